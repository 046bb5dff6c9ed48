"""Points in parameter space: the one data type every layer of lmclab passes around.

A *point* θ is a ``dict[str, Tensor]`` keyed like a model's ``state_dict()``: trainable parameters
and buffers (BN running statistics, counters). Every operation on points lives here.

Conventions (one rule each):

- **direction**: ``direction(θ_A, θ_B) = θ_B − θ_A`` (from A towards B), so θ_A + λ·d = θ_λ.
- **dtype**: an operation returns tensors in the dtype of its first point unless given ``dtype=``;
  reductions to a number (``inner``, ``norm``, ``distance``) always accumulate in float64.
- **keys**: operations act on every floating-point tensor of the first point unless given ``keys=``;
  non-floating tensors (e.g. BN's ``num_batches_tracked``) are not coordinates: they are carried over
  from the first point where a point is returned, and never enter a number.
- **parameters vs buffers**: directions, Hessians and curvature live on the model's trainable
  parameters (``parameter_names(model)``); ``split_point`` separates a point into the two.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

#: A point θ in parameter space: state-dict names -> tensors (parameters and buffers).
Point = dict[str, torch.Tensor]
#: Read-only view of a point accepted by every function here.
PointLike = Mapping[str, torch.Tensor]

__all__ = [
    "Point",
    "PointLike",
    "common_keys",
    "direction",
    "distance",
    "flatten",
    "inner",
    "lerp",
    "mean",
    "mixture",
    "norm",
    "parameter_names",
    "parameters_of",
    "split_point",
    "unflatten",
]


def common_keys(*points: PointLike, keys: Iterable[str] | None = None) -> list[str]:
    """`keys` (checked to be in every point), else the floating-point tensors all points share, in the
    first point's order. Shapes must agree."""
    if not points:
        raise ValueError("need at least one point")
    if keys is not None:
        chosen = list(keys)
        for i, p in enumerate(points):
            missing = [k for k in chosen if k not in p]
            if missing:
                raise KeyError(f"point {i} lacks tensors {missing}")
    else:
        chosen = [k for k, v in points[0].items() if v.is_floating_point() and all(k in p for p in points[1:])]
    if not chosen:
        raise ValueError("the points share no floating-point tensors")
    for k in chosen:
        shapes = {tuple(p[k].shape) for p in points}
        if len(shapes) > 1:
            raise ValueError(f"tensor {k!r} has different shapes in the points: {sorted(shapes)}")
    return chosen


def direction(
    theta_a: PointLike, theta_b: PointLike, keys: Iterable[str] | None = None, dtype: torch.dtype | None = None
) -> Point:
    """d = θ_B − θ_A on `keys` (default: the common floating tensors), detached, computed in `dtype`
    (default: θ_A's dtype per tensor) on θ_A's device."""
    out: Point = {}
    for k in common_keys(theta_a, theta_b, keys=keys):
        a = theta_a[k].detach()
        target = dtype or a.dtype
        out[k] = theta_b[k].detach().to(a.device, target) - a.to(target)
    return out


def inner(a: PointLike, b: PointLike) -> float:
    """⟨a, b⟩ = Σ_tensors Σ_entries a·b over the keys of `a`, accumulated in float64."""
    return float(sum(torch.sum(a[k].double() * b[k].double().to(a[k].device)) for k in a))


def norm(a: PointLike, keys: Iterable[str] | None = None) -> float:
    """‖a‖₂ over `keys` (default: a's floating tensors), in float64."""
    chosen = {k: a[k] for k in common_keys(a, keys=keys)}
    return math.sqrt(inner(chosen, chosen))


def distance(a: PointLike, b: PointLike, keys: Iterable[str] | None = None) -> float:
    """‖a − b‖₂ over `keys` (default: the common floating tensors), differences taken in float64."""
    return norm(direction(b, a, keys=keys, dtype=torch.float64))


def lerp(
    theta_a: PointLike, theta_b: PointLike, lam: float, only: Iterable[str] | None = None, base: str = "a"
) -> Point:
    """θ_λ = (1−λ)θ_A + λθ_B on the tensors in `only` (default: all floating tensors), in θ_A's dtype
    (``torch.lerp``: exact at λ = 0 and λ = 1); the other tensors come from θ_A (base "a") or θ_B
    ("b"); non-floating tensors always from θ_A."""
    if theta_a.keys() != theta_b.keys():
        raise KeyError(f"endpoints differ in tensors: {sorted(set(theta_a) ^ set(theta_b))}")
    if base not in ("a", "b"):
        raise ValueError(f"base must be 'a' or 'b', got {base!r}")
    chosen = set(theta_a) if only is None else set(only)
    unknown = chosen - set(theta_a)
    if unknown:
        raise KeyError(f"no such tensors to interpolate: {sorted(unknown)}")
    out: Point = {}
    for k, a in theta_a.items():
        if not a.is_floating_point():
            out[k] = a
        elif k in chosen:
            out[k] = torch.lerp(a, theta_b[k].to(a.device, a.dtype), lam)
        else:
            out[k] = a if base == "a" else theta_b[k]
    return out


def mean(points: Sequence[PointLike]) -> Point:
    """θ̄ = (1/K) Σ_k θ_k entrywise, accumulated in float64 and cast back to the first point's dtypes;
    non-floating tensors from the first point. Not differentiable (see :func:`mixture`)."""
    if not points:
        raise ValueError("mean of no points")
    out: Point = {}
    for name, first in points[0].items():
        if first.is_floating_point():
            acc = torch.stack([p[name].to(torch.float64) for p in points]).mean(0)
            out[name] = acc.to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def mixture(points: Sequence[PointLike], weights: torch.Tensor | np.ndarray | Sequence[float]) -> Point:
    """θ_mix = Σ_k w_k θ_k over the keys of points[0], in the points' dtype and differentiable in the
    points (STE's training objective); non-floating tensors cloned from points[0]."""
    if len(points) != len(weights):
        raise ValueError(f"{len(points)} points but {len(weights)} mixing weights")
    w = [float(x) for x in weights]
    out: Point = {}
    for name, first in points[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        acc = first * w[0]
        for wk, p in zip(w[1:], points[1:]):
            acc = acc + p[name] * wk
        out[name] = acc
    return out


def flatten(point: PointLike, names: Sequence[str] | None = None) -> torch.Tensor:
    """One vector: the tensors in `names` order (default: the mapping's order), each flattened row-major."""
    keys = list(point) if names is None else list(names)
    return torch.cat([point[k].reshape(-1) for k in keys])


def unflatten(vector: torch.Tensor, like: PointLike) -> Point:
    """Inverse of :func:`flatten` in `like`'s key order, with `like`'s shapes, dtypes and devices."""
    out: Point = {}
    offset = 0
    for k, t in like.items():
        n = t.numel()
        out[k] = vector[offset : offset + n].reshape(t.shape).to(t.device, t.dtype)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the point {offset}")
    return out


def parameter_names(model: nn.Module) -> list[str]:
    """The model's trainable parameter names in ``named_parameters()`` order (stable across processes):
    the coordinates directions, Hessians and curvature live in; buffers excluded."""
    return [n for n, _ in model.named_parameters()]


def parameters_of(theta: PointLike, model: nn.Module) -> Point:
    """θ restricted to the model's trainable parameters (detached, dtype kept, model order)."""
    names = parameter_names(model)
    missing = [n for n in names if n not in theta]
    if missing:
        raise KeyError(f"θ lacks parameters {sorted(missing)}")
    return {n: theta[n].detach() for n in names}


def split_point(theta: PointLike, model: nn.Module) -> tuple[Point, Point]:
    """(parameters, buffers) of θ: the model's trainable parameters in model order, and every other tensor."""
    params = parameters_of(theta, model)
    buffers = {k: v.detach() for k, v in theta.items() if k not in params}
    return params, buffers
