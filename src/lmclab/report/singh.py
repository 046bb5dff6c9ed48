"""Figures of Singh et al., "Landscaping linear mode connectivity", from the tidy tables of
`lmclab.experiments.singh`: the error/loss on the segment between siblings over child training
(Figs 1, 8–12), sibling angles and solution planes (Figs 2, 13), Prop. 1 against measured barriers and
the sibling distance (Figs 4, 14), layer-wise measured against Prop. 2 over training (Figs 5, 15–20)
and the toy landscapes (Fig. 6). Missing values (NaN, empty cells) are left out, never drawn as numbers.
Where a table holds several sibling pairs, lines and markers show their mean (3-D panels: pair 0).
Curves evaluated at a grid of α carry a marker at each evaluated α; measured barrier curves have their
maximum written at the peak; panels drawn from an evaluation name the split (Singh's analyses use a
fixed training subset) and its number of examples (`examples`, default the rows' ``examples`` column);
every heat map has a labelled colour bar. The measured layer-wise quantity is Singh's layer-set barrier
B_P(½) (:data:`lmclab.paths.barriers.LAYER_SET_BARRIER`, column ``layer_set_barrier_half``), not the
one-sided layer-wise barrier of ``lmclab interpolate --layers``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import cm
from matplotlib.colors import Normalize, TwoSlopeNorm

from lmclab.report import figures
from lmclab.report.figures import SavedFigure

Rows = Sequence[Mapping[str, Any]]


def _value(v: Any) -> float:
    return math.nan if v is None or v == "" else float(v)


def _forks(rows: Rows) -> list[int]:
    return sorted({int(r["fork_epoch"]) for r in rows})


def _mean_by(rows: Rows, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """x values (sorted) and the mean of y over rows (pairs) at each; NaN where none is finite."""
    groups: dict[float, list[float]] = {}
    for r in rows:
        groups.setdefault(float(r[x]), []).append(_value(r[y]))
    xs = np.array(sorted(groups))
    with np.errstate(all="ignore"):
        ys = np.array([np.nanmean(groups[k]) if np.isfinite(groups[k]).any() else np.nan for k in xs])
    return xs, ys


def _no_data(ax: plt.Axes, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _examples(rows: Rows, examples: Any) -> int | None:
    """The number of evaluated (training) examples: `examples`, else the rows' first ``examples`` cell."""
    if examples is not None:
        return figures.count(examples)
    return next((figures.count(r.get("examples")) for r in rows if figures.count(r.get("examples")) is not None), None)


def _finish(ax: plt.Axes, has_data: bool, **legend: Any) -> None:
    """Grid, and the legend (keywords to ``ax.legend``, default fontsize 8) or a "no data" note."""
    ax.grid(alpha=0.3)
    if has_data:
        ax.legend(**{"fontsize": 8, **legend})
    else:
        _no_data(ax)


def plot_segments(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    metric: str = "error",
    title: str = "",
    examples: Any = None,
) -> SavedFigure:
    """Figs 1 / 10 (and 8–9, 11–12 for other settings): one 3-D panel per fork epoch with the curve of
    `metric` along the segment θ_1^t → θ_2^t laid out at its child epoch t (top), and its barrier
    version with the endpoints' values subtracted (bottom). Rows: {fork_epoch, pair, child_epoch, metric,
    lambda, value, barrier} (and optionally ``examples``: the training subset's size)."""
    rows = [r for r in rows if r["metric"] == metric and int(r.get("pair", 0)) == 0]
    data = figures.data_text("train", _examples(rows, examples))
    forks = _forks(rows) or [0]
    fig = plt.figure(figsize=(4.3 * len(forks), 8.2), constrained_layout=True)
    zlabel = {"error": "train error", "loss": "train loss"}.get(metric, metric)
    for i, epoch in enumerate(forks):
        sel = [r for r in rows if int(r["fork_epoch"]) == epoch]
        epochs = sorted({float(r["child_epoch"]) for r in sel})
        colours = cm.viridis(Normalize(min(epochs, default=0), max(epochs, default=1))(epochs))
        for j, (key, label) in enumerate((("value", zlabel), ("barrier", f"{zlabel} − endpoint line"))):
            ax = fig.add_subplot(2, len(forks), j * len(forks) + i + 1, projection="3d")
            for t, colour in zip(epochs, colours):
                pts = sorted((float(r["lambda"]), _value(r[key])) for r in sel if float(r["child_epoch"]) == t)
                lam, z = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
                ax.plot(lam, np.full_like(lam, t), z, color=colour, lw=1.2, marker="o", ms=1.8)
            ax.set_xlabel("α (θ₁ → θ₂)", fontsize=8)
            ax.set_ylabel("child epoch", fontsize=8)
            ax.set_zlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.view_init(elev=24, azim=-60)
            ax.set_box_aspect(None, zoom=0.86)  # room for the z label inside the panel
            ax.set_title(
                (f"forked at epoch {epoch}" if j == 0 else f"barrier curves, fork {epoch}") + f"\n{data}", fontsize=10
            )
            if not sel:
                _no_data(ax)
    return figures.save_figure(fig, path, title)


def plot_geometry(
    path: str | os.PathLike, angles: Iterable[Mapping[str, Any]], geometry: Iterable[Mapping[str, Any]], title: str = ""
) -> SavedFigure:
    """Fig. 2 / 13: the angle between the final siblings with base = origin (a) and base = fork point (b)
    per fork epoch; (c) solution-plane determination cos(θ_1^t − θ_2^t, θ_1* − θ_2*) over child epochs."""
    angles, geometry = list(angles), list(geometry)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    for ax, base, colour, label in (
        (axes[0], "origin", "C0", "base = origin"),
        (axes[1], "fork", "C1", "base = fork point"),
    ):
        sel = [r for r in angles if r["base"] == base]
        forks, values = _mean_by(sel, "fork_epoch", "angle_degrees")
        pos = np.arange(len(forks))
        finite = np.isfinite(values)
        ax.bar(pos[finite], values[finite], color=colour, width=0.6)
        for p, v, ok in zip(pos, values, finite):
            ax.annotate(
                f"{v:.3g}°" if ok else "n/a",
                (p, v if ok else 0),
                ha="center",
                va="bottom",
                fontsize=8,
                xytext=(0, 2),
                textcoords="offset points",
            )
        ax.set_xticks(pos, [f"{int(f)}" for f in forks])
        ax.set(xlabel="fork epoch", ylabel="angle between final siblings (degrees)", title=f"sibling angle, {label}")
        ax.grid(alpha=0.3, axis="y")
        if not sel:
            _no_data(ax)
    ax = axes[2]
    for i, epoch in enumerate(_forks(geometry)):
        t, cos = _mean_by([r for r in geometry if int(r["fork_epoch"]) == epoch], "child_epoch", "plane_cos")
        ax.plot(t, cos, "-o", ms=2.5, color=f"C{i}", label=f"fork {epoch}")
    ax.set(
        xlabel="child epoch t",
        ylabel="cos(θ₁ᵗ − θ₂ᵗ, θ₁* − θ₂*)",
        title="solution-plane determination",
        ylim=(min(0.0, ax.get_ylim()[0]), 1.02),
    )
    _finish(ax, bool(geometry))
    return figures.save_figure(fig, path, title)


def plot_barrier_predictions(
    path: str | os.PathLike,
    predictions: Iterable[Mapping[str, Any]],
    curves: Iterable[Mapping[str, Any]],
    geometry: Iterable[Mapping[str, Any]],
    title: str = "",
    examples: Any = None,
) -> SavedFigure:
    """Fig. 4 / 14: (a) Prop. 1's predicted barrier max_α B(α) against the measured one for the final
    siblings of each fork; (b) the whole curves (measured: a marker at each evaluated α, its maximum
    written at the peak); (c) the sibling distance ‖θ_1^t − θ_2^t‖ over child epochs. (a) and (b) name
    the training subset's size (`examples`, default the prediction rows' ``examples`` column)."""
    predictions, curves, geometry = list(predictions), list(curves), list(geometry)
    data = figures.data_text("train", _examples(predictions + curves, examples))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), constrained_layout=True)
    ax = axes[0]
    series = [
        (
            "measured_max",
            "measured (interpolated BN statistics)"
            if any(np.isfinite(_value(r.get("measured_bn_reset_max"))) for r in predictions)
            else "measured",
            "k",
            "o",
        ),
        ("measured_bn_reset_max", "measured (BN statistics reset)", "0.5", "s"),
        ("predicted_max", "Prop. 1 prediction", "C3", "D"),
    ]
    forks = _forks(predictions)
    pos = np.arange(len(forks))
    for k, (key, label, colour, marker) in enumerate(series):
        values = (
            np.array(
                [
                    _mean_by([r for r in predictions if int(r["fork_epoch"]) == f], "fork_epoch", key)[1][0]
                    for f in forks
                ]
            )
            if forks
            else np.array([])
        )
        finite = np.isfinite(values)
        if finite.any():
            ax.plot(
                pos[finite] + (k - 1) * 0.08, values[finite], marker=marker, ls="none", ms=8, color=colour, label=label
            )
    ax.set_xticks(pos, [str(f) for f in forks])
    ax.set(xlabel="fork epoch", ylabel="loss barrier max_α B(α)")
    ax.set_title(f"predicted vs actual barrier (final siblings)\n{data}", fontsize=10)
    _finish(ax, bool(predictions))

    ax = axes[1]
    for i, epoch in enumerate(forks):
        sel = [r for r in curves if int(r["fork_epoch"]) == epoch]
        a, measured = _mean_by(sel, "alpha", "measured")
        _, predicted = _mean_by(sel, "alpha", "predicted")
        ax.plot(a, measured, "-", color=f"C{i}", lw=1.8, label=f"fork {epoch}: measured", **figures.POINTS)
        ax.plot(a, predicted, "--", color=f"C{i}", lw=1.4, label=f"fork {epoch}: Prop. 1")
        pairs = [_mean_by([r for r in sel if r.get("pair", 0) == p], "alpha", "measured") for p in _pairs(sel)]
        found = figures.curve_barriers(pairs)
        at = figures.barrier_position(a, measured)
        if found and at is not None:
            figures.annotate_barrier(ax, at, figures.barrier_text(found), f"C{i}")
    ax.set(xlabel="α", ylabel="barrier curve B(α) (loss)")
    ax.set_title(f"barrier curves at the end of training\n{data}", fontsize=10)
    ax.grid(alpha=0.3)
    if forks:
        ax.legend(fontsize=7, ncol=min(4, len(forks)), loc="upper center", bbox_to_anchor=(0.5, -0.16))

    ax = axes[2]
    for i, epoch in enumerate(_forks(geometry)):
        t, d = _mean_by([r for r in geometry if int(r["fork_epoch"]) == epoch], "child_epoch", "distance")
        ax.plot(t, d, "-", color=f"C{i}", label=f"fork {epoch}")
    ax.set(xlabel="child epoch t", ylabel="‖θ₁ᵗ − θ₂ᵗ‖", title="sibling distance")
    _finish(ax, bool(geometry))
    return figures.save_figure(fig, path, title)


def _pairs(rows: Rows) -> list[Any]:
    return list(dict.fromkeys(r.get("pair", 0) for r in rows))


def _heat_map(
    fig: plt.Figure, ax: plt.Axes, rows: Rows, key: str, title: str, label: str, cmap: str = "viridis"
) -> None:
    layers = [name for _, name in sorted({(int(r["layer_index"]), r["layer"]) for r in rows})]
    epochs = sorted({float(r["child_epoch"]) for r in rows})
    grid = np.full((len(layers), len(epochs)), np.nan)
    li, ei = {n: i for i, n in enumerate(layers)}, {t: j for j, t in enumerate(epochs)}
    for r in rows:
        grid[li[r["layer"]], ei[float(r["child_epoch"])]] = _value(r[key])
    if not np.isfinite(grid).any():
        _no_data(ax)
        ax.set_title(title)
        return
    low, high = float(np.nanmin(grid)), float(np.nanmax(grid))
    norm = TwoSlopeNorm(0.0, min(low, -1e-12), max(high, 1e-12)) if low < 0 < high else None
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu_r" if norm is not None else cmap,
        norm=norm,
    )
    size = max(4, 9 - len(layers) // 6)
    ax.set_yticks(np.arange(len(layers)), layers, fontsize=size)
    step = max(1, len(epochs) // 12)
    ax.set_xticks(np.arange(0, len(epochs), step), [f"{epochs[j]:g}" for j in range(0, len(epochs), step)], fontsize=8)
    ax.set(xlabel="child epoch t")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.85, label=label)


#: The heat maps of :func:`plot_layerwise`: column, panel title, colour-bar label.
LAYERWISE_MAPS = (
    (
        "layer_set_barrier_half",
        "measured layer-set barrier B_P(½), P = {ℓ} (Singh)",
        "layer_set_barrier B_ℓ(½) (loss)",
    ),
    ("predicted_half", "Prop. 2 prediction at α = ½", "Prop. 2 at α = ½ (loss)"),
    ("distance", "layer distance ‖θ₁ᵗ[ℓ] − θ₂ᵗ[ℓ]‖", "‖θ₁ᵗ[ℓ] − θ₂ᵗ[ℓ]‖"),
)


def plot_layerwise(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    sums: Iterable[Mapping[str, Any]],
    title: str = "",
    examples: Any = None,
) -> SavedFigure:
    """Figs 5, 15–20: heat maps (layer × child epoch) of Singh's measured layer-set barrier B_P(½) for
    P = {ℓ} (column ``layer_set_barrier_half``: both bases, relative to the siblings' losses), Prop. 2's
    prediction at α = ½ and the layer distance ‖d[ℓ]‖; and eq. 20's cross-block sums next to the measured
    barriers over child epochs. Titles name the training subset's size (`examples`, default the rows'
    ``examples`` column)."""
    rows, sums = list(rows), list(sums)
    data = figures.data_text("train", _examples(rows + sums, examples))
    fig, axes = plt.subplots(2, 2, figsize=(14, 10), constrained_layout=True)
    for ax, (column, text, label) in zip((axes[0][0], axes[0][1], axes[1][0]), LAYERWISE_MAPS):
        cmap = "magma" if column == "distance" else "viridis"
        _heat_map(fig, ax, rows, column, text if column == "distance" else f"{text}\n{data}", label, cmap=cmap)
    ax = axes[1][1]
    styles = {
        "measured": ("-", 2.0),
        "Prop. 1": ("--", 1.6),
        "eq. 20": (":", 1.6),
        "Σ diagonal": ("-.", 1.4),
        "Σ off": ((0, (3, 1, 1, 1)), 1.4),
    }
    for i, quantity in enumerate(dict.fromkeys(r["quantity"] for r in sums)):
        t, v = _mean_by([r for r in sums if r["quantity"] == quantity], "child_epoch", "value")
        ls, lw = next((s for k, s in styles.items() if quantity.startswith(k)), ("-", 1.4))
        ax.plot(t, v, ls=ls, lw=lw, marker="o", ms=2.5, color=f"C{i}", label=quantity)
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set(xlabel="child epoch t", ylabel="barrier at α = ½ (loss)")
    ax.set_title(f"cross-block sums (eq. 20) and measured barriers\n{data}", fontsize=10)
    _finish(ax, bool(sums), ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    return figures.save_figure(fig, path, title)


def plot_toy_landscapes(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], title: str = "") -> SavedFigure:
    """Fig. 6: each toy landscape L(θ) = Π(θ − m_i)² with its minima, and on the segment between each pair
    of adjacent minima Prop. 1's prediction (dashed) next to the exact barrier curve (= L there)."""
    rows = list(rows)
    names = list(dict.fromkeys(r["landscape"] for r in rows))
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.6), constrained_layout=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        land = sorted(
            (float(r["theta"]), float(r["loss"])) for r in rows if r["landscape"] == name and r["kind"] == "landscape"
        )
        theta, loss = np.array([p[0] for p in land]), np.array([p[1] for p in land])
        ax.plot(theta, loss, color="black", lw=2, label="L(θ)")
        top = 0.0
        pairs = dict.fromkeys(r["pair"] for r in rows if r["landscape"] == name and r["kind"] == "pair")
        for i, pair in enumerate(pairs):
            sel = sorted(
                (
                    (float(r["theta"]), float(r["predicted"]), float(r["loss"]), r)
                    for r in rows
                    if r["landscape"] == name and r.get("pair") == pair
                ),
                key=lambda p: p[0],
            )
            x = np.array([p[0] for p in sel])
            predicted = np.array([p[1] for p in sel])
            exact = sel[0][3]
            ax.plot(
                x,
                predicted,
                "--",
                color=f"C{i}",
                lw=1.6,
                label=f"{pair}: Prop. 1 peak {predicted.max():.3g}, exact barrier {float(exact['barrier']):.3g}",
            )
            ax.fill_between(x, 0, [p[2] for p in sel], color=f"C{i}", alpha=0.12, lw=0)
            top = max(top, float(predicted.max()), float(exact["barrier"]))
        minima = np.array(
            sorted(
                {
                    float(r["theta"])
                    for r in rows
                    if r["landscape"] == name and r["kind"] == "pair" and float(r["alpha"]) in (0.0, 1.0)
                }
            )
        )
        ax.plot(minima, np.zeros_like(minima), "v", color="C3", ms=8, label="minima")
        ax.set_ylim(-0.05 * top, 1.35 * top if top > 0 else 1)
        ax.set(xlabel="θ", ylabel="L(θ)", title=f"{name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center")
    return figures.save_figure(fig, path, title)
