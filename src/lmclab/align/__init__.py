"""Aligning models by permuting hidden units: two models (weight, activation, STE matching) and K models
(naive, pairwise, MergeMany, STE-MM).

Methods are registered by name (:mod:`lmclab.align.registry`): :data:`PAIR_METHODS` for two models,
dispatched by ``align(θ_A, θ_B, spec, method)``, which returns a :class:`MatchResult`
(``result.perm.apply(θ_B, spec)`` is the aligned B); :data:`POPULATION_METHODS` for K models, dispatched
by ``align_population(points, spec, method)``, which returns a :class:`PopulationAlignment`. Importing
this package imports every method module, which registers the method; the order of the imports below
is the order the methods are listed in.
"""

from __future__ import annotations

from lmclab.align.registry import (
    NEEDS,
    PAIR_METHODS,
    POPULATION_METHODS,
    SETTINGS,
    MethodEntry,
    PairMethod,
    PopulationMethod,
    align,
    align_population,
    as_point,
    get_pair_method,
    get_population_method,
    register_pair_method,
    register_population_method,
)
from lmclab.align.results import MatchResult, PopulationAlignment

# The method modules, in listing order: two-model methods, then K-model methods.
from lmclab.align.weight_matching import (  # isort: skip
    WeightMatchingState,
    default_weights,
    match_distances,
    spec_tensor_names,
    weight_matching,
)
from lmclab.align.activation_matching import STATISTICS, ActivationStats, activation_matching  # isort: skip
from lmclab.align.ste import LAMBDAS, ste_matching, straight_through  # isort: skip
from lmclab.align.sinkhorn import sinkhorn_matching  # isort: skip
from lmclab.align.population import naive, pairwise  # isort: skip
from lmclab.align.merge_many import merge_many  # isort: skip
from lmclab.align.ste_mm import MIXINGS, ste_mm  # isort: skip
from lmclab.align.c2m3 import c2m3  # isort: skip
from lmclab.align.assignment import WarmAssignment, assignment_value, solve_assignment  # isort: skip

__all__ = [
    "LAMBDAS",
    "METHODS",
    "MIXINGS",
    "NEEDS",
    "PAIR_METHODS",
    "POPULATION_METHODS",
    "SETTINGS",
    "STATISTICS",
    "ActivationStats",
    "MatchResult",
    "MethodEntry",
    "PairMethod",
    "PopulationAlignment",
    "PopulationMethod",
    "WarmAssignment",
    "WeightMatchingState",
    "activation_matching",
    "align",
    "align_population",
    "as_point",
    "assignment_value",
    "c2m3",
    "default_weights",
    "get_pair_method",
    "get_population_method",
    "match_distances",
    "merge_many",
    "naive",
    "pairwise",
    "register_pair_method",
    "register_population_method",
    "solve_assignment",
    "spec_tensor_names",
    "ste_matching",
    "sinkhorn_matching",
    "ste_mm",
    "straight_through",
    "weight_matching",
]

#: The built-in two-model methods' names (a snapshot taken at import; :data:`PAIR_METHODS` is the live registry).
METHODS: tuple[str, ...] = tuple(PAIR_METHODS)
