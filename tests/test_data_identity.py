"""Data identity: a run records which data it saw, a changed image folder is a different run, runs trained
on different data are compared only when asked (and then the output says on which data), and `lmclab
eval` says which split and how many examples it evaluated."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from figures import drawn
from lmclab.cli import main
from lmclab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmclab.data import DataError, folder_fingerprint
from lmclab.experiments.ito import merge_runs
from lmclab.experiments.lmc import align_runs, lmc_pairs
from lmclab.experiments.predict import predict_vs_measure
from lmclab.store import DataMismatch, Run, RunMeta, RunStore, check_same_data
from lmclab.training import RunOptions, get_preset, train

TINY = ["--train-per-class", "10", "--hidden", "16", "--epochs", "1", "--no-progress", "--offline", "--device", "cpu"]

# Regression pins, computed before data identity existed: runs on named datasets keep their hashes.
PINNED = {"mlp_mnist": "37b2bd8f0b9c971b", "mlp_fashion_mnist": "d06781c028e13f76"}
PINNED_NAMED = {
    "mnist": "9a2adce2d4c489ac",
    "fashion_mnist": "aa037cb36091fbfc",
    "cifar10": "684e2313e84ad4b5",
    "cifar100": "c3d0ad7401fd14c0",
}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny(preset: str) -> RunConfig:
    c = get_preset(preset).config
    return dataclasses.replace(
        c,
        data=dataclasses.replace(c.data, train_per_class=10),
        model=dataclasses.replace(c.model, hidden=(16,)),
        train=dataclasses.replace(c.train, epochs=1),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Run]:
    """An MNIST MLP and a Fashion-MNIST MLP of the same shapes (tiny), trained through the CLI."""
    root = tmp_path_factory.mktemp("identity_runs")
    io = ["--runs-dir", str(root), "--data-dir", str(shared_data), "--json"]
    out: dict[str, Run] = {}
    for preset in PINNED:
        assert main(["train", preset, *TINY, *io]) == 0
        out[preset] = RunStore(root).get(tiny(preset).run_hash())
    return out


def io(runs: dict[str, Run], shared_data: Path) -> list[str]:
    return ["--runs-dir", str(runs["mlp_mnist"].path.parent), "--data-dir", str(shared_data), "--device", "cpu"]


def stored(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_named_dataset_hashes_are_unchanged(runs: dict[str, Run]) -> None:
    assert {preset: tiny(preset).run_hash() for preset in PINNED} == PINNED
    assert {p: r.path.name for p, r in runs.items()} == {p: f"train_{h}" for p, h in PINNED.items()}
    named = {d: RunConfig(DataConfig(d, train_subset=500, augment=False)).run_hash() for d in PINNED_NAMED}
    assert named == PINNED_NAMED
    config = json.loads((runs["mlp_mnist"].path / "config.json").read_text())
    assert "data_fingerprint" not in config["data"]  # config.json (and step keys) as before


def test_a_run_records_the_data_it_saw(runs: dict[str, Run]) -> None:
    infos = {p: r.data_info for p, r in runs.items()}
    for info in infos.values():
        assert info.fingerprint is not None and len(info.fingerprint) == 64
        assert info.splits is not None
        assert info.splits["train"]["examples"] == info.train_size == 100  # 10 per class, after the subset
        assert info.splits["train"]["of"] == 60000
        assert info.splits["test"]["examples"] == info.splits["test"]["of"] == info.test_size == 10000
        assert len({info.splits["train"]["fingerprint"], info.splits["test"]["fingerprint"]}) == 2
        assert info.folder_fingerprint is None
    assert infos["mlp_mnist"].name == "mnist" and infos["mlp_fashion_mnist"].name == "fashion_mnist"
    assert infos["mlp_mnist"].fingerprint != infos["mlp_fashion_mnist"].fingerprint


def test_old_runs_without_a_fingerprint_load_and_compare_by_name(runs: dict[str, Run], tmp_path: Path) -> None:
    old = tmp_path / runs["mlp_mnist"].path.name
    shutil.copytree(runs["mlp_mnist"].path, old)
    meta = json.loads((old / "meta.json").read_text())
    for key in ("fingerprint", "splits", "folder_fingerprint"):
        del meta["data_info"][key]
    (old / "meta.json").write_text(json.dumps(meta))
    info = Run(old).meta.data_info
    assert info is not None and info.fingerprint is None and info.splits is None
    assert RunMeta.from_json(meta).to_json() == meta  # written back exactly as read
    assert check_same_data([Run(old), runs["mlp_mnist"]]).same
    with pytest.raises(DataMismatch, match="fashion_mnist"):
        check_same_data([Run(old), runs["mlp_fashion_mnist"]])


@pytest.mark.parametrize("command", ["interpolate", "align", "predict", "merge", "plane", "spectrum", "curve"])
def test_runs_on_different_data_are_refused(
    runs: dict[str, Run], shared_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str
) -> None:
    a, b = runs["mlp_mnist"], runs["mlp_fashion_mnist"]
    root = a.path.parent
    before = stored(root)
    pair = [a.hash, "--path-to", b.hash] if command == "spectrum" else [a.hash, b.hash]
    extra = ["--out", str(tmp_path / "out")] if command != "align" else []
    code, out, err = run_cli(capsys, command, *pair, *extra, *io(runs, shared_data), "--offline", "--no-progress")
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert a.path.name in lines[0] and b.path.name in lines[0]
    assert "mnist (data " in lines[0] and "fashion_mnist (data " in lines[0]
    if command == "curve":  # fitted on run A's training data: no flag to allow it, and the message offers none
        assert "only runs trained on the same data" in lines[0] and "--allow-different-data" not in lines[0]
    else:
        assert "--allow-different-data" in lines[0]
    assert stored(root) == before and not (tmp_path / "out").exists()


def test_python_api_refuses_unless_allowed(runs: dict[str, Run], tmp_path: Path) -> None:
    a, b = runs["mlp_mnist"], runs["mlp_fashion_mnist"]
    with pytest.raises(DataMismatch, match="different data"):
        align_runs(a, b, device="cpu", progress=False)
    with pytest.raises(DataMismatch):
        lmc_pairs([(a, b)], method=None, out=tmp_path / "lmc", say=lambda _: None, device="cpu", progress=False)
    with pytest.raises(DataMismatch):
        merge_runs([a, b], out=tmp_path / "merge", say=lambda _: None, device="cpu", progress=False)
    with pytest.raises(DataMismatch):
        predict_vs_measure(a, b, out=tmp_path / "predict", device="cpu", say=lambda _: None)
    assert not any((tmp_path / d).exists() for d in ("lmc", "merge", "predict"))
    check = check_same_data([a, b], allow=True)
    assert not check.same and check.evaluated_on.dataset == "mnist"
    assert check_same_data([a, a]).same and check_same_data([a, a]).column() == {}


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_allowed_comparison_says_which_data(
    runs: dict[str, Run], shared_data: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    a, b = runs["mlp_mnist"], runs["mlp_fashion_mnist"]
    label = f"mnist (data {str(a.data_info.fingerprint)[:12]})"
    out_dir = tmp_path / "lmc"
    args = ["--align", "weight", "--points", "3", "--split", "test", "--subset", "200", "--out", str(out_dir)]
    args += ["--allow-different-data"]
    code, out, err = run_cli(
        capsys, "interpolate", a.hash, b.hash, *args, *io(runs, shared_data), "--offline", "--no-progress", "--json"
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["data"]["same"] is False and summary["data"]["evaluated_on"] == [label]
    assert [r["dataset"] for r in summary["data"]["pairs"][0]["runs"]] == ["mnist", "fashion_mnist"]
    assert summary["alignments"][0]["data"]["same"] is False
    assert f"evaluated on {label}" in err  # the note (on stderr while stdout carries JSON)
    paths, barriers = read(out_dir / "paths.csv"), read(out_dir / "barriers.csv")
    assert paths and barriers
    assert {r["evaluated_on"] for r in paths} == {r["evaluated_on"] for r in barriers} == {label}
    title = drawn(out_dir / "paths.png").figure.get_suptitle()
    assert f"evaluated on {label}" in title and "fashion_mnist" in title

    # same data: no column, no note
    same_dir = tmp_path / "same"
    code, out, err = run_cli(
        capsys, "interpolate", a.hash, a.hash, "--points", "3", "--split", "test", "--subset", "200",
        "--out", str(same_dir), *io(runs, shared_data), "--offline", "--no-progress", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["data"]["same"] is True and "evaluated_on" not in read(same_dir / "paths.csv")[0]
    assert "evaluated on" not in drawn(same_dir / "paths.png").figure.get_suptitle()


def test_allowed_merge_says_which_data(runs: dict[str, Run], shared_data: Path, tmp_path: Path) -> None:
    a, b = runs["mlp_mnist"], runs["mlp_fashion_mnist"]
    said: list[str] = []
    summary = merge_runs(
        [a, b],
        ["merge_many"],
        out=tmp_path / "merge",
        points=3,
        examples=100,
        splits=("test",),
        runs_dir=str(a.path.parent),
        data_dir=str(shared_data),
        device="cpu",
        progress=False,
        say=said.append,
        allow_different_data=True,
    )
    assert summary["data"]["same"] is False and summary["data"]["evaluated_on"].startswith("mnist (data ")
    assert any(s.startswith("note: evaluated on mnist") for s in said)
    tables = sorted((tmp_path / "merge").glob("*.csv"))
    assert tables and all(read(t)[0]["evaluated_on"] == summary["data"]["evaluated_on"] for t in tables)
    assert "evaluated on mnist" in drawn(tmp_path / "merge" / "heatmap_test.png").figure.get_suptitle()


def test_eval_names_split_and_count(
    runs: dict[str, Run], shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = runs["mlp_mnist"]
    code, out, err = run_cli(capsys, "eval", run.hash, "--split", "test", *io(runs, shared_data), "--offline")
    assert code == 0, err
    assert "test split of mnist (10000 examples)" in out
    code, out, _ = run_cli(capsys, "eval", run.hash, "--split", "both", *io(runs, shared_data), "--offline", "--json")
    result = json.loads(out)
    assert code == 0
    assert (result["train"]["split"], result["train"]["examples"]) == ("train", 60000)
    assert (result["test"]["split"], result["test"]["examples"]) == ("test", 10000)
    assert result["test"]["same_as_trained"] is True and result["test"]["dataset"] == "mnist"


# ------------------------------------------------------------------------------------ image folders


def write_folder(root: Path, seed: int) -> Path:
    """train/{a,b}/ and test/{a,b}/ with two 6×6 greyscale PNGs each, pixels drawn from `seed`."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (6, 6), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / cls / f"{i}.png")
    return root


def folder_config(root: Path | str) -> RunConfig:
    return RunConfig(
        DataConfig(f"imagefolder:{root}"),
        ModelConfig("mlp", hidden=(4,)),
        TrainConfig(batch_size=4, epochs=1),
    )


def test_image_folder_content_is_part_of_the_run_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCLAB_CACHE_DIR", str(tmp_path / "cache"))
    one, two = write_folder(tmp_path / "one", seed=0), write_folder(tmp_path / "two", seed=1)
    hash_one = folder_config(one).run_hash()
    assert folder_config(one).normalised().data.data_fingerprint == folder_fingerprint(one)
    assert folder_config(two).run_hash() != hash_one

    # change one image: a different run; write the same bytes back (new times): the same run again
    image = one / "train" / "a" / "0.png"
    original = image.read_bytes()
    Image.fromarray(np.zeros((6, 6), np.uint8), mode="L").save(image)
    assert folder_config(one).run_hash() != hash_one
    image.unlink()
    image.write_bytes(original)
    assert folder_config(one).run_hash() == hash_one

    # a relative spelling is the same folder; a copy elsewhere has the same content fingerprint; so has a zip
    monkeypatch.chdir(tmp_path)
    assert folder_config("one").run_hash() == hash_one
    shutil.copytree(one, tmp_path / "copy")
    assert folder_fingerprint(tmp_path / "copy") == folder_fingerprint(one)
    with zipfile.ZipFile(tmp_path / "one.zip", "w") as z:
        for f in sorted(one.rglob("*.png")):
            z.write(f, f.relative_to(one).as_posix())
    assert folder_fingerprint(tmp_path / "one.zip") == folder_fingerprint(one)

    # only image folders carry a fingerprint
    with pytest.raises(ValueError, match="imagefolder"):
        RunConfig(DataConfig("mnist", data_fingerprint="0" * 64)).normalised()
    with pytest.raises(DataError, match="does not exist"):
        folder_config(tmp_path / "missing").run_hash()


def test_an_image_folder_run_records_its_content_and_refuses_a_changed_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMCLAB_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_folder(tmp_path / "pets", seed=0)
    options = RunOptions(runs_dir=str(tmp_path / "runs"), device="cpu", progress=False)
    config = folder_config(folder).normalised()
    run = train(config, options)
    info = run.meta.data_info
    assert info is not None and info.folder_fingerprint == config.data.data_fingerprint == folder_fingerprint(folder)
    assert info.splits is not None and info.splits["train"]["examples"] == 4 and info.fingerprint is not None
    assert run.config.data.data_fingerprint == config.data.data_fingerprint  # in config.json, hashed to its name
    assert run.config.run_hash() == run.hash

    write_folder(folder, seed=5)  # the folder changes under a config that names its old content
    stale = dataclasses.replace(config, seeds=dataclasses.replace(config.seeds, seed_init=9))
    with pytest.raises(DataError, match="has changed"):
        train(stale, options)
    fresh = folder_config(folder)  # given again: a new run on the folder as it is now
    assert fresh.run_hash() not in (run.hash, stale.run_hash())
