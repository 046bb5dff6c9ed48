"""Experiments end to end on the tiny Benkő preset (real MNIST): graph, caching, tables, figures,
predictions and sharpness on the same runs."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lmclab.cli import main
from lmclab.experiments.benko import run_benko
from lmclab.experiments.predict import predict_vs_measure, sharpness
from lmclab.store import RunStore


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("benko")
    summary = run_benko("tiny", out=root / "out", runs_dir=str(root / "runs"), data_dir=str(shared_data),
                        device="cpu", progress=False, say=lambda _: None)
    return root, summary


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_benko_tables_and_figures(tiny) -> None:  # type: ignore[no-untyped-def]
    root, summary = tiny
    files = summary["files"]
    for key in ("loss_mlp_tiny", "fig7", "fig8"):
        assert Path(files[key]).stat().st_size > 20_000
    rows = read(files["loss_table"])
    # 2 pairs × 2 paths × 2 splits × 5 λ × (true + 2 centres × 4 orders)
    assert len(rows) == 2 * 2 * 2 * 5 * 9
    for pair in ("0", "1"):
        for path in ("naive", "aligned"):
            sel = [r for r in rows if r["pair"] == pair and r["path"] == path and r["split"] == "test"]
            true = {float(r["lambda"]): float(r["value"]) for r in sel if r["curve"] == "true"}
            at_a = {float(r["lambda"]): float(r["value"]) for r in sel if r["center"] == "a" and r["order"] == "1"}
            at_b = {float(r["lambda"]): float(r["value"]) for r in sel if r["center"] == "b" and r["order"] == "1"}
            # every approximation passes through the true loss at its own centre
            assert at_a[0.0] == pytest.approx(true[0.0], rel=1e-5)
            assert at_b[1.0] == pytest.approx(true[1.0], rel=1e-5)
    rmse = read(files["rmse_table"])
    assert {r["approximation"] for r in rmse} == {"a1", "a2", "b1", "b2", "direct"}
    zero = [float(r["rmse"]) for r in rmse if r["approximation"] == "a1" and float(r["lambda"]) == 0.0]
    assert max(zero) < 1e-4  # the approximation centred at A is exact at A


def test_benko_rerun_recomputes_nothing(tiny, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = tiny
    again = run_benko("tiny", out=root / "out2", runs_dir=str(root / "runs"), data_dir=str(shared_data),
                      device="cpu", progress=False, say=lambda _: None)
    assert {name.split("_")[0] for name in again["steps_run"]} <= {"train", "align"}  # stores of their own


def test_predictions_and_sharpness_on_a_pair(tiny, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _ = tiny
    runs = RunStore(root / "runs").runs()
    summary = predict_vs_measure(runs[0], runs[1], split="test", examples=200, points=5, out=tmp_path,
                                 data_dir=str(shared_data), device="cpu", say=lambda _: None)
    blocks = read(summary["files"]["cross_blocks"])
    total = sum(float(r["value"]) for r in blocks)
    assert total == pytest.approx(summary["q1"] / 8, rel=1e-4)  # eq. 20 blocks sum to ⅛ dᵀH₁d
    curve = read(summary["files"]["curve"])
    assert float(curve[0]["measured"]) == 0.0 and float(curve[-1]["predicted"]) == 0.0
    result = sharpness(runs[0], examples=200, probes=30, data_dir=str(shared_data), device="cpu")
    for key in ("trace", "scale_aware_trace"):
        t = result[key]
        assert t["ci_low"] <= t["estimate"] <= t["ci_high"] and np.isfinite(t["estimate"])
    assert result["top_eigenvalue"] > 0


def test_cli_run_and_sharpness(tiny, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    root, _ = tiny
    io = ["--runs-dir", str(root / "runs"), "--data-dir", str(shared_data), "--offline", "--device", "cpu"]
    assert main(["run", "benko", "--preset", "tiny", "--out", str(root / "cli"), "--no-progress", *io, "--json"]) == 0
    assert "fig8" in json.loads(capsys.readouterr().out)["files"]
    run = RunStore(root / "runs").runs()[0]
    assert main(["sharpness", run.hash[:8], "--subset", "100", "--probes", "10", "--no-eigenvalue", *io]) == 0
    assert "trace" in capsys.readouterr().out
    assert main(["run", "benko", "--preset", "nope", *io]) == 2
    assert "presets: smoke, paper, tiny" in capsys.readouterr().err


def test_singh_set_barrier_against_hand_made_layer_interpolation(shared_data: Path) -> None:
    """(1−α)L(θ_{2→1}) + αL(θ_{1→2}) − [(1−α)L_1 + αL_2], θ_{2→1} = θ_1 with only the set interpolated."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from lmclab.data import DeviceDataset
    from lmclab.experiments.predict import endpoint_losses, singh_set_barrier
    from lmclab.models import build_model

    data = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=200, progress=False)
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=[16, 16]).eval()
    torch.manual_seed(1)
    theta_1 = dict(model.state_dict())
    theta_2 = {k: v + 0.3 * torch.randn_like(v) for k, v in theta_1.items()}
    tensors = ["layers.1.linear.weight", "layers.1.linear.bias"]
    x, y = next(iter(data.batches(1000)))

    def loss(theta: dict) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(functional_call(model, theta, (x,)), y))

    def only(base: dict, a: float) -> dict:
        return {k: ((1 - a) * theta_1[k] + a * theta_2[k]) if k in tensors else base[k] for k in base}

    lambdas = [0.0, 0.25, 0.5, 1.0]
    expected = [(1 - a) * loss(only(theta_1, a)) + a * loss(only(theta_2, a)) - ((1 - a) * loss(theta_1) + a * loss(theta_2))
                for a in lambdas]
    got = singh_set_barrier(model, theta_1, theta_2, data, lambdas, tensors)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    ends = endpoint_losses(model, theta_1, theta_2, data)
    np.testing.assert_allclose(ends, (loss(theta_1), loss(theta_2)), rtol=1e-6)
    np.testing.assert_allclose(singh_set_barrier(model, theta_1, theta_2, data, lambdas, tensors, ends), got)
