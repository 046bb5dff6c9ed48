"""Download tests against a local HTTP server on 127.0.0.1 (never the real mirrors); a newly registered
dataset loading by name (from local files or its own mirror) and being listed."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import pickle
import struct
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from lmclab.data import DATASET_NAMES, DataError, DeviceDataset, load_split, registry
from lmclab.data.registry import DatasetEntry, IdxSource, register_dataset


class Server:
    """A static file server for ``root`` that counts requests per path."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Local mirror serving tmp_path/www; the cache and mirror env vars point at it; real mirrors removed."""
    www = tmp_path / "www"
    www.mkdir()
    srv = Server(www)
    monkeypatch.delenv("LMCLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("LMCLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LMCLAB_DATASET_MIRROR", srv.url + "/")
    for name in list(registry.DATASETS):
        patch_source(monkeypatch, name, mirrors=())
    yield srv
    srv.close()


def patch_source(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> None:
    """Replace fields of dataset ``name``'s source for one test; a dict is merged into the field's mapping."""
    entry = registry.DATASETS[name]
    changes = {k: {**getattr(entry.source, k), **v} if isinstance(v, dict) else v for k, v in changes.items()}
    source = dataclasses.replace(entry.source, **changes)  # type: ignore[arg-type]
    monkeypatch.setitem(registry.DATASETS, name, dataclasses.replace(entry, source=source))


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def serve_mnist(www: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """Tiny official-format gzipped IDX files in ``www``; the dataset's gz md5s are patched to their digests."""
    rng = np.random.default_rng(1)
    arrays = {}
    gz_md5 = {}
    for split, n in (("train", 20), ("test", 8)):
        images_name, labels_name = registry.MNIST_FILES[split]
        arrays[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n, dtype=np.uint8) % 10
        for fname, array in ((images_name, arrays[split]), (labels_name, arrays[f"{split}_labels"])):
            payload = gzip.compress(idx_bytes(array))
            (www / f"{fname}.gz").write_bytes(payload)
            gz_md5[f"{fname}.gz"] = hashlib.md5(payload).hexdigest()
    patch_source(monkeypatch, name, gz_md5=gz_md5)
    return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_download_once(name: str, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = serve_mnist(server.root, name, monkeypatch)
    x, y, info = load_split(name, "train", data_dir=tmp_path / "empty", progress=False)
    assert x.shape == (20, 1, 28, 28) and torch.equal(x[:, 0], torch.from_numpy(ref["train"]))
    assert y.tolist() == ref["train_labels"].tolist()
    raw = tmp_path / "cache" / "data" / registry.DATASETS[name].source.folder / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert info.source == str(raw)
    assert len(server.requests) == 2
    x2, _, _ = load_split(name, "train", progress=False)
    assert torch.equal(x, x2) and len(server.requests) == 2  # second load: no HTTP at all
    test = DeviceDataset.load(name, "test", progress=True)  # progress bar enabled works too
    assert len(test) == 8 and len(server.requests) == 4


def test_corrupt_download_is_rejected(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_mnist(server.root, "mnist", monkeypatch)
    served = server.root / "t10k-images-idx3-ubyte.gz"
    served.write_bytes(b"these are not the bytes you are looking for")
    expected = registry.DATASETS["mnist"].source.gz_md5["t10k-images-idx3-ubyte.gz"]  # type: ignore[union-attr]
    with pytest.raises(DataError) as err:
        load_split("mnist", "test", download=True, progress=False)
    msg = str(err.value)
    assert f"{server.url}/t10k-images-idx3-ubyte.gz" in msg
    assert expected in msg and hashlib.md5(served.read_bytes()).hexdigest() in msg
    raw = tmp_path / "cache" / "data" / "MNIST" / "raw"
    assert [p.name for p in raw.iterdir()] == ["t10k-labels-idx1-ubyte.gz"]  # nothing corrupt, no temp files


def test_mirrors_are_tried_in_order(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = serve_mnist(server.root, "mnist", monkeypatch)
    (server.root / "good").mkdir()
    for p in server.root.glob("*.gz"):
        p.rename(server.root / "good" / p.name)
    patch_source(monkeypatch, "mnist", mirrors=(server.url + "/missing/", server.url + "/good/"))
    _, y, _ = load_split("mnist", "test", progress=False)
    assert y.tolist() == ref["test_labels"].tolist()
    # $LMCLAB_DATASET_MIRROR first, then the table's mirrors in order, for each file
    assert server.requests == [
        "/t10k-images-idx3-ubyte.gz",
        "/missing/t10k-images-idx3-ubyte.gz",
        "/good/t10k-images-idx3-ubyte.gz",
        "/t10k-labels-idx1-ubyte.gz",
        "/missing/t10k-labels-idx1-ubyte.gz",
        "/good/t10k-labels-idx1-ubyte.gz",
    ]


def test_all_mirrors_failing(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    patch_source(monkeypatch, "cifar100", mirrors=(server.url + "/elsewhere/",))
    with pytest.raises(DataError) as err:
        load_split("cifar100", "test", progress=False)
    msg = str(err.value)
    assert f"{server.url}/cifar-100-python.tar.gz" in msg and f"{server.url}/elsewhere/cifar-100-python.tar.gz" in msg
    assert "404" in msg and "No usable copy" in msg


def cifar10_tarball(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """A tiny cifar-10-python.tar.gz in the official format; md5 tables patched to match."""
    rng = np.random.default_rng(2)
    out = {}
    md5 = {}
    with tarfile.open(path, "w:gz") as tf:
        for f in registry.DATASETS["cifar10"].source.md5:  # type: ignore[union-attr]
            data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, 2)]
            payload = pickle.dumps({b"batch_label": b"tiny", b"labels": labels, b"data": data})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{f}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
            md5[f] = hashlib.md5(payload).hexdigest()
            out[f] = data
    patch_source(monkeypatch, "cifar10", md5=md5, tarball_md5=hashlib.md5(path.read_bytes()).hexdigest())
    return out


def test_cifar_tarball_download(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = cifar10_tarball(server.root / "cifar-10-python.tar.gz", monkeypatch)
    x, y, info = load_split("cifar10", "train", progress=False)
    assert x.shape == (10, 3, 32, 32) and x[2, 1, 3, 4].item() == ref["data_batch_2"][0, 1024 + 3 * 32 + 4]
    data = tmp_path / "cache" / "data"
    assert (data / "cifar-10-python.tar.gz").is_file() and (data / "cifar-10-batches-py" / "test_batch").is_file()
    assert server.requests == ["/cifar-10-python.tar.gz"]
    xt, _, _ = load_split("cifar10", "test", progress=False)
    assert xt.shape == (2, 3, 32, 32) and len(server.requests) == 1  # found in the cache, no second download
    assert info.classes[0] == "airplane"


# ---------------------------------------------------------------- registering a dataset


def mnist_like(name: str, folder: str, **source: object) -> DatasetEntry:
    """An IDX-format dataset with MNIST's info and file names under a new name and folder."""
    info = dataclasses.replace(registry.DATASETS["mnist"].info, name=name)
    return DatasetEntry(name, info, IdxSource(folder, registry.MNIST_FILES, **source))  # type: ignore[arg-type]


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Datasets registered by the test are dropped afterwards: it registers into a copy of the registry, which
    monkeypatch puts back (after undoing the test's other changes, also made to the copy)."""
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))


def test_registered_idx_dataset_loads_by_name_and_is_listed(
    shared_data: Path, tmp_path: Path, registered: None, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmclab.cli import main

    monkeypatch.setenv("LMCLAB_CACHE_DIR", str(tmp_path / "cache"))
    mnist = registry.DATASETS["mnist"].source
    assert isinstance(mnist, IdxSource)
    register_dataset(mnist_like("mnist_copy", "MNIST", sha256=mnist.sha256))  # the real MNIST files, a new name
    assert DATASET_NAMES[-1] == "mnist_copy" and "mnist_copy" in DATASET_NAMES
    assert DATASET_NAMES == ("mnist", "fashion_mnist", "cifar10", "cifar100", "mnist_copy")
    assert main(["datasets", "--json"]) == 0
    assert "mnist_copy" in json.loads(capsys.readouterr().out)
    x, y, info = load_split("MNIST-copy", "test", data_dir=shared_data, download=False, progress=False)
    assert info.name == "mnist_copy" and info.source == str((shared_data / "MNIST" / "raw").absolute())
    xm, ym, _ = load_split("mnist", "test", data_dir=shared_data, download=False, progress=False)
    assert torch.equal(x, xm) and torch.equal(y, ym)
    # the entry's own checksums are verified
    patch_source(monkeypatch, "mnist_copy", sha256={"t10k-labels-idx1-ubyte": "0" * 64})
    with pytest.raises(DataError, match="checksum mismatch") as err, pytest.warns(UserWarning):
        load_split("mnist_copy", "test", data_dir=shared_data, download=False, progress=False)
    assert "No usable copy of mnist_copy (test split)" in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(mnist_like("mnist_copy", "Elsewhere"))
    for bad in ("Mnist_Copy2", "with-dash", "imagefolder:x", ""):
        with pytest.raises(ValueError, match="lower case"):
            register_dataset(mnist_like(bad, "MNIST"))
    with pytest.raises(ValueError, match="info is named"):
        register_dataset(DatasetEntry("other", registry.DATASETS["mnist"].info, mnist))
    with pytest.raises(ValueError, match="no files for split"):
        IdxSource("MNIST", {"train": registry.MNIST_FILES["train"]})
    assert "other" not in DATASET_NAMES and len(DATASET_NAMES) == 5


def test_registered_idx_dataset_downloads_from_its_mirrors(
    server: Server, tmp_path: Path, registered: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_dataset(mnist_like("digits", "Digits", mirrors=(server.url + "/digits/",)))
    (server.root / "digits").mkdir()
    ref = serve_mnist(server.root / "digits", "digits", monkeypatch)
    monkeypatch.delenv("LMCLAB_DATASET_MIRROR")
    _, y, info = load_split("digits", "test", data_dir=tmp_path / "empty", progress=False)
    assert y.tolist() == ref["test_labels"].tolist()
    assert server.requests == ["/digits/t10k-images-idx3-ubyte.gz", "/digits/t10k-labels-idx1-ubyte.gz"]
    assert info.source == str(tmp_path / "cache" / "data" / "Digits" / "raw")


def test_unregistered_dataset_is_unknown() -> None:
    assert "mnist_copy" not in DATASET_NAMES and "digits" not in DATASET_NAMES
    with pytest.raises(DataError, match="unknown dataset 'digits'"):
        load_split("digits", "test", download=False, progress=False)
