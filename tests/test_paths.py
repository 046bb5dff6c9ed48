"""Paths: interpolation, barrier definitions on hand-made curves, BN reset and REPAIR by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from figures import check_paths
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.models import build_model
from lmclab.paths import (
    barrier_curve,
    barrier_report,
    barriers,
    channel_stats,
    cumulative_layer_sets,
    default_lambdas,
    endpoint_losses,
    evaluate_path,
    layer_groups,
    layer_set_barrier,
    path_losses,
    path_values,
    repair,
    repair_points,
    reset_bn_stats,
)
from lmclab.paths.barriers import curve_barrier_rows, midpoint_index
from lmclab.paths.normalization import endpoint_stats
from lmclab.points import lerp
from lmclab.report import plot_paths
from lmclab.training import evaluate


def toy_dataset(n: int = 96, shape: tuple[int, int, int] = (1, 6, 6), classes: int = 3, seed: int = 0) -> DeviceDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    info = DatasetInfo(
        "toy", classes, shape, (0.5,) * shape[0], (0.25,) * shape[0], False, tuple("abc"[:classes]), "test"
    )
    return DeviceDataset(images, labels, info)


def make(name: str, seed: int, **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, input_shape=(1, 6, 6), num_classes=3, **kw).eval()


# ---------------------------------------------------------------------------------------- barriers


def test_barriers_on_an_exact_polynomial() -> None:
    """L(λ) = 1 + 2λ + 4λ(1−λ): curve 4λ(1−λ), barrier 1 at ½; max L = 3.25 at ¾, so rebasin = 3.25 − 2."""
    lam = default_lambdas(25)
    values = [1 + 2 * x + 4 * x * (1 - x) for x in lam]
    np.testing.assert_allclose(barrier_curve(lam, values), [4 * x * (1 - x) for x in lam], atol=1e-12)
    b = barriers(lam, values)
    assert b["barrier"] == pytest.approx(1.0) and b["argmax_lambda"] == 0.5
    assert b["rebasin"] == pytest.approx(1.25) and b["midpoint"] == pytest.approx(1.0)


def test_midpoint_off_grid_is_none_and_negative_barrier() -> None:
    """λ = ½ not evaluated: no midpoint (never an interpolated or nearest value)."""
    lam, values = [0.0, 0.4, 0.6, 1.0], [1.0, 0.0, 0.5, 1.0]
    b = barriers(lam, values)
    assert b["midpoint"] is None
    assert b["barrier"] == 0.0 and b["rebasin"] == 0.0
    lam4 = default_lambdas(4)  # lmclab interpolate --points 4: 0, ⅓, ⅔, 1
    assert midpoint_index(lam4) is None and barriers(lam4, [0.0, 1.0, 1.0, 0.0])["midpoint"] is None
    assert midpoint_index(default_lambdas(5)) == 2
    assert barriers(default_lambdas(5), [0.0, 1.0, 3.0, 1.0, 0.0])["midpoint"] == 3.0


def test_midpoint_is_absent_from_tables_where_half_was_not_evaluated(tmp_path: Path) -> None:
    """barriers.csv leaves the midpoint empty (JSON: null) and the printed table says why."""
    from lmclab.experiments.lmc import _say_barriers, write_lmc_report

    def rows(points: int) -> list[dict]:
        return [
            {"pair": 0, "path": "naive", "layers": "all", "split": "test", "lambda": x, "metric": m, "value": v}
            for x in default_lambdas(points)
            for m, v in (("loss", 1 + 4 * x * (1 - x)), ("accuracy", 0.9 - x * (1 - x)), ("error", 0.1 + x * (1 - x)))
        ]

    for points, has_half in ((4, False), (5, True)):
        out = tmp_path / str(points)
        files = write_lmc_report(rows(points), out)
        with open(files["barriers"]) as fh:
            table = list(csv.DictReader(fh))
        assert {r["metric"] for r in table} == {"loss", "error"}
        for r in table:
            assert (r["midpoint"] != "") == has_half, (points, r)
            assert r["quantity"] == "barrier"
        report = barrier_report(rows(points))
        assert all((r["midpoint"] is None) != has_half for r in report)
        assert (json.loads(json.dumps(report))[0]["midpoint"] is None) != has_half
        said: list[str] = []
        _say_barriers(report, 1, said.append)
        assert all(("midpoint n/a (λ = ½ not evaluated)" in line) != has_half for line in said) and said


def test_barrier_refuses_nan_and_bad_grids() -> None:
    with pytest.raises(ValueError, match="non-finite values on the path at λ = \\[0.5\\]"):
        barriers([0, 0.5, 1], [1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="from 0 to 1"):
        barriers([0.1, 1], [1.0, 1.0])


def test_barrier_report_groups_curves() -> None:
    rows = [
        {"path": p, "split": "test", "metric": m, "lambda": x, "value": v}
        for p, scale in (("naive", 1.0), ("permuted", 0.1))
        for m in ("loss", "accuracy")
        for x, v in ((0, 0.0), (0.5, scale), (1, 0.0))
    ]
    report = {(r["path"], r["metric"]): r["barrier"] for r in barrier_report(rows)}
    assert report == {("naive", "loss"): 1.0, ("permuted", "loss"): 0.1}


def test_curve_barrier_rows_name_each_quantity_and_report_a_non_finite_curve() -> None:
    keys = ("path", "layers", "split", "metric")
    rows = [
        {"path": p, "layers": layers, "base": "b", "split": "test", "metric": "loss", "lambda": x, "value": v}
        for p, layers, mid in (("naive", "all", 1.0), ("naive", "fc1", 0.25), ("broken", "all", float("nan")))
        for x, v in ((0, 0.0), (0.5, mid), (1, 0.0))
    ]
    report = curve_barrier_rows(rows, keys)
    assert [(r["path"], r["layers"], r["quantity"]) for r in report] == [
        ("naive", "all", "barrier"),
        ("naive", "fc1", "layerwise_barrier"),
        ("broken", "all", "barrier"),
    ]
    assert report[0]["barrier"] == 1.0 and "base" not in report[0]
    assert report[1]["barrier"] == 0.25 and report[1]["base"] == "b"
    assert "non-finite" in report[2]["error"] and "barrier" not in report[2]


# ---------------------------------------------------------------------------------------- interpolation


def test_layer_set_barrier_of_all_tensors_is_the_barrier_curve() -> None:
    """With every tensor in the set both one-layer points are θ_α, so B_P(α) = L(θ_α) − [(1−α)L_1 + αL_2]."""
    data = toy_dataset(n=48)
    ma, mb = make("resnet20", 0, norm="batchnorm"), make("resnet20", 1, norm="batchnorm")
    a, b = ma.state_dict(), mb.state_dict()
    lambdas = [0.0, 0.25, 0.5, 1.0]
    losses = path_losses(ma, a, b, data, lambdas)
    ends = endpoint_losses(ma, a, b, data)
    assert ends == (losses[0], losses[-1])
    np.testing.assert_allclose(
        layer_set_barrier(ma, a, b, data, lambdas, list(a), ends), barrier_curve(lambdas, losses), rtol=1e-6, atol=1e-7
    )
    # no tensor interpolated: (1−α)L_1 + αL_2 minus itself
    np.testing.assert_allclose(layer_set_barrier(ma, a, b, data, lambdas, []), 0.0, atol=1e-7)


def test_layerwise_barrier_and_layer_set_barrier_are_different_quantities_with_different_names(
    tmp_path: Path,
) -> None:
    """interpolate --layers' one-sided `layerwise_barrier` (the layer interpolated, the rest from A; barrier
    of that curve) and predict's two-sided `layer_set_barrier` B_P: equal for P = every tensor, different
    for one layer, so their tables name them differently."""
    from lmclab.experiments.lmc import write_lmc_report
    from lmclab.paths.barriers import LAYER_SET_BARRIER, LAYERWISE_BARRIER, QUANTITIES, WHOLE_MODEL_BARRIER
    from lmclab.report.predict import MEASURED

    data = toy_dataset(n=60)
    ma, mb = make("mlp", 0, hidden=(16,)), make("mlp", 1, hidden=(16,))
    a, b = ma.state_dict(), mb.state_dict()
    lam = default_lambdas(5)
    head = layer_groups(ma)["head"]
    for tensors, same in ((list(a), True), (head, False)):
        one_sided = evaluate_path(
            ma, a, b, {"test": data}, lambdas=lam, only=tensors, base="a", bn="none", progress=False
        )
        layerwise = barriers(lam, path_values(one_sided, "loss"))
        layer_set = layer_set_barrier(ma, a, b, data, lam, tensors)
        if same:
            assert layerwise["barrier"] == pytest.approx(float(layer_set.max()), abs=1e-6)
            assert layerwise["midpoint"] == pytest.approx(float(layer_set[2]), abs=1e-6)
        else:
            assert abs(layerwise["midpoint"] - float(layer_set[2])) > 1e-3  # type: ignore[operator]
    # so the names differ, in the tables of each command
    assert len({WHOLE_MODEL_BARRIER, LAYERWISE_BARRIER, LAYER_SET_BARRIER}) == 3 and set(QUANTITIES) == {
        WHOLE_MODEL_BARRIER,
        LAYERWISE_BARRIER,
        LAYER_SET_BARRIER,
    }
    assert MEASURED == f"{LAYER_SET_BARRIER}_half"  # predict's (and singh's) column
    rows = [
        {**r, "pair": 0, "path": "naive", "layers": layers, **({"base": "a"} if only else {})}
        for layers, only in (("all", None), ("head", head))
        for r in evaluate_path(ma, a, b, {"test": data}, lambdas=lam, only=only, bn="none", progress=False)
    ]
    with open(write_lmc_report(rows, tmp_path)["barriers"]) as fh:
        table = list(csv.DictReader(fh))
    assert {(r["layers"], r["quantity"], r.get("base") or "") for r in table} == {
        ("all", "barrier", ""),
        ("head", "layerwise_barrier", "a"),
    }


def test_layer_groups_and_cumulative_orders() -> None:
    groups = layer_groups(make("resnet20", 0, norm="batchnorm"))
    assert groups["stem.norm"] == [
        "stem.norm.weight",
        "stem.norm.bias",
        "stem.norm.running_mean",
        "stem.norm.running_var",
        "stem.norm.num_batches_tracked",
    ]
    names = list(groups)
    assert names[0] == "stem.conv" and names[-1] == "head"
    assert cumulative_layer_sets(names, "shallow")[1] == names[:2]
    assert cumulative_layer_sets(names, "deep")[0] == ["head"]
    rnd = cumulative_layer_sets(names, "random", seed=3)
    assert rnd == cumulative_layer_sets(names, "random", seed=3) and sorted(rnd[-1]) == sorted(names)


def test_path_endpoints_equal_the_models(tmp_path: Path) -> None:
    data = toy_dataset()
    ma, mb = make("mlp", 0, hidden=(16,)), make("mlp", 1, hidden=(16,))
    rows = evaluate_path(ma, ma.state_dict(), mb.state_dict(), {"test": data}, lambdas=[0.0, 0.5, 1.0], progress=False)
    loss = {r["lambda"]: r["value"] for r in rows if r["metric"] == "loss"}
    assert loss[0.0] == evaluate(ma, data)["loss"] and loss[1.0] == evaluate(mb, data)["loss"]
    err = {r["lambda"]: r["value"] for r in rows if r["metric"] == "error"}
    acc = {r["lambda"]: r["value"] for r in rows if r["metric"] == "accuracy"}
    assert all(err[x] == pytest.approx(1 - acc[x]) for x in acc)
    named = [{**r, "path": "naive"} for r in rows]
    check_paths(plot_paths(tmp_path / "p.png", named), named)  # the loss and accuracy drawn at each λ


# ---------------------------------------------------------------------------------------- BN reset / REPAIR


def test_bn_reset_equals_a_recomputation_by_hand() -> None:
    data = toy_dataset(n=90)
    model = make("resnet20", 0, norm="batchnorm")
    bn = model.stem.norm
    # by hand: the stem BN's inputs are the stem conv's outputs; average of batch means / unbiased variances
    conv_outputs = [model.stem.conv(x) for x, _ in data.batches(30)]
    mean = torch.stack([o.mean((0, 2, 3)) for o in conv_outputs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in conv_outputs]).mean(0)
    bn.running_mean.fill_(7.0)
    reset_bn_stats(model, data, batch_size=30)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert not model.training and bn.momentum == 0.1
    # the population mean is exact when batches are equal-sized
    torch.testing.assert_close(bn.running_mean, torch.cat(conv_outputs).mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kw"),
    [("mlp", {"hidden": (16, 16)}), ("resnet20", {"norm": "layernorm"}), ("resnet20", {"norm": "batchnorm"})],
)
def test_repair_reaches_the_goal_statistics(name: str, kw: dict) -> None:
    """With one batch holding all the data, REPAIR's folded network has exactly the goal channel stats."""
    data = toy_dataset(n=64)
    ma, mb = make(name, 0, **kw), make(name, 1, **kw)
    example = next(data.batches(2))[0]
    points = repair_points(ma, example)
    assert points and "head" not in points
    scratch = make(name, 2, **kw)
    sa = endpoint_stats(scratch, ma.state_dict(), points, data, batch_size=64)
    sb = endpoint_stats(scratch, mb.state_dict(), points, data, batch_size=64)
    lam = 0.3
    scratch.load_state_dict(lerp(ma.state_dict(), mb.state_dict(), lam))
    repair(scratch, sa, sb, lam, data, batch_size=64)
    after = channel_stats(scratch, points, data, batch_size=64)
    for p in points:
        torch.testing.assert_close(after.mean[p], (1 - lam) * sa.mean[p] + lam * sb.mean[p], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(after.std[p], (1 - lam) * sa.std[p] + lam * sb.std[p], rtol=1e-3, atol=1e-4)


def test_repair_points_skip_the_head_of_a_norm_free_mlp() -> None:
    model = make("mlp", 0, hidden=(8, 8))
    assert repair_points(model, torch.zeros(2, 1, 6, 6)) == ["layers.0.linear", "layers.1.linear"]


def test_bn_modes_on_a_path() -> None:
    data = toy_dataset(n=60)
    ma, mb = make("resnet20", 0, norm="batchnorm"), make("resnet20", 1, norm="batchnorm")
    for bn in ("none", "reset", "repair"):
        rows = evaluate_path(
            ma,
            ma.state_dict(),
            mb.state_dict(),
            {"test": data},
            lambdas=[0, 0.5, 1],
            bn=bn,
            bn_data=data,
            progress=False,
        )
        assert len(rows) == 9 and all(np.isfinite(r["value"]) for r in rows)
    with pytest.raises(ValueError, match="needs bn_data"):
        evaluate_path(ma, ma.state_dict(), mb.state_dict(), {"test": data}, bn="reset")
