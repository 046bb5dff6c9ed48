"""Interpolation paths between points in parameter space, barriers, BN reset and REPAIR."""
from lmclab.paths.barriers import DEFINITIONS, barrier_curve, barrier_report, barriers
from lmclab.paths.curves import BN_MODES, default_bn_mode, evaluate_path, path_values
from lmclab.paths.interpolate import cumulative_layer_sets, default_lambdas, layer_groups, lerp
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
    "BN_MODES", "DEFINITIONS", "ChannelStats", "barrier_curve", "barrier_report", "barriers", "channel_stats",
    "cumulative_layer_sets", "default_bn_mode", "default_lambdas", "evaluate_path", "has_batchnorm", "path_values",
    "layer_groups", "lerp", "repair", "repair_points", "reset_bn_stats",
    "PopulationBarriers", "all_pairs_barriers", "barrier_matrix", "merged_metrics", "merged_point",
    "summarize_barriers",
]
