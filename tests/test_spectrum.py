"""Hessian spectra: top-k eigenpairs, SLQ density, per-block curvature, along paths, figures and `lmclab spectrum`.

Every number is checked against the dense Hessian of a tiny float64 net (`dense_hessian`: torch.func.hessian
of the loss as a function of the flat parameters, independent of the HVP code)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from figures import check_density, check_path_curvature, drawn
from lmclab.cli import main
from lmclab.curvature.hessian import HessianOperator, dense_hessian
from lmclab.curvature.spectrum import (
    PathSpectra,
    SpectralDensity,
    Spectrum,
    block_curvature,
    block_partition,
    curve_spectra,
    hessian_spectrum,
    lanczos,
    path_spectra,
    residual_blocks,
    slq_density,
    top_eigenpairs,
)
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.experiments.curve import CurveSettings, fit_curve
from lmclab.models import build_model
from lmclab.models.layers import BasicBlock, ConvNormAct
from lmclab.paths import reset_bn_stats
from lmclab.paths.mode_curves import Curve, curve_point
from lmclab.permutation import Permutation, derive_spec
from lmclab.points import flatten, lerp, parameter_names, unflatten
from lmclab.report.spectrum import plot_density, plot_path_curvature
from lmclab.report.tables import write_csv
from lmclab.store import Store

# ---------------------------------------------------------------------------------------- fixtures


def tiny_mlp(seed: int = 0) -> nn.Module:
    """flatten → 4-5 tanh → 5-3 (43 parameters; blocks of 25 and 18), float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def batches(n: int = 23, batch: int = 10, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n float64 examples of shape (1, 2, 2) in batches of `batch` (an uneven last batch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, list, torch.Tensor, HessianOperator]:
    model, data = tiny_mlp(), batches()
    h = dense_hessian(model, None, data)
    return model, data, h, HessianOperator(model, None, data)


def block_slice(model: nn.Module, tensors: list[str]) -> torch.Tensor:
    """Indices of `tensors` in the flat parameter vector (named_parameters order)."""
    idx, offset = [], 0
    for name, p in model.named_parameters():
        if name in tensors:
            idx += list(range(offset, offset + p.numel()))
        offset += p.numel()
    return torch.tensor(idx)


# ---------------------------------------------------------------------------------------- top-k


def test_top_k_matches_dense_eigvalsh(setup) -> None:  # noqa: ANN001
    model, _, h, op = setup
    exact = torch.linalg.eigvalsh(h).flip(0)  # descending
    assert exact[-1] < 0  # an indefinite Hessian: "largest" must mean algebraic, not |λ|
    pairs = top_eigenpairs(op, 6, tol=0)
    np.testing.assert_allclose(pairs.values, exact[:6].numpy(), rtol=1e-6)
    assert max(pairs.residuals) < 1e-8
    for value, v in zip(pairs.values, pairs.vectors):  # each vector is an eigenvector of the dense H
        x = flatten(v, parameter_names(model))
        assert torch.linalg.vector_norm(h @ x - value * x) <= 1e-8 * abs(value)
    smallest = top_eigenpairs(op, 2, which="SA", tol=0)
    np.testing.assert_allclose(smallest.values, torch.linalg.eigvalsh(h)[:2].numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------- Lanczos / SLQ


def test_full_lanczos_recovers_the_spectrum_and_quadrature_moments_are_exact(setup) -> None:  # noqa: ANN001
    """Up to n steps from one generic start: the Gauss nodes are the n eigenvalues. With the n unit vectors as
    starts and m = 2 steps, n·mean Σ τθ^p = tr(H^p) exactly for p ≤ 2m − 1 = 3."""
    model, _, h, op = setup
    n = h.shape[0]
    one = slq_density(op, starts=1, steps=n, seed=3)
    nodes, exact = np.asarray(one.nodes[0]), torch.linalg.eigvalsh(h).numpy()
    # H has a null space (softmax is unchanged by a shift of every logit): the Krylov space holds each
    # distinct eigenvalue once, so the chain stops early with every distinct eigenvalue as a node
    distinct = len(np.unique(np.round(exact, 8)))
    assert len(nodes) == distinct < n
    assert np.abs(nodes[:, None] - exact[None, :]).min(axis=1).max() < 1e-9
    assert np.abs(nodes[:, None] - exact[None, :]).min(axis=0).max() < 1e-9
    assert sum(one.weights[0]) == pytest.approx(1.0, abs=1e-12)

    units = [unflatten(e, op.params) for e in torch.eye(n, dtype=torch.float64)]
    exact = slq_density(op, steps=2, start_vectors=units, parallel=8)
    assert exact.starts == n and all(len(t) <= 2 for t in exact.nodes)
    for p in (1, 2, 3):
        assert n * exact.moment(p) == pytest.approx(float(torch.trace(torch.linalg.matrix_power(h, p))), rel=1e-10)
    assert np.trapezoid(exact.density, exact.grid) == pytest.approx(1.0, abs=1e-3)  # ∫ρ = 1


def test_slq_moments_estimate_trace_and_trace_of_square_within_their_standard_error(setup) -> None:  # noqa: ANN001
    """Rademacher starts: each start's n Σ τθ = vᵀHv, n Σ τθ² = vᵀH²v (m ≥ 2). Their exact variances are
    2(‖A‖_F² − Σ A_ii²) for A = H, H²; the mean of s starts is within 4 standard errors of the truth."""
    model, data, h, _ = setup
    op = HessianOperator(model, None, data, vectorize=True)  # many starts per pass, vmapped
    n, s = h.shape[0], 200
    density = slq_density(op, starts=s, steps=3, seed=1, parallel=100)
    for a, p in ((h, 1), (h @ h, 2)):
        sd = math.sqrt(2 * (float((a * a).sum()) - float((torch.diagonal(a) ** 2).sum())))
        assert abs(n * density.moment(p) - float(torch.trace(a))) <= 4 * sd / math.sqrt(s)
    trace = density.trace()
    assert trace.ci_low <= float(torch.trace(h)) <= trace.ci_high
    assert np.trapezoid(density.density, density.grid) == pytest.approx(1.0, abs=1e-3)


def test_lanczos_basis_is_orthonormal_and_stops_in_an_invariant_subspace() -> None:
    """On a diagonal matrix with 3 distinct eigenvalues the Krylov space has dimension 3: the chain stops after
    3 steps and its nodes are those eigenvalues."""
    d = torch.tensor([1.0, 1.0, 2.0, 2.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    ((alpha, beta),) = lanczos(lambda vs: [d * v for v in vs], [torch.ones(7, dtype=torch.float64)], steps=6)
    assert len(alpha) == 3 and len(beta) == 2
    t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(t), [1.0, 2.0, 5.0], atol=1e-12)


# ---------------------------------------------------------------------------------------- blocks


def test_block_traces_and_eigenvalues_against_the_dense_block_diagonal(setup) -> None:  # noqa: ANN001
    model, _, h, op = setup
    blocks = block_partition(model)
    assert list(blocks) == ["1", "3"]
    found = block_curvature(op, blocks, probes=200, tol=1e-10, seed=0)
    total, half2 = 0.0, 0.0
    for b in found:
        idx = block_slice(model, b.tensors)
        hbb = h[idx][:, idx]
        assert b.parameters == len(idx)
        assert b.trace.ci_low <= float(torch.trace(hbb)) <= b.trace.ci_high
        assert b.top_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(hbb)[-1]), rel=1e-6)
        total += b.trace.estimate
        half2 += b.trace.half_width**2
    assert abs(total - float(torch.trace(h))) <= math.sqrt(half2)  # blocks sum to the whole trace within the CI
    # exact: all eigenvalues of each small tensor's block H_BB (the operator restricted to B), summed = tr(H_BB)
    for name in ("1.bias", "3.bias", "3.weight"):
        idx = block_slice(model, [name])
        hbb = h[idx][:, idx]
        pairs = top_eigenpairs(op, len(idx) - 3 if len(idx) > 6 else len(idx), names=[name], tol=0)
        exact = torch.linalg.eigvalsh(hbb).flip(0)[: len(pairs.values)]
        np.testing.assert_allclose(pairs.values, exact.numpy(), rtol=1e-6, atol=1e-12)
        if len(pairs.values) == len(idx):
            assert sum(pairs.values) == pytest.approx(float(torch.trace(hbb)), rel=1e-10)


def tiny_resnet() -> nn.Module:
    return nn.Sequential(
        ConvNormAct(1, 2, norm="none"),
        BasicBlock(2, 2, stride=1, norm="none"),
        BasicBlock(2, 3, stride=2, norm="none"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


def test_residual_blocks_partition_the_parameters() -> None:
    model = tiny_resnet()
    blocks = residual_blocks(model)
    assert list(blocks) == ["0", "1", "2", "5"]
    assert "2.shortcut.conv.weight" in blocks["2"] and "1.conv2.weight" in blocks["1"]
    flat = [t for ts in blocks.values() for t in ts]
    assert sorted(flat) == sorted(parameter_names(model)) and len(flat) == len(set(flat))
    resnet = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, width=1, norm="layernorm")
    found = residual_blocks(resnet)
    assert list(found) == ["stem", *(f"layers.{s}.{b}" for s in range(3) for b in range(3)), "head"]
    assert found["stem"] == ["stem.conv.weight", "stem.norm.weight", "stem.norm.bias"]
    mlp = tiny_mlp()
    assert residual_blocks(mlp) == block_partition(mlp, "layer")
    with pytest.raises(ValueError):
        block_partition(mlp, "attention")


# ---------------------------------------------------------------------------------------- paths, results


def test_path_spectra_ends_are_the_endpoint_spectra_and_a_permutation_changes_no_eigenvalue() -> None:
    model, data = tiny_mlp(0), batches()
    theta_a = {k: v.clone() for k, v in model.state_dict().items()}
    theta_b = {k: v.clone() for k, v in tiny_mlp(1).state_dict().items()}
    spec = derive_spec(model, torch.randn(2, 1, 2, 2, dtype=torch.float64))
    permuted = Permutation.random(spec, torch.Generator().manual_seed(0)).apply(theta_b, spec)
    options = {"top": 3, "trace_probes": 4, "density": True, "starts": 2, "steps": 5, "blocks": ("layer",)}
    options |= {"block_probes": 3, "tol": 0.0}
    spectra = path_spectra(model, theta_a, {"naive": theta_b, "permuted": permuted}, data, [0, 0.5, 1], **options)
    at_b = hessian_spectrum(model, theta_b, data, **options)
    dense_b = torch.linalg.eigvalsh(dense_hessian(model, theta_b, data)).flip(0)[:3].numpy()
    np.testing.assert_allclose(spectra.spectra["naive"][2].top_eigenvalues, dense_b, rtol=1e-6)
    np.testing.assert_allclose(spectra.spectra["permuted"][2].top_eigenvalues, dense_b, rtol=1e-6)  # P H Pᵀ
    np.testing.assert_allclose(at_b.top_eigenvalues, dense_b, rtol=1e-6)
    assert spectra.spectra["naive"][0] is spectra.spectra["permuted"][0]  # θ(0) = θ_A once
    assert len(spectra.rows()) == 6 and {r["path"] for r in spectra.rows()} == {"naive", "permuted"}
    # serialised and read back: the same JSON
    text = json.dumps(spectra.to_json(), allow_nan=False)
    assert PathSpectra.from_json(json.loads(text)).to_json() == json.loads(text)
    one = spectra.spectra["naive"][1].to_json()
    assert Spectrum.from_json(json.loads(json.dumps(one))).to_json() == one


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_curve_spectra_ends_are_the_endpoints_and_inside_the_spectrum_at_the_curve_point(kind: str) -> None:
    """Same probes at every t: φ(0), φ(1) give exactly the endpoints' spectra; at an interior t the top eigenvalues
    are dense eigvalsh of ∇²L at curve_point(curve, t), which is off the straight line (a different spectrum)."""
    model, data = tiny_mlp(0), batches()
    theta_a, theta_b, bend = state(tiny_mlp(0)), state(tiny_mlp(1)), state(tiny_mlp(2))
    curve = Curve(kind, theta_a, (bend,), theta_b)
    options = {"top": 3, "trace_probes": 4, "tol": 0.0}
    visited: list[tuple[str, float]] = []
    spectra = curve_spectra(model, curve, data, [0, 0.3, 1], on_point=lambda *p: visited.append(p), **options)
    assert list(spectra.spectra) == [kind] and spectra.lambdas == [0, 0.3, 1]
    assert visited == [(kind, 0.0), (kind, 0.3), (kind, 1.0)]
    at_0, inside, at_1 = spectra.spectra[kind]
    assert at_0.to_json() == hessian_spectrum(model, theta_a, data, **options).to_json()
    assert at_1.to_json() == hessian_spectrum(model, theta_b, data, **options).to_json()
    point = curve_point(curve, 0.3)
    dense = torch.linalg.eigvalsh(dense_hessian(model, point, data)).flip(0)[:3].numpy()
    np.testing.assert_allclose(inside.top_eigenvalues, dense, rtol=1e-6)
    assert inside.trace == hessian_spectrum(model, point, data, **options).trace  # the same probes
    straight = float(torch.linalg.eigvalsh(dense_hessian(model, lerp(theta_a, theta_b, 0.3), data))[-1])
    assert abs(inside.top_eigenvalues[0] - straight) > 1e-3 * abs(straight)
    again = curve_spectra(model, curve, data, [0, 1], name="mine", at_a=at_0, **options)
    assert again.spectra["mine"][0] is at_0 and again.spectra["mine"][1].to_json() == at_1.to_json()
    with pytest.raises(ValueError, match="t must lie"):
        curve_spectra(model, curve, data, [0, 1.5], top=1)


def toy_dataset(n: int = 23) -> DeviceDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 2, 2), generator=g, dtype=torch.uint8)
    info = DatasetInfo("toy", 3, (1, 2, 2), (0.5,), (0.25,), False, ("a", "b", "c"), "test")
    return DeviceDataset(images, torch.arange(n) % 3, info)


def test_curve_spectra_recompute_batchnorm_statistics_at_each_t() -> None:
    def bn_net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).eval()

    model, data = bn_net(0), toy_dataset()
    ends = [state(bn_net(s)) for s in (0, 1, 2)]
    for p, scale in zip(ends, (1.0, 3.0, 0.2)):  # distinct running statistics at the control points
        p["2.running_var"] *= scale
    curve = Curve("bezier", ends[0], (ends[2],), ends[1])
    with pytest.raises(ValueError, match="bn_data"):
        curve_spectra(model, curve, data, [0.5], top=1)
    spectra = curve_spectra(model, curve, data, [0, 0.5], bn_data=data, top=2, trace_probes=0, tol=0.0)
    for t, found in zip((0, 0.5), spectra.spectra["bezier"]):
        model.load_state_dict(curve_point(curve, t))
        reset_bn_stats(model, data)
        reset = state(model)
        dense = torch.linalg.eigvalsh(dense_hessian(model, reset, data).double()).flip(0)[:2].numpy()
        np.testing.assert_allclose(found.top_eigenvalues, dense, rtol=1e-4)
        stale = float(torch.linalg.eigvalsh(dense_hessian(model, curve_point(curve, t), data).double())[-1])
        assert abs(found.top_eigenvalues[0] - stale) > 1e-2 * abs(stale)  # not the interpolated statistics


def test_batchnorm_path_needs_statistics() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    theta = model.state_dict()
    with pytest.raises(ValueError, match="bn_data"):
        path_spectra(model.eval(), theta, {"naive": theta}, batches(), [0, 1], top=1)


def test_figures_draw_density_on_symlog_and_curvature_on_both_paths(tmp_path: Path, setup) -> None:  # noqa: ANN001
    model, data, _, op = setup
    density = slq_density(op, starts=3, steps=8, seed=0)
    top = top_eigenpairs(op, 3).values
    saved = plot_density(tmp_path / "density.png", density, top, split="train", examples=23)
    check_density(saved, density.to_json(), top, split="train", examples=23)
    ax = saved.figure.axes[0]
    assert saved.path.is_file() and ax.get_xscale() == "symlog" and ax.get_yscale() == "log"
    assert "top 3 eigenvalues" in [t.get_text() for t in ax.get_legend().get_texts()]

    theta_b = {k: v.clone() for k, v in tiny_mlp(1).state_dict().items()}
    spectra = path_spectra(model, model.state_dict(), {"naive": theta_b, "aligned": theta_b}, data, [0, 1], top=1)
    saved = plot_path_curvature(tmp_path / "path.png", spectra, split="train", examples=23)
    rows = spectra.rows()
    check_path_curvature(saved, rows, split="train", examples=23)
    write_csv(tmp_path / "path.csv", rows)
    check_path_curvature(saved, read_csv(tmp_path / "path.csv"), split="train", examples=23)  # the table as stored
    top_ax, trace_ax = saved.figure.axes
    assert [line.get_label() for line in top_ax.lines] == ["naive", "aligned"]
    assert [t.get_text() for t in trace_ax.get_legend().get_texts()] == ["naive (95% CI)", "aligned (95% CI)"]


def test_spectrum_figure_checks_fail_on_a_wrong_or_missing_series(tmp_path: Path, setup) -> None:  # noqa: ANN001
    """check_density / check_path_curvature compare what was drawn with the data: a figure drawn from other
    numbers, or without one of the series, fails them."""
    model, data, _, op = setup
    density = slq_density(op, starts=3, steps=8, seed=0)
    top = list(top_eigenpairs(op, 3).values)
    stored = density.to_json()
    other = SpectralDensity.from_json({**stored, "density": [2 * v for v in stored["density"]]})
    fewer_nodes = SpectralDensity.from_json({**stored, "nodes": stored["nodes"][:2], "weights": stored["weights"][:2]})
    for name, drawn_density, drawn_top in (
        ("density: y of 'SLQ density", other, top),
        (r"Gauss nodes \(3 starts", fewer_nodes, top),  # one start's nodes missing
        ("density: drew 4 line", density, top[:2]),
        ("density: x of 'top 3 eigenvalues'", density, [top[0] + 0.25, *top[1:]]),
    ):
        saved = plot_density(tmp_path / "d.png", drawn_density, drawn_top, split="train", examples=23)
        with pytest.raises(AssertionError, match=name):
            check_density(saved, stored, top, split="train", examples=23)
            pytest.fail(name)

    theta_b = {k: v.clone() for k, v in tiny_mlp(1).state_dict().items()}
    spectra = path_spectra(model, model.state_dict(), {"naive": theta_b, "aligned": theta_b}, data, [0, 1], top=1)
    rows = spectra.rows()
    stored_path = spectra.to_json()
    moved_top, moved_trace = json.loads(json.dumps(stored_path)), json.loads(json.dumps(stored_path))
    moved_top["spectra"]["aligned"][1]["eigen"]["values"][0] += 0.25
    moved_trace["spectra"]["naive"][0]["trace"]["estimate"] += 0.25
    for name, drawn_spectra in (
        ("top eigenvalue: drew 1 line", PathSpectra(spectra.lambdas, {"naive": spectra.spectra["naive"]})),
        ("top eigenvalue: y of 'aligned'", PathSpectra.from_json(moved_top)),
        ("trace naive: y", PathSpectra.from_json(moved_trace)),
    ):
        saved = plot_path_curvature(tmp_path / "p.png", drawn_spectra, split="train", examples=23)
        with pytest.raises(AssertionError, match=name):
            check_path_curvature(saved, rows, split="train", examples=23)
            pytest.fail(name)
    saved = plot_path_curvature(tmp_path / "p.png", spectra, split="train", examples=23)
    check_path_curvature(saved, rows, split="train", examples=23)
    with pytest.raises(AssertionError, match="train, 99 examples"):
        check_path_curvature(saved, rows, split="train", examples=99)


# ---------------------------------------------------------------------------------------- CLI

TINY = ["--train-per-class", "20", "--hidden", "16", "--epochs", "1", "--batch-size", "50", "--no-progress"]


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def stored_blocks(stored: dict) -> list[dict]:
    """The rows of blocks.csv rebuilt from the stored spectrum: kind, block, parameters, trace, CI, top eigenvalue."""
    return [
        {
            "kind": b["kind"],
            "block": b["name"],
            "parameters": b["parameters"],
            "trace": b["trace"]["estimate"],
            "ci_low": b["trace"]["ci_low"],
            "ci_high": b["trace"]["ci_high"],
            "top_eigenvalue": b["top_eigenvalue"],
        }
        for b in stored["blocks"]
    ]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_bad_values_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "spectrum", "--help")
    assert code == 0 and "--path-to" in out and "--density" in out and "allowed" in out
    for argv in (
        ["--top", "-1"],
        ["--probes", "1"],
        ["--sigma", "0"],
        ["--sigma", "nan"],
        ["--split", "val"],
        ["--align", "bogus"],
        ["--points", "1"],
        ["--steps", "0"],
    ):
        code, out, err = run_cli(capsys, "spectrum", "somerun", *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, (argv, err)
        assert argv[0] in err and ("allowed" in err or "choose from" in err)


def test_cli_spectrum_on_a_tiny_stored_pair(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    io = ["--runs-dir", str(tmp_path), "--data-dir", str(shared_data), "--device", "cpu", "--offline"]
    made = []
    for seed in (1, 2):
        code, out, _ = run_cli(capsys, "train", "mlp_mnist", *TINY, "--seed", str(seed), *io, "--json")
        assert code == 0
        made.append(json.loads(out)["run"])
    quick = ["--subset", "50", "--top", "3", "--probes", "4", "--starts", "2", "--steps", "6", "--block-probes", "3"]
    argv = ["spectrum", made[0], *quick, "--density", "--blocks", *io, "--json"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    result = json.loads(out)
    top = result["top_eigenvalues"]
    assert len(top) == 3 and top == sorted(top, reverse=True) and not result["reused"]
    assert "spectrum: " in err  # progress on stderr
    assert [b["block"] for b in result["blocks"]] == ["layers.0.linear", "head"]
    assert Path(result["files"]["density_figure"]).is_file() and Path(result["files"]["blocks"]).is_file()
    assert result["density"]["largest_node"] <= top[0] * (1 + 1e-6)  # Ritz values never exceed λ_max
    stored = json.loads(Path(result["files"]["result"]).read_text())["spectrum"]
    assert stored["top_eigenvalues"] == top
    figure = drawn(result["files"]["density_figure"])
    check_density(figure, stored["density"], top, split=result["split"], examples=result["examples"])
    assert stored["density"]["starts"] == 2 and stored["density"]["steps"] == 6  # --starts 2 --steps 6
    assert read_csv(result["files"]["blocks"]) == [
        {k: "" if v is None else str(v) for k, v in b.items()} for b in stored_blocks(stored)
    ]
    code, out, err = run_cli(capsys, *argv, "--no-progress")  # the same command: reused, same numbers
    again = json.loads(out)
    assert code == 0 and again["reused"] and again["top_eigenvalues"] == top and "spectrum: " not in err

    code, out, err = run_cli(
        capsys, "spectrum", made[0], *quick, "--path-to", made[1], "--points", "3", *io, "--no-progress"
    )
    assert code == 0, err
    assert "top eigenvalues:" in out and "weight-matched" in out and "naive" in out
    lines = [line for line in out.splitlines() if line.startswith(("naive ", "weight-matched "))]
    assert len(lines) == 6
    files = next(line for line in out.splitlines() if line.startswith("files: "))[len("files: ") :].split(", ")
    table = read_csv(next(f for f in files if f.endswith("path_curvature.csv")))
    assert [(r["path"], float(r["lambda"])) for r in table] == [
        (p, x) for p in ("naive", "weight-matched") for x in (0, 0.5, 1)
    ]
    figure = drawn(next(f for f in files if f.endswith("path_curvature.png")))
    check_path_curvature(figure, table, split=result["split"], examples=result["examples"])
    code, _, err = run_cli(capsys, "spectrum", "deadbeef", *io)
    assert code == 2 and "no run" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "spectrum", made[0], "--top", "100000", *io)
    assert code == 2 and "--top 100000" in err and len(err.strip().splitlines()) == 1


def test_cli_spectrum_along_a_tiny_stored_curve(tiny_pair, cli_io, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    store, (run_a, run_b) = tiny_pair
    settings = CurveSettings(epochs=1, lr=3e-3, batch_size=50, train_subset=200)
    fitted = fit_curve(run_a, run_b, settings=settings, store=Store(store.root), device="cpu", progress=False)
    io = cli_io(store.root)
    quick = ["--subset", "50", "--top", "2", "--probes", "4", "--points", "3", *io, "--json"]
    code, out, err = run_cli(capsys, "spectrum", run_a.path.name, "--curve", fitted.path.name, *quick)
    assert code == 0, err
    result = json.loads(out)
    rows = result["curve"]["rows"]
    assert "path" not in result and result["curve"]["kind"] == "bezier" and result["curve"]["bends"] == 1
    assert [(r["path"], r["lambda"]) for r in rows] == [("bezier curve", t) for t in (0.0, 0.5, 1.0)]
    assert rows[0]["top_eigenvalue"] == result["top_eigenvalues"][0]  # φ(0) = θ_A
    figure = Path(result["files"]["path_figure"])
    assert figure.is_file() and Path(result["files"]["path_table"]).is_file()
    data = {"split": result["split"], "examples": result["examples"]}
    check_path_curvature(drawn(figure), rows, **data, xlabel="t (curve)")
    check_path_curvature(drawn(figure), read_csv(result["files"]["path_table"]), **data, xlabel="t (curve)")

    both = ["--path-to", run_b.path.name, "--align", "weight"]
    code, out, err = run_cli(capsys, "spectrum", run_a.path.name, "--curve", str(fitted.path), *both, *quick)
    assert code == 0, err
    again = json.loads(out)
    assert {r["path"] for r in again["path"]["rows"]} == {"naive", "weight-matched"}
    assert again["curve"]["rows"] == rows  # the same probes: the same numbers
    both_rows = again["path"]["rows"] + again["curve"]["rows"]
    check_path_curvature(
        drawn(again["files"]["path_figure"]), both_rows, **data, xlabel="λ (straight paths) / t (curve)"
    )
    naive_end = [r for r in again["path"]["rows"] if r["path"] == "naive"][-1]
    assert naive_end["top_eigenvalue"] == pytest.approx(rows[-1]["top_eigenvalue"], rel=1e-5)  # both end at θ_B

    before = sorted(p.name for p in store.root.iterdir())
    for argv, named in (
        ([run_b.path.name, "--curve", fitted.path.name], "--curve"),  # the curve starts at A, not B
        ([run_a.path.name, "--curve", fitted.path.name, "--path-to", run_a.path.name], "--path-to"),
        ([run_a.path.name, "--curve", "curve_nosuch"], "--curve"),
    ):
        code, out, err = run_cli(capsys, "spectrum", *argv, *io)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and named in err, (argv, err)
    assert sorted(p.name for p in store.root.iterdir()) == before  # nothing written
    code, out, _ = run_cli(capsys, "spectrum", "--help")
    assert code == 0 and "--curve" in out
