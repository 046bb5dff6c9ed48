"""Aligning K models at once: the shared result type and the methods' registry.

Model 0 is the reference (never permuted); ``perms[i]`` maps model i's hidden units onto the joint
frame, so ``perms[i].apply(θ_i, spec)`` is model i aligned; ``perms[0]`` is the identity. The merged
model is the uniform mean of the aligned points, θ̄ = (1/K) Σ_i π_i(θ_i) (BN models then need a
statistics reset, :func:`lmclab.paths.reset_bn_stats`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmclab.permutation.spec import Params, Permutation, PermutationSpec

__all__ = ["PopulationAlignment", "POPULATION_METHODS", "align_population", "mean_point", "population_method"]


@dataclass
class PopulationAlignment:
    """K permutations into one frame (``perms[0]`` = identity for the reference model 0)."""

    perms: list[Permutation]
    spec: PermutationSpec
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.perms)

    def aligned(self, points: Sequence[Params]) -> list[Params]:
        """[π_i(θ_i)] for the K points, in order."""
        if len(points) != len(self.perms):
            raise ValueError(f"{len(points)} points for an alignment of {len(self.perms)} models")
        return [p.apply(theta, self.spec) for p, theta in zip(self.perms, points)]

    def merged(self, points: Sequence[Params]) -> Params:
        """θ̄ = (1/K) Σ_i π_i(θ_i): the uniform mean of the aligned points."""
        return mean_point(self.aligned(points))


def mean_point(points: Sequence[Params]) -> Params:
    """Entrywise mean of K points; floating tensors averaged in float64 then cast back, integer
    buffers (e.g. BN's num_batches_tracked) taken from the first point."""
    if not points:
        raise ValueError("mean of no points")
    out: Params = {}
    for name, first in points[0].items():
        if first.is_floating_point():
            acc = torch.stack([p[name].to(torch.float64) for p in points]).mean(0)
            out[name] = acc.to(first.dtype)
        else:
            out[name] = first.clone()
    return out


#: name -> fn(points, spec, **kw) -> PopulationAlignment
POPULATION_METHODS: dict[str, Callable[..., PopulationAlignment]] = {}


def population_method(name: str) -> Callable[[Callable[..., PopulationAlignment]], Callable[..., PopulationAlignment]]:
    """Register a K-model alignment method under `name` (used by :func:`align_population`)."""

    def register(fn: Callable[..., PopulationAlignment]) -> Callable[..., PopulationAlignment]:
        POPULATION_METHODS[name] = fn
        return fn

    return register


def align_population(points: Sequence[Params], spec: PermutationSpec, method: str, **kw: Any) -> PopulationAlignment:
    """Align K points with `method` (one of :data:`POPULATION_METHODS`); keywords go to the method."""
    import lmclab.align.population_methods  # noqa: F401  (registers the methods)

    if method not in POPULATION_METHODS:
        raise ValueError(f"unknown population method {method!r}; valid: {', '.join(sorted(POPULATION_METHODS))}")
    return POPULATION_METHODS[method](list(points), spec, **kw)
