"""Singh et al.'s experiment end to end on the tiny preset (real MNIST): forks, tables checked against
independent computations, caching, determinism, figures, the CLI and bad presets."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from figures import (
    check_barrier_predictions,
    check_geometry,
    check_layerwise,
    check_segments,
    check_toy_landscapes,
    drawn,
)
from lmclab.cli import main
from lmclab.config import RunConfig
from lmclab.data import DeviceDataset
from lmclab.experiments import registry
from lmclab.experiments.context import ExperimentContext
from lmclab.experiments.graph import STEP_KINDS, StepContext, finite_or_none
from lmclab.experiments.settings import PresetError, load_preset, parse_preset, read_presets
from lmclab.experiments.singh import EXPERIMENT, SinghOptions, build_graph, run_singh, sibling_runs
from lmclab.store import Run, RunStore
from lmclab.training import evaluate, load_run_model

QUIET = {"progress": False, "say": lambda _: None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("singh")
    summary = run_singh(
        "tiny", out=root / "out", runs_dir=str(root / "runs"), data_dir=str(shared_data), device="cpu", **QUIET
    )
    graph = build_graph(load_preset("singh", "tiny", SinghOptions))["mlp_tiny"]
    return root, summary, graph


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def children(root: Path, graph, fork: int) -> tuple[Run, Run]:  # type: ignore[no-untyped-def]
    """The two stored sibling runs of a fork."""
    store = RunStore(root / "runs")
    runs = tuple(store.find(RunConfig.from_dict(getattr(graph[fork][0], m).config["run"])) for m in ("a", "b"))
    assert all(r is not None and r.complete for r in runs)
    return runs  # type: ignore[return-value]


def eval_subset(shared_data: Path) -> DeviceDataset:
    return DeviceDataset.load("mnist", "train", data_dir=shared_data, subset=300, augment=False, progress=False)


def test_figures_and_tables_are_written(tiny) -> None:  # type: ignore[no-untyped-def]
    _, summary, _ = tiny
    files = summary["files"]
    t = {
        name: [r for r in read(files[name]) if r.get("setting") == "mlp_tiny"]
        for name in (
            "segments",
            "angles",
            "geometry",
            "predictions",
            "prediction_curves",
            "layerwise",
            "cross_block_sums",
        )
    }
    for metric in ("error", "loss"):
        check_segments(drawn(files[f"segments_{metric}_mlp_tiny"]), t["segments"], metric=metric)
    check_geometry(drawn(files["geometry_mlp_tiny"]), t["angles"], t["geometry"])
    check_barrier_predictions(
        drawn(files["barriers_mlp_tiny"]), t["predictions"], t["prediction_curves"], t["geometry"]
    )
    fork0 = [
        [r for r in t[name] if r["fork_epoch"] == "0" and r["pair"] == "0"]
        for name in ("layerwise", "cross_block_sums")
    ]
    check_layerwise(drawn(files["layerwise_mlp_tiny_fork0"]), *fork0)
    check_toy_landscapes(drawn(files["fig6_toy"]), read(files["toy"]))
    segments = read(files["segments"])
    # forks 0 and 1 of a 3-epoch run: 4 + 3 child checkpoints, 2 metrics, 5 α
    assert len(segments) == (4 + 3) * 2 * 5
    assert {r["fork_epoch"] for r in segments} == {"0", "1"}


def test_segments_against_direct_evaluation(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    root, summary, graph = tiny
    rows = read(summary["files"]["segments"])
    data = eval_subset(shared_data)
    run_a, run_b = children(root, graph, 1)
    spe = run_a.meta["steps_per_epoch"]
    for child_epoch, step in ((0, spe), (2, 3 * spe)):
        sel = {
            float(r["lambda"]): r
            for r in rows
            if r["fork_epoch"] == "1" and float(r["child_epoch"]) == child_epoch and r["metric"] == "loss"
        }
        for lam, run in ((0.0, run_a), (1.0, run_b)):
            direct = evaluate(load_run_model(run, step), data)["loss"]
            assert float(sel[lam]["value"]) == pytest.approx(direct, rel=1e-6)
            assert float(sel[lam]["barrier"]) == pytest.approx(0.0, abs=1e-6)
        if child_epoch == 0:  # both siblings are the fork point: the segment is one point
            assert {r["value"] for r in sel.values()} == {sel[0.0]["value"]}


def flat(theta: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return np.concatenate([theta[n].double().numpy().ravel() for n in names])


def test_geometry_against_numpy(tiny) -> None:  # type: ignore[no-untyped-def]
    root, summary, graph = tiny
    run_a, run_b = children(root, graph, 0)
    names = [n for n, _ in load_run_model(run_a).named_parameters()]
    fork, final = run_a.checkpoint_steps()[0], run_a.checkpoint_steps()[-1]
    v1, v2 = (flat(run.load_state(final), names) for run in (run_a, run_b))
    base = flat(run_a.load_state(fork), names)

    def degrees(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.degrees(np.arccos(x @ y / np.linalg.norm(x) / np.linalg.norm(y))))

    angles = {r["base"]: float(r["angle_degrees"]) for r in read(summary["files"]["angles"]) if r["fork_epoch"] == "0"}
    assert angles["origin"] == pytest.approx(degrees(v1, v2), rel=1e-6)
    assert angles["fork"] == pytest.approx(degrees(v1 - base, v2 - base), rel=1e-6)
    geo = [r for r in read(summary["files"]["geometry"]) if r["fork_epoch"] == "0"]
    assert float(geo[0]["distance"]) == 0.0 and math.isnan(float(geo[0]["plane_cos"]))  # undefined at the fork
    assert float(geo[-1]["plane_cos"]) == pytest.approx(1.0)
    assert float(geo[-1]["distance"]) == pytest.approx(np.linalg.norm(v1 - v2), rel=1e-9)
    middle = geo[1]
    step = int(middle["step"])
    d_t = flat(run_a.load_state(step), names) - flat(run_b.load_state(step), names)
    assert float(middle["plane_cos"]) == pytest.approx(d_t @ (v1 - v2) / np.linalg.norm(d_t) / np.linalg.norm(v1 - v2))


def test_prediction_q1_against_finite_differences(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    """q1 = dᵀ∇²L(θ_1)d equals f″(0) of f(t) = L(θ_1 + t d), by central differences in float64."""
    root, summary, graph = tiny
    run_a, run_b = children(root, graph, 0)
    pred = next(r for r in read(summary["files"]["predictions"]) if r["fork_epoch"] == "0")
    model = load_run_model(run_a).double()
    theta_1 = {k: v.double() for k, v in run_a.load_state().items()}
    theta_2 = {k: v.double() for k, v in run_b.load_state().items()}
    data = eval_subset(shared_data)
    x, y = next(data.batches(len(data)))

    def f(t: float) -> float:
        params = {k: theta_1[k] + t * (theta_2[k] - theta_1[k]) for k in theta_1}
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(functional_call(model, params, (x.double(),)), y))

    h = 1e-5  # small enough that no ReLU changes sign within ±h (the Hessian ignores kinks)
    second = (f(h) - 2 * f(0.0) + f(-h)) / h**2
    assert float(pred["q1"]) == pytest.approx(second, rel=1e-5)
    curves = [r for r in read(summary["files"]["prediction_curves"]) if r["fork_epoch"] == "0"]
    assert float(curves[0]["measured"]) == 0.0 and float(curves[-1]["measured"]) == 0.0
    # the measured curve is L(θ_α) − the endpoint line, L from the direct formula above
    mid = next(r for r in curves if float(r["alpha"]) == 0.5)
    assert float(mid["measured"]) == pytest.approx(f(0.5) - (f(0.0) + f(1.0)) / 2, abs=1e-5)


def test_layerwise_tables_agree_with_the_prediction_step(tiny) -> None:  # type: ignore[no-untyped-def]
    _, summary, _ = tiny
    files = summary["files"]
    layers = read(files["layerwise"])
    assert {r["layer"] for r in layers} == {"layers.0.linear", "layers.1.linear", "head"}
    assert sorted({float(r["child_epoch"]) for r in layers}) == [1.0, 2.0, 3.0]  # the fork itself left out
    sums = {(float(r["child_epoch"]), r["quantity"]): float(r["value"]) for r in read(files["cross_block_sums"])}
    final = 3.0
    # all layers interpolated at the final siblings = the prediction step's measured B(½) (another code path)
    mid = next(r for r in read(files["prediction_curves"]) if r["fork_epoch"] == "0" and float(r["alpha"]) == 0.5)
    assert sums[(final, "measured: all layers interpolated")] == pytest.approx(float(mid["measured"]), abs=1e-6)
    # Σ of all cross-blocks with ½(H₁+H₂) is Prop. 1 at α = ½: ⅛·½(q1 + q2) from the prediction step
    pred = next(r for r in read(files["predictions"]) if r["fork_epoch"] == "0")
    assert sums[(final, "Prop. 1 at ½ = Σ all blocks, ½(H₁+H₂)")] == pytest.approx(
        (float(pred["q1"]) + float(pred["q2"])) / 16, rel=1e-4
    )
    blocks = [r for r in read(files["cross_blocks"]) if float(r["child_epoch"]) == final]
    assert sum(float(r["theta_1"]) for r in blocks) == pytest.approx(float(pred["q1"]) / 8, rel=1e-4)
    diag = sum(float(r["predicted_half"]) for r in layers if float(r["child_epoch"]) == final)
    assert sums[(final, "Σ diagonal blocks = Σ_ℓ Prop. 2")] == pytest.approx(diag, rel=1e-6)


def test_steps_are_deterministic(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    root, _, graph = tiny
    steps = graph[1][0]
    inputs = {m: {"run": str(r.path)} for m, r in zip(("a", "b"), children(root, graph, 1))}
    ctx = StepContext(root / "scratch", {"data_dir": str(shared_data), "device": "cpu", "progress": False})
    for kind in ("segments", "geometry"):
        step = getattr(steps, kind)
        stored = json.loads((root / "runs" / "steps" / step.name / "result.json").read_text())["result"]
        assert finite_or_none(STEP_KINDS[f"singh_{kind}"](ctx, dict(step.config), inputs)) == stored


def test_rerun_recomputes_nothing(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    root, _, graph = tiny
    ctx = ExperimentContext(
        out=root / "unused", runs_dir=str(root / "runs"), data_dir=str(shared_data), device="cpu", progress=False
    )
    _, ran = ctx.run_steps(step for pairs in graph.values() for siblings in pairs for step in siblings.steps())
    assert ran and {name.split("_")[0] for name in ran} == {"train"}  # self-caching run store


def test_cli_dispatches_to_the_registered_singh(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = []
    fake = dataclasses.replace(EXPERIMENT, run=lambda options, ctx: calls.append((options, ctx)) or {"files": {}})
    monkeypatch.setitem(registry.EXPERIMENTS, "singh", fake)
    assert (
        main(
            [
                "run",
                "singh",
                "--preset",
                "tiny",
                "--out",
                "o",
                "--runs-dir",
                "r",
                "--data-dir",
                "d",
                "--device",
                "cpu",
                "--no-progress",
                "--offline",
                "--json",
            ]
        )
        == 0
    )
    options, ctx = calls[0]
    assert isinstance(options, SinghOptions) and options == load_preset("singh", "tiny", SinghOptions)
    assert (ctx.out, ctx.runs_dir, ctx.data_dir, ctx.device, ctx.progress) == (Path("o"), "r", "d", "cpu", False)
    assert (ctx.experiment, ctx.preset) == ("singh", "tiny")
    assert main(["run", "singh", "--preset", "tiny", "--json"]) == 0
    assert calls[1][1].out == Path("out/singh-tiny")  # the default output directory: out/EXPERIMENT-PRESET
    capsys.readouterr()
    monkeypatch.undo()  # the real experiment: an unknown preset fails before anything runs
    assert main(["run", "singh", "--preset", "nope", "--offline"]) == 2
    assert "presets: smoke, paper, tiny" in capsys.readouterr().err


def test_bad_presets_and_non_siblings_are_clear_errors(tiny) -> None:  # type: ignore[no-untyped-def]
    root, _, graph = tiny
    preset = load_preset("singh", "tiny", SinghOptions)
    table = read_presets("singh")["tiny"]
    for options, match in (
        ({"layerwise_forks": (2,)}, "not fork epochs"),
        ({"fork_epochs": (3,)}, "no child training"),
        ({"fork_epochs": ()}, "distinct non-negative"),
        ({"bn": "average"}, "bn must be"),
    ):
        with pytest.raises(ValueError, match=match):
            build_graph(dataclasses.replace(preset, **options))
        with pytest.raises(PresetError, match=match):  # the loader runs the same checks
            parse_preset(SinghOptions, {**table, **options}, name="tiny")
    run_a, _ = children(root, graph, 0)
    _, run_c = children(root, graph, 1)
    with pytest.raises(ValueError, match="not siblings"):
        sibling_runs({"a": {"run": str(run_a.path)}, "b": {"run": str(run_c.path)}})
