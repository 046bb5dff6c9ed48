"""Angles, cosines and distances between points in parameter space (dict[str, Tensor]).

Every quantity is an inner product over a common set of tensors (default: all floating-point
tensors the points share; pass `keys` to restrict to the model's parameters), accumulated in
float64. Singh et al. (Sec. 2, Fig. 2):

- sibling angle  ∠(θ_1* − θ_base, θ_2* − θ_base), base = the origin or the fork point;
- solution-plane determination  cos(θ_1^t − θ_2^t, θ_1* − θ_2*) over child training time t;
- sibling distance  ‖θ_1^t − θ_2^t‖ over t.

A cosine or angle with a zero vector is undefined and returned as NaN (e.g. at the fork step,
where both siblings are the same point).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from lmclab.curvature.hessian import vdot

Point = Mapping[str, torch.Tensor]

__all__ = [
    "angle", "common_keys", "cosine", "difference", "distance", "distances", "norm", "plane_determination",
    "sibling_angle",
]


def common_keys(*points: Point, keys: Iterable[str] | None = None) -> list[str]:
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


def difference(a: Point, b: Point, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """a − b on the common tensors, in float64."""
    return {k: a[k].detach().double() - b[k].detach().double().to(a[k].device) for k in common_keys(a, b, keys=keys)}


def norm(a: Point, keys: Iterable[str] | None = None) -> float:
    """‖a‖₂ over the chosen tensors."""
    chosen = common_keys(a, keys=keys)
    return math.sqrt(vdot({k: a[k] for k in chosen}, a))


def distance(a: Point, b: Point, keys: Iterable[str] | None = None) -> float:
    """‖a − b‖₂."""
    return norm(difference(a, b, keys))


def cosine(a: Point, b: Point, keys: Iterable[str] | None = None) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖); NaN if either vector is zero."""
    chosen = common_keys(a, b, keys=keys)
    na, nb = norm(a, chosen), norm(b, chosen)
    if na == 0.0 or nb == 0.0:
        return math.nan
    return max(-1.0, min(1.0, vdot({k: a[k] for k in chosen}, b) / (na * nb)))


def angle(a: Point, b: Point, keys: Iterable[str] | None = None, degrees: bool = True) -> float:
    """∠(a, b) = 2·atan2(‖â − b̂‖, ‖â + b̂‖) with â = a/‖a‖ (Kahan; accurate near 0 and π, where
    arccos of the cosine is not); NaN if either vector is zero."""
    chosen = common_keys(a, b, keys=keys)
    na, nb = norm(a, chosen), norm(b, chosen)
    if na == 0.0 or nb == 0.0:
        return math.nan
    ua = {k: a[k].detach().double() / na for k in chosen}
    ub = {k: b[k].detach().double().to(a[k].device) / nb for k in chosen}
    minus = math.sqrt(sum(float(((ua[k] - ub[k]) ** 2).sum()) for k in chosen))
    plus = math.sqrt(sum(float(((ua[k] + ub[k]) ** 2).sum()) for k in chosen))
    radians = 2.0 * math.atan2(minus, plus)
    return math.degrees(radians) if degrees else radians


def sibling_angle(theta_1: Point, theta_2: Point, base: Point | None = None, keys: Iterable[str] | None = None,
                  degrees: bool = True) -> float:
    """Singh Fig. 2(a): ∠(θ_1 − θ_base, θ_2 − θ_base); base None = the origin."""
    if base is None:
        return angle(theta_1, theta_2, keys, degrees)
    chosen = common_keys(theta_1, theta_2, base, keys=keys)
    return angle(difference(theta_1, base, chosen), difference(theta_2, base, chosen), degrees=degrees)


def plane_determination(trajectory_1: Iterable[Point], trajectory_2: Iterable[Point], final_1: Point, final_2: Point,
                        keys: Iterable[str] | None = None) -> list[float]:
    """Singh Fig. 2(b): cos(θ_1^t − θ_2^t, θ_1* − θ_2*) for each t (NaN where θ_1^t = θ_2^t).

    Trajectories may be lazy (generators that load one checkpoint at a time)."""
    final = difference(final_1, final_2, keys)
    return [cosine(difference(p1, p2, list(final)), final) for p1, p2 in _pairs(trajectory_1, trajectory_2)]


def distances(trajectory_1: Iterable[Point], trajectory_2: Iterable[Point],
              keys: Iterable[str] | None = None) -> list[float]:
    """‖θ_1^t − θ_2^t‖ for each t (Singh Fig. 4b)."""
    return [distance(p1, p2, keys) for p1, p2 in _pairs(trajectory_1, trajectory_2)]


def _pairs(trajectory_1: Iterable[Point], trajectory_2: Iterable[Point]) -> Iterable[tuple[Point, Point]]:
    try:
        yield from zip(trajectory_1, trajectory_2, strict=True)
    except ValueError as err:
        if str(err).startswith("zip()"):
            raise ValueError(f"the two trajectories differ in length ({err})") from None
        raise
