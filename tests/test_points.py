"""lmclab.points against independent computations: numpy in float64, flat vectors, autograd, the model's own
parameter and buffer lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lmclab.points import (
    common_keys,
    direction,
    distance,
    flatten,
    inner,
    lerp,
    mean,
    mixture,
    norm,
    parameter_names,
    parameters_of,
    split_point,
    unflatten,
)


def bn_model(seed: int) -> nn.Module:
    """Linear → BatchNorm (running statistics and an integer counter) → Linear, with non-trivial statistics."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model.train()
    model(torch.randn(16, 3))
    return model.eval()


def random_point(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g, dtype=dtype),
        "b": torch.randn(5, generator=g, dtype=dtype),
        "n": torch.tensor(seed),
    }  # an integer buffer: not a coordinate


def as_vector(p: dict[str, torch.Tensor], keys: tuple[str, ...] = ("w", "b")) -> np.ndarray:
    return np.concatenate([p[k].numpy().astype(np.float64).ravel() for k in keys])


# ------------------------------------------------------------------------------------------ keys


def test_common_keys_are_the_shared_floating_tensors_in_first_point_order() -> None:
    a, b = random_point(0), random_point(1)
    assert common_keys(a, b) == ["w", "b"]
    assert common_keys(a, {"b": b["b"]}) == ["b"]
    assert common_keys(a, keys=["b"]) == ["b"]
    with pytest.raises(KeyError, match="lacks"):
        common_keys(a, b, keys=["w", "missing"])
    with pytest.raises(ValueError, match="different shapes"):
        common_keys(a, {**b, "w": torch.zeros(4, 3)})
    with pytest.raises(ValueError, match="no floating"):
        common_keys({"n": torch.tensor(1)})


# ------------------------------------------------------------------------------------ direction


def test_direction_points_from_a_to_b() -> None:
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randint(-50, 50, (3, 4), generator=g).float(), "n": torch.tensor(3)}
    b = {"w": torch.randint(-50, 50, (3, 4), generator=g).float(), "n": torch.tensor(5)}
    d = direction(a, b)
    assert list(d) == ["w"]  # the integer buffer is not a coordinate
    assert torch.equal(a["w"] + d["w"], b["w"])  # integer-valued: exact, θ_A + d = θ_B
    assert torch.equal(direction(b, a)["w"], -d["w"])


def test_direction_dtype_rule() -> None:
    a, b = random_point(0, torch.float32), random_point(1, torch.float64)
    d = direction(a, b)
    assert d["w"].dtype == torch.float32  # the first point's dtype
    torch.testing.assert_close(d["w"], b["w"].float() - a["w"])
    d64 = direction(a, b, dtype=torch.float64)
    assert d64["w"].dtype == torch.float64
    np.testing.assert_array_equal(d64["w"].numpy(), b["w"].numpy() - a["w"].numpy().astype(np.float64))
    assert list(direction(a, b, keys=["b"])) == ["b"]


# ------------------------------------------------------------------------- inner, norm, distance


def test_inner_equals_the_dot_product_of_the_flat_vectors() -> None:
    a, b = random_point(0), random_point(1)
    keys = ["w", "b"]
    flat = torch.dot(flatten(a, keys).double(), flatten(b, keys).double()).item()
    assert inner({k: a[k] for k in keys}, b) == pytest.approx(flat, rel=1e-14)
    assert inner({k: a[k] for k in keys}, b) == pytest.approx(float(as_vector(a) @ as_vector(b)), rel=1e-12)


def test_inner_accumulates_in_float64() -> None:
    big, small = torch.tensor([1.0e8], dtype=torch.float32), torch.tensor([1.0], dtype=torch.float32)
    x = {"a": big, "b": small, "c": -big}  # fp32 accumulation would lose the 1
    assert inner(x, {"a": small, "b": small, "c": small}) == 1.0


def test_norm_and_distance_against_numpy_float64() -> None:
    a, b = random_point(0), random_point(1)
    assert norm(a) == pytest.approx(np.linalg.norm(as_vector(a)), rel=1e-12)
    assert norm(a, keys=["b"]) == pytest.approx(np.linalg.norm(a["b"].numpy().astype(np.float64)), rel=1e-12)
    assert distance(a, b) == pytest.approx(np.linalg.norm(as_vector(a) - as_vector(b)), rel=1e-12)
    assert distance(a, b) == distance(b, a)
    assert distance(a, b, keys=["w"]) == pytest.approx(
        np.linalg.norm(as_vector(a, ("w",)) - as_vector(b, ("w",))), rel=1e-12
    )
    assert distance(a, a) == 0.0


def test_distance_takes_differences_in_float64() -> None:
    a = {"x": torch.tensor([1.0], dtype=torch.float32)}
    b = {"x": torch.tensor([1.0 + 2.0**-40], dtype=torch.float64)}  # below fp32 resolution around 1
    assert distance(b, a) == pytest.approx(2.0**-40, rel=1e-12)


# ------------------------------------------------------------------------------------------ lerp


def test_lerp_is_exact_at_the_ends_and_takes_integer_buffers_from_a() -> None:
    a, b = bn_model(0).state_dict(), bn_model(1).state_dict()
    for lam, end in ((0.0, a), (1.0, b)):
        point = lerp(a, b, lam)
        assert all(torch.equal(point[k], end[k]) for k in a if a[k].is_floating_point())
    mid = lerp(a, b, 0.25)
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(mid[k], 0.75 * a[k] + 0.25 * b[k])
        else:
            assert torch.equal(mid[k], a[k])  # num_batches_tracked from θ_A


def test_lerp_only_some_tensors_with_either_base() -> None:
    a, b = bn_model(0).state_dict(), bn_model(1).state_dict()
    for base, other in (("a", a), ("b", b)):
        point = lerp(a, b, 0.5, only=["0.weight"], base=base)
        torch.testing.assert_close(point["0.weight"], (a["0.weight"] + b["0.weight"]) / 2)
        assert all(torch.equal(point[k], other[k]) for k in a if k != "0.weight" and a[k].is_floating_point())
    with pytest.raises(KeyError, match="no such tensors"):
        lerp(a, b, 0.5, only=["nope"])
    with pytest.raises(KeyError, match="differ"):
        lerp(a, {k: v for k, v in b.items() if k != "0.bias"}, 0.5)
    with pytest.raises(ValueError, match="base"):
        lerp(a, b, 0.5, base="c")


def test_lerp_keeps_the_first_points_dtype() -> None:
    a, b = random_point(0, torch.float32), random_point(1, torch.float64)
    assert lerp(a, b, 0.5)["w"].dtype == torch.float32


# ---------------------------------------------------------------------------------- mean, mixture


def test_mean_against_numpy_and_integer_buffers_from_the_first_point() -> None:
    points = [random_point(seed) for seed in range(4)]
    m = mean(points)
    for k in ("w", "b"):
        expected = np.mean(np.stack([p[k].numpy().astype(np.float64) for p in points]), axis=0)
        assert m[k].dtype == torch.float32
        np.testing.assert_allclose(m[k].numpy(), expected.astype(np.float32), rtol=1e-7, atol=0)
    assert torch.equal(m["n"], points[0]["n"]) and m["n"] is not points[0]["n"]
    with pytest.raises(ValueError):
        mean([])


def test_mixture_value_and_gradient_are_the_weights() -> None:
    points = [
        {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in random_point(s, torch.float64).items()}
        for s in range(3)
    ]
    weights = [0.2, 0.5, 0.3]
    mix = mixture(points, weights)
    expected = sum(w * p["w"].detach() for w, p in zip(weights, points))
    torch.testing.assert_close(mix["w"], expected, rtol=1e-14, atol=0)
    assert torch.equal(mix["n"], points[0]["n"])
    g = torch.Generator().manual_seed(9)
    upstream = {k: torch.randn(mix[k].shape, generator=g, dtype=torch.float64) for k in ("w", "b")}
    objective = sum((mix[k] * upstream[k]).sum() for k in ("w", "b"))
    grads = torch.autograd.grad(objective, [p[k] for p in points for k in ("w", "b")])
    for i, w in enumerate(weights):  # ∂/∂θ_i Σ ⟨g, Σ_j w_j θ_j⟩ = w_i g
        for j, k in enumerate(("w", "b")):
            torch.testing.assert_close(grads[2 * i + j], w * upstream[k], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="weights"):
        mixture(points, [1.0])
    # equal weights give the mean (up to the accumulation dtype)
    plain = [random_point(s) for s in range(3)]
    torch.testing.assert_close(mixture(plain, [1 / 3] * 3)["w"], mean(plain)["w"])


# ---------------------------------------------------------------------------------- flat vectors


def test_flatten_unflatten_round_trip_in_the_given_order() -> None:
    p = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([10.0, 11.0], dtype=torch.float64)}
    assert torch.equal(flatten(p, ["b", "w"]), torch.tensor([10.0, 11.0, 0, 1, 2, 3, 4, 5], dtype=torch.float64))
    vec = flatten(p)
    assert vec.tolist() == [0, 1, 2, 3, 4, 5, 10, 11]
    back = unflatten(vec, p)
    assert list(back) == ["w", "b"]
    assert all(torch.equal(back[k], p[k]) and back[k].dtype == p[k].dtype for k in p)
    with pytest.raises(ValueError, match="entries"):
        unflatten(torch.zeros(9), p)


# ---------------------------------------------------------------------------- parameters, buffers


def test_parameter_names_and_split_point_follow_the_model() -> None:
    model = bn_model(0)
    theta = model.state_dict()
    assert parameter_names(model) == [n for n, _ in model.named_parameters()]
    params, buffers = split_point(theta, model)
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert set(buffers) == {n for n, _ in model.named_buffers()}
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert not any(t.requires_grad for t in params.values())
    assert list(parameters_of(theta, model)) == list(params)
    with pytest.raises(KeyError, match="lacks"):
        parameters_of({k: v for k, v in theta.items() if k != "3.bias"}, model)
    d = direction(theta, bn_model(1).state_dict(), keys=parameter_names(model))
    assert list(d) == list(params)  # a direction over the parameters only
