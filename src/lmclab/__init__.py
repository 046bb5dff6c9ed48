"""lmclab: linear mode connectivity modulo permutation symmetries — train, align, interpolate, explain."""

__version__ = "0.1.0"
