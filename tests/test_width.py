"""The width ablation (`lmclab run width`) end to end on the tiny preset (real MNIST): the tidy table's rows
and columns, the naive barrier against one computed directly from the stored runs, invariances of the
aligned and repaired endpoints, the figure, a rerun that reuses every step, and refused presets."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from figures import check_png, drawn, legend_labels, panels
from lmclab.cli import main
from lmclab.config import RunConfig
from lmclab.data import DeviceDataset
from lmclab.experiments.context import Execution, using_execution
from lmclab.experiments.graph import KIND_RESOURCES, topological_order
from lmclab.experiments.settings import PresetError, load_preset, parse_preset, read_presets
from lmclab.experiments.width import WidthOptions, build_graph, run_width
from lmclab.store import RunStore
from lmclab.training import load_run_model

QUIET = {"progress": False, "say": lambda _: None}
COLUMNS = ("width", "norm", "pair", "method", "correction", "split", "metric", "barrier")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("width")
    summary = run_width(
        "tiny", out=root / "out", runs_dir=str(root / "runs"), data_dir=str(shared_data), device="cpu", **QUIET
    )
    return root, summary


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_table_has_one_row_per_width_pair_method_correction_split_metric(tiny) -> None:  # type: ignore[no-untyped-def]
    _, summary = tiny
    preset = load_preset("width", "tiny", WidthOptions)
    rows = read(summary["files"]["barriers"])
    assert set(COLUMNS) <= set(rows[0])
    keys = [tuple(r[c] for c in COLUMNS[:-1]) for r in rows]
    expected = {
        (str(w), "none", "0", m, c, split, metric)
        for w in preset.widths
        for m in preset.methods
        for c in preset.corrections
        for split in preset.splits
        for metric in ("loss", "error")
    }
    assert len(keys) == len(set(keys)) == len(expected) == 2 * 2 * 2 * 2 * 2
    assert set(keys) == expected
    for r in rows:  # B(0) = B(1) = 0 on every curve, so its maximum is ≥ 0
        assert math.isfinite(float(r["barrier"])) and float(r["barrier"]) >= 0.0
        assert r["examples"] == "200"
    means = read(summary["files"]["summary"])
    assert len(means) == len(expected) and {r["pairs"] for r in means} == {"1"}
    for m in means:  # one pair: the mean is that pair's barrier, the SD 0
        (row,) = [r for r in rows if all(r[k] == m[k] for k in ("width", "method", "correction", "split", "metric"))]
        assert float(m["mean"]) == pytest.approx(float(row["barrier"])) and float(m["sd"]) == 0.0


def _members(root: Path, width: int) -> tuple[Any, Any]:
    preset = load_preset("width", "tiny", WidthOptions)
    pair = build_graph(preset)["mlp_tiny"][width][0]
    store = RunStore(root / "runs")
    runs = tuple(store.find(RunConfig.from_dict(step.config["run"])) for step in (pair.a, pair.b))
    assert all(r is not None and r.complete for r in runs)
    return runs


@pytest.mark.parametrize("width", [1, 2])
def test_naive_barrier_equals_a_direct_computation(tiny, shared_data: Path, width: int) -> None:  # type: ignore[no-untyped-def]
    root, summary = tiny
    run_a, run_b = _members(root, width)
    model = load_run_model(run_a, device="cpu")
    theta_a, theta_b = run_a.load_state(), run_b.load_state()
    assert any(tuple(v.shape) == (4 * width, 784) for v in theta_a.values())  # hidden 4 × width
    lambdas = np.linspace(0, 1, 5)
    for split in ("train", "test"):
        data = DeviceDataset.load("mnist", split, data_dir=shared_data, subset=200, augment=False, progress=False)
        xs, ys = zip(*data.batches(1000))
        x, y = torch.cat(xs), torch.cat(ys)
        losses, errors = [], []
        for lam in lambdas:  # θ_λ = (1−λ)θ_A + λθ_B, written out here (not lmclab.points.lerp)
            model.load_state_dict({k: (1 - lam) * theta_a[k] + lam * theta_b[k] for k in theta_a})
            with torch.no_grad():
                logits = model.eval()(x)
            losses.append(F.cross_entropy(logits, y).item())
            errors.append((logits.argmax(1) != y).float().mean().item())
        for metric, values in (("loss", losses), ("error", errors)):
            v = np.array(values)
            direct = float(np.max(v - ((1 - lambdas) * v[0] + lambdas * v[-1])))
            (row,) = [
                r
                for r in read(summary["files"]["barriers"])
                if (r["width"], r["method"], r["correction"], r["split"], r["metric"])
                == (str(width), "naive", "none", split, metric)
            ]
            assert float(row["barrier"]) == pytest.approx(direct, rel=1e-5, abs=1e-6), (split, metric)
            assert float(row["endpoint_a"]) == pytest.approx(v[0], rel=1e-5)
            assert float(row["endpoint_b"]) == pytest.approx(v[-1], rel=1e-5)


def test_aligned_and_repaired_endpoints_keep_the_endpoint_functions(tiny) -> None:  # type: ignore[no-untyped-def]
    """f(π(θ_B)) = f(θ_B): every method's path ends at the same loss; REPAIR at λ = 0 and 1 rescales each
    channel to its own statistics, so it changes the endpoints by rounding only."""
    _, summary = tiny
    rows = read(summary["files"]["barriers"])
    for r in rows:
        (naive,) = [
            n
            for n in rows
            if n["method"] == "naive"
            and n["correction"] == "none"
            and all(n[k] == r[k] for k in ("width", "pair", "split", "metric"))
        ]
        tol = 1e-4 if r["metric"] == "loss" else 0.0051  # error: at most one of 200 examples flips
        for end in ("endpoint_a", "endpoint_b"):
            assert float(r[end]) == pytest.approx(float(naive[end]), abs=tol), (r, end)


def test_figure_draws_every_method_and_correction(tiny) -> None:  # type: ignore[no-untyped-def]
    _, summary = tiny
    saved = drawn(summary["files"]["barrier_vs_width_mlp_tiny"])
    check_png(saved)
    rows = read(summary["files"]["barriers"])
    axes = panels(saved, 4)
    assert set(legend_labels(saved.figure)) == {
        "naive, no correction",
        "naive, REPAIR",
        "weight matching, no correction",
        "weight matching, REPAIR",
    }
    for ax in axes:
        assert ax.get_xscale() == "log"
        metric, split = ax.get_title().split(" barrier, ")[0], ax.get_title().split(", ")[1]
        assert len(ax.containers) == 4
        for container in ax.containers:
            line = container.lines[0]
            method = "naive" if container.get_label().startswith("naive") else "weight"
            correction = "repair" if container.get_label().endswith("REPAIR") else "none"
            mine = [
                r
                for r in rows
                if (r["metric"], r["split"], r["method"], r["correction"]) == (metric, split, method, correction)
            ]
            expected = sorted((float(r["width"]), float(r["barrier"])) for r in mine)
            np.testing.assert_allclose(line.get_xdata(), [w for w, _ in expected])
            np.testing.assert_allclose(line.get_ydata(), [b for _, b in expected], rtol=1e-12)


def test_rerun_reuses_every_step(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    root, first = tiny
    with using_execution(Execution()) as execution:
        again = run_width(
            "tiny", out=root / "out2", runs_dir=str(root / "runs"), data_dir=str(shared_data), device="cpu", **QUIET
        )
    steps = topological_order(
        s
        for widths in build_graph(load_preset("width", "tiny", WidthOptions)).values()
        for pairs in widths.values()
        for p in pairs
        for s in p.steps()
    )
    (report,) = execution.reports
    assert report.computed == [] and report.failed == {} and len(report.reused) == len(steps)
    for table in ("barriers", "summary", "curves"):
        assert read(again["files"][table]) == read(first["files"][table])
    assert KIND_RESOURCES["width_path"] == "evaluation"


def _table(**changes: Any) -> dict[str, Any]:
    table = dict(read_presets("width")["tiny"])
    settings = [dict(s) for s in table["settings"]]
    for key in ("overrides", "options"):
        if key in changes:
            settings[0][key] = changes.pop(key)
    return {**table, **changes, "settings": settings}


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (_table(corrections=["none", "reset"]), "'reset' recomputes BatchNorm statistics.*norm none"),
        (_table(methods=["naive", "nope"]), "methods must be distinct names of naive, "),
        (_table(widths=[1, 1]), "widths must be distinct multipliers"),
        (_table(widths=[]), "widths must be distinct multipliers"),
        (_table(points=2), "points must be ≥ 3"),
        (_table(splits=["val"]), "splits must be some of train, test"),
        (_table(overrides={"model": {"width": 2}}), "model.width is the experiment's axis"),
        (_table(corrections=["none", "bogus"]), "corrections must be distinct names of none, reset, repair"),
    ],
)
def test_bad_presets_are_refused(table: dict[str, Any], match: str) -> None:
    with pytest.raises(PresetError, match=match):
        parse_preset(WidthOptions, table)


def test_bn_reset_only_for_batchnorm_models() -> None:
    """A LayerNorm ResNet-20: BN reset refused, REPAIR accepted; a BatchNorm one: both accepted."""
    ln = _table(corrections=["none", "reset", "repair"], overrides={})
    ln["settings"][0]["preset"] = "resnet20_cifar10"
    with pytest.raises(PresetError, match="'reset' recomputes BatchNorm statistics.*resnet20, norm layernorm"):
        parse_preset(WidthOptions, ln)
    assert parse_preset(WidthOptions, {**ln, "corrections": ["none", "repair"]}).corrections == ("none", "repair")
    bn = _table(corrections=["none", "reset", "repair"], overrides={})
    bn["settings"][0]["preset"] = "resnet20_bn_cifar10"
    assert parse_preset(WidthOptions, bn).corrections == ("none", "reset", "repair")


def test_presets_load_and_cli_refuses_a_bad_preset(capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("smoke", "paper", "tiny", "vit"):
        preset = load_preset("width", name, WidthOptions)
        assert preset.settings and preset.widths
    paper = load_preset("width", "paper", WidthOptions)
    assert {s.name: paper.at(s).corrections for s in paper.settings} == {
        "resnet20_ln": ("none", "repair"),
        "resnet20_bn": ("none", "reset", "repair"),
    }
    assert max(paper.widths) == 32
    assert main(["run", "width", "--preset", "nope", "--offline"]) == 2
    err = capsys.readouterr().err
    assert "presets: smoke, paper, tiny" in err and len(err.strip().splitlines()) == 1
