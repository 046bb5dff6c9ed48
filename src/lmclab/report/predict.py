"""Measured against Hessian-predicted barriers (Singh et al. Figs 4–5 in spirit).

The measured layer-wise quantity is Singh's two-sided layer-set barrier B_P(½) (column
``layer_set_barrier_half``; :data:`lmclab.paths.barriers.LAYER_SET_BARRIER`), not the one-sided
``layerwise_barrier`` of ``lmclab interpolate --layers``: labels say so."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from lmclab.report import figures
from lmclab.report.figures import SavedFigure

#: The measured layer-set barrier's column in the layer and cumulative tables.
MEASURED = "layer_set_barrier_half"


def plot_predictions(
    path: str | os.PathLike,
    curve: Sequence[Mapping[str, Any]],
    layers: Sequence[Mapping[str, Any]],
    cumulative: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    matrix: np.ndarray,
    title: str = "",
    split: str = "test",
    examples: Any = None,
) -> SavedFigure:
    """Whole model: measured B(α) (a marker at each evaluated α, its maximum written at the peak) and
    Prop. 1; per layer ℓ: the measured layer-set barrier B_{ℓ}(½) and Prop. 2 at α = ½; cumulative layer
    sets: measured B_P(½) and eq. 21; the eq. 20 cross-block matrix (labelled colour bar). Every panel
    drawn from an evaluation names `split` and its number of `examples`."""
    data = figures.data_text(split, figures.count(examples))
    fig, axes = plt.subplots(2, 2, figsize=(13, 10), constrained_layout=True)
    ax = axes[0][0]
    alpha = [float(r["alpha"]) for r in curve]
    measured = [float(r["measured"]) for r in curve]
    ax.plot(alpha, measured, "k-", lw=2, label="measured B(α)", **figures.POINTS)
    ax.plot(alpha, [float(r["predicted"]) for r in curve], "--", color="C3", lw=2, label="Prop. 1 prediction")
    found = figures.curve_barriers([(alpha, measured)])
    at = figures.barrier_position(alpha, measured)
    if found and at is not None:
        figures.annotate_barrier(ax, at, figures.barrier_text(found), "black")
    ax.set(xlabel="α", ylabel="barrier (loss)")
    ax.set_title(f"whole model\n{data}", fontsize=10)
    ax.margins(y=0.12)
    ax.grid(alpha=0.3)
    ax.legend()

    ax = axes[0][1]
    y = np.arange(len(layers))
    ax.barh(
        y - 0.2,
        [float(r[MEASURED]) for r in layers],
        height=0.4,
        color="0.3",
        label="measured layer_set_barrier B_ℓ(½)",
    )
    ax.barh(y + 0.2, [float(r["predicted_half"]) for r in layers], height=0.4, color="C3", label="Prop. 2 at α = ½")
    ax.set_yticks(y, [r["layer"] for r in layers], fontsize=max(4, 9 - len(layers) // 8))
    ax.invert_yaxis()
    ax.set(xlabel="layer-set barrier at α = ½ (loss)")
    ax.set_title(f"one layer P = {{ℓ}}, both bases (Singh's B_P)\n{data}", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    for i, order in enumerate(dict.fromkeys(r["order"] for r in cumulative)):
        rows = [r for r in cumulative if r["order"] == order]
        k = [float(r["k"]) for r in rows]
        ax.plot(k, [float(r[MEASURED]) for r in rows], "-o", color=f"C{i}", ms=3, label=f"{order}: measured B_P(½)")
        ax.plot(k, [float(r["predicted_eq21"]) for r in rows], "--s", color=f"C{i}", ms=3, label=f"{order}: eq. 21")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="number of layers in P (cumulative)", ylabel="layer-set barrier at α = ½ (loss)")
    ax.set_title(f"cumulative layer sets P\n{data}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    m = np.asarray(matrix, dtype=float)
    bound = float(np.nanmax(np.abs(m))) if m.size else 1.0
    bound = bound or 1.0
    image = ax.imshow(m, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound))
    ticks = np.arange(len(names))
    size = max(4, 9 - len(names) // 8)
    ax.set_xticks(ticks, names, rotation=90, fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)
    ax.set_title(f"cross-blocks B*(ℓ,ℓ') = ⅛ d[ℓ]ᵀ∇²L(θ₁)[ℓ,ℓ']d[ℓ'] (eq. 20)\n{data}", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label="B*(ℓ,ℓ') (loss)")
    return figures.save_figure(fig, path, title)
