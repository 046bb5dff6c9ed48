"""The `gpu` presets of benko, ito, singh and width (issue 13 item 4): each loads as its experiment's typed options,
and, shrunk to a CPU size by replacing option values (fewer members, epochs, examples, probes; width 1, or widths
×1/×2 for width; a training subset of 256 CIFAR-10 images) while keeping its structure (its settings, methods,
orders, splits, step kinds), runs end to end on the real CIFAR-10 into a temporary store and writes its tables and
figures. `--plan` shows each preset's step graph without running anything.

At this size the runs' own final evaluation on CIFAR-10's 10,000 test images (about 40 s per run on one CPU
thread, and in no table of these experiments) would take most of the time: the end-to-end tests cut the test
split the trainer loads to its first EVAL_EXAMPLES images (:func:`small_test_split`)."""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import lmclab.training.trainer as trainer
from lmclab.cli import main
from lmclab.data import DeviceDataset
from lmclab.experiments.benko import BenkoOptions
from lmclab.experiments.context import ExperimentContext
from lmclab.experiments.ito import ItoOptions
from lmclab.experiments.registry import EXPERIMENTS
from lmclab.experiments.settings import Setting
from lmclab.experiments.singh import SinghOptions
from lmclab.experiments.width import WidthOptions

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN_SUBSET = 256
EVAL_EXAMPLES = 64


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def shrunk_setting(
    s: Setting, *, epochs: int, train: Mapping[str, Any] | None = None, width: int | None = 1, **fields: Any
) -> Any:
    """`s` at a CPU size: `width` (None: left alone, for the width experiment, whose axis it is), TRAIN_SUBSET
    training images, `epochs` (and `train`'s other values) at batch 64, EVAL_EXAMPLES examples per split;
    `fields` replace the setting's own (pairs, models)."""
    o = {section: dict(values) for section, values in s.overrides.items()}
    if width is not None:
        o["model"] = {**o.get("model", {}), "width": width}
    o["data"] = {**o.get("data", {}), "train_subset": TRAIN_SUBSET}
    o["train"] = {**o.get("train", {}), "epochs": epochs, "batch_size": 64, **(train or {})}
    return dataclasses.replace(s, overrides=o, eval_examples=EVAL_EXAMPLES, **fields)


@pytest.fixture
def small_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer evaluates its runs on the first EVAL_EXAMPLES test images (the training split is untouched)."""
    load = trainer.load_datasets

    def cut(*args: Any, **kwargs: Any) -> tuple[DeviceDataset, DeviceDataset]:
        train, test = load(*args, **kwargs)
        n = EVAL_EXAMPLES
        return train, DeviceDataset(test.images[:n], test.labels[:n], test.info, augment=test.augment)

    monkeypatch.setattr(trainer, "load_datasets", cut)


def run_shrunk(experiment: str, options: Any, root: Path, shared_data: Path) -> dict[str, Any]:
    ctx = ExperimentContext(
        out=root / "out",
        experiment=experiment,
        preset="gpu",
        runs_dir=str(root / "runs"),
        data_dir=str(shared_data),
        device="cpu",
        progress=False,
        say=lambda _: None,
    )
    return EXPERIMENTS[experiment].run(options, ctx)


def check_files(summary: Mapping[str, Any], names: list[str]) -> None:
    files = summary["files"]
    missing = [n for n in names if n not in files or not Path(files[n]).is_file()]
    assert not missing, missing
    assert all(Path(p).stat().st_size > 0 for p in files.values())


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("experiment", ["benko", "ito", "singh", "width"])
def test_gpu_preset_loads_on_the_real_cifar10(experiment: str) -> None:
    e = EXPERIMENTS[experiment]
    assert "gpu" in e.presets()
    options = e.load("gpu")  # unknown keys and wrong types are refused by the loader
    assert type(options) is e.options_type and options.name == "gpu"
    assert "not yet run on a GPU" in options.description
    for s in options.settings:
        config = s.base_config()
        assert config.data.dataset == "cifar10" and config.data.train_subset is None  # the whole real training set
        assert config.model.model == "resnet20"
        assert 10 <= config.train.epochs <= 30  # tens of epochs


def test_gpu_presets_hold_the_papers_main_comparisons() -> None:
    benko = EXPERIMENTS["benko"].load("gpu")
    assert isinstance(benko, BenkoOptions)
    assert benko.orders == (1, 2) and benko.splits == ("train", "test")
    assert [(s.base_config().model.width, s.base_config().model.norm) for s in benko.settings] == [
        (1, "layernorm"),
        (4, "layernorm"),
    ]
    assert all(2 <= s.pairs <= 3 for s in benko.settings) and benko.logit_setting == "resnet20x1_cifar10"
    ito = EXPERIMENTS["ito"].load("gpu")
    assert isinstance(ito, ItoOptions)
    assert ito.methods == ("naive", "pairwise", "merge_many", "ste_mm")
    assert [(s.base_config().model.width, s.models) for s in ito.settings] == [(4, 5)]
    singh = EXPERIMENTS["singh"].load("gpu")
    assert isinstance(singh, SinghOptions)
    (s,) = singh.settings
    train = s.base_config().train
    assert s.base_config().model.norm == "batchnorm" and (train.epochs, train.milestones) == (12, (6, 9))
    assert singh.fork_epochs == (0, 1, 2, 5) and singh.layerwise_forks == (2,)
    width = EXPERIMENTS["width"].load("gpu")
    assert isinstance(width, WidthOptions)
    assert width.widths == (1, 2, 4) and width.methods == ("naive", "weight")
    assert width.corrections == ("none", "repair") and width.splits == ("train", "test")
    (s,) = width.settings
    assert s.base_config().model.norm == "layernorm" and s.pairs == 2 and s.eval_examples == 2000


@pytest.mark.parametrize("experiment", ["benko", "ito", "singh", "width"])
def test_gpu_preset_plan_runs_nothing(
    experiment: str, tmp_path: Path, cli_io, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    args = ["run", experiment, "--preset", "gpu", "--plan", "--out", str(out), *cli_io(tmp_path / "runs")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{experiment} --preset gpu: the step graph (nothing is run)" in printed
    assert "train" in printed and "0 stored" in printed
    assert not out.exists() and not any((tmp_path / "runs").glob("**/*.safetensors"))


# ------------------------------------------------------------------------------- end to end, CPU size


@pytest.mark.usefixtures("small_test_split")
def test_benko_gpu_shrunk_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    gpu = EXPERIMENTS["benko"].load("gpu")
    assert isinstance(gpu, BenkoOptions)
    options = dataclasses.replace(
        gpu,
        points=5,
        logit_examples=8,
        derivative_batch_size=64,
        settings=tuple(shrunk_setting(s, epochs=1, pairs=1) for s in gpu.settings),
    )
    summary = run_shrunk("benko", options, tmp_path, shared_data)
    names = [s.name for s in gpu.settings]
    check_files(summary, ["loss_table", *(f"loss_{n}" for n in names), "rmse_table", "example_table", "fig7", "fig8"])
    rows = read(summary["files"]["loss_table"])
    assert list(rows[0]) == [
        "setting",
        "pair",
        "path",
        "split",
        "examples",
        "lambda",
        "curve",
        "center",
        "order",
        "value",
    ]
    assert {(r["setting"], r["path"], r["split"]) for r in rows} == {
        (n, p, sp) for n in names for p in ("naive", "aligned") for sp in ("train", "test")
    }
    assert {r["examples"] for r in rows} == {str(EVAL_EXAMPLES)}
    taylor = [r for r in rows if r["curve"] == "taylor"]
    assert {(r["center"], r["order"]) for r in taylor} == {(c, o) for c in ("a", "b") for o in ("1", "2")}
    assert len([r for r in rows if r["curve"] == "true"]) == len(names) * 2 * 2 * 5
    rmse = read(summary["files"]["rmse_table"])
    assert {r["setting"] for r in rmse} == {"resnet20x1_cifar10"} and {r["path"] for r in rmse} == {"naive", "aligned"}


@pytest.mark.usefixtures("small_test_split")
def test_ito_gpu_shrunk_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    gpu = EXPERIMENTS["ito"].load("gpu")
    assert isinstance(gpu, ItoOptions)
    options = dataclasses.replace(
        gpu,
        points=3,
        merge_many=dataclasses.replace(gpu.merge_many, max_rounds=2),
        ste_mm=dataclasses.replace(gpu.ste_mm, epochs=1, batch_size=128, train_examples=TRAIN_SUBSET),
        trace=dataclasses.replace(gpu.trace, examples=32, probes=2, batch_size=32),
        settings=tuple(shrunk_setting(s, epochs=1, models=3) for s in gpu.settings),
    )
    summary = run_shrunk("ito", options, tmp_path, shared_data)
    (name,) = [s.name for s in gpu.settings]
    check_files(
        summary,
        [
            "merged_table",
            "barrier_summary_table",
            "pair_barriers_table",
            "trace_table",
            f"merged_{name}",
            f"barriers_pairs_{name}",
            f"barriers_to_merged_{name}",
            f"trace_{name}",
            f"heatmap_{name}",
        ],
    )
    merged = [r for r in read(summary["files"]["merged_table"]) if r["model"] == "merged"]
    assert {(r["method"], r["k"]) for r in merged} == {(m, k) for m in gpu.methods for k in ("2", "3")}
    assert {(r["split"], r["metric"]) for r in merged} == {
        (sp, m) for sp in ("train", "test") for m in ("loss", "accuracy", "error")
    }
    assert {r["examples"] for r in merged} == {str(EVAL_EXAMPLES)}
    trace = read(summary["files"]["trace_table"])
    assert {(r["method"], r["k"], r["kind"]) for r in trace} == {
        (m, k, kind) for m in gpu.methods for k in ("2", "3") for kind in ("trace", "scale_aware_trace")
    }


@pytest.mark.usefixtures("small_test_split")
def test_singh_gpu_shrunk_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    gpu = EXPERIMENTS["singh"].load("gpu")
    assert isinstance(gpu, SinghOptions)
    # 2 epochs (÷10 at 1) forked at the preset's first two fork epochs, the second with the layer-wise analysis
    forks = gpu.fork_epochs[:2]
    options = dataclasses.replace(
        gpu,
        fork_epochs=forks,
        layerwise_forks=forks[1:],
        points=5,
        examples=EVAL_EXAMPLES,
        every=1,
        bn_examples=16,
        prediction_examples=16,
        hvp_batch_size=16,
        layerwise_every=1,
        settings=tuple(shrunk_setting(s, epochs=2, train={"milestones": [1]}) for s in gpu.settings),
    )
    assert forks == (0, 1) and len(gpu.layerwise_forks) == 1
    summary = run_shrunk("singh", options, tmp_path, shared_data)
    (name,) = [s.name for s in gpu.settings]
    check_files(
        summary,
        [
            "segments",
            "geometry",
            "predictions",
            "layerwise",
            f"segments_error_{name}",
            f"segments_loss_{name}",
            f"geometry_{name}",
            f"barriers_{name}",
            f"layerwise_{name}_fork1",
        ],
    )
    segments = read(summary["files"]["segments"])
    assert {r["fork_epoch"] for r in segments} == {"0", "1"}
    assert {r["bn"] for r in segments} == {"reset"} and {r["examples"] for r in segments} == {str(EVAL_EXAMPLES)}
    predictions = read(summary["files"]["predictions"])
    assert sorted(r["fork_epoch"] for r in predictions) == ["0", "1"]
    assert all(r["measured_max"] != "" and r["measured_bn_reset_max"] != "" for r in predictions)
    assert {r["fork_epoch"] for r in read(summary["files"]["layerwise"])} == {"1"}


@pytest.mark.usefixtures("small_test_split")
def test_width_gpu_shrunk_end_to_end(tmp_path: Path, shared_data: Path) -> None:
    gpu = EXPERIMENTS["width"].load("gpu")
    assert isinstance(gpu, WidthOptions)
    options = dataclasses.replace(
        gpu,
        widths=gpu.widths[:2],
        points=3,
        correction_examples=EVAL_EXAMPLES,
        settings=tuple(shrunk_setting(s, epochs=1, width=None, pairs=1) for s in gpu.settings),
    )
    summary = run_shrunk("width", options, tmp_path, shared_data)
    (name,) = [s.name for s in gpu.settings]
    check_files(summary, ["barriers", "summary", "curves", f"barrier_vs_width_{name}"])
    rows = read(summary["files"]["barriers"])
    assert {(r["width"], r["method"], r["correction"], r["split"], r["metric"]) for r in rows} == {
        (str(w), m, c, sp, me)
        for w in (1, 2)
        for m in gpu.methods
        for c in gpu.corrections
        for sp in gpu.splits
        for me in ("loss", "error")
    }
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # one pair: widths × methods × corrections × splits × metrics
    assert {r["norm"] for r in rows} == {"layernorm"} and {r["examples"] for r in rows} == {str(EVAL_EXAMPLES)}
