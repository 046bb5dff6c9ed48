"""What alignment methods return: :class:`MatchResult` (two models) and :class:`PopulationAlignment` (K models).

Two models: ``result.perm.apply(θ_B, spec)`` is B aligned to A.

K models: model 0 is the reference (never permuted); ``perms[i]`` maps model i's hidden units onto the
joint frame, so ``perms[i].apply(θ_i, spec)`` is model i aligned; ``perms[0]`` is the identity. The
merged model is the uniform mean of the aligned points, θ̄ = (1/K) Σ_i π_i(θ_i) (BN models then need a
statistics reset, :func:`lmclab.paths.reset_bn_stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmclab import points
from lmclab.permutation.spec import Permutation, PermutationSpec
from lmclab.points import Point, PointLike

__all__ = ["MatchResult", "PopulationAlignment"]


@dataclass
class MatchResult:
    """An alignment of model B to model A: `perm.apply(θ_B, spec)` is the aligned B.

    `objective[k]` is J(π) = Σ_t w_t ⟨θ_A[t], π(θ_B)[t]⟩ after sweep k+1 (activation matching: the sum
    of the matched statistics); distances are ‖θ_A − θ_B‖ and ‖θ_A − π(θ_B)‖ over all the spec's
    floating-point tensors, unweighted. `converged` is False when `max_sweeps` ran out; `info` holds
    method-specific details (seed, objective_init, changes_per_sweep, seconds, …).
    """

    perm: Permutation
    spec: PermutationSpec
    sweeps: int
    objective: list[float]
    distance_before: float
    distance_after: float
    method: str
    converged: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Everything but the permutation tensors (plus, per group, how many units moved)."""
        moved = {k: int((p != torch.arange(len(p))).sum()) for k, p in self.perm.perms.items()}
        return {
            "method": self.method,
            "sweeps": self.sweeps,
            "converged": self.converged,
            "objective": list(self.objective),
            "distance_before": self.distance_before,
            "distance_after": self.distance_after,
            "units_moved": moved,
            "info": dict(self.info),
            "spec": self.spec.to_dict(),
        }


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

    def aligned(self, thetas: Sequence[PointLike]) -> list[Point]:
        """[π_i(θ_i)] for the K points, in order."""
        if len(thetas) != len(self.perms):
            raise ValueError(f"{len(thetas)} points for an alignment of {len(self.perms)} models")
        return [p.apply(theta, self.spec) for p, theta in zip(self.perms, thetas)]

    def merged(self, thetas: Sequence[PointLike]) -> Point:
        """θ̄ = (1/K) Σ_i π_i(θ_i): the uniform mean of the aligned points (:func:`lmclab.points.mean`)."""
        return points.mean(self.aligned(thetas))
