"""Loss and accuracy along interpolation paths (the look of Git Re-Basin's and Benkő's figures)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from lmclab.report import figures
from lmclab.report.figures import SavedFigure

SPLIT_STYLE = {"train": "-", "test": "--"}


def plot_paths(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    metrics: Sequence[str] = ("loss", "accuracy"),
    title: str = "",
    endpoint_labels: tuple[str, str] = ("Model A", "Model B"),
    examples: Mapping[str, Any] | int | None = None,
) -> SavedFigure:
    """One panel per metric; one colour per path (e.g. naive, permuted), train solid / test dashed, a
    marker at every evaluated λ; mean ± std over pairs when rows carry several `pair` values. Each curve
    has its barrier written at its peak (:func:`figures.barrier_text`: mean ± SD over pairs; for
    accuracy the drop below the endpoint line, i.e. the error barrier). Panel titles name the splits and
    their numbers of examples (`examples`: split -> n, or one n; default the rows' ``examples`` column).
    Non-finite values are left out of the lines and counted in the panel's title, never drawn as numbers."""
    rows = list(rows)
    paths = list(dict.fromkeys(r.get("path", "path") for r in rows))
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts = figures.examples_of(rows, examples)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.4 * len(metrics), 4.3), constrained_layout=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        dropped = 0
        for i, name in enumerate(paths):
            for split in splits:
                curves: dict[Any, dict[float, float]] = {}
                for r in rows:
                    if r.get("path", "path") == name and r["split"] == split and r["metric"] == metric:
                        curves.setdefault(r.get("pair", 0), {})[float(r["lambda"])] = float(r["value"])
                if not curves:
                    continue
                lam = sorted(set().union(*curves.values()))
                values = np.array([[c.get(x, math.nan) for x in lam] for c in curves.values()], dtype=float)
                dropped += int((~np.isfinite(values)).sum())
                values[~np.isfinite(values)] = np.nan
                mean = np.nanmean(values, axis=0) if np.isfinite(values).any() else values[0]
                label = f"{name} {split}" + (f" (n={len(curves)})" if len(curves) > 1 else "")
                ax.plot(lam, mean, SPLIT_STYLE.get(split, ":"), color=f"C{i}", label=label, lw=1.8, **figures.POINTS)
                if len(curves) > 1:
                    std = np.nanstd(values, axis=0)
                    ax.fill_between(lam, mean - std, mean + std, color=f"C{i}", alpha=0.18, lw=0)
                found = figures.curve_barriers([(lam, v) for v in values], metric)
                at = figures.barrier_position(lam, mean, metric)
                if found and at is not None:
                    notes = [split] if len(splits) > 1 else []  # which curve: train and test peak close together
                    if metric in figures.LOWER_IS_WORSE:
                        notes.append("error barrier")  # the drop below the endpoint line
                    if len(found) < len(curves):
                        notes.append(f"{len(found)} of {len(curves)} pairs")
                    text = figures.barrier_text(found) + (f" ({', '.join(notes)})" if notes else "")
                    offset = 18.0 * (splits.index(split) - (len(splits) - 1) / 2)
                    figures.annotate_barrier(ax, at, text, f"C{i}", metric, offset=offset)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_xticklabels([endpoint_labels[0], "0.25", "0.5", "0.75", endpoint_labels[1]])
        ax.set_xlabel("λ")
        ax.set_ylabel(metric)
        ax.margins(y=0.12)
        ax.set_title(
            metric
            + (f" ({dropped} non-finite values omitted)" if dropped else "")
            + "\n"
            + figures.splits_text(counts),
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, handlelength=3.5)  # long enough to show test's dashes between the markers
    return figures.save_figure(fig, path, title)
