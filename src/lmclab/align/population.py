"""Aligning K models at once: the two baseline methods, registered with :mod:`lmclab.align.registry`.

- ``naive``: no permutation (the baselines' plain average).
- ``pairwise``: weight-match every model i ≥ 1 to the reference model 0 independently (two-model
  matching applied K − 1 times; Ito et al.'s baseline that need not give one joint basin).

The joint methods are :mod:`lmclab.align.merge_many` and :mod:`lmclab.align.ste_mm`; the result type and
its frame convention :class:`lmclab.align.results.PopulationAlignment`; dispatch by name
:func:`lmclab.align.align_population`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmclab.align.registry import align_population, register_population_method
from lmclab.align.results import PopulationAlignment
from lmclab.align.weight_matching import weight_matching
from lmclab.permutation.spec import Permutation, PermutationSpec
from lmclab.points import PointLike

__all__ = ["PopulationAlignment", "align_population", "naive", "pairwise"]


@register_population_method("naive", "no permutation (the plain average)")
def naive(points: Sequence[PointLike], spec: PermutationSpec, **_: Any) -> PopulationAlignment:
    """Identity permutations for every model."""
    return PopulationAlignment([Permutation.identity(spec) for _ in points], spec, "naive")


@register_population_method(
    "pairwise",
    "weight-match each model to the first one, independently",
    accepts=("seed",),
    revision=2,  # 2: weight matching's anchored start for specs with attention heads
)
def pairwise(points: Sequence[PointLike], spec: PermutationSpec, *, seed: int = 0, **kw: Any) -> PopulationAlignment:
    """π_i = weight_matching(θ_0, θ_i) for i ≥ 1; π_0 = identity."""
    results = [weight_matching(points[0], p, spec, seed=seed, **kw) for p in points[1:]]
    return PopulationAlignment(
        [Permutation.identity(spec), *(r.perm for r in results)],
        spec,
        "pairwise",
        info={
            "sweeps": [r.sweeps for r in results],
            "distance_before": [r.distance_before for r in results],
            "distance_after": [r.distance_after for r in results],
        },
    )
