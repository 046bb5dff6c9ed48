"""Training curves of one or several runs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from lmclab.report import figures
from lmclab.report.figures import SavedFigure

#: What the two kinds of value in a run's history are (legend suffixes).
TRAIN_NOTE = "running mean over the epoch"
TEST_NOTE = "evaluated at epoch end"


def plot_histories(
    path: str | os.PathLike,
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    title: str = "",
    examples: Mapping[str, Any] | None = None,
) -> SavedFigure:
    """Loss and accuracy per epoch, one colour per run. Train values (solid) are running means over the
    epoch's mini-batches, with the weights changing while they accumulate (and augmented batches where
    the recipe augments); test values (dashed) are evaluations of the weights at the end of the epoch
    (where one was logged). The legend says which is which; panel titles give the number of examples of
    each split (`examples`: {"train": n, "test": m}, when known)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    for i, (label, history) in enumerate(histories.items()):
        colour = f"C{i}"
        epochs = [h["epoch"] for h in history]
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            ax.plot(
                epochs,
                [h[f"train_{key}"] for h in history],
                "-o",
                color=colour,
                ms=3,
                label=f"{label} train ({TRAIN_NOTE})",
            )
            test = [(h["epoch"], h[f"test_{key}"]) for h in history if f"test_{key}" in h]
            if test:
                ax.plot(*zip(*test), "--s", color=colour, ms=3, label=f"{label} test ({TEST_NOTE})")
    counts = {s: figures.count(n) for s, n in (examples or {}).items()}
    note = figures.splits_text(counts) if counts else "train: running means; test: end-of-epoch evaluations"
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy")
    epochs = sorted({h["epoch"] for history in histories.values() for h in history})
    for ax, metric in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_title(f"{metric}\n{note}", fontsize=10)
        if epochs and epochs[-1] - epochs[0] < 2:  # one or two epochs: ticks at them, room around them
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    return figures.save_figure(fig, path, title)
