"""Cycle consistency of the pairwise maps among K aligned models.

A pairwise map π_ij aligns model j to model i (``π_ij.apply(θ_j)`` is in i's units, as
``weight_matching(θ_i, θ_j).perm``). The maps are *cycle-consistent* when every composition around a
cycle is the identity; for triples, π_ij ∘ π_jk ∘ π_ki = id (i → k → j → i).

- Methods that map every member into one shared frame (a reference model or a universe: pairwise
  matching to model 0, MergeMany, STE-MM, C2M3, with ``perms[i]`` taking model i into the frame) give
  π_ij = π_i⁻¹ ∘ π_j (π_j into the frame, then π_i⁻¹ back to i's units; written π_i ∘ π_j⁻¹ when π_i
  denotes the frame → model map). These are consistent by construction *through the reference*:
  π_ij ∘ π_jk ∘ π_ki = π_i⁻¹π_j π_j⁻¹π_k π_k⁻¹π_i = id, so their cycle error is exactly 0.
- The *direct* pairwise maps solve weight matching for each pair i < j independently (π_ji = π_ij⁻¹);
  nothing ties them together, and they are generally inconsistent.

Cycle error of a triple, per group: the fraction of the group's units u with (π_ij ∘ π_jk ∘ π_ki)(u) ≠ u
(the same for every starting point and orientation of the triple: those compositions are conjugate or
inverse). Reported per group and overall (the units of all groups together), as means over the
C(K, 3) triples; undefined (None) for K < 3.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmclab.align.results import PopulationAlignment
from lmclab.align.weight_matching import weight_matching
from lmclab.permutation.spec import Permutation, PermutationSpec
from lmclab.points import PointLike

__all__ = [
    "CycleConsistency",
    "TripleError",
    "alignment_cycle_consistency",
    "cycle_consistency",
    "direct_pairwise_maps",
    "map_between",
    "pairwise_maps",
    "triple_error",
]

#: Pairwise maps by (i, j), i < j: π_ij aligns model j to model i.
PairMaps = Mapping[tuple[int, int], Permutation]


def pairwise_maps(alignment: PopulationAlignment) -> dict[tuple[int, int], Permutation]:
    """π_ij = π_i⁻¹ ∘ π_j for i < j from a joint alignment (consistent by construction)."""
    inv = [p.inverse() for p in alignment.perms]
    return {(i, j): inv[i].compose(alignment.perms[j]) for i, j in itertools.combinations(range(alignment.k), 2)}


def direct_pairwise_maps(
    points: Sequence[PointLike], spec: PermutationSpec, *, seed: int = 0, **wm_kw: Any
) -> dict[tuple[int, int], Permutation]:
    """π_ij = weight_matching(θ_i, θ_j).perm for every i < j, each pair solved independently
    (`wm_kw` go to :func:`weight_matching`)."""
    return {
        (i, j): weight_matching(points[i], points[j], spec, seed=seed, **wm_kw).perm
        for i, j in itertools.combinations(range(len(points)), 2)
    }


def map_between(maps: PairMaps, i: int, j: int) -> Permutation:
    """π_ij: maps[(i, j)] for i < j, maps[(j, i)]⁻¹ for i > j."""
    if i == j:
        raise ValueError(f"no map from model {i} to itself")
    return maps[(i, j)] if i < j else maps[(j, i)].inverse()


@dataclass(frozen=True)
class TripleError:
    """One triple (i, j, k): per group, the units not mapped back by π_ij ∘ π_jk ∘ π_ki, and the group sizes."""

    triple: tuple[int, int, int]
    wrong: Mapping[str, int]
    sizes: Mapping[str, int]

    @property
    def overall(self) -> float:
        total = sum(self.sizes.values())
        return sum(self.wrong.values()) / total if total else 0.0

    def fraction(self, group: str) -> float:
        return self.wrong[group] / self.sizes[group] if self.sizes[group] else 0.0


def triple_error(maps: PairMaps, i: int, j: int, k: int) -> TripleError:
    """The cycle error of triple (i, j, k) under `maps` (module docstring)."""
    cycle = map_between(maps, i, j).compose(map_between(maps, j, k)).compose(map_between(maps, k, i))
    wrong, sizes = {}, {}
    for g, p in cycle.perms.items():
        wrong[g] = int((p != torch.arange(len(p))).sum())
        sizes[g] = len(p)
    return TripleError((i, j, k), wrong, sizes)


@dataclass(frozen=True)
class CycleConsistency:
    """The cycle errors of all triples among `k` models (means over triples; None for k < 3)."""

    k: int
    triples: tuple[TripleError, ...]

    def first(self, k: int) -> CycleConsistency:
        """Restricted to the triples among the first `k` models."""
        return CycleConsistency(k, tuple(t for t in self.triples if max(t.triple) < k))

    @property
    def groups(self) -> list[str]:
        return list(self.triples[0].sizes) if self.triples else []

    @property
    def overall(self) -> float | None:
        """Mean over triples of the fraction of all units (every group) not mapped back; None without triples."""
        return sum(t.overall for t in self.triples) / len(self.triples) if self.triples else None

    def per_group(self) -> dict[str, float]:
        """Mean over triples of each group's fraction of units not mapped back ({} without triples)."""
        n = len(self.triples)
        return {g: sum(t.fraction(g) for t in self.triples) / n for g in self.groups} if n else {}

    def summary(self) -> dict[str, Any]:
        """{"k", "triples" (how many), "overall", "groups"} (overall None and groups {} without triples)."""
        return {"k": self.k, "triples": len(self.triples), "overall": self.overall, "groups": self.per_group()}

    def to_json(self) -> dict[str, Any]:
        """Every triple's counts (:meth:`from_json` reads it back)."""
        return {
            "k": self.k,
            "triples": [
                {"triple": list(t.triple), "wrong": dict(t.wrong), "sizes": dict(t.sizes)} for t in self.triples
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CycleConsistency:
        return cls(
            int(data["k"]),
            tuple(
                TripleError((int(t["triple"][0]), int(t["triple"][1]), int(t["triple"][2])), t["wrong"], t["sizes"])
                for t in data["triples"]
            ),
        )


def cycle_consistency(maps: PairMaps, k: int) -> CycleConsistency:
    """Cycle errors of every triple i < j < k' among `k` models under the pairwise `maps`."""
    return CycleConsistency(k, tuple(triple_error(maps, *t) for t in itertools.combinations(range(k), 3)))


def alignment_cycle_consistency(alignment: PopulationAlignment) -> CycleConsistency:
    """Cycle errors of a joint alignment's pairwise maps π_i⁻¹ ∘ π_j (0 by construction; computed, not assumed)."""
    return cycle_consistency(pairwise_maps(alignment), alignment.k)
