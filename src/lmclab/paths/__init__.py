"""Interpolation paths between points in parameter space, barriers, BN reset and REPAIR.

The interpolated points are :func:`lmclab.points.lerp`."""

from lmclab.paths.barriers import DEFINITIONS, Spread, barrier_curve, barrier_report, barriers, spread
from lmclab.paths.batched import evaluate_points
from lmclab.paths.curves import (
    BN_MODES,
    default_bn_mode,
    endpoint_losses,
    evaluate_path,
    layer_set_barrier,
    path_losses,
    path_values,
)
from lmclab.paths.interpolate import cumulative_layer_sets, default_lambdas, layer_groups
from lmclab.paths.normalization import (
    ChannelStats,
    channel_stats,
    has_batchnorm,
    repair,
    repair_points,
    reset_bn_stats,
)
from lmclab.paths.population import (
    PopulationBarriers,
    all_pairs_barriers,
    barrier_matrix,
    merged_metrics,
    merged_point,
    summarize_barriers,
)

__all__ = [
    "BN_MODES",
    "DEFINITIONS",
    "ChannelStats",
    "PopulationBarriers",
    "Spread",
    "all_pairs_barriers",
    "barrier_curve",
    "barrier_matrix",
    "barrier_report",
    "barriers",
    "channel_stats",
    "cumulative_layer_sets",
    "default_bn_mode",
    "default_lambdas",
    "endpoint_losses",
    "evaluate_path",
    "evaluate_points",
    "has_batchnorm",
    "layer_groups",
    "layer_set_barrier",
    "merged_metrics",
    "merged_point",
    "path_losses",
    "path_values",
    "repair",
    "repair_points",
    "reset_bn_stats",
    "spread",
    "summarize_barriers",
]
