"""Experiments: one module per study, each a function that writes figures and tables."""
