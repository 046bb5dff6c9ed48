"""Aligning models by permuting hidden units: two models (weight, activation, STE matching) and K models
(pairwise, MergeMany, STE-MM).

Every two-model method returns a :class:`MatchResult`; ``result.perm.apply(θ_B, spec)`` is the aligned
B. Every K-model method returns a :class:`PopulationAlignment` (``align_population(points, spec, method)``).
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lmclab.align.activation_matching import STATISTICS, ActivationStats, activation_matching
from lmclab.align.assignment import WarmAssignment, assignment_value, solve_assignment
from lmclab.align.merge_many import merge_many
from lmclab.align.population import (
    POPULATION_METHODS,
    PopulationAlignment,
    align_population,
    mean_point,
    population_method,
)
from lmclab.align.ste import LAMBDAS, straight_through, ste_matching
from lmclab.align.ste_mm import MIXINGS, ste_mm
from lmclab.align.weight_matching import (
    MatchResult,
    WeightMatchingState,
    default_weights,
    match_distances,
    spec_tensor_names,
    weight_matching,
)
from lmclab.permutation.spec import Params, PermutationSpec

__all__ = [
    "LAMBDAS", "METHODS", "MIXINGS", "POPULATION_METHODS", "STATISTICS", "ActivationStats", "MatchResult",
    "PopulationAlignment", "WarmAssignment", "WeightMatchingState", "activation_matching", "align",
    "align_population", "assignment_value", "default_weights", "match_distances", "mean_point", "merge_many",
    "population_method", "solve_assignment", "spec_tensor_names", "ste_matching", "ste_mm", "straight_through",
    "weight_matching",
]

#: Methods accepted by :func:`align`.
METHODS: tuple[str, ...] = ("weight", "activation", "ste")


def _as_params(x: Params | nn.Module) -> Params:
    return dict(x.state_dict()) if isinstance(x, nn.Module) else dict(x)


def _as_model(x: Params | nn.Module, model: nn.Module | None, which: str) -> nn.Module:
    if isinstance(x, nn.Module):
        return x
    if model is None:
        raise ValueError(f"activation matching of parameter dicts needs model=<an instance of the architecture> "
                         f"to load {which} into")
    m = copy.deepcopy(model)
    m.load_state_dict(x)
    return m


def align(params_a: Params | nn.Module, params_b: Params | nn.Module, spec: PermutationSpec,
          method: str = "weight", **kw: Any) -> MatchResult:
    """Align B to A with `method` ("weight": :func:`weight_matching`; "activation": :func:`activation_matching`;
    "ste": :func:`ste_matching`, which needs ``model=`` and ``data=``).

    Points may be parameter dicts or modules. "activation" needs ``batches=`` and, for dicts,
    ``model=`` (an instance of the architecture, copied and loaded with each point); the other
    keywords go to the method.
    """
    if method == "weight":
        return weight_matching(_as_params(params_a), _as_params(params_b), spec, **kw)
    if method == "activation":
        model = kw.pop("model", None)
        if "batches" not in kw:
            raise ValueError("activation matching needs batches=<iterable of input batches>")
        batches = kw.pop("batches")
        return activation_matching(_as_model(params_a, model, "A"), _as_model(params_b, model, "B"), spec,
                                   batches, **kw)
    if method == "ste":
        if "model" not in kw or "data" not in kw:
            raise ValueError("STE needs model=<an instance of the architecture> and data=<a DeviceDataset>")
        return ste_matching(_as_params(params_a), _as_params(params_b), spec, **kw)
    raise ValueError(f"unknown alignment method {method!r}; valid methods: {', '.join(METHODS)}")
