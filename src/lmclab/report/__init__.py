"""Figures and tables."""
from lmclab.report.figures import save_figure  # first: selects the Agg backend before pyplot loads
from lmclab.report.paths import plot_paths
from lmclab.report.tables import write_csv
from lmclab.report.training import plot_histories

__all__ = ["plot_histories", "plot_paths", "save_figure", "write_csv"]
