"""Tests for lmclab.data: real MNIST-family files, errors, subsets, DeviceDataset, image folders, CIFAR pickles."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import lmclab.data as data
from lmclab.data import (
    DATASET_NAMES,
    DataError,
    DatasetInfo,
    DeviceDataset,
    cache_dir,
    default_data_dirs,
    load_split,
    per_class_subset,
    readers,
    registry,
    stratified_subset,
)

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No user data dirs, a private cache, and no network mirrors for every test."""
    monkeypatch.delenv("LMCLAB_DATA_DIR", raising=False)
    monkeypatch.delenv("LMCLAB_DATASET_MIRROR", raising=False)
    monkeypatch.setenv("LMCLAB_CACHE_DIR", str(tmp_path / "cache"))
    for name in list(registry.DATASETS):
        patch_source(monkeypatch, name, mirrors=())
    return tmp_path / "cache"


def patch_source(monkeypatch: pytest.MonkeyPatch, name: str, **changes: object) -> None:
    """Replace fields of dataset ``name``'s source for one test; a dict is merged into the field's mapping."""
    entry = registry.DATASETS[name]
    changes = {k: {**getattr(entry.source, k), **v} if isinstance(v, dict) else v for k, v in changes.items()}
    source = dataclasses.replace(entry.source, **changes)  # type: ignore[arg-type]
    monkeypatch.setitem(registry.DATASETS, name, dataclasses.replace(entry, source=source))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- real MNIST family


def test_mnist_real(shared_data: Path) -> None:
    x, y, info = load_split("mnist", "train", data_dir=shared_data, download=False, progress=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.dtype == torch.int64 and y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10 and not info.augment_default
    assert info.mean == (0.1307,) and info.std == (0.3081,)
    assert info.source == str((shared_data / "MNIST" / "raw").absolute())
    xt, yt, _ = load_split("mnist", "test", data_dir=shared_data, download=False, progress=False)
    assert xt.shape == (10000, 1, 28, 28) and xt.dtype == torch.uint8 and yt.shape == (10000,)


def test_fashion_mnist_real(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCLAB_DATA_DIR", str(shared_data))  # found through the environment variable
    x, y, info = load_split("fashion_mnist", "train", download=False, progress=False)
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert torch.bincount(y).tolist() == [6000] * 10
    assert x.shape == (60000, 1, 28, 28) and info.classes[0] == "T-shirt/top"
    assert info.mean == (0.2860,) and info.std == (0.3530,)


def test_name_is_normalised(shared_data: Path) -> None:
    _, y, info = load_split("Fashion-MNIST", "test", data_dir=shared_data, download=False, progress=False)
    assert info.name == "fashion_mnist" and y.shape == (10000,)


# ---------------------------------------------------------------- errors


def test_default_data_dirs_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setenv("LMCLAB_DATA_DIR", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    assert default_data_dirs(tmp_path / "x") == [tmp_path / "x", tmp_path / "a", tmp_path / "b", isolated / "data"]
    assert default_data_dirs() == [tmp_path / "a", tmp_path / "b", isolated / "data"]
    assert cache_dir() == isolated


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_missing_data_lists_every_place(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for env_dir in ("env1", "env2"):
        (tmp_path / env_dir).mkdir()
    monkeypatch.setenv("LMCLAB_DATA_DIR", os.pathsep.join([str(tmp_path / "env1"), str(tmp_path / "env2")]))
    with pytest.raises(DataError) as err:
        load_split(name, "train", data_dir=empty, download=False, progress=False)
    msg = str(err.value)
    dirs = default_data_dirs(empty)
    assert len(dirs) == 4
    src = registry.DATASETS[name].source
    for d in dirs:
        if isinstance(src, registry.IdxSource):
            for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
                raw = d / src.folder / "raw"
                assert str(raw / f) in msg and str(raw / f"{f}.gz") in msg
        else:
            assert str(d / src.folder) in msg
            assert str(d / src.tarball) in msg
            if name == "cifar10":
                assert str(d / "cifar10-jpeg.zip") in msg
    assert "--data-dir" in msg and "LMCLAB_DATA_DIR" in msg and "download" in msg and "layout" in msg


def _copy_mnist(shared_data: Path, dest: Path, files: tuple[str, ...]) -> Path:
    raw = dest / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in files:
        shutil.copyfile(shared_data / "MNIST" / "raw" / f, raw / f)
    return raw


def test_corrupt_file_is_named_and_not_used(shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _copy_mnist(shared_data, tmp_path / "bad", MNIST_FILES[2:])
    bad = raw / "t10k-images-idx3-ubyte"
    content = bytearray(bad.read_bytes())
    content[5000] ^= 0xFF
    bad.write_bytes(bytes(content))
    with pytest.raises(DataError) as err, pytest.warns(UserWarning, match="checksum"):
        load_split("mnist", "test", data_dir=tmp_path / "bad", download=False, progress=False)
    msg = str(err.value)
    assert str(bad) in msg and "NOT used" in msg
    assert registry.DATASETS["mnist"].source.sha256["t10k-images-idx3-ubyte"] in msg  # type: ignore[union-attr]
    assert hashlib.sha256(bytes(content)).hexdigest() in msg
    # a valid copy later in the search order is used instead (with a warning about the bad one)
    monkeypatch.setenv("LMCLAB_DATA_DIR", str(shared_data))
    with pytest.warns(UserWarning, match="t10k-images"):
        x, _, info = load_split("mnist", "test", data_dir=tmp_path / "bad", download=False, progress=False)
    assert info.source == str((shared_data / "MNIST" / "raw").absolute()) and x.shape[0] == 10000


def test_truncated_file_is_detected(shared_data: Path, tmp_path: Path) -> None:
    raw = _copy_mnist(shared_data, tmp_path, MNIST_FILES[2:])
    short = raw / "t10k-labels-idx1-ubyte"
    short.write_bytes(short.read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated") as err, pytest.warns(UserWarning):
        load_split("mnist", "test", data_dir=tmp_path, download=False, progress=False)
    assert str(short) in str(err.value)


def test_idx_parser_errors() -> None:
    with pytest.raises(DataError, match="magic"):
        readers.parse_idx(b"\x01\x02\x08\x01", "f")
    with pytest.raises(DataError, match="disagrees"):
        readers.parse_idx(b"\x00\x00\x08\x01\x00\x00\x00\x02abc", "f")
    assert readers.parse_idx(b"\x00\x00\x08\x02\x00\x00\x00\x01\x00\x00\x00\x02\x07\x09", "f").tolist() == [[7, 9]]


def test_unknown_name_and_split() -> None:
    with pytest.raises(DataError) as err:
        load_split("imagenet", "train")
    for n in DATASET_NAMES:
        assert n in str(err.value)
    assert "imagefolder:<path>" in str(err.value)
    with pytest.raises(DataError, match="train, test"):
        load_split("mnist", "validation")
    with pytest.raises(DataError, match="needs a path"):
        load_split("imagefolder:", "train")


# ---------------------------------------------------------------- subsets


def _labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def test_stratified_subset_proportions_and_first_of_class() -> None:
    y = _labels([50, 30, 20])
    idx = stratified_subset(y, 10)
    assert torch.equal(idx, idx.sort().values) and idx.dtype == torch.int64
    assert torch.bincount(y[idx], minlength=3).tolist() == [5, 3, 2]
    for c, k in enumerate([5, 3, 2]):
        first = (y == c).nonzero().flatten()[:k]
        assert set(first.tolist()) <= set(idx.tolist())
    assert torch.equal(idx, stratified_subset(y.clone(), 10))
    # largest remainder: 3 classes of 3, n=4 -> exact 4/3 each; remainders tie, lowest class gets the extra
    y3 = torch.tensor([2, 1, 0, 0, 1, 2, 2, 1, 0])
    assert torch.bincount(y3[stratified_subset(y3, 4)]).tolist() == [2, 1, 1]
    assert stratified_subset(y3, 4).tolist() == [0, 1, 2, 3]  # class 0 at 2, 3; class 1 at 1; class 2 at 0
    # remainders 3.2 / 1.8 -> 3 / 2 (not floor 3 / 1)
    y2 = _labels([16, 9])
    assert torch.bincount(y2[stratified_subset(y2, 5)]).tolist() == [3, 2]
    assert stratified_subset(y, 100).tolist() == list(range(100))
    assert stratified_subset(y, 0).numel() == 0
    with pytest.raises(DataError):
        stratified_subset(y, 101)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.data())
def test_stratified_subset_property(counts: list[int], draw: st.DataObject) -> None:
    y = _labels(counts)
    n = draw.draw(st.integers(0, len(y)))
    idx = stratified_subset(y, n)
    got = torch.bincount(y[idx], minlength=len(counts))
    assert idx.numel() == n == int(got.sum()) and len(set(idx.tolist())) == n
    for c, total in enumerate(counts):
        assert abs(got[c].item() - n * total / len(y)) < 1
        assert torch.equal(idx[y[idx] == c], (y == c).nonzero().flatten()[: got[c]])


def test_per_class_subset() -> None:
    y = _labels([5, 3, 4])
    idx = per_class_subset(y, 3)
    assert torch.equal(idx, idx.sort().values)
    assert torch.bincount(y[idx]).tolist() == [3, 3, 3]
    for c in range(3):
        assert torch.equal(idx[y[idx] == c], (y == c).nonzero().flatten()[:3])
    with pytest.raises(DataError, match="class 1: 3"):
        per_class_subset(y, 4)
    with pytest.raises(DataError):
        stratified_subset(torch.zeros(3, 2, dtype=torch.long), 1)


# ---------------------------------------------------------------- DeviceDataset


def _info(channels: int = 3) -> DatasetInfo:
    return DatasetInfo(
        "toy",
        4,
        (channels, 6, 5),
        (0.5, 0.25, 0.125)[:channels],
        (0.2, 0.4, 0.8)[:channels],
        True,
        ("a", "b", "c", "d"),
        "memory",
    )


def _toy(n: int = 10, augment: bool = True) -> DeviceDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (n, 3, 6, 5), generator=g, dtype=torch.uint8)
    return DeviceDataset(images, torch.arange(n) % 4, _info(), augment)


def test_normalize_matches_hand_computation() -> None:
    ds = _toy()
    x = ds.normalize(ds.images[:2])
    assert x.dtype == torch.float32 and x.shape == (2, 3, 6, 5)
    v = ds.images[1, 2, 3, 4].item()
    assert x[1, 2, 3, 4].item() == pytest.approx((v / 255 - 0.125) / 0.8, abs=1e-6)
    v = ds.images[0, 0, 0, 0].item()
    assert x[0, 0, 0, 0].item() == pytest.approx((v / 255 - 0.5) / 0.2, abs=1e-6)
    xb, yb = ds.batch(torch.tensor([1, 0]))  # no generator -> no augmentation
    assert torch.equal(xb, ds.normalize(ds.images[[1, 0]])) and yb.tolist() == [1, 0]


def _find_crop(original: torch.Tensor, out: torch.Tensor) -> list[tuple[int, int, bool]]:
    padded = F.pad(original, (4, 4, 4, 4))
    h, w = original.shape[-2:]
    hits = []
    for dy in range(9):
        for dx in range(9):
            crop = padded[:, dy : dy + h, dx : dx + w]
            for flip in (False, True):
                if torch.equal(crop.flip(-1) if flip else crop, out):
                    hits.append((dy, dx, flip))
    return hits


def test_augmentation_is_deterministic_genuine_crop_and_flip() -> None:
    ds = _toy(64)
    idx = torch.arange(64)
    a = ds.random_crop_flip(ds.images, torch.Generator().manual_seed(1))
    b = ds.random_crop_flip(ds.images, torch.Generator().manual_seed(1))
    c = ds.random_crop_flip(ds.images, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.uint8
    xa, _ = ds.batch(idx, torch.Generator().manual_seed(1))
    assert torch.equal(xa, ds.normalize(a))
    params = []
    for i in range(64):
        hits = _find_crop(ds.images[i], a[i])
        assert hits, f"sample {i} is not a crop of the zero-padded image"
        params.append(hits[0])
    assert len({p[:2] for p in params}) > 5 and {p[2] for p in params} == {False, True}
    assert any(p[:2] != (4, 4) for p in params)  # genuine shifts with black borders occur


def test_augmentation_off_without_generator_or_flag() -> None:
    ds = _toy(8, augment=False)
    x, _ = ds.batch(torch.arange(8), torch.Generator().manual_seed(0))
    assert torch.equal(x, ds.normalize(ds.images))


def test_generator_on_wrong_device_is_refused() -> None:
    ds = _toy()
    fake = SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(DataError, match="generator"):
        ds.batch(torch.arange(2), fake)  # type: ignore[arg-type]


def test_batches_cover_everything_once() -> None:
    ds = _toy(10)
    sizes, xs, ys = [], [], []
    for x, y in ds.batches(4):
        sizes.append(len(y))
        xs.append(x)
        ys.append(y)
    assert sizes == [4, 4, 2]
    assert torch.equal(torch.cat(ys), ds.labels) and torch.equal(torch.cat(xs), ds.normalize(ds.images))


def test_device_dataset_load_real(shared_data: Path) -> None:
    train = DeviceDataset.load("mnist", "train", data_dir=shared_data, subset=1000, download=False, progress=False)
    assert len(train) == 1000 and train.augment is False and train.images.device.type == "cpu"
    counts = torch.bincount(train.labels, minlength=10)
    assert int(counts.sum()) == 1000 and int(counts.min()) > 80
    test = DeviceDataset.load("mnist", "test", data_dir=shared_data, per_class=7, download=False, progress=False)
    assert torch.bincount(test.labels).tolist() == [7] * 10
    with pytest.raises(DataError, match="mutually exclusive"):
        DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=5, per_class=1, download=False)


# ---------------------------------------------------------------- image folders

COLOURS = {"cat": (200, 10, 10), "ant": (10, 200, 10), "bee": (10, 10, 200)}


def _png(
    path: Path, size: tuple[int, int] = (8, 8), colour: tuple[int, ...] | int = (0, 0, 0), mode: str = "RGB"
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def _make_tree(root: Path, mode: str = "RGB") -> Path:
    for split, n in (("train", 3), ("test", 1)):
        for cls, colour in COLOURS.items():
            for i in range(n):
                c = colour if mode == "RGB" else colour[0]
                _png(root / split / cls / f"{i:03d}.png", colour=c, mode=mode)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root


def _zip_tree(root: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(root.rglob("*")):
            zf.write(p, p.relative_to(root).as_posix())
    return dest


def test_imagefolder_dir_and_zip(tmp_path: Path, isolated: Path) -> None:
    tree = _make_tree(tmp_path / "tree")
    archive = _zip_tree(tree, tmp_path / "tree.zip")
    for source in (tree, archive):
        x, y, info = load_split(f"imagefolder:{source}", "train", progress=False)
        assert info.classes == ("ant", "bee", "cat") and info.num_classes == 3
        assert x.shape == (9, 3, 8, 8) and x.dtype == torch.uint8 and info.input_shape == (3, 8, 8)
        assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        for img, label in zip(x, y):
            assert img[:, 3, 3].tolist() == list(COLOURS[info.classes[label]])
        expected_mean = [np.mean([c[k] for c in COLOURS.values()]) / 255 for k in range(3)]
        assert info.mean == pytest.approx(expected_mean)
        assert info.augment_default and info.source == str(source)
        xt, yt, info_t = load_split(f"imagefolder:{source}", "test", progress=False)
        assert xt.shape == (3, 3, 8, 8) and yt.tolist() == [0, 1, 2] and info_t.mean == info.mean
    # one decoded cache per split: a directory and a zip of one tree have one content fingerprint
    assert len(list((isolated / "decoded").glob("*.safetensors"))) == 2


def test_imagefolder_greyscale_and_enclosing_folder(tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "pack" / "grey", mode="L")
    archive = _zip_tree(tmp_path / "pack", tmp_path / "grey.zip")  # entries are grey/train/...
    x, y, info = load_split(f"imagefolder:{archive}", "train", progress=False)
    assert x.shape == (9, 1, 8, 8) and not info.augment_default and len(info.mean) == 1
    assert x[0, 0, 0, 0].item() == COLOURS["ant"][0]
    assert torch.equal(x, load_split(f"imagefolder:{tree}", "train", progress=False)[0])


def test_imagefolder_decoded_cache_is_reused(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _make_tree(tmp_path / "tree")
    x1, y1, _ = load_split(f"imagefolder:{tree}", "test", progress=False)
    cached = sorted((isolated / "decoded").glob("*.safetensors"))
    assert len(cached) == 2  # test split + train split (for the normalisation statistics)

    def no_decoding(data: bytes, where: str) -> np.ndarray:
        raise AssertionError(f"decoded {where} although the cache was valid")

    monkeypatch.setattr(readers, "decode_image", no_decoding)
    x2, y2, _ = load_split(f"imagefolder:{tree}", "test", progress=False)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    _png(tree / "test" / "ant" / "999.png", colour=COLOURS["ant"])  # content changed -> new key -> decodes
    with pytest.raises(AssertionError, match="although the cache"):
        load_split(f"imagefolder:{tree}", "test", progress=False)


def test_imagefolder_bad_inputs(tmp_path: Path) -> None:
    tree = _make_tree(tmp_path / "tree")
    odd = tree / "train" / "bee" / "zzz.png"
    _png(odd, size=(9, 8))
    with pytest.raises(DataError, match="same size") as err:
        load_split(f"imagefolder:{tree}", "train", progress=False)
    assert str(odd) in str(err.value)
    odd.write_bytes(b"definitely not a png")
    with pytest.raises(DataError, match="cannot decode") as err:
        load_split(f"imagefolder:{tree}", "train", progress=False)
    assert str(odd) in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        load_split(f"imagefolder:{tmp_path / 'nope'}", "train", progress=False)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_split(f"imagefolder:{tmp_path / 'empty'}", "train", progress=False)


def test_real_cifar10_jpeg_zip_test_split(shared_data: Path) -> None:
    x, y, info = load_split("cifar10", "test", data_dir=shared_data, download=False, progress=False)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y).tolist() == [1000] * 10
    assert info.classes == registry.CIFAR10_CLASSES and "JPEG-recompressed" in info.source
    assert info.mean == (0.4914, 0.4822, 0.4465) and info.augment_default
    # JPEG-recompressed CIFAR-10 has statistics close to the official constants
    mean = x.double().div(255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(info.mean, dtype=torch.float64), atol=0.01)


# ---------------------------------------------------------------- official CIFAR pickles (tiny, generated)


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), as in the official (Python 2 cPickle) CIFAR files."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], label_key: bytes, style: str) -> None:
    """One batch file: ``py2`` (official: Python 2 strings, numpy.core names), ``py3-2`` (protocol 2 from
    Python 3, bytes via _codecs.encode) or ``py3`` (protocol 4)."""
    entry = {b"batch_label": b"tiny", label_key: labels, b"data": data, b"filenames": [b"x.png"] * len(labels)}
    if label_key == b"fine_labels":
        entry[b"coarse_labels"] = [0] * len(labels)
    if style == "py2":
        buf = io.BytesIO()
        Py2Pickler(buf, protocol=2).dump(entry)
        payload = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    else:
        payload = pickle.dumps(entry, protocol=2 if style == "py3-2" else 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)


def make_cifar(root: Path, name: str, monkeypatch: pytest.MonkeyPatch, rows: int = 3) -> dict[str, np.ndarray]:
    """Official-format batches under root/<folder>; md5 tables patched to match. Returns images per split."""
    src = registry.DATASETS[name].source
    assert isinstance(src, registry.CifarSource)
    folder = root / src.folder
    rng = np.random.default_rng(0)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    classes = 10 if name == "cifar10" else 100
    out: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, files in src.files.items():
        for i, f in enumerate(files):
            data = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, classes, rows)]
            write_cifar_batch(folder / f, data, labels, key, ("py2", "py3-2", "py3")[i % 3])
            out[split].append(data)
            out.setdefault(f"{split}_labels", []).append(np.array(labels))
    patch_source(monkeypatch, name, md5={f: md5(folder / f) for files in src.files.values() for f in files})
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_official_format(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = make_cifar(tmp_path, name, monkeypatch)
    x, y, info = load_split(name, "train", data_dir=tmp_path, download=False, progress=False)
    src = registry.DATASETS[name].source
    assert isinstance(src, registry.CifarSource)
    n_train = len(src.files["train"]) * 3
    assert x.shape == (n_train, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.tolist() == ref["train_labels"].tolist() and info.num_classes == (10 if name == "cifar10" else 100)
    # row-major RGB planes: byte c*1024 + h*32 + w of row i is pixel (c, h, w)
    for i, c, h, w in [(0, 0, 0, 0), (n_train // 2, 2, 5, 7), (n_train - 1, 1, 31, 30)]:
        assert x[i, c, h, w].item() == ref["train"][i, c * 1024 + h * 32 + w]
    assert info.source == str(tmp_path.absolute() / src.folder)
    test = DeviceDataset.load(name, "test", data_dir=tmp_path, download=False, progress=False)
    train = DeviceDataset.load(name, "train", data_dir=tmp_path, download=False, progress=False)
    assert len(test) == 3 and not test.augment and train.augment
    assert torch.equal(test.images, torch.from_numpy(ref["test"].reshape(-1, 3, 32, 32)))


def test_cifar_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path, "cifar100", monkeypatch)
    patch_source(monkeypatch, "cifar100", md5={"test": "0" * 32})
    with pytest.raises(DataError, match="md5 checksum mismatch") as err, pytest.warns(UserWarning):
        load_split("cifar100", "test", data_dir=tmp_path, download=False, progress=False)
    assert str(tmp_path.absolute() / "cifar-100-python" / "test") in str(err.value)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path, "cifar10", monkeypatch)
    marker = tmp_path / "pwned"
    evil = tmp_path / "cifar-10-batches-py" / "test_batch"
    evil.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    patch_source(monkeypatch, "cifar10", md5={"test_batch": md5(evil)})
    with pytest.raises(DataError, match="refusing to unpickle") as err, pytest.warns(UserWarning):
        load_split("cifar10", "test", data_dir=tmp_path, download=False, progress=False)
    assert "system" in str(err.value) and str(evil) in str(err.value)
    assert not marker.exists()
    with pytest.raises(DataError, match="refusing"):
        readers.RestrictedUnpickler(io.BytesIO(pickle.dumps(print))).load()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            tf.addfile(ti, io.BytesIO(payload))
    return path


def test_cifar_tarball_is_extracted_safely(tmp_path: Path, isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    ref = make_cifar(src, "cifar10", monkeypatch)
    members = {
        f"cifar-10-batches-py/{f}": (src / "cifar-10-batches-py" / f).read_bytes()
        for files in registry.DATASETS["cifar10"].source.files.values()
        for f in files
    }
    data_dir = tmp_path / "dl"
    data_dir.mkdir()
    tarball = _tar(data_dir / "cifar-10-python.tar.gz", members)
    patch_source(monkeypatch, "cifar10", tarball_md5=md5(tarball))
    x, y, _ = load_split("cifar10", "test", data_dir=data_dir, download=False, progress=False)
    assert torch.equal(x, torch.from_numpy(ref["test"].reshape(-1, 3, 32, 32)))
    assert (isolated / "data" / "cifar-10-batches-py" / "test_batch").is_file()
    # a tarball with a path-traversal member is refused and writes nothing outside the cache
    evil = _tar(data_dir / "cifar-10-python.tar.gz", {**members, "../escaped": b"x"})
    patch_source(monkeypatch, "cifar10", tarball_md5=md5(evil))
    shutil.rmtree(isolated / "data")
    with pytest.raises(DataError, match="unsafe member") as err, pytest.warns(UserWarning):
        load_split("cifar10", "train", data_dir=data_dir, download=False, progress=False)
    assert str(evil) in str(err.value)
    assert not (isolated / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_public_api_exports() -> None:
    assert set(data.__all__) >= {
        "DATASET_NAMES",
        "DataError",
        "DatasetInfo",
        "DeviceDataset",
        "cache_dir",
        "default_data_dirs",
        "load_split",
        "per_class_subset",
        "stratified_subset",
    }
    assert DATASET_NAMES == ("mnist", "fashion_mnist", "cifar10", "cifar100") == tuple(registry.DATASETS)
    assert DATASET_NAMES[0] == "mnist" and DATASET_NAMES[-2:] == ("cifar10", "cifar100") and "mnist" in DATASET_NAMES
    assert list(registry.STATIC_INFO) == list(DATASET_NAMES)
    assert registry.STATIC_INFO["cifar10"] is registry.DATASETS["cifar10"].info
    assert issubclass(DataError, Exception)
