"""Figures and tables."""

# figures first: it selects the Agg backend before pyplot loads
from lmclab.report.figures import SavedFigure, save_figure
from lmclab.report.paths import plot_paths
from lmclab.report.tables import write_csv
from lmclab.report.training import plot_histories

__all__ = ["SavedFigure", "plot_histories", "plot_paths", "save_figure", "write_csv"]
