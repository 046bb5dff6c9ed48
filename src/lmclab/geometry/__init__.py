"""Sibling geometry (angles, solution planes, distances) and Singh's 1-D toy landscapes."""
from lmclab.geometry.angles import (
    angle,
    common_keys,
    cosine,
    difference,
    distance,
    distances,
    norm,
    plane_determination,
    sibling_angle,
)
from lmclab.geometry.toy import FOUR_MINIMA, TWO_MINIMA, ToyLandscape

__all__ = [
    "FOUR_MINIMA", "TWO_MINIMA", "ToyLandscape", "angle", "common_keys", "cosine", "difference", "distance",
    "distances", "norm", "plane_determination", "sibling_angle",
]
