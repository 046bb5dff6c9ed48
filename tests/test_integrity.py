"""Integrity of what the store writes: checksums recorded at write time and verified on every read (flipped
bytes inside a tensor's data, header intact, are an error naming the file, never a NaN); file modes that
honour the umask; writes that never follow a symbolic link out of the store."""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lmclab.cli import main
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.data import DeviceDataset, load_split, readers
from lmclab.experiments.graph import LocalExecutor, Step, step_kind
from lmclab.permutation import Permutation
from lmclab.store import (
    CheckpointError,
    IntegrityError,
    Run,
    RunStore,
    Store,
    UnsafePathError,
    UnverifiedFileWarning,
    atomic_write,
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
)
from lmclab.training import RunOptions, TrainingState, train

TINY = RunConfig(
    data=DataConfig("mnist", train_per_class=10),
    model=ModelConfig("mlp", hidden=(16,)),
    train=TrainConfig(optimizer="adam", lr=1e-3, batch_size=50, epochs=2),
    seeds=SeedConfig(1, 2, 3),
)


def flip_tensor_bytes(path: Path, prefix: str, count: int = 3) -> str:
    """XOR `count` bytes in the middle of the data of the first tensor whose name starts with `prefix`; the
    safetensors header (names, dtypes, shapes, offsets, metadata) is left byte for byte as it was."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header_bytes = bytes(raw[: 8 + n])
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in sorted(header) if k != "__metadata__" and k.startswith(prefix))
    begin, end = header[name]["data_offsets"]
    assert end - begin >= count, f"{name} is too small to damage"
    start = 8 + n + begin + (end - begin - count) // 2
    for i in range(start, start + count):
        raw[i] ^= 0xA5
    path.write_bytes(bytes(raw))
    assert path.read_bytes()[: 8 + n] == header_bytes
    return name


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Run:
    """One tiny MNIST run (2 epochs of 2 steps, Adam: the optimizer state holds tensors)."""
    root = tmp_path_factory.mktemp("store")
    options = RunOptions(runs_dir=str(root), data_dir=str(shared_data), device="cpu", progress=False, download=False)
    return train(TINY, options)


@pytest.fixture
def run_copy(trained: Run, tmp_path: Path) -> Run:
    """A copy of the trained run's store for one test to damage."""
    root = tmp_path / "store"
    shutil.copytree(trained.path.parent, root)
    return Run(root / trained.path.name)


# ---------------------------------------------------------------- checkpoints


def test_a_checkpoint_records_and_verifies_checksums(trained: Run) -> None:
    final = trained.final_checkpoint()
    assert final is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedFileWarning)  # written now: verified, no legacy warning
        tensors, header = load_checkpoint(final)
    assert header["step"] == 4 and {"rng.data", "rng.augment", "train.epoch_sums"} <= set(tensors)
    assert any(k.startswith("optim.") and k.endswith("exp_avg") for k in tensors)


@pytest.mark.parametrize(
    ("prefix", "part"),
    [
        ("model.", "model"),
        ("optim.", "optimizer state"),
        ("rng.data", "generator state"),
        ("rng.augment", "generator state"),
        ("train.epoch_sums", "training sums"),
    ],
)
def test_flipped_bytes_in_each_part_of_a_checkpoint_are_named(
    run_copy: Run, shared_data: Path, prefix: str, part: str
) -> None:
    final = run_copy.final_checkpoint()
    assert final is not None
    name = flip_tensor_bytes(final, prefix)
    with pytest.raises(IntegrityError) as err:
        load_checkpoint(final)
    message = str(err.value)
    assert str(final) in message and f"{part} ({name}" in message and "\n" not in message
    assert err.value.path == final and err.value.what == [name]
    assert isinstance(err.value, CheckpointError)  # what the command line reports in one line
    with pytest.raises(IntegrityError, match="step_00000004"):  # every reader of the run goes through it
        run_copy.load_state()
    info = DeviceDataset.load("mnist", "test", subset=10, data_dir=shared_data, download=False, progress=False).info
    with pytest.raises(IntegrityError):  # resuming from it, too
        TrainingState.from_checkpoint(TINY, info, torch.device("cpu"), final)


def test_an_edited_checkpoint_header_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"model.w": torch.ones(3)}, {"step": 7})
    raw = path.read_bytes()
    assert raw.count(b'\\"step\\": 7') == 1
    path.write_bytes(raw.replace(b'\\"step\\": 7', b'\\"step\\": 8'))  # same length: a valid file
    with pytest.raises(IntegrityError, match=r"c\.safetensors is corrupt: its header \(lmclab\)"):
        load_checkpoint(path)


def test_a_checkpoint_written_before_checksums_is_read_unverified_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "legacy.safetensors"
    save_file({"model.w": torch.arange(4.0)}, str(path), metadata={"lmclab": json.dumps({"format": 1, "step": 3})})
    with pytest.warns(UnverifiedFileWarning, match="legacy.safetensors was written before lmclab recorded checksums"):
        tensors, header = load_checkpoint(path)
    assert header["step"] == 3 and torch.equal(tensors["model.w"], torch.arange(4.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(path)  # once per file and process


def test_eval_of_a_run_with_a_flipped_checkpoint_exits_non_zero_naming_the_file(
    run_copy: Run, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    final = run_copy.final_checkpoint()
    assert final is not None
    flip_tensor_bytes(final, "model.")
    code = main(["eval", run_copy.hash[:8], "--runs-dir", str(run_copy.path.parent), "--data-dir", str(shared_data)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and str(final) in err and "corrupt" in err
    assert "Traceback" not in err


def test_a_stored_alignment_is_verified_when_reused(
    run_copy: Run, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """alignment.json is sealed: reusing an edited one is refused, naming the file (exit 2, one line)."""
    argv = ["align", run_copy.hash[:8], run_copy.hash[:8], "--runs-dir", str(run_copy.path.parent)]
    argv += ["--data-dir", str(shared_data), "--no-progress"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    (info,) = run_copy.path.parent.glob("align_*/alignment.json")
    assert main(argv) == 0  # reused, verified
    again = capsys.readouterr().out
    assert "when it was computed" not in first and "reused" not in first
    assert "on random inputs when it was computed: " in again and "reused; its checksums verified" in again
    doc = json.loads(info.read_text())
    doc["method"] = "activation"
    info.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(info) in err and "is corrupt" in err


# ---------------------------------------------------------------- permutations


def test_flipped_bytes_in_a_permutation_file_are_named(tmp_path: Path) -> None:
    perm = Permutation({"layer.0": torch.randperm(64, generator=torch.Generator().manual_seed(0))})
    path = perm.save(tmp_path / "perm.safetensors", None, method="test")
    back, _, meta = Permutation.load(path)
    assert torch.equal(back.perms["layer.0"], perm.perms["layer.0"]) and meta == {"method": "test"}
    flip_tensor_bytes(path, "perm.")
    with pytest.raises(IntegrityError, match=r"permutation file .*perm\.safetensors is corrupt.*perm\.layer\.0"):
        Permutation.load(path)


# ---------------------------------------------------------------- step results


@step_kind("test_integrity_blob")
def _blob(ctx, config, inputs):  # type: ignore[no-untyped-def]
    (ctx.directory / "blob.bin").write_bytes(bytes(range(256)) * 4)
    Permutation({"g": torch.arange(8)}).save(ctx.directory / "perm.safetensors")
    return {"value": config["value"], "list": [1.5, 2.5]}


@pytest.fixture
def stored_step(tmp_path: Path) -> Iterator[tuple[Step, Path]]:
    step = Step("test_integrity_blob", {"value": 1.25})
    executor = LocalExecutor(tmp_path, progress=False)
    assert executor.run([step])[step.key]["value"] == 1.25
    directory = Store(tmp_path).step_dir(step.kind, step.key)
    doc = json.loads((directory / "result.json").read_text())
    assert set(doc["integrity"]["files"]) == {"blob.bin", "perm.safetensors"}
    yield step, directory


def _rerun(step: Step, directory: Path) -> dict:
    executor = LocalExecutor(directory.parents[1], progress=False)
    result = executor.run([step])[step.key]
    assert executor.ran == []  # read from the store, not computed again
    return result


def test_a_step_result_is_verified_when_read(stored_step: tuple[Step, Path]) -> None:
    step, directory = stored_step
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedFileWarning)
        assert _rerun(step, directory) == {"value": 1.25, "list": [1.5, 2.5]}


def test_an_edited_step_result_is_named(stored_step: tuple[Step, Path]) -> None:
    step, directory = stored_step
    result = directory / "result.json"
    result.write_text(result.read_text().replace("1.25", "9.25"))  # still valid JSON, a different number
    with pytest.raises(IntegrityError, match=r"step result .*result\.json is corrupt: its content differs"):
        _rerun(step, directory)


def test_a_truncated_step_result_is_named(stored_step: tuple[Step, Path]) -> None:
    step, directory = stored_step
    result = directory / "result.json"
    result.write_bytes(result.read_bytes()[:40])
    with pytest.raises(IntegrityError, match=r"result\.json is unreadable"):
        _rerun(step, directory)


@pytest.mark.parametrize("name", ["blob.bin", "perm.safetensors"])
def test_flipped_bytes_in_a_file_a_step_wrote_are_named(stored_step: tuple[Step, Path], name: str) -> None:
    step, directory = stored_step
    raw = bytearray((directory / name).read_bytes())
    raw[-5] ^= 0xFF  # (the last bytes of a safetensors file are tensor data)
    (directory / name).write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=rf"{name} is corrupt: it differs from the checksum recorded in step"):
        _rerun(step, directory)


def test_a_step_result_written_before_checksums_is_read_with_one_warning(stored_step: tuple[Step, Path]) -> None:
    step, directory = stored_step
    result = directory / "result.json"
    doc = json.loads(result.read_text())
    del doc["integrity"]
    result.write_text(json.dumps(doc))
    with pytest.warns(UnverifiedFileWarning, match="result.json was written before"):
        assert _rerun(step, directory)["value"] == 1.25


# ---------------------------------------------------------------- decoded dataset caches


@pytest.fixture
def image_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("LMCLAB_DATA_DIR", raising=False)
    monkeypatch.setenv("LMCLAB_CACHE_DIR", str(tmp_path / "cache"))
    for split, n in (("train", 4), ("test", 2)):
        for label, colour in (("a", (200, 10, 10)), ("b", (10, 200, 10))):
            for i in range(n):
                (tmp_path / "tree" / split / label).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (colour[0], colour[1], i * 20)).save(
                    tmp_path / "tree" / split / label / f"{i}.png"
                )
    return tmp_path / "tree"


def _cache_of(image_tree: Path, split: str) -> Path:
    found = sorted((image_tree.parent / "cache" / "decoded").glob(f"*-{split}.safetensors"))
    assert len(found) == 1
    return found[0]


def test_a_corrupt_decoded_cache_is_named_never_used_and_rebuilt(
    image_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y, _ = load_split(f"imagefolder:{image_tree}", "test", progress=False)
    cache = _cache_of(image_tree, "test")
    flip_tensor_bytes(cache, "images")
    with pytest.warns(UserWarning, match=rf"decoded-image cache {cache} is corrupt: its images differ"):
        assert readers._read_cache(cache, ("a", "b")) is None  # the read detects it and names the file
    with pytest.warns(UserWarning, match="corrupt"):
        x2, y2, _ = load_split(f"imagefolder:{image_tree}", "test", progress=False)
    assert torch.equal(x, x2) and torch.equal(y, y2)  # decoded again from the images, not read from the cache

    def no_decoding(data: bytes, where: str) -> None:
        raise AssertionError(f"decoded {where} although the rebuilt cache is valid")

    monkeypatch.setattr(readers, "decode_image", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x3, _, _ = load_split(f"imagefolder:{image_tree}", "test", progress=False)
    assert torch.equal(x, x3)


def test_a_decoded_cache_without_checksums_is_rebuilt(image_tree: Path) -> None:
    load_split(f"imagefolder:{image_tree}", "test", progress=False)
    cache = _cache_of(image_tree, "test")
    tensors, meta = load_checkpoint_free(cache)
    del meta["sha256"]
    save_file(tensors, str(cache), metadata=meta)
    with pytest.warns(UserWarning, match="has no checksums"):
        load_split(f"imagefolder:{image_tree}", "test", progress=False)
    assert "sha256" in load_checkpoint_free(cache)[1]


def load_checkpoint_free(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})  # noqa: SIM118


# ---------------------------------------------------------------- modes and links


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_honour_the_umask(tmp_path: Path, umask_022: None, image_tree: Path) -> None:
    text = atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
    checkpoint = save_checkpoint(tmp_path / "c.safetensors", {"model.w": torch.ones(2)}, {"step": 1})
    run = RunStore(tmp_path / "runs").open(TINY)
    assert _mode(text) == _mode(checkpoint) == _mode(run.path / "config.json") == _mode(run.path / "meta.json") == 0o644
    load_split(f"imagefolder:{image_tree}", "test", progress=False)
    assert _mode(_cache_of(image_tree, "test")) == 0o644
    os.umask(0o027)
    assert _mode(atomic_write_json(tmp_path / "b.json", {"a": 1})) == 0o640
    os.umask(0o002)
    assert _mode(atomic_write_json(tmp_path / "b.json", {"a": 2})) == 0o664  # (a replaced file takes the new mode)


def test_writes_never_follow_a_link_out_of_the_store(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.json").write_text("{}")
    store = Store(tmp_path / "store")
    run = store.runs.open(TINY)

    (run.path / "checkpoints").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match=r"checkpoints is a symbolic link inside the store"):
        save_checkpoint(run.checkpoint_path(1), {"model.w": torch.ones(2)}, {"step": 1})
    assert [p.name for p in outside.iterdir()] == ["victim.json"]

    (run.path / "meta.json").unlink()
    (run.path / "meta.json").symlink_to(outside / "victim.json")
    with pytest.raises(UnsafePathError, match=r"meta\.json is a symbolic link"):
        atomic_write_json(run.path / "meta.json", {"status": "running"})
    assert (outside / "victim.json").read_text() == "{}"

    linked_run = store.root / "train_0123456789abcdef"
    linked_run.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="train_0123456789abcdef is a symbolic link"):
        Run(linked_run).update_meta(status="running")
    with pytest.raises(UnsafePathError):
        Permutation({"g": torch.arange(3)}).save(linked_run / "perm.safetensors")
    assert [p.name for p in outside.iterdir()] == ["victim.json"]


def test_a_linked_store_root_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "real", target_is_directory=True)
    run = RunStore(tmp_path / "runs").open(TINY)
    save_checkpoint(run.checkpoint_path(0), {"model.w": torch.ones(2)}, {"step": 0})
    assert (tmp_path / "real" / run.path.name / "checkpoints" / "step_00000000.safetensors").is_file()
