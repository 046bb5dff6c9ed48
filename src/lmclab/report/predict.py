"""Measured against Hessian-predicted barriers (Singh et al. Figs 4–5 in spirit)."""

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


def plot_predictions(
    path: str | os.PathLike,
    curve: Sequence[Mapping[str, Any]],
    layers: Sequence[Mapping[str, Any]],
    cumulative: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    matrix: np.ndarray,
    title: str = "",
) -> SavedFigure:
    fig, axes = plt.subplots(2, 2, figsize=(13, 10), constrained_layout=True)
    ax = axes[0][0]
    alpha = [r["alpha"] for r in curve]
    ax.plot(alpha, [r["measured"] for r in curve], "k-", lw=2, label="measured B(α)")
    ax.plot(alpha, [r["predicted"] for r in curve], "--", color="C3", lw=2, label="Prop. 1 prediction")
    ax.set(xlabel="α", ylabel="barrier (loss)", title="whole model")
    ax.grid(alpha=0.3)
    ax.legend()

    ax = axes[0][1]
    y = np.arange(len(layers))
    ax.barh(y - 0.2, [r["measured_half"] for r in layers], height=0.4, color="0.3", label="measured B_ℓ(½)")
    ax.barh(y + 0.2, [r["predicted_half"] for r in layers], height=0.4, color="C3", label="Prop. 2 at α = ½")
    ax.set_yticks(y, [r["layer"] for r in layers], fontsize=max(4, 9 - len(layers) // 8))
    ax.invert_yaxis()
    ax.set(xlabel="layer barrier at α = ½", title="one layer interpolated (Adilova/Singh)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    for i, order in enumerate(dict.fromkeys(r["order"] for r in cumulative)):
        rows = [r for r in cumulative if r["order"] == order]
        k = [r["k"] for r in rows]
        ax.plot(k, [r["measured_half"] for r in rows], "-o", color=f"C{i}", ms=3, label=f"{order}: measured")
        ax.plot(k, [r["predicted_eq21"] for r in rows], "--s", color=f"C{i}", ms=3, label=f"{order}: eq. 21")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(
        xlabel="number of layers interpolated (cumulative)",
        ylabel="barrier at α = ½",
        title="cumulative sets of layers",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    ax = axes[1][1]
    m = np.asarray(matrix, dtype=float)
    bound = float(np.nanmax(np.abs(m))) or 1.0
    image = ax.imshow(m, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound))
    ticks = np.arange(len(names))
    size = max(4, 9 - len(names) // 8)
    ax.set_xticks(ticks, names, rotation=90, fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)
    ax.set_title("cross-blocks B*(ℓ,ℓ') = ⅛ d[ℓ]ᵀ∇²L(θ₁)[ℓ,ℓ']d[ℓ'] (eq. 20)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    return figures.save_figure(fig, path, title)
