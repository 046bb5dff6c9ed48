"""Second- and higher-order analysis: directional derivatives, Taylor approximations, Hessian predictions, trace."""
from lmclab.curvature.functional import (
    FunctionalModel,
    functional_model,
    iterate_batches,
    parameter_direction,
    summed_cross_entropy,
)

__all__ = ["FunctionalModel", "functional_model", "iterate_batches", "parameter_direction", "summed_cross_entropy"]
