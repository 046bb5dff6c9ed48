"""Loss planes: Gram–Schmidt basis, coordinates, filter-normalised directions, the grid against direct
evaluations at the marked points, the contour figure, and `lmclab plane` end to end on tiny MNIST runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from figures import assert_colorbars_labelled, check_plane, check_png, drawn, panels
from lmclab.cli import main
from lmclab.data import DeviceDataset
from lmclab.experiments import plane as plane_module
from lmclab.experiments.lmc import align_runs
from lmclab.geometry.plane import (
    evaluate_plane,
    filter_normalized_direction,
    gram_schmidt,
    grid_axes,
    nearest_node,
    plane_from_directions,
    plane_through,
)
from lmclab.models import build_model
from lmclab.paths import reset_bn_stats
from lmclab.points import inner, lerp, parameter_names
from lmclab.training import evaluate, load_run_model


def states(name: str, k: int = 3, seed: int = 0, **options: object) -> tuple[torch.nn.Module, list[dict]]:
    torch.manual_seed(seed)
    models = [build_model(name, input_shape=(1, 28, 28), num_classes=10, **options).eval() for _ in range(k)]
    return models[0], [m.state_dict() for m in models]


@pytest.fixture(scope="module")
def test_data(shared_data: Path) -> DeviceDataset:
    return DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=200, download=False, progress=False)


# ------------------------------------------------------------------------------------ basis and coordinates


def test_gram_schmidt_is_orthonormal_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    vectors = [{"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(3)]
    vectors[2] = {k: vectors[0][k] + 1e-3 * vectors[2][k] for k in vectors[0]}  # nearly parallel to the first
    basis = gram_schmidt(vectors)
    assert all(t.dtype == torch.float64 for e in basis for t in e.values())
    gram = np.array([[inner(a, b) for b in basis] for a in basis])
    np.testing.assert_allclose(gram, np.eye(3), atol=1e-14)
    # the span is kept: e1 ∝ v1, and v2 has no component outside span(e1, e2)
    v2 = {k: t.double() for k, t in vectors[1].items()}
    rest = {k: v2[k] - inner(v2, basis[0]) * basis[0][k] - inner(v2, basis[1]) * basis[1][k] for k in v2}
    assert math.sqrt(inner(rest, rest)) < 1e-12
    assert inner({k: t.double() for k, t in vectors[0].items()}, basis[0]) > 0
    with pytest.raises(ValueError, match="linearly dependent"):
        gram_schmidt([vectors[0], {k: 2.0 * t for k, t in vectors[0].items()}])
    with pytest.raises(ValueError, match="zero"):
        gram_schmidt([{k: torch.zeros_like(t) for k, t in vectors[0].items()}])


def test_coordinates_reproduce_the_points() -> None:
    model, thetas = states("resnet20", width=1, norm="batchnorm")
    for theta in thetas:  # BN statistics differ between the points, so the buffers' combination is checked too
        theta.update({k: torch.rand_like(t) + 0.5 for k, t in theta.items() if "running" in k})
    plane = plane_through(*thetas, names=parameter_names(model))
    coords = [plane.coordinates(t) for t in thetas]
    assert coords[0] == (0.0, 0.0) and abs(coords[1][1]) < 1e-12 and coords[2][1] > 0
    d01 = math.sqrt(sum(float(((thetas[1][k].double() - thetas[0][k].double()) ** 2).sum()) for k in plane.names))
    assert coords[1][0] == pytest.approx(d01, rel=1e-12)
    for theta, (u, v) in zip(thetas, coords):
        assert plane.distance_from(theta) < 1e-10
        back = plane.point(u, v)
        for k, t in theta.items():  # float32 values given back exactly (the basis is float64)
            assert torch.equal(back[k], t), k
    # on the line θ0θ1 the plane's points are the straight path's, buffers included
    mid = plane.point(coords[1][0] / 2, 0.0)
    half = lerp(thetas[0], thetas[1], 0.5)
    for k, t in half.items():
        torch.testing.assert_close(mid[k], t, rtol=1e-6, atol=1e-6)
    # a point off the plane projects onto its coordinates
    e3 = gram_schmidt([plane.e1, plane.e2, {k: torch.randn_like(t) for k, t in plane.e1.items()}])[2]
    off = {k: thetas[0][k].double() + 2.0 * plane.e1[k] - 3.0 * plane.e2[k] + 0.5 * e3[k] for k in plane.names}
    assert plane.coordinates(off) == pytest.approx((2.0, -3.0), abs=1e-9)
    assert plane.distance_from(off) == pytest.approx(0.5, rel=1e-9)


def test_filter_normalized_direction() -> None:
    model, (theta, *_) = states("resnet20", k=1, width=1, norm="batchnorm")
    d = filter_normalized_direction(theta, model, torch.Generator().manual_seed(0))
    assert list(d) == parameter_names(model)  # parameters only: no BN buffers
    norm_layers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    checked = 0
    for k, t in d.items():
        module = k.rsplit(".", 1)[0]
        if theta[k].dim() < 2 or module in norm_layers:
            assert not t.any(), f"{k}: biases and normalisation parameters are left out"
            continue
        ours = t.reshape(t.shape[0], -1).norm(dim=1)
        model_filters = theta[k].double().reshape(t.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(ours, model_filters, rtol=1e-12, atol=1e-12)
        checked += t.shape[0]
    assert checked > 100
    assert any(theta[k].dim() == 1 and k.rsplit(".", 1)[0] in norm_layers for k in d)  # there were BN params
    again = filter_normalized_direction(theta, model, torch.Generator().manual_seed(0))
    other = filter_normalized_direction(theta, model, torch.Generator().manual_seed(1))
    assert all(torch.equal(again[k], d[k]) for k in d) and not all(torch.equal(other[k], d[k]) for k in d)
    plane = plane_from_directions(theta, d, other)
    assert plane.point(0.0, 0.0)["bn1.running_var" if "bn1.running_var" in theta else next(iter(theta))] is not None
    assert all(torch.equal(plane.point(0.0, 0.0)[k], t) for k, t in theta.items())


def test_grid_axes_include_the_points() -> None:
    us, vs = grid_axes((-1.0, -2.0), (3.0, 2.0), 5, include=[(0.3, 1e-17), (0.0, 0.0), (1.7, 0.123)])
    assert us[0] == -1.0 and us[-1] == 3.0 and {0.3, 0.0, 1.7} <= set(us.tolist())
    assert {0.123} <= set(vs.tolist()) and len(vs) == 6  # 1e-17 and 0.0 are one value
    assert np.all(np.diff(us) > 0) and np.all(np.diff(vs) > 0)
    with pytest.raises(ValueError):
        grid_axes((0.0, 0.0), (1.0, 1.0), 1)


# ------------------------------------------------------------------------------------ the grid


@pytest.mark.parametrize(
    ("name", "options", "bn"),
    [("mlp", {"hidden": (32, 16)}, "none"), ("resnet20", {"width": 1, "norm": "batchnorm"}, "reset")],
)
def test_grid_reproduces_direct_evaluations(
    name: str, options: dict, bn: str, test_data: DeviceDataset, shared_data: Path
) -> None:
    model, thetas = states(name, **options)
    train_data = DeviceDataset.load(
        "mnist", "train", data_dir=shared_data, subset=200, augment=False, download=False, progress=False
    )
    plane = plane_through(*thetas, names=parameter_names(model))
    coords = [plane.coordinates(t) for t in thetas]
    us, vs = grid_axes((-5.0, -5.0), (coords[1][0] + 5, coords[2][1] + 5), 3, include=coords)
    nodes = [(float(u), float(v)) for v in vs for u in us]
    if bn == "reset":  # one BN pass per node: the points and two others
        nodes = [nearest_node(nodes, *c) for c in coords] + [(-5.0, -5.0), (1.0, 2.0)]
    rows = evaluate_plane(
        model, plane, nodes, {"test": test_data}, bn=bn, bn_data=train_data, chunk=4, batch_size=64, progress=False
    )
    assert len(rows) == 3 * len(nodes) and {r["metric"] for r in rows} == {"loss", "accuracy", "error"}
    for theta, (u, v) in zip(thetas, coords):
        direct = build_model(name, input_shape=(1, 28, 28), num_classes=10, **options).eval()
        direct.load_state_dict(theta)
        if bn == "reset":
            reset_bn_stats(direct, train_data)
        expected = evaluate(direct, test_data)
        node = nearest_node(nodes, u, v)  # the point's node: its coordinates up to float64 rounding
        assert abs(node[0] - u) + abs(node[1] - v) < 1e-12
        got = {r["metric"]: r["value"] for r in rows if (r["u"], r["v"]) == node}
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["accuracy"] == expected["accuracy"] and got["error"] == pytest.approx(1 - expected["accuracy"])
    # an off-point node differs from the marked points (the grid is not one constant)
    assert len({round(r["value"], 6) for r in rows if r["metric"] == "loss"}) > 3


# ------------------------------------------------------------------------------------ command line


def read(path: str | Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_cli_plane_pair_draws_stores_and_reuses(  # type: ignore[no-untyped-def]
    tiny_pair,
    cli_io,
    shared_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, (run_a, run_b) = tiny_pair
    args = ["plane", run_a.hash[:8], run_b.hash[:8], "--grid", "4", "--subset", "200", *cli_io(store.root)]
    assert main([*args, "--out", str(tmp_path / "o"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not result["reused"]
    grid = read(tmp_path / "o" / "grid.csv")
    assert set(grid[0]) >= {"u", "v", "split", "metric", "value", "examples"}
    assert result["grid"]["nodes"] == len(grid) // 3 >= 16
    points = {(p["point"], p["metric"]): p for p in result["points"]}
    assert {p for p, _ in points} == {"A", "B", "π(B)"}
    # the grid's values at the marked points are the runs' own (π(B) computes B's function)
    test = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=200, download=False, progress=False)
    for label, run in (("A", run_a), ("B", run_b), ("π(B)", run_b)):
        expected = evaluate(load_run_model(run), test)
        assert points[(label, "loss")]["value"] == pytest.approx(expected["loss"], rel=1e-5)
        assert points[(label, "error")]["value"] == pytest.approx(1 - expected["accuracy"], abs=1e-9)
        assert points[(label, "loss")]["distance_from_plane"] < 1e-9
    alignment = align_runs(run_a, run_b, store=store, device="cpu", progress=False)
    assert result["identity"]["alignments"] == [str(alignment.path)]
    saved = drawn(tmp_path / "o" / "plane.png")
    check_png(saved)
    (ax,) = panels(saved, 1)
    assert_colorbars_labelled(saved, 1)
    assert [t.get_text() for t in ax.texts] == ["A", "B", "π(B)"]
    assert "test, 200 examples" in ax.get_title()
    check_plane(saved, grid, read(tmp_path / "o" / "points.csv"))
    # the same request again: reused from the store, nothing evaluated
    calls: list[int] = []
    real = plane_module.evaluate_plane
    monkeypatch.setattr(plane_module, "evaluate_plane", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main([*args, "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused"] and not calls and again["points"] == result["points"]
    # another grid is another result
    assert main([*args[:3], "--grid", "3", *args[5:], "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["reused"] and calls


def test_cli_plane_random_directions(tiny_pair, cli_io, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    store, (run_a, _) = tiny_pair
    args = [*cli_io(store.root), "--grid", "3", "--subset", "100", "--split", "both", "--out", str(tmp_path)]
    assert main(["plane", run_a.hash[:8], "--random-directions", "--radius", "0.5", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [p["point"] for p in result["points"]] == ["A"] * 4
    assert result["grid"]["nodes"] == 9 and result["grid"]["u"][0] == pytest.approx(-result["grid"]["u"][1])
    check_plane(drawn(tmp_path / "plane.png"), read(tmp_path / "grid.csv"), read(tmp_path / "points.csv"))


def test_cli_plane_help_and_bad_values(tiny_pair, cli_io, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    store, (run_a, run_b) = tiny_pair
    with pytest.raises(SystemExit) as exit_info:
        main(["plane", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--random-directions" in out and "--margin" in out and "allowed" in out
    common = [run_a.hash[:8], run_b.hash[:8], *cli_io(store.root)]
    for bad in (
        ["--grid", "1"],
        ["--grid", "x"],
        ["--margin", "-0.1"],
        ["--margin", "nan"],
        ["--radius", "0"],
        ["--chunk", "0"],
        ["--split", "val"],
        ["--align", "nope"],
        ["--bn", "repair"],
        ["--subset", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["plane", *common, *bad])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and bad[0] in err, (bad, err)
    for runs, flags, words in (
        ([run_a.hash[:8], run_b.hash[:8]], ["--align", "none"], "two points"),
        ([run_a.hash[:8], run_b.hash[:8]], ["--random-directions"], "exactly one run"),
        ([run_a.hash[:8]], [], "RUN"),
    ):
        assert main(["plane", *runs, *cli_io(store.root), *flags]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and words in err, err
