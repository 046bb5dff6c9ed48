"""Figures of Benkő's paper: loss and its Taylor approximations along paths (Figs 1–6), one input's
logits (Fig. 7), logit RMSE over the test set (Fig. 8). Approximations centred at A are drawn solid
up to the midpoint and faded beyond it; centred at B the other way round. Measured curves (the true
loss, the true logits, the RMSE) carry a marker at each evaluated λ; the true loss has its barrier
written at its peak; panel titles name the split and its number of examples."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from lmclab.report import figures
from lmclab.report.figures import SavedFigure

ORDER_STYLE = {1: ":", 2: "--", 3: "-.", 4: (0, (5, 1, 1, 1, 1, 1))}
CENTER_COLOURS = {"a": ("#1f77b4", "#6baed6", "#08306b", "#9ecae1"), "b": ("#d95f02", "#fdae6b", "#7f2704", "#fdd0a2")}
#: The true logits' markers (squares: the small circles mark approximations centred at B).
TRUE_LOGIT_POINTS = {**figures.POINTS, "marker": "s"}
PATH_TITLES = {"naive": "naive: θ_A → θ_B", "aligned": "weight-matched: θ_A → π(θ_B)"}


def _by_pair(rows: list[Mapping[str, Any]], key: str = "value") -> tuple[np.ndarray, np.ndarray]:
    """λ (sorted) and one row of values per pair (NaN where missing)."""
    by_pair: dict[Any, dict[float, float]] = {}
    for r in rows:
        v = r[key]
        by_pair.setdefault(r.get("pair", 0), {})[float(r["lambda"])] = np.nan if v is None or v == "" else float(v)
    lam = np.array(sorted(set().union(*by_pair.values())))
    return lam, np.array([[c.get(x, np.nan) for x in lam] for c in by_pair.values()], dtype=float)


def _mean_std(rows: list[Mapping[str, Any]], key: str = "value") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lam, values = _by_pair(rows, key)
    with np.errstate(all="ignore"):
        return lam, np.nanmean(values, 0), np.nanstd(values, 0)


def _faded_halves(ax: plt.Axes, lam: np.ndarray, y: np.ndarray, center: str, **style: Any) -> None:
    near = lam <= 0.5 if center == "a" else lam >= 0.5
    ax.plot(lam[near], y[near], **style)
    style.pop("label", None)
    ax.plot(lam[~near | (lam == 0.5)], y[~near | (lam == 0.5)], alpha=0.3, **style)


def plot_loss_approximations(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    title: str = "",
    examples: Mapping[str, Any] | int | None = None,
) -> SavedFigure:
    """Rows of one setting: {pair, path, split, lambda, curve (true|taylor), center, order, value}, and
    optionally ``examples`` (the split's evaluated examples; or give `examples`: split -> n, or one n)."""
    rows = list(rows)
    splits = list(dict.fromkeys(r["split"] for r in rows))
    counts = figures.examples_of(rows, examples)
    paths = [p for p in PATH_TITLES if any(r["path"] == p for r in rows)]
    orders = sorted({int(r["order"]) for r in rows if r["curve"] == "taylor"})
    fig, axes = plt.subplots(
        len(splits), len(paths), figsize=(5.6 * len(paths), 3.9 * len(splits)), constrained_layout=True, squeeze=False
    )
    for i, split in enumerate(splits):
        for j, name in enumerate(paths):
            ax = axes[i][j]
            sel = [r for r in rows if r["split"] == split and r["path"] == name]
            true = [r for r in sel if r["curve"] == "true"]
            lam, mean, std = _mean_std(true)
            ax.plot(lam, mean, color="black", lw=2.2, label="true loss", zorder=5, **figures.POINTS)
            ax.fill_between(lam, mean - std, mean + std, color="black", alpha=0.15, lw=0)
            found = figures.curve_barriers([(lam, v) for v in _by_pair(true)[1]])
            at = figures.barrier_position(lam, mean)
            if found and at is not None:
                figures.annotate_barrier(ax, at, figures.barrier_text(found), "black")
            for center in ("a", "b"):
                for k in orders:
                    l2, m2, _ = _mean_std(
                        [r for r in sel if r["curve"] == "taylor" and r["center"] == center and int(r["order"]) == k]
                    )
                    _faded_halves(
                        ax,
                        l2,
                        m2,
                        center,
                        color=CENTER_COLOURS[center][k - 1 if k <= 4 else 3],
                        ls=ORDER_STYLE.get(k, "-"),
                        lw=1.6,
                        label=f"order {k}, centred at {center.upper()}",
                    )
            finite = mean[np.isfinite(mean)]
            if finite.size:
                span = max(finite.max() - finite.min(), 1e-3)
                ax.set_ylim(finite.min() - 0.3 * span, finite.max() + 0.6 * span)
            ax.set_xlim(-0.02, 1.02)
            ax.set(xlabel="λ", ylabel=f"{split} loss")
            ax.set_title(f"{PATH_TITLES[name]}\n{figures.data_text(split, counts.get(split))}", fontsize=10)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    return figures.save_figure(fig, path, title)


def _path_panels(rows: list[Mapping[str, Any]]) -> tuple[list[str], Any, Any]:
    """The paths present in `rows` (naive, aligned) and one panel for each, side by side."""
    paths = [p for p in PATH_TITLES if any(r["path"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(paths), figsize=(6 * len(paths), 4.2), constrained_layout=True, squeeze=False)
    return paths, fig, axes


def plot_logit_example(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], title: str = "", split: str = "test"
) -> SavedFigure:
    """Fig. 7: rows {path, input, label, class, curve (true|direct|a1|a2|b1|b2…), lambda, value}: one
    input of `split`; the true logits carry a marker at each evaluated λ."""
    rows = list(rows)
    paths, fig, axes = _path_panels(rows)
    for ax, name in zip(axes[0], paths):
        sel = [r for r in rows if r["path"] == name]
        classes = list(dict.fromkeys(r["class"] for r in sel))
        for ci, c in enumerate(classes):
            colour = f"C{ci}"
            for curve in dict.fromkeys(r["curve"] for r in sel):
                pts = sorted((r["lambda"], r["value"]) for r in sel if r["class"] == c and r["curve"] == curve)
                lam, y = np.array([p[0] for p in pts]), np.array([np.nan if p[1] is None else p[1] for p in pts])
                if curve == "true":
                    ax.plot(lam, y, color=colour, lw=2.4, **TRUE_LOGIT_POINTS)
                elif curve == "direct":
                    ax.plot(lam, y, color=colour, lw=0.9, alpha=0.7)
                elif curve[1:] in ("1", "2"):
                    _faded_halves(
                        ax,
                        lam,
                        y,
                        curve[0],
                        color=colour,
                        lw=1.3,
                        ls=ORDER_STYLE[int(curve[1:])],
                        marker="o" if curve[0] == "b" else None,
                        ms=2.5,
                    )
        label = sel[0]["label"] if sel else "?"
        ax.set(
            xlabel="λ",
            ylabel="logit",
        )
        ax.set_title(
            f"{PATH_TITLES[name]}\n{split} input {sel[0]['input'] if sel else '?'} (label {label}, 1 example); "
            f"classes {classes}",
            fontsize=10,
        )
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    handles = [
        Line2D([], [], color="k", lw=2.4, label="z_k(θ_λ)", **TRUE_LOGIT_POINTS),
        Line2D([], [], color="k", lw=0.9, alpha=0.7, label="(1−λ)z(θ_A) + λz(θ_B)"),
        Line2D([], [], color="k", ls=":", label="linear, centred at A"),
        Line2D([], [], color="k", ls="--", label="quadratic, centred at A"),
        Line2D([], [], color="k", ls=":", marker="o", ms=2.5, label="linear, centred at B"),
        Line2D([], [], color="k", ls="--", marker="o", ms=2.5, label="quadratic, centred at B"),
    ]
    axes[0][-1].legend(handles=handles, fontsize=7)
    return figures.save_figure(fig, path, title)


def plot_logit_rmse(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    title: str = "",
    split: str = "test",
    examples: Any = None,
) -> SavedFigure:
    """Fig. 8: rows {pair, path, approximation, lambda, rmse} (and optionally ``examples``: the number of
    `split` inputs the RMSE is over, or give `examples`); mean ± SD over pairs, a marker at each λ."""
    rows = list(rows)
    n = figures.count(examples if examples is not None else (rows[0].get("examples") if rows else None))
    paths, fig, axes = _path_panels(rows)
    for ax, name in zip(axes[0], paths):
        sel = [r for r in rows if r["path"] == name]
        for approx in dict.fromkeys(r["approximation"] for r in sel):
            lam, mean, std = _mean_std([r for r in sel if r["approximation"] == approx], key="rmse")
            if approx == "direct":
                style: dict[str, Any] = {"color": "grey", "ls": "-", "label": "direct interpolation"}
            else:
                k, center = int(approx[1:]), approx[0]
                style = {
                    "color": CENTER_COLOURS[center][k - 1 if k <= 4 else 3],
                    "ls": ORDER_STYLE.get(k, "-"),
                    "label": f"order {k}, centred at {center.upper()}",
                }
            ax.plot(lam, mean, lw=1.6, **style, **{**figures.POINTS, "ms": 2.5})
            ax.fill_between(lam, np.maximum(mean - std, 0), mean + std, color=style["color"], alpha=0.12, lw=0)
        ax.set_ylim(bottom=0)
        ax.set(xlabel="λ", ylabel="RMSE of z_k, k = argmax z(θ_A)")
        ax.set_title(f"{PATH_TITLES[name]}\n{figures.data_text(split, n)}", fontsize=10)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return figures.save_figure(fig, path, title)
