"""Sibling geometry (angles, solution planes, trajectory distances), loss planes, Singh's 1-D toy landscapes.

Point operations (direction, inner, norm, distance) are :mod:`lmclab.points`."""

from lmclab.geometry.angles import (
    SiblingGeometry,
    angle,
    cosine,
    distances,
    plane_determination,
    sibling_angle,
    sibling_geometry,
)
from lmclab.geometry.plane import (
    Plane,
    evaluate_plane,
    filter_normalized_direction,
    gram_schmidt,
    plane_from_directions,
    plane_through,
)
from lmclab.geometry.toy import FOUR_MINIMA, TWO_MINIMA, ToyLandscape

__all__ = [
    "FOUR_MINIMA",
    "TWO_MINIMA",
    "Plane",
    "SiblingGeometry",
    "ToyLandscape",
    "angle",
    "cosine",
    "distances",
    "evaluate_plane",
    "filter_normalized_direction",
    "gram_schmidt",
    "plane_determination",
    "plane_from_directions",
    "plane_through",
    "sibling_angle",
    "sibling_geometry",
]
