"""Shared figure plumbing: the Agg backend and atomic saving."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lmclab.store import atomic_write  # noqa: E402


def save_figure(fig: Figure, path: str | os.PathLike, title: str = "", dpi: int = 130) -> Path:
    """Give the figure its title, write it atomically (format from the suffix, default PNG), close it."""
    if title:
        fig.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return path
