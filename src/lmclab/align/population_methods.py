"""The K-model alignment methods, registered with :func:`lmclab.align.population.population_method`.

- ``naive``: no permutation (the baselines' plain average).
- ``pairwise``: weight-match every model i ≥ 1 to the reference model 0 independently (two-model
  matching applied K − 1 times; Ito et al.'s baseline that need not give one joint basin).
- ``merge_many`` and ``ste_mm``: see :mod:`lmclab.align.merge_many` and :mod:`lmclab.align.ste_mm`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmclab.align.merge_many import merge_many
from lmclab.align.population import PopulationAlignment, population_method
from lmclab.align.ste_mm import ste_mm
from lmclab.align.weight_matching import weight_matching
from lmclab.permutation.spec import Params, Permutation, PermutationSpec


@population_method("naive")
def naive(points: Sequence[Params], spec: PermutationSpec, **_: Any) -> PopulationAlignment:
    """Identity permutations for every model."""
    return PopulationAlignment([Permutation.identity(spec) for _ in points], spec, "naive")


@population_method("pairwise")
def pairwise(points: Sequence[Params], spec: PermutationSpec, *, seed: int = 0, **kw: Any) -> PopulationAlignment:
    """π_i = weight_matching(θ_0, θ_i) for i ≥ 1; π_0 = identity."""
    results = [weight_matching(points[0], p, spec, seed=seed, **kw) for p in points[1:]]
    return PopulationAlignment([Permutation.identity(spec), *(r.perm for r in results)], spec, "pairwise",
                               info={"sweeps": [r.sweeps for r in results],
                                     "distance_before": [r.distance_before for r in results],
                                     "distance_after": [r.distance_after for r in results]})


population_method("merge_many")(merge_many)
population_method("ste_mm")(ste_mm)
