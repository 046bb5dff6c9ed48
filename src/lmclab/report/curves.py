"""A mode-connecting curve drawn with the straight paths between the same two models (Garipov et al. Fig. 1's
comparison, as loss and error against the path parameter)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from lmclab.report import figures
from lmclab.report.figures import SavedFigure

SPLIT_STYLE = {"train": "-", "test": "--"}


def plot_mode_curves(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    curves: Sequence[str],
    metrics: Sequence[str] = ("loss", "error"),
    title: str = "",
    examples: Mapping[str, Any] | int | None = None,
    close_up: bool = True,
) -> SavedFigure:
    """One panel per metric against λ (straight paths) or t (the `curves`, e.g. "bezier"), both in [0, 1]:
    one colour per path, train solid / test dashed, a marker at every evaluated point, each line's barrier
    written at its peak and the endpoints' mean as a dotted line; one legend below the panels. With
    `close_up`, a second loss panel shows the same lines with the y range of the `curves` (a straight line
    leaving it is cut at the frame, and its barrier is written only in the full panel). Panel titles name
    the splits and their numbers of examples (`examples`, default: the rows' ``examples`` column)."""
    rows = [r for r in rows if r.get("layers", "all") == "all"]
    paths = list(dict.fromkeys(str(r.get("path", "path")) for r in rows))
    paths = [p for p in paths if p not in curves] + [p for p in curves if p in paths]  # curves drawn last
    splits = list(dict.fromkeys(str(r["split"]) for r in rows))
    counts = figures.examples_of(rows, examples)
    panels = [(m, False) for m in metrics]
    if close_up and "loss" in metrics:
        panels.insert(list(metrics).index("loss") + 1, ("loss", True))
    zoom = close_up_range(rows, curves) if close_up else None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.8), layout="constrained", squeeze=False)
    for ax, (metric, zoomed) in zip(axes[0], panels):
        ends: dict[str, list[float]] = {}
        drawn: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        for i, name in enumerate(paths):
            for split in splits:
                points = sorted(
                    (float(r["lambda"]), float(r["value"]))
                    for r in rows
                    if str(r.get("path", "path")) == name and str(r["split"]) == split and r["metric"] == metric
                )
                if not points:
                    continue
                x, y = np.array([p[0] for p in points]), np.array([p[1] for p in points])
                kind = "curve" if name in curves else "straight"
                ax.plot(
                    x,
                    y,
                    SPLIT_STYLE.get(split, ":"),
                    color=f"C{i}",
                    lw=2.2 if name in curves else 1.5,
                    label=f"{name} ({kind}) {split}",
                    **figures.POINTS,
                )
                ends.setdefault(split, [float(y[0]), float(y[-1])])
                drawn.append((i, split, x, y))
        for k, (split, (a, b)) in enumerate(ends.items()):
            ax.axhline(0.5 * (a + b), color=("0.3", "0.6")[k % 2], lw=0.9, ls=":", label=f"endpoints' mean, {split}")
        ax.set_xlim(-0.02, 1.02)
        ax.margins(y=0.12)
        if zoomed and zoom is not None:
            ax.set_ylim(*zoom)
        for i, split, x, y in drawn:
            found = figures.curve_barriers([(x, y)], metric)
            at = figures.barrier_position(x, y, metric)
            if not found or at is None:
                continue
            if metric == "loss" and zoom is not None and (at[1] <= zoom[1]) != zoomed:
                continue  # each loss barrier is written once: in the close-up when its peak is in view there
            offset = 18.0 * (splits.index(split) - (len(splits) - 1) / 2)
            figures.annotate_barrier(ax, at, figures.barrier_text(found), f"C{i}", metric, offset=offset)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_xticklabels(["Model A", "0.25", "0.5", "0.75", "Model B"])
        ax.set_xlabel("λ (straight paths) / t (curve)")
        ax.set_ylabel(metric)
        ax.set_title(
            f"{metric}{' (close-up on the curve)' if zoomed else ''}\n{figures.splits_text(counts)}", fontsize=10
        )
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
    return figures.save_figure(fig, path, title)


def close_up_range(rows: Iterable[Mapping[str, Any]], curves: Sequence[str]) -> tuple[float, float] | None:
    """The close-up panel's loss range: the curves' finite losses, padded by a quarter of their span."""
    values = [
        float(r["value"])
        for r in rows
        if str(r.get("path", "path")) in curves and r["metric"] == "loss" and np.isfinite(float(r["value"]))
    ]
    if not values:
        return None
    low, high = min(values), max(values)
    pad = 0.25 * (high - low or abs(high) or 1.0)
    return low - pad, high + pad
