"""Permutation symmetries of hidden units: specs (derived from the model graph or given), apply, verify."""

from lmclab.permutation.activations import capture_activations
from lmclab.permutation.derive import PermTracer, derive_spec, example_input_for, spec_for, trace_model
from lmclab.permutation.spec import (
    AxisRef,
    PermGroup,
    Permutation,
    PermutationSpec,
    SpecError,
    expand_block,
    permute_axis,
)
from lmclab.permutation.verify import Invariance, check_invariance, verify_permutation

__all__ = [
    "AxisRef",
    "Invariance",
    "PermGroup",
    "Permutation",
    "PermutationSpec",
    "SpecError",
    "expand_block",
    "permute_axis",
    "PermTracer",
    "capture_activations",
    "check_invariance",
    "derive_spec",
    "example_input_for",
    "spec_for",
    "trace_model",
    "verify_permutation",
]
