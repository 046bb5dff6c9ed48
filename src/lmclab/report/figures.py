"""Shared figure plumbing: the Agg backend and atomic saving. The report modules call
`figures.save_figure` through this module, so that one name sees every figure saved (tests record them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lmclab.store import atomic_write  # noqa: E402


@dataclass(frozen=True, eq=False)
class SavedFigure:
    """A figure written to `path`, and the (closed) matplotlib Figure itself: its axes, lines, images,
    labels and legends are exactly what was drawn, for inspection. It stands in for the path it was
    saved to: ``str()`` and ``os.fspath()`` give the path, so ``Path(saved)`` and ``open(saved)`` work."""

    path: Path
    figure: Figure
    dpi: int

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


def save_figure(fig: Figure, path: str | os.PathLike, title: str = "", dpi: int = 130) -> SavedFigure:
    """Give the figure its title, write it atomically (format from the suffix, default PNG), close it."""
    if title:
        fig.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return SavedFigure(path, fig, dpi)
