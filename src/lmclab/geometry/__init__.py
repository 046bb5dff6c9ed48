"""Sibling geometry (angles, solution planes, trajectory distances) and Singh's 1-D toy landscapes.

Point operations (direction, inner, norm, distance) are :mod:`lmclab.points`."""

from lmclab.geometry.angles import angle, cosine, distances, plane_determination, sibling_angle
from lmclab.geometry.toy import FOUR_MINIMA, TWO_MINIMA, ToyLandscape

__all__ = [
    "FOUR_MINIMA",
    "TWO_MINIMA",
    "ToyLandscape",
    "angle",
    "cosine",
    "distances",
    "plane_determination",
    "sibling_angle",
]
