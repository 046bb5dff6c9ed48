"""Training curves of one or several runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from lmclab.report import figures
from lmclab.report.figures import SavedFigure


def plot_histories(
    path: str | os.PathLike, histories: Mapping[str, Sequence[Mapping[str, Any]]], title: str = ""
) -> SavedFigure:
    """Loss and accuracy per epoch (train: solid, test: dashed), one colour per run."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for i, (label, history) in enumerate(histories.items()):
        colour = f"C{i}"
        epochs = [h["epoch"] for h in history]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            ax.plot(epochs, [h[f"train_{key}"] for h in history], "-o", color=colour, ms=3, label=f"{label} train")
            test = [(h["epoch"], h[f"test_{key}"]) for h in history if f"test_{key}" in h]
            if test:
                ax.plot(*zip(*test), "--s", color=colour, ms=3, label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return figures.save_figure(fig, path, title)
