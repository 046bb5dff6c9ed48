"""Mode-connecting curves (Garipov et al. 2018): parametrisations against their formulas and finite differences,
training, BatchNorm statistics along a curve, the Taylor expansion of t ↦ L(φ(t)) against finite differences
and an exact polynomial, the stored curve (reuse, resume), and `lmclab curve` (help, bad flags, JSON)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.polynomial import Polynomial
from torch import nn

from figures import assert_barriers_written, assert_lines, check_png, drawn, expected_barrier_text, panels
from lmclab.cli import main
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.curvature.curve_taylor import curve_loss_derivatives, curve_taylor_values
from lmclab.curvature.derivatives import loss_derivatives
from lmclab.data import DeviceDataset
from lmclab.experiments import curve as curve_module
from lmclab.experiments.curve import CurveSettings, fit_curve
from lmclab.paths import barriers, evaluate_path
from lmclab.paths.mode_curves import (
    Curve,
    curve_point,
    curve_tangent,
    curve_weights,
    evaluate_curve,
    straight_curve,
    train_curve,
)
from lmclab.points import distance, lerp
from lmclab.store import Store
from lmclab.training import RunOptions, load_run_model, train

TINY = RunConfig(
    data=DataConfig("mnist", train_per_class=50),
    model=ModelConfig("mlp", hidden=(32, 32)),
    train=TrainConfig(optimizer="adam", lr=3e-3, batch_size=50, epochs=3),
)
SETTINGS = CurveSettings(epochs=2, lr=3e-3, batch_size=50, train_subset=500)


def random_point(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g, dtype=dtype),
        "b": torch.randn(3, generator=g, dtype=dtype),
        "count": torch.tensor(seed),  # a non-floating buffer: carried over from θ_A
    }


def random_curve(kind: str, bends: int, seed: int = 0) -> Curve:
    ends = straight_curve(kind, random_point(seed), random_point(seed + 1), bends)
    return Curve(kind, ends.start, tuple(random_point(seed + 10 + i) for i in range(bends)), ends.end)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-12) -> bool:
    return all(torch.allclose(a[k].double(), b[k].double(), atol=atol, rtol=0) for k in a if a[k].is_floating_point())


# ------------------------------------------------------------------------------------------ parametrisations


def test_quadratic_bezier_is_garipovs_formula() -> None:
    c = random_curve("bezier", 1)
    a, m, b = c.points
    for t in (0.0, 0.3, 0.5, 0.9, 1.0):
        want = {k: (1 - t) ** 2 * a[k] + 2 * t * (1 - t) * m[k] + t**2 * b[k] for k in ("w", "b")}
        assert close(curve_point(c, t), want)
        slope = {k: -2 * (1 - t) * a[k] + 2 * (1 - 2 * t) * m[k] + 2 * t * b[k] for k in ("w", "b")}
        assert close(curve_tangent(c, t), slope)
    assert curve_point(c, 0.37)["count"] == a["count"]


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("bends", [1, 2, 3])
def test_endpoints_exact_and_tangent_is_the_finite_difference(kind: str, bends: int) -> None:
    c = random_curve(kind, bends, seed=bends)
    for k in ("w", "b"):
        assert torch.equal(curve_point(c, 0.0)[k], c.start[k]) and torch.equal(curve_point(c, 1.0)[k], c.end[k])
    for t in (0.05, 0.21, 0.62, 0.93):
        weights = curve_weights(kind, bends, t)
        assert math.isclose(sum(float(w) for w in weights), 1.0, abs_tol=1e-12)  # a partition of unity
        h = 1e-6
        fd = {k: (curve_point(c, t + h)[k] - curve_point(c, t - h)[k]) / (2 * h) for k in ("w", "b")}
        assert close(curve_tangent(c, t), fd, atol=1e-7)


@pytest.mark.parametrize("bends", [1, 2, 3])
def test_polychain_passes_through_its_bends_and_straight_curves_are_the_line(bends: int) -> None:
    c = random_curve("polychain", bends)
    for i, p in enumerate(c.points):
        assert close(curve_point(c, i / (bends + 1)), p)
    for kind in ("bezier", "polychain"):
        line = straight_curve(kind, c.start, c.end, bends)
        for t in (0.1, 0.45, 0.8):
            assert close(curve_point(line, t), lerp(c.start, c.end, t), atol=1e-12)
            assert close(curve_tangent(line, t), {k: c.end[k] - c.start[k] for k in ("w", "b")}, atol=1e-12)


def test_bad_curves_are_refused() -> None:
    a, b = random_point(0), random_point(1)
    with pytest.raises(ValueError, match="kind"):
        straight_curve("spline", a, b)
    with pytest.raises(ValueError, match="bends"):
        straight_curve("bezier", a, b, bends=4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        curve_point(straight_curve("bezier", a, b), 1.5)


# ------------------------------------------------------------------------------------------ a trained pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("runs")
    opts = RunOptions(runs_dir=str(root), data_dir=str(shared_data), device="cpu", progress=False, download=False)
    runs = [train(dataclasses.replace(TINY, seeds=SeedConfig.from_seed(s)), opts) for s in (0, 1)]
    return root, runs


@pytest.fixture(scope="module")
def train_data(shared_data: Path) -> DeviceDataset:
    return DeviceDataset.load("mnist", "train", data_dir=shared_data, subset=500, augment=False, progress=False)


def test_training_lowers_the_maximum_loss_along_the_curve_deterministically(pair, train_data) -> None:  # type: ignore[no-untyped-def]
    _, (run_a, run_b) = pair
    model = load_run_model(run_a)
    line = straight_curve("bezier", run_a.load_state(), run_b.load_state(), 1)
    ts = [i / 10 for i in range(11)]
    # the untrained curve is the straight path: same rows as evaluate_path
    before = evaluate_curve(model, line, {"train": train_data}, ts=ts, progress=False)
    straight = evaluate_path(model, line.start, line.end, {"train": train_data}, lambdas=ts, progress=False)
    assert [r["value"] for r in before] == pytest.approx([r["value"] for r in straight], abs=1e-6)
    trained, record = train_curve(model, line, train_data, epochs=4, lr=3e-3, batch_size=50, seed=0, progress=False)
    again, _ = train_curve(model, line, train_data, epochs=4, lr=3e-3, batch_size=50, seed=0, progress=False)
    assert all(torch.equal(trained.bends[0][k], again.bends[0][k]) for k in trained.bends[0])  # seeded, CPU
    assert distance(trained.bends[0], line.bends[0]) > 0 and len(record.history) == 4
    for k in line.start:  # the endpoints are not trained
        assert torch.equal(trained.start[k], line.start[k]) and torch.equal(trained.end[k], line.end[k])
    after = evaluate_curve(model, trained, {"train": train_data}, ts=ts, progress=False)
    loss_before = [r["value"] for r in before if r["metric"] == "loss"]
    loss_after = [r["value"] for r in after if r["metric"] == "loss"]
    assert loss_after[0] == loss_before[0] and loss_after[-1] == loss_before[-1]
    b_before, b_after = barriers(ts, loss_before), barriers(ts, loss_after)
    assert b_before["barrier"] > 0.1, "the tiny pair should have a barrier on the straight path"
    assert max(loss_after) < max(loss_before) - 0.05
    assert b_after["rebasin"] < 0.5 * b_before["rebasin"]


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 16)
        self.bn = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.fc(x.flatten(1)))))


def bn_point(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = BNNet()
    net.bn.running_mean.normal_()
    net.bn.running_var.uniform_(0.5, 2.0)
    net.bn.weight.data.uniform_(0.5, 1.5)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("chunk", [1, 3])  # one t at a time with the model; stacked (vmap) with a partial last chunk
def test_batchnorm_statistics_are_recomputed_at_every_t(shared_data: Path, chunk: int) -> None:
    data = DeviceDataset.load("mnist", "train", data_dir=shared_data, subset=200, augment=False, progress=False)
    c = random_bn_curve()
    ts = [0.0, 0.3, 0.5, 1.0]
    rows = evaluate_curve(BNNet(), c, {"train": data}, ts=ts, bn="reset", bn_data=data, chunk=chunk, progress=False)
    stored = evaluate_curve(BNNet(), c, {"train": data}, ts=ts, bn="none", chunk=chunk, progress=False)
    x, y = next(data.batches(len(data)))
    for t in ts:
        p = curve_point(c, t)  # by hand: BN with the mean and unbiased variance of its inputs over the data
        h = F.linear(x.flatten(1), p["fc.weight"], p["fc.bias"])
        z = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=True) + 1e-5) * p["bn.weight"] + p["bn.bias"]
        loss = F.cross_entropy(F.linear(torch.relu(z), p["head.weight"], p["head.bias"]), y).item()
        got = [r["value"] for r in rows if r["lambda"] == t and r["metric"] == "loss"]
        kept = [r["value"] for r in stored if r["lambda"] == t and r["metric"] == "loss"]
        assert got == pytest.approx([loss], rel=1e-5)
        assert abs(kept[0] - loss) > 1e-3  # the curve's own (combined) statistics give another loss
    with pytest.raises(ValueError, match="bn_data"):
        evaluate_curve(BNNet(), c, {"train": data}, ts=ts, bn="reset", progress=False)


def random_bn_curve() -> Curve:
    line = straight_curve("bezier", bn_point(0), bn_point(1), 1)
    return Curve("bezier", line.start, (bn_point(2),), line.end)


def test_training_a_batchnorm_curve_uses_batch_statistics(shared_data: Path) -> None:
    data = DeviceDataset.load("mnist", "train", data_dir=shared_data, subset=200, augment=False, progress=False)
    c = random_bn_curve()
    trained, record = train_curve(BNNet(), c, data, epochs=2, lr=1e-2, batch_size=50, progress=False)
    assert torch.equal(trained.bends[0]["bn.running_mean"], c.bends[0]["bn.running_mean"])  # buffers untouched
    assert not torch.equal(trained.bends[0]["bn.weight"], c.bends[0]["bn.weight"])
    assert record.history[-1]["train_loss"] < record.history[0]["train_loss"]


# ------------------------------------------------------------------------------------------ Taylor along a curve


def tiny_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.Tanh(), nn.Linear(12, 10)).double()


def mean_loss(model: nn.Module, curve: Curve, t: float, x: torch.Tensor, y: torch.Tensor) -> float:
    scratch = copy.deepcopy(model)
    scratch.load_state_dict(curve_point(curve, t))
    with torch.no_grad():
        return F.cross_entropy(scratch(x.double()), y).item()


@pytest.mark.parametrize(("kind", "bends", "t0"), [("bezier", 1, 0.4), ("bezier", 3, 0.7), ("polychain", 2, 0.2)])
def test_curve_derivatives_match_finite_differences(shared_data: Path, kind: str, bends: int, t0: float) -> None:
    data = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=60, augment=False, progress=False)
    x, y = next(data.batches(60))
    model = tiny_mlp(0)
    points = [tiny_mlp(s).state_dict() for s in range(bends + 2)]
    c = Curve(kind, points[0], tuple(points[1:-1]), points[-1])
    got = curve_loss_derivatives(model, c, t0, data, order=3, batch_size=25, dtype=torch.float64).coefficients
    g = lambda t: mean_loss(model, c, t, x, y)  # noqa: E731
    assert got[0].item() == pytest.approx(g(t0), rel=1e-12)
    h = 2.5e-3  # central differences, errors of order h⁴
    d1 = (-g(t0 + 2 * h) + 8 * g(t0 + h) - 8 * g(t0 - h) + g(t0 - 2 * h)) / (12 * h)
    d2 = (-g(t0 + 2 * h) + 16 * g(t0 + h) - 30 * g(t0) + 16 * g(t0 - h) - g(t0 - 2 * h)) / (12 * h**2)
    d3 = (-g(t0 + 3 * h) + 8 * g(t0 + 2 * h) - 13 * g(t0 + h) + 13 * g(t0 - h) - 8 * g(t0 - 2 * h) + g(t0 - 3 * h)) / (
        8 * h**3
    )
    assert got[1:].tolist() == pytest.approx([d1, d2, d3], rel=1e-5, abs=1e-7)
    if kind == "polychain":  # inside a segment the curve is the line through φ(t₀) along φ'(t₀)
        names = [n for n, _ in model.named_parameters()]
        line = loss_derivatives(
            model, curve_point(c, t0), curve_tangent(c, t0, names), data, order=3, method="jvp", dtype=torch.float64
        )
        assert got.tolist() == pytest.approx(line.coefficients.tolist(), rel=1e-10, abs=1e-12)


def squared_error(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits - targets).square().sum()


def test_curve_derivatives_of_a_quadratic_loss_are_the_exact_polynomial() -> None:
    """A linear model and a squared error: L(φ(t)) is a polynomial of degree 2(K+1) in t; its derivatives at
    t₀ are exact, and those above its degree vanish."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    targets = torch.randn(7, 3, generator=g, dtype=torch.float64)
    model = nn.Linear(4, 3).double()
    bends = 1
    points = [
        {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in model.state_dict().items()}
        for _ in range(bends + 2)
    ]
    c = Curve("bezier", points[0], tuple(points[1:-1]), points[-1])
    n = bends + 1
    bernstein = [math.comb(n, i) * Polynomial([0, 1]) ** i * Polynomial([1, -1]) ** (n - i) for i in range(n + 1)]
    # z(φ(t)) = Σ_i w_i(t) (W_i x + b_i): the model is linear in θ
    z_points = [(x @ p["weight"].T + p["bias"]).numpy() for p in points]
    loss = Polynomial([0.0])
    for row in range(7):
        for col in range(3):
            z = sum((w * z_points[i][row, col] for i, w in enumerate(bernstein)), Polynomial([0.0]))
            loss += (z - targets[row, col].item()) ** 2
    loss = loss / 7
    t0 = 0.35
    got = curve_loss_derivatives(
        model, c, t0, [(x, targets)], order=2 * n + 1, loss_fn=squared_error, dtype=torch.float64
    )
    want = [loss.deriv(k)(t0) if k else loss(t0) for k in range(2 * n + 2)]
    assert got.coefficients.tolist() == pytest.approx(want, rel=1e-10, abs=1e-9)
    assert got.coefficients[-1].item() == pytest.approx(0.0, abs=1e-9)
    ts = [0.0, 0.5, 1.0]
    exact = curve_taylor_values(got, t0, ts, order=2 * n)  # the full expansion is the polynomial itself
    assert exact.tolist() == pytest.approx([loss(t) for t in ts], rel=1e-10)


# ------------------------------------------------------------------------------------------ stored curves


def test_stored_curve_is_reused_and_resumes_bit_identically(
    pair, shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    _, (run_a, run_b) = pair
    kw = dict(settings=SETTINGS, data_dir=str(shared_data), device="cpu", progress=False, say=lambda _: None)
    whole = fit_curve(run_a, run_b, store=Store(tmp_path / "whole"), **kw)  # type: ignore[arg-type]
    assert not whole.reused and (whole.path / "curve.safetensors").is_file()
    assert not (whole.path / "resume.safetensors").exists()
    again = fit_curve(run_a, run_b, store=Store(tmp_path / "whole"), **kw)  # type: ignore[arg-type]
    assert again.reused and again.path == whole.path
    assert all(torch.equal(again.curve.bends[0][k], whole.curve.bends[0][k]) for k in whole.curve.bends[0])

    real = curve_module.train_curve

    def killed_after_one_epoch(*args, **kwargs):  # type: ignore[no-untyped-def]
        save = kwargs["on_epoch"]

        def on_epoch(epoch, *rest):  # type: ignore[no-untyped-def]
            save(epoch, *rest)
            raise KeyboardInterrupt

        return real(*args, **{**kwargs, "on_epoch": on_epoch})

    monkeypatch.setattr(curve_module, "train_curve", killed_after_one_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit_curve(run_a, run_b, store=Store(tmp_path / "killed"), **kw)  # type: ignore[arg-type]
    monkeypatch.setattr(curve_module, "train_curve", real)
    said: list[str] = []
    resumed = fit_curve(run_a, run_b, store=Store(tmp_path / "killed"), **{**kw, "say": said.append})  # type: ignore[arg-type]
    assert said and "resuming" in said[0] and "epoch 1" in said[0]
    assert resumed.path.name == whole.path.name and not resumed.reused
    assert all(torch.equal(resumed.curve.bends[0][k], whole.curve.bends[0][k]) for k in whole.curve.bends[0])
    assert resumed.info["history"] == whole.info["history"]


# ------------------------------------------------------------------------------------------ the command


def test_help_and_bad_flags_exit_2_with_one_line(capsys: pytest.CaptureFixture[str], pair) -> None:  # type: ignore[no-untyped-def]
    root, (run_a, run_b) = pair
    with pytest.raises(SystemExit) as exc:
        main(["curve", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--kind", "--bends", "--align", "--epochs", "--points", "--subset", "--json", "bezier, polychain"):
        assert flag in text
    before = sorted(p.name for p in root.iterdir())
    for flags, named in (
        (["--bends", "4"], "--bends"),
        (["--bends", "0"], "--bends"),
        (["--kind", "spline"], "--kind"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--epochs", "0"], "--epochs"),
        (["--points", "1"], "--points"),
        (["--align", "magic"], "--align"),
        (["--bn", "repair"], "--bn"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["curve", run_a.path.name, run_b.path.name, "--runs-dir", str(root), *flags])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and named in err, (flags, err)
    assert main(["curve", "nosuchrun", run_b.path.name, "--runs-dir", str(root)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written


def test_curve_json_has_interpolates_barrier_rows_and_the_figure(
    capsys: pytest.CaptureFixture[str], pair, shared_data: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    root, (run_a, run_b) = pair
    common = ["--runs-dir", str(root), "--data-dir", str(shared_data), "--device", "cpu", "--no-progress", "--json"]
    common += ["--points", "5", "--subset", "200"]
    assert (
        main(
            ["interpolate", run_a.path.name, run_b.path.name, "--align", "weight", "--out", str(tmp_path / "i")]
            + common
        )
        == 0
    )
    straight = json.loads(capsys.readouterr().out)["barriers"]
    argv = ["curve", run_a.path.name, run_b.path.name, "--kind", "bezier", "--bends", "1", "--epochs", "2"]
    argv += ["--lr", "3e-3", "--batch-size", "50", "--train-subset", "500", "--out", str(tmp_path / "c"), *common]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["barriers"]
    assert {r["path"] for r in rows} == {"naive", "weight-matched", "bezier"}
    assert {tuple(sorted(r)) for r in rows} == {tuple(sorted(r)) for r in straight}  # the same columns
    for r in straight:  # the straight paths agree with interpolate's
        twin = [q for q in rows if all(q[k] == r[k] for k in ("path", "split", "metric"))]
        assert len(twin) == 1 and twin[0]["barrier"] == pytest.approx(r["barrier"], abs=1e-6)
    naive = {(r["split"], r["metric"]): r for r in rows if r["path"] == "naive"}
    curve = {(r["split"], r["metric"]): r for r in rows if r["path"] == "bezier"}
    assert curve[("train", "loss")]["rebasin"] < naive[("train", "loss")]["rebasin"]
    assert out["curve"]["reused"] is False and out["curve"]["align"] is None
    assert main([*argv, "--split", "test", "--points", "3", "--compare", "none", "--out", str(tmp_path / "c2")]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["curve"]["reused"] is True and again["curve"]["path"] == out["curve"]["path"]
    assert {r["path"] for r in again["barriers"]} == {"naive", "bezier"}

    saved = drawn(out["figure"])
    check_png(saved)
    with open(out["paths"]) as fh:
        table = list(csv.DictReader(fh))
    loss_notes: list[str] = []
    for ax, metric in zip(panels(saved, 3), ("loss", "loss", "error"), strict=True):
        expected, written = [], []
        for name in ("naive", "weight-matched", "bezier"):
            for split in ("train", "test"):
                sel = sorted(
                    (float(r["lambda"]), float(r["value"]))
                    for r in table
                    if r["path"] == name and r["split"] == split and r["metric"] == metric
                )
                kind = "curve" if name == "bezier" else "straight"
                lam, val = [p[0] for p in sel], [p[1] for p in sel]
                expected.append((f"{name} ({kind}) {split}", lam, val))
                written.append(expected_barrier_text([(lam, val)], metric))
        for split in ("train", "test"):
            first = [s for s in expected if s[0] == f"naive (straight) {split}"][0][2]
            expected.append((f"endpoints' mean, {split}", [0, 1], [0.5 * (first[0] + first[-1])] * 2))
        assert_lines(ax, expected, f"curves {metric}")
        notes = [t.get_text() for t in ax.texts if type(t).__name__ == "Annotation"]
        assert_barriers_written(ax, notes, f"curves {metric}")  # each note sits on a drawn line
        if metric == "loss":
            loss_notes += notes
            want_loss = sorted(w for w in written if w is not None)
        else:
            assert sorted(notes) == sorted(w for w in written if w is not None)
        assert ax.get_ylabel() == metric and "train, 200 examples" in ax.get_title()
    assert sorted(loss_notes) == want_loss  # every loss barrier once, in the full or the close-up panel
    close_up = panels(saved, 3)[1]
    low, high = close_up.get_ylim()
    bezier = [float(r["value"]) for r in table if r["path"] == "bezier" and r["metric"] == "loss"]
    assert low <= min(bezier) and max(bezier) <= high and "close-up" in close_up.get_title()
    assert np.isfinite([float(r["value"]) for r in table]).all()
