"""Batched evaluation of many points (lmclab.paths.batched): equal to one point at a time, BN reset per
point bit for bit, the chunk-size estimate, and evaluate_path / evaluate_plane going through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.geometry import evaluate_plane, plane_through
from lmclab.models import build_model
from lmclab.paths import evaluate_path, path_values, reset_bn_stats
from lmclab.paths.batched import (
    activation_bytes,
    default_chunk,
    evaluate_points,
    evaluate_stacked,
    reset_bn_stats_stacked,
    stack_points,
)
from lmclab.points import lerp

LAMBDAS = [i / 8 for i in range(9)]


def toy_dataset(n: int = 70, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> DeviceDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    info = DatasetInfo("toy", 3, shape, (0.5,) * shape[0], (0.25,) * shape[0], False, ("a", "b", "c"), "test")
    return DeviceDataset(images, torch.arange(n) % 3, info)


def make(name: str, seed: int, shape: tuple[int, int, int] = (1, 8, 8), **kw: object) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, input_shape=shape, num_classes=3, **kw).eval()


MODELS = {
    "mlp": {"hidden": (32, 32)},
    "resnet20-bn": {"width": 1, "norm": "batchnorm"},
    "vit": {"dim": 16, "depth": 1, "heads": 2, "patch": 4},
}


def pair(key: str) -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    name, opts = key.split("-")[0], MODELS[key]
    a, b = make(name, 0, **opts), make(name, 1, **opts)
    if key == "resnet20-bn":  # stored statistics that differ between the ends (fresh ones are 0 and 1)
        data = toy_dataset(seed=5)
        for m in (a, b):
            reset_bn_stats(m, data)
    return a, a.state_dict(), b.state_dict()


def plain_loop(model: nn.Module, points: list[dict[str, torch.Tensor]], data: DeviceDataset) -> list[tuple]:
    """What a user writes: load each point into the model, one pass, mean loss and accuracy (float64)."""
    out = []
    for p in points:
        model.load_state_dict(p)
        model.eval()
        x, y = next(data.batches(len(data)))
        with torch.no_grad():
            logits = model(x).double()
        out.append((F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).double().mean().item()))
    return out


@pytest.mark.parametrize("key", list(MODELS))
def test_nine_lambdas_batched_equal_one_by_one(key: str) -> None:
    model, a, b = pair(key)
    data = {"test": toy_dataset(), "train": toy_dataset(n=45, seed=1)}
    rows = {
        chunk: evaluate_path(model, a, b, data, lambdas=LAMBDAS, bn="none", batch_size=32, chunk=chunk, progress=False)
        for chunk in (1, 4, 9, None)  # one at a time; uneven chunks (4, 4, 1); all at once; the default
    }
    assert rows[None] == rows[1]  # the CPU's default is the loop, bit for bit
    assert [{k: r[k] for k in ("lambda", "split", "metric")} for r in rows[9]] == [
        {k: r[k] for k in ("lambda", "split", "metric")} for r in rows[1]
    ]
    for chunk in (4, 9):
        for split in data:
            for metric in ("loss", "accuracy"):
                np.testing.assert_allclose(
                    path_values(rows[chunk], metric, split), path_values(rows[1], metric, split), rtol=1e-6
                )
    # and an independent computation: a plain loop over the points, whole split at once, float64
    points = [lerp(a, b, lam) for lam in LAMBDAS]
    expected = plain_loop(make(key.split("-")[0], 2, **MODELS[key]), points, data["test"])
    np.testing.assert_allclose(path_values(rows[9], "loss", "test"), [e[0] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(path_values(rows[9], "accuracy", "test"), [e[1] for e in expected], rtol=1e-12)


@pytest.mark.parametrize("bn", ["reset", "repair"])
def test_bn_reset_and_repair_batched_equal_one_by_one(bn: str) -> None:
    model, a, b = pair("resnet20-bn")
    data, bn_data = {"test": toy_dataset()}, toy_dataset(n=90, seed=3)
    kw = {"lambdas": LAMBDAS, "bn": bn, "bn_data": bn_data, "bn_examples": 70, "batch_size": 32, "progress": False}
    loop = evaluate_path(model, a, b, data, chunk=1, **kw)  # type: ignore[arg-type]
    batched = evaluate_path(model, a, b, data, chunk=5, **kw)  # type: ignore[arg-type]
    for metric in ("loss", "accuracy"):
        np.testing.assert_allclose(path_values(batched, metric), path_values(loop, metric), rtol=1e-6)
    # the reset matters: without it the interior points differ
    none = evaluate_path(model, a, b, data, lambdas=LAMBDAS, bn="none", batch_size=32, progress=False)
    assert max(abs(x - y) for x, y in zip(path_values(none, "loss"), path_values(loop, "loss"))) > 1e-3


def test_stacked_bn_reset_equals_reset_point_by_point() -> None:
    """Per point: reset_bn_stats (cumulative average over batches of 500 … here batches of 16, first 40
    examples) on the model and reset_bn_stats_stacked under vmap give the same running statistics."""
    model, a, b = pair("resnet20-bn")
    data = toy_dataset(n=50, seed=4)
    points = [lerp(a, b, lam) for lam in (0.0, 0.3, 1.0)]
    stacked = stack_points(points, model.state_dict())
    reset_bn_stats_stacked(model, stacked, data, batch_size=16, max_examples=40)
    for i, p in enumerate(points):
        model.load_state_dict(p)
        reset_bn_stats(model, data, batch_size=16, max_examples=40)
        for k, t in model.state_dict().items():
            torch.testing.assert_close(stacked[k][i], t, rtol=1e-6, atol=1e-7)
            if k.endswith("num_batches_tracked"):
                assert int(stacked[k][i]) == 3
    assert not torch.equal(stacked["stem.norm.running_mean"][0], a["stem.norm.running_mean"])


def test_stacked_point_and_list_agree_and_keys_are_checked() -> None:
    model, a, b = pair("mlp")
    data = toy_dataset()
    points = [lerp(a, b, lam) for lam in (0.2, 0.7)]
    assert evaluate_stacked(model, points, data, 25) == evaluate_stacked(
        model, stack_points(points, model.state_dict()), data, 25
    )
    with pytest.raises(KeyError, match="missing"):
        stack_points([{k: v for k, v in a.items() if k != next(iter(a))}], model.state_dict())
    with pytest.raises(ValueError, match="leading dimension"):
        evaluate_stacked(model, {k: v for k, v in a.items()}, data)


def test_a_non_finite_point_is_nan_alone() -> None:
    model, a, b = pair("mlp")
    bad = {k: torch.full_like(v, math.inf) if v.is_floating_point() else v for k, v in b.items()}
    out = evaluate_points(model, [a, bad, b], {"t": toy_dataset()}, chunk=3)
    assert math.isnan(out[1]["t"]["loss"]) and math.isnan(out[1]["t"]["accuracy"])
    assert all(np.isfinite(out[i]["t"]["loss"]) for i in (0, 2))


def test_chunk_estimate_from_parameters_and_activations() -> None:
    model = make("mlp", 0, hidden=(32, 16))
    example = torch.zeros(5, 1, 8, 8)
    # leaf outputs of one example, counted from the architecture: 64 inputs flattened, then 32 and 16
    # hidden units (linear and ReLU outputs each), 3 logits; float32
    kinds = sorted(type(m).__name__ for m in model.modules() if not list(m.children()))
    assert kinds == ["Flatten", "Linear", "Linear", "Linear", "ReLU", "ReLU"], kinds
    leaf_floats = 64 + 2 * 32 + 2 * 16 + 3
    assert activation_bytes(model, example) == 4 * leaf_floats
    state = 4 * sum(t.numel() for t in model.state_dict().values())
    per_point = state + 10 * 4 * leaf_floats
    assert default_chunk(model, example, 10, budget_bytes=7 * per_point, most=100) == 7
    assert default_chunk(model, example, 10, budget_bytes=7 * per_point - 1, most=100) == 6
    assert default_chunk(model, example, 10, budget_bytes=7 * per_point, most=3) == 3
    assert default_chunk(model, example, 10, budget_bytes=1) == 1
    assert default_chunk(model, example, 10) == 1  # the CPU: no batching by default


def test_bad_arguments() -> None:
    model, a, b = pair("mlp")
    data = {"t": toy_dataset()}
    with pytest.raises(ValueError, match="cannot be batched"):
        evaluate_points(model, [a], data, bn="repair")
    with pytest.raises(ValueError, match="needs bn_data"):
        evaluate_points(model, [a], data, bn="reset")
    with pytest.raises(ValueError, match="positive"):
        evaluate_points(model, [a], data, chunk=0)


def test_plane_goes_through_the_batched_evaluator() -> None:
    """A plane through θ_A, θ_B and a third point: its nodes on the u axis are the straight path's points."""
    model, a, b = pair("resnet20-bn")
    c = make("resnet20", 2, width=1, norm="batchnorm").state_dict()
    c = {k: v for k, v in zip(a, c.values())}
    plane = plane_through(a, b, c, [n for n, _ in model.named_parameters()])
    length = plane.coordinates(b)[0]
    data, bn_data = {"test": toy_dataset()}, toy_dataset(n=60, seed=3)
    lams = [0.0, 0.5, 1.0]
    for bn in ("none", "reset"):
        rows = evaluate_plane(
            model, plane, [(lam * length, 0.0) for lam in lams], data, bn=bn, bn_data=bn_data, chunk=2, progress=False
        )
        path = evaluate_path(model, a, b, data, lambdas=lams, bn=bn, bn_data=bn_data, chunk=1, progress=False)
        np.testing.assert_allclose(
            [r["value"] for r in rows if r["metric"] == "loss"], path_values(path, "loss"), rtol=1e-5
        )
