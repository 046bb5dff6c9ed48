"""Angles, cosines and trajectory distances between points in parameter space (:mod:`lmclab.points`).

Every quantity is an inner product over a common set of tensors (default: all floating-point
tensors the points share; pass `keys` to restrict to the model's parameters), accumulated in
float64 (the point operations ``direction``, ``inner``, ``norm``, ``distance`` live in
:mod:`lmclab.points`). Singh et al. (Sec. 2, Fig. 2):

- sibling angle  ∠(θ_1* − θ_base, θ_2* − θ_base), base = the origin or the fork point;
- solution-plane determination  cos(θ_1^t − θ_2^t, θ_1* − θ_2*) over child training time t;
- sibling distance  ‖θ_1^t − θ_2^t‖ over t.

A cosine or angle with a zero vector is undefined and returned as NaN (e.g. at the fork step,
where both siblings are the same point).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lmclab.points import PointLike, common_keys, direction, distance, inner, norm

__all__ = [
    "SiblingGeometry",
    "angle",
    "cosine",
    "distances",
    "plane_determination",
    "sibling_angle",
    "sibling_geometry",
]


def cosine(a: PointLike, b: PointLike, keys: Iterable[str] | None = None) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖); NaN if either vector is zero."""
    chosen = common_keys(a, b, keys=keys)
    na, nb = norm(a, chosen), norm(b, chosen)
    if na == 0.0 or nb == 0.0:
        return math.nan
    return max(-1.0, min(1.0, inner({k: a[k] for k in chosen}, b) / (na * nb)))


def angle(a: PointLike, b: PointLike, keys: Iterable[str] | None = None, degrees: bool = True) -> float:
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


def sibling_angle(
    theta_1: PointLike,
    theta_2: PointLike,
    base: PointLike | None = None,
    keys: Iterable[str] | None = None,
    degrees: bool = True,
) -> float:
    """Singh Fig. 2(a): ∠(θ_1 − θ_base, θ_2 − θ_base); base None = the origin."""
    if base is None:
        return angle(theta_1, theta_2, keys, degrees)
    chosen = common_keys(theta_1, theta_2, base, keys=keys)
    return angle(
        direction(base, theta_1, chosen, torch.float64),
        direction(base, theta_2, chosen, torch.float64),
        degrees=degrees,
    )


def plane_determination(
    trajectory_1: Iterable[PointLike],
    trajectory_2: Iterable[PointLike],
    final_1: PointLike,
    final_2: PointLike,
    keys: Iterable[str] | None = None,
) -> list[float]:
    """Singh Fig. 2(b): cos(θ_1^t − θ_2^t, θ_1* − θ_2*) for each t (NaN where θ_1^t = θ_2^t).

    Trajectories may be lazy (generators that load one checkpoint at a time)."""
    final = direction(final_2, final_1, keys, torch.float64)  # θ_1* − θ_2*
    return [cosine(_difference(p1, p2, final), final) for p1, p2 in _pairs(trajectory_1, trajectory_2)]


def distances(
    trajectory_1: Iterable[PointLike], trajectory_2: Iterable[PointLike], keys: Iterable[str] | None = None
) -> list[float]:
    """‖θ_1^t − θ_2^t‖ for each t (Singh Fig. 4b)."""
    return [distance(p1, p2, keys) for p1, p2 in _pairs(trajectory_1, trajectory_2)]


@dataclass(frozen=True)
class SiblingGeometry:
    """Singh Figs. 2 and 4b at one training time t of two siblings (NaN where undefined)."""

    distance: float  # ‖θ_1^t − θ_2^t‖
    plane_cos: float  # cos(θ_1^t − θ_2^t, θ_1* − θ_2*)
    angle_origin: float  # ∠(θ_1^t, θ_2^t), degrees
    angle_fork: float  # ∠(θ_1^t − θ_base, θ_2^t − θ_base), degrees


def sibling_geometry(
    trajectory_1: Iterable[PointLike],
    trajectory_2: Iterable[PointLike],
    final_1: PointLike,
    final_2: PointLike,
    base: PointLike,
    keys: Iterable[str] | None = None,
) -> list[SiblingGeometry]:
    """:class:`SiblingGeometry` at every t, in one pass over the (possibly lazy) trajectories: the
    distance and plane determination of :func:`distances` and :func:`plane_determination`, and
    :func:`sibling_angle` with the origin and with `base` (the fork point) as base."""
    keys = None if keys is None else list(keys)
    final = direction(final_2, final_1, keys, torch.float64)  # θ_1* − θ_2*
    out = []
    for p1, p2 in _pairs(trajectory_1, trajectory_2):
        d = _difference(p1, p2, final)
        out.append(
            SiblingGeometry(
                distance=norm(d),
                plane_cos=cosine(d, final),
                angle_origin=sibling_angle(p1, p2, keys=keys),
                angle_fork=sibling_angle(p1, p2, base=base, keys=keys),
            )
        )
    return out


def _difference(p1: PointLike, p2: PointLike, final: PointLike) -> dict[str, torch.Tensor]:
    """θ_1 − θ_2 in float64 on the tensors of `final`."""
    return direction(p2, p1, list(final), torch.float64)


def _pairs(
    trajectory_1: Iterable[PointLike], trajectory_2: Iterable[PointLike]
) -> Iterable[tuple[PointLike, PointLike]]:
    try:
        yield from zip(trajectory_1, trajectory_2, strict=True)
    except ValueError as err:
        if str(err).startswith("zip()"):
            raise ValueError(f"the two trajectories differ in length ({err})") from None
        raise
