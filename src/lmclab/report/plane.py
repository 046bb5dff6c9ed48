"""Loss planes: filled contours of the loss over a plane in parameter space, the points that span it
marked and labelled (the look of Git Re-Basin's Fig. 1 / Garipov et al.'s Fig. 1)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.colors import LogNorm

from lmclab.report import figures
from lmclab.report.figures import SavedFigure

#: Number of log-spaced contour levels between the smallest and largest value on the grid.
LEVELS = 24
#: Marker of each labelled point (cycled).
MARKERS = ("o", "*", "D", "s", "^", "v")


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2, 5 × 10^k in [low, high] (with both ends when fewer than three fall inside)."""
    ticks = [
        m * 10.0**k
        for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        for m in (1.0, 2.0, 5.0)
        if low <= m * 10.0**k <= high
    ]
    return ticks if len(ticks) >= 3 else sorted({low, *ticks, high})


def plane_grid(rows: Iterable[Mapping[str, Any]], split: str, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u values, v values, Z[v, u]) of `metric` on `split` from tidy grid rows (CSV text or numbers);
    a grid node without a row (or with an empty cell) is NaN."""
    cells: dict[tuple[float, float], float] = {}
    for r in rows:
        if r["split"] == split and r["metric"] == metric:
            value = r["value"]
            cells[(float(r["u"]), float(r["v"]))] = math.nan if value in (None, "") else float(value)
    if not cells:
        raise ValueError(f"no {metric} rows on the {split} split")
    us = np.array(sorted({u for u, _ in cells}))
    vs = np.array(sorted({v for _, v in cells}))
    z = np.array([[cells.get((u, v), math.nan) for u in us] for v in vs], dtype=float)
    return us, vs, z


def plot_plane(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    points: Mapping[str, tuple[float, float]],
    *,
    metric: str = "loss",
    splits: Sequence[str] | None = None,
    axis_labels: tuple[str, str] = ("u", "v"),
    title: str = "",
    examples: Mapping[str, Any] | int | None = None,
) -> SavedFigure:
    """One panel per split: filled contours of `metric` over the (u, v) grid with log-spaced levels (a
    labelled colour bar with log ticks), thin contour lines, and each of `points` (label -> (u, v))
    marked and labelled. Axes are to scale (u and v are distances in parameter space). Non-finite or
    non-positive values are left blank and counted in the panel's title; the title names the split and
    its number of examples (`examples`, default the rows' ``examples`` column)."""
    rows = list(rows)
    splits = list(splits) if splits is not None else list(dict.fromkeys(str(r["split"]) for r in rows))
    counts = figures.examples_of([r for r in rows if r["split"] in splits], examples)
    grids = {s: plane_grid(rows, s, metric) for s in splits}
    width = max(1e-12, max(float(g[0][-1] - g[0][0]) for g in grids.values()))
    height = max(1e-12, max(float(g[1][-1] - g[1][0]) for g in grids.values()))
    panel_h = 4.6
    panel_w = round(2 * (min(max(panel_h * width / height, 3.2), 8.5) + 1.6)) / 2  # to scale, + colour bar
    fig, axes = plt.subplots(
        1, len(splits), figsize=(panel_w * len(splits), panel_h + 0.9), constrained_layout=True, squeeze=False
    )
    fig.get_layout_engine().set(h_pad=0.1, w_pad=0.1)  # type: ignore[union-attr,call-arg]
    for ax, split in zip(axes[0], splits):
        us, vs, z = grids[split]
        good = np.isfinite(z) & (z > 0)
        blank = int((~good).sum())
        if not good.any():
            raise ValueError(f"no finite positive {metric} on the {split} split: nothing to draw")
        low, high = float(z[good].min()), float(z[good].max())
        if high <= low * (1 + 1e-9):
            high = low * 1.01
        levels = np.geomspace(low, high, LEVELS)
        masked = np.ma.masked_where(~good, z)
        norm = LogNorm(vmin=low, vmax=high)
        filled = ax.contourf(us, vs, masked, levels=levels, norm=norm, cmap="viridis", extend="neither")
        ax.contour(us, vs, masked, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.5, norm=norm)
        bar = fig.colorbar(filled, ax=ax, shrink=0.9, label=f"{split} {metric} (log scale)")
        bar.set_ticks(ticks := log_ticks(low, high))
        bar.set_ticklabels([f"{t:.3g}" for t in ticks])
        bar.minorticks_off()
        for i, (label, (u, v)) in enumerate(points.items()):
            ax.plot(
                [u],
                [v],
                MARKERS[i % len(MARKERS)],
                ms=11 if MARKERS[i % len(MARKERS)] == "*" else 8,
                color="white",
                markeredgecolor="black",
                markeredgewidth=1.0,
                label=label,
                zorder=5,
            )
            text = ax.annotate(
                label,
                (u, v),
                xytext=(7, 7),
                textcoords="offset points",
                fontsize=12,
                fontweight="bold",
                color="white",
                zorder=6,
            )
            text.set_path_effects([patheffects.withStroke(linewidth=2.5, foreground="black")])
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlim(us[0], us[-1])
        ax.set_ylim(vs[0], vs[-1])
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        ax.set_title(
            f"{metric} on the plane ({figures.data_text(split, counts.get(split))})"
            + (f"\n{blank} grid points non-finite or ≤ 0, left blank" if blank else ""),
            fontsize=10,
        )
        if points:
            ax.legend(loc="best", fontsize=8, framealpha=0.85)
    return figures.save_figure(fig, path, title=title)
