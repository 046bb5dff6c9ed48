"""Loss planes: the plane through three points in parameter space (or a point and two directions), its
orthonormal basis, the points' coordinates in it, and loss and error on a grid of (u, v).

A plane is an origin o and an orthonormal basis (e₁, e₂) of the model's trainable parameters (float64,
Gram–Schmidt over the flattened parameters, :mod:`lmclab.points`):

    θ(u, v) = o + u·e₁ + v·e₂,   (u, v) = (⟨θ − o, e₁⟩, ⟨θ − o, e₂⟩) for θ in the plane,

so u and v are Euclidean distances in parameter space (Git Re-Basin, Fig. 1; Garipov et al. 2018, Fig. 1).

- Through three points θ₀, θ₁, θ₂ (e.g. θ_A, θ_B, π(θ_B)): o = θ₀, e₁ ∝ θ₁ − θ₀, e₂ ∝ θ₂ − θ₀ minus its
  e₁ component. Every point of the plane is an affine combination Σ wᵢθᵢ (Σ wᵢ = 1, the barycentric
  coordinates of (u, v)); the other floating tensors (BN running statistics) are combined with the same
  weights, so on the line θ₀θ₁ the plane's points are the straight path's (:func:`lmclab.points.lerp`).
- Around one point θ with two directions d₁, d₂ (Li et al. 2018, filter-normalised random directions,
  :func:`filter_normalized_direction`): o = θ, (e₁, e₂) = Gram–Schmidt(d₁, d₂); buffers from θ.

Evaluation (:func:`evaluate_plane`) handles BatchNorm statistics as the straight path does
(:func:`lmclab.paths.evaluate_path`): "reset" recomputes them at every grid point from training data,
"none" uses the plane's (combined) statistics in eval mode. Many grid points are evaluated per pass over
the data (:func:`lmclab.paths.batched.evaluate_points`: ``torch.func.functional_call`` under
``torch.func.vmap`` over a chunk of points).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmclab.data import DeviceDataset
from lmclab.paths.batched import BATCHED_BN_MODES, evaluate_points, metric_rows
from lmclab.paths.curves import BN_MODES, default_bn_mode
from lmclab.paths.normalization import NORM_TYPES
from lmclab.points import Point, PointLike, direction, inner, norm, parameter_names

__all__ = [
    "Plane",
    "evaluate_plane",
    "filter_normalized_direction",
    "gram_schmidt",
    "grid_axes",
    "nearest_node",
    "plane_from_directions",
    "plane_through",
]

#: A vector whose residual after Gram–Schmidt is below this fraction of its norm is taken as dependent.
DEPENDENT = 1e-10


def gram_schmidt(vectors: Sequence[PointLike]) -> list[Point]:
    """Orthonormal e₁ … e_k (float64) spanning `vectors` (on the first vector's keys): eᵢ ∝ vᵢ − Σ_{j<i}
    ⟨vᵢ, eⱼ⟩eⱼ, orthogonalised twice (classical Gram–Schmidt with one reorthogonalisation, accurate to
    float64 rounding). ValueError for a zero or linearly dependent vector."""
    basis: list[Point] = []
    keys = list(vectors[0]) if vectors else []
    for i, v in enumerate(vectors):
        w: Point = {k: v[k].detach().double() for k in keys}
        size = math.sqrt(inner(w, w))
        for _ in range(2):
            for e in basis:
                c = inner(w, e)
                w = {k: w[k] - c * e[k].to(w[k].device) for k in keys}
        left = math.sqrt(inner(w, w))
        if size == 0.0 or left <= DEPENDENT * size:
            raise ValueError(
                f"vector {i} is {'zero' if size == 0.0 else 'linearly dependent on the ones before'}: "
                "the points do not span a plane"
            )
        basis.append({k: t / left for k, t in w.items()})
    return basis


@dataclass(frozen=True)
class Plane:
    """θ(u, v) = origin + u·e1 + v·e2 on the tensors `names` (float64 basis); see the module docstring.

    `anchors`: the three points the plane was built through (None for a plane from directions), whose
    barycentric combination gives the other floating tensors (buffers) of θ(u, v)."""

    origin: Point
    e1: Point
    e2: Point
    names: tuple[str, ...]
    anchors: tuple[Point, Point, Point] | None = None
    anchor_coords: tuple[tuple[float, float], ...] = ()

    def coordinates(self, theta: PointLike) -> tuple[float, float]:
        """(⟨θ − o, e₁⟩, ⟨θ − o, e₂⟩) in float64: θ's orthogonal projection onto the plane."""
        d = direction(self.origin, theta, self.names, torch.float64)
        return inner(d, self.e1), inner(d, self.e2)

    def distance_from(self, theta: PointLike) -> float:
        """‖θ − θ(u, v)‖ at θ's coordinates: 0 for a point of the plane (float64)."""
        u, v = self.coordinates(theta)
        d = direction(self.origin, theta, self.names, torch.float64)
        return norm({k: d[k] - u * self.e1[k] - v * self.e2[k] for k in self.names})

    def weights(self, u: float, v: float) -> tuple[float, float, float]:
        """Barycentric coordinates (w₀, w₁, w₂) of (u, v) with respect to the anchors (Σ wᵢ = 1)."""
        if self.anchors is None:
            raise ValueError("a plane from directions has no anchors")
        (u1, v1), (u2, v2) = self.anchor_coords[1:] if self.anchor_coords else map(self.coordinates, self.anchors[1:])
        w1, w2 = np.linalg.solve(np.array([[u1, u2], [v1, v2]]), np.array([u, v]))
        return 1.0 - float(w1) - float(w2), float(w1), float(w2)

    def point(self, u: float, v: float) -> Point:
        """θ(u, v): the parameters o + u·e₁ + v·e₂ computed in float64 and cast to the origin's dtype (so
        the coordinates of a stored point give back its float32 values); other floating tensors the
        anchors' barycentric combination (from the origin without anchors); integer tensors the origin's."""
        out: Point = {}
        weights = self.weights(u, v) if self.anchors is not None else None
        for k, t in self.origin.items():
            if k in self.e1:
                out[k] = (t.double() + u * self.e1[k] + v * self.e2[k]).to(t.dtype)
            elif t.is_floating_point() and weights is not None and self.anchors is not None:
                acc = sum(w * a[k].double() for w, a in zip(weights, self.anchors))
                out[k] = torch.as_tensor(acc).to(t.device, t.dtype)
            else:
                out[k] = t
        return out


def plane_through(
    theta_0: PointLike, theta_1: PointLike, theta_2: PointLike, names: Iterable[str] | None = None
) -> Plane:
    """The plane through θ₀ (origin), θ₁ (on the u axis, v = 0) and θ₂ (v > 0), on `names` (default:
    the floating tensors the three share; pass ``parameter_names(model)`` for the parameters)."""
    chosen = list(names) if names is not None else [k for k, t in theta_0.items() if t.is_floating_point()]
    e1, e2 = gram_schmidt(
        [direction(theta_0, theta_1, chosen, torch.float64), direction(theta_0, theta_2, chosen, torch.float64)]
    )
    anchors = (dict(theta_0), dict(theta_1), dict(theta_2))
    plane = Plane(dict(theta_0), e1, e2, tuple(chosen), anchors)
    return Plane(plane.origin, e1, e2, plane.names, anchors, tuple(plane.coordinates(a) for a in anchors))


def plane_from_directions(theta: PointLike, d1: PointLike, d2: PointLike) -> Plane:
    """The plane through θ spanned by d₁, d₂ (on d₁'s keys): e₁ = d₁/‖d₁‖, e₂ ∝ d₂ ⊥ e₁; buffers from θ."""
    e1, e2 = gram_schmidt([d1, d2])
    return Plane(dict(theta), e1, e2, tuple(d1))


def filter_normalized_direction(
    theta: PointLike, model: torch.nn.Module, generator: torch.Generator | None = None
) -> Point:
    """A random direction d on the model's parameters, filter-normalised (Li et al. 2018, Sec. 4):
    d ~ N(0, I), then each filter dᵢ (a row along the output axis, dim 0, of a weight of >= 2 dims)
    rescaled to ‖dᵢ‖ = ‖θᵢ‖. Biases, every parameter of < 2 dims and the parameters of normalisation
    layers are 0 (left out). Drawn on the CPU from `generator` (device-independent), returned on θ's
    devices in float64."""
    norm_params = {
        f"{module_name}.{p}" if module_name else p
        for module_name, module in model.named_modules()
        if isinstance(module, NORM_TYPES)
        for p, _ in module.named_parameters(recurse=False)
    }
    out: Point = {}
    for k in parameter_names(model):
        t = theta[k].detach()
        if t.dim() < 2 or k in norm_params:
            out[k] = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
            continue
        d = torch.randn(t.shape, dtype=torch.float64, generator=generator)
        filters = t.double().cpu().reshape(t.shape[0], -1).norm(dim=1)
        scale = filters / d.reshape(t.shape[0], -1).norm(dim=1)
        out[k] = (d * scale.view(-1, *([1] * (t.dim() - 1)))).to(t.device)
    return out


def grid_axes(
    low: tuple[float, float], high: tuple[float, float], n: int, include: Iterable[tuple[float, float]] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """u and v values of a rectilinear grid: `n` evenly spaced from low to high on each axis, plus the
    coordinates of the points in `include` (so the grid evaluates them), sorted; values within 1e-9 of the
    axis span of each other are one value (an included coordinate, the first one given)."""
    if n < 2:
        raise ValueError(f"a grid needs at least 2 values per axis, got {n}")
    include = list(include)
    axes = []
    for i in range(2):
        values = np.concatenate([np.linspace(low[i], high[i], n), [p[i] for p in include]])
        values.sort()
        tol = 1e-9 * max(high[i] - low[i], 1e-300)
        keep = np.concatenate([[True], np.diff(values) > tol])
        kept = values[keep]
        placed: set[int] = set()
        for p in include:  # a kept near-duplicate of an included coordinate becomes the coordinate (the first)
            j = int(np.argmin(np.abs(kept - p[i])))
            if j not in placed:
                kept[j] = p[i]
                placed.add(j)
        axes.append(kept)
    return axes[0], axes[1]


def nearest_node(nodes: Iterable[tuple[float, float]], u: float, v: float) -> tuple[float, float]:
    """The grid node closest to (u, v) (a marked point's node: its coordinates up to float rounding)."""
    return min(nodes, key=lambda n: (n[0] - u) ** 2 + (n[1] - v) ** 2)


def evaluate_plane(
    model: torch.nn.Module,
    plane: Plane,
    coords: Sequence[tuple[float, float]],
    datasets: Mapping[str, DeviceDataset],
    *,
    bn: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    chunk: int | None = None,
    batch_size: int = 1000,
    progress: bool = True,
    desc: str = "plane",
) -> list[dict[str, Any]]:
    """Tidy rows {u, v, split, metric, value} (loss, accuracy, error) at every (u, v) of `coords`.

    `bn` as in :func:`lmclab.paths.evaluate_path`: "reset" recomputes BatchNorm statistics at every point
    from `bn_data` (one pass each, or its first `bn_examples`), "none" keeps the plane's. `chunk` points
    (default: :func:`lmclab.paths.batched.default_chunk`'s memory estimate) are evaluated per pass over
    each split, BN statistics reset per point in the same pass (:func:`lmclab.paths.batched.evaluate_points`).
    `model` is only a template."""
    bn = bn or default_bn_mode(model)
    if bn not in BATCHED_BN_MODES:
        valid = ", ".join(BATCHED_BN_MODES)
        raise ValueError(f"bn mode {bn!r} is not available on a plane; valid: {valid} (of {', '.join(BN_MODES)})")
    metrics = evaluate_points(  # raises if bn='reset' comes without bn_data
        model,
        (plane.point(u, v) for u, v in coords),
        datasets,
        bn=bn,
        bn_data=bn_data,
        bn_examples=bn_examples,
        chunk=chunk,
        batch_size=batch_size,
        total=len(coords),
        progress=progress,
        desc=desc,
        unit="pt",
    )
    return metric_rows([{"u": u, "v": v} for u, v in coords], metrics)
