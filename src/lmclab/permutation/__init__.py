"""Permutation symmetries of hidden units: specs (derived from the model graph or given), apply, verify."""
from lmclab.permutation.spec import (
    AxisRef,
    Params,
    PermGroup,
    Permutation,
    PermutationSpec,
    SpecError,
    expand_block,
    parameter_distance,
    permute_axis,
)

__all__ = [
    "AxisRef", "Params", "PermGroup", "Permutation", "PermutationSpec", "SpecError", "expand_block",
    "parameter_distance", "permute_axis",
]
