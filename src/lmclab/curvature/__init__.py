"""Second- and higher-order analysis: directional derivatives, Taylor approximations, Hessian predictions, trace."""

from lmclab.curvature.functional import (
    FunctionalModel,
    functional_model,
    iterate_batches,
    parameter_blocks,
    summed_cross_entropy,
)
from lmclab.curvature.hessian import HessianOperator, dense_hessian, hvp, hvp_many, quadratic_form
from lmclab.curvature.predictions import (
    BarrierPrediction,
    CrossBlocks,
    PairPrediction,
    barrier_prediction,
    cross_block_matrix,
    predicted_barrier_curve,
    predicted_set_barrier,
)
from lmclab.curvature.trace import TraceEstimate, hessian_trace, hutchinson_trace, hutchpp_trace, top_eigenvalue

__all__ = [
    "BarrierPrediction",
    "CrossBlocks",
    "FunctionalModel",
    "HessianOperator",
    "PairPrediction",
    "TraceEstimate",
    "barrier_prediction",
    "cross_block_matrix",
    "dense_hessian",
    "functional_model",
    "hessian_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "hvp",
    "hvp_many",
    "iterate_batches",
    "parameter_blocks",
    "predicted_barrier_curve",
    "predicted_set_barrier",
    "quadratic_form",
    "summed_cross_entropy",
    "top_eigenvalue",
]
