"""The width ablation's figure (`lmclab run width`): barrier against width multiplier (log2 axis), one
panel per metric (loss, error) and split, one line per alignment method (colour) and correction (line
style): the mean over pairs with ± SD error bars, a marker at each width evaluated."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from lmclab.paths.barriers import spread
from lmclab.report import figures
from lmclab.report.figures import SavedFigure

Rows = Sequence[Mapping[str, Any]]

METHOD_LABELS = {"naive": "naive", "weight": "weight matching", "activation": "activation matching"}
CORRECTION_LABELS = {"none": "no correction", "reset": "BN reset", "repair": "REPAIR"}
LINESTYLES = ("-", "--", ":", "-.")


def _value(v: Any) -> float:
    return math.nan if v is None or v == "" else float(v)


def mean_sd_by_width(rows: Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(widths sorted, mean barrier over the rows (pairs) at each, SD (:func:`lmclab.paths.barriers.spread`));
    NaN where none is finite."""
    groups: dict[float, list[float]] = {}
    for r in rows:
        groups.setdefault(float(r["width"]), []).append(_value(r["barrier"]))
    xs = np.array(sorted(groups))
    means, sds = [], []
    for x in xs:
        s = spread(groups[x])
        means.append(s.mean)
        sds.append(s.sd)
    return xs, np.array(means), np.array(sds)


def plot_barrier_vs_width(path: str | os.PathLike, rows: Rows, title: str = "") -> SavedFigure:
    """Rows of `width_barriers.csv` (one setting): {width, pair, method, correction, split, metric, barrier,
    examples}. Panels: metric (rows) × split (columns)."""
    metrics = [m for m in ("loss", "error") if any(r["metric"] == m for r in rows)] or ["loss"]
    splits = list(dict.fromkeys(str(r["split"]) for r in rows)) or ["test"]
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    corrections = list(dict.fromkeys(str(r["correction"]) for r in rows))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    styles = {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(corrections)}
    examples = figures.examples_of(rows)
    fig, axes = plt.subplots(
        len(metrics),
        len(splits),
        figsize=(4.6 * len(splits) + 2.4, 3.4 * len(metrics) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    widths = sorted({float(r["width"]) for r in rows})
    for i, metric in enumerate(metrics):
        for j, split in enumerate(splits):
            ax = axes[i][j]
            for method in methods:
                for correction in corrections:
                    mine = [
                        r
                        for r in rows
                        if r["metric"] == metric
                        and str(r["split"]) == split
                        and r["method"] == method
                        and r["correction"] == correction
                    ]
                    if not mine:
                        continue
                    xs, mean, sd = mean_sd_by_width(mine)
                    ax.errorbar(
                        xs,
                        mean,
                        yerr=sd,
                        color=colors[method],
                        linestyle=styles[correction],
                        capsize=2.5,
                        label=f"{METHOD_LABELS.get(method, method)}, {CORRECTION_LABELS.get(correction, correction)}",
                        **figures.POINTS,
                    )
            ax.axhline(0.0, color="0.6", lw=0.7, zorder=0)
            ax.set_xscale("log", base=2)
            if widths:
                ax.set_xticks(widths, [f"×{w:g}" for w in widths])
                ax.minorticks_off()
            ax.set_xlabel("width multiplier (log₂ axis)")
            ax.set_ylabel(f"{metric} barrier")
            ax.set_title(f"{metric} barrier, {figures.data_text(split, examples.get(split))}", fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", fontsize=8, title="method, correction")
    pairs = len({(r["width"], r["pair"]) for r in rows}) // max(len(widths), 1)
    note = f"mean ± SD over {pairs} pair{'s' if pairs != 1 else ''} per width"
    return figures.save_figure(fig, path, title=f"{title}: {note}" if title else note)
