"""Hessian spectra: the SLQ density on a signed log scale with the top eigenvalues marked, and curvature
(top eigenvalue, trace with its CI) against λ along straight paths (naive and aligned) and against t along curves."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.transforms import blended_transform_factory

from lmclab.curvature.spectrum import PathSpectra, SpectralDensity
from lmclab.report import figures
from lmclab.report.figures import SavedFigure


def symlog_threshold(density: SpectralDensity, top: Sequence[float] = ()) -> float:
    """The linear range ±t of the symlog axis: the smoothing width σ, but at least 10⁻⁴ of the largest |node|."""
    largest = max([abs(x) for t in density.nodes for x in t] + [abs(x) for x in top] + [1e-12])
    return float(max(density.sigma, 1e-4 * largest))


def plot_density(
    path: str | os.PathLike,
    density: SpectralDensity,
    top_eigenvalues: Sequence[float] = (),
    *,
    title: str = "",
    split: str = "train",
    examples: int | None = None,
) -> SavedFigure:
    """ρ(λ) (SLQ, Gaussian smoothing σ) against λ on a symlog axis, ρ on a log axis (floored at 10⁻⁸ of its
    maximum), every start's Gauss nodes as a rug along the bottom, and the top eigenvalues (Lanczos) as
    vertical lines."""
    grid = np.asarray(density.grid, dtype=float)
    rho = np.asarray(density.density, dtype=float)
    floor = max(float(rho.max()) * 1e-8, 1e-300)
    fig, ax = plt.subplots(figsize=(10, 5), constrained_layout=True)
    ax.plot(grid, np.maximum(rho, floor), "-", color="C0", lw=1.4, label=f"SLQ density (σ = {density.sigma:.3g})")
    nodes = np.concatenate([np.asarray(t, dtype=float) for t in density.nodes])
    rug = blended_transform_factory(ax.transData, ax.transAxes)  # x in data, y in axes units: a rug at the bottom
    ax.plot(
        nodes,
        np.full_like(nodes, 0.03),
        "|",
        color="0.45",
        ms=9,
        transform=rug,
        label=f"Gauss nodes ({density.starts} starts × ≤{density.steps} steps)",
    )
    for i, lam in enumerate(top_eigenvalues):
        ax.axvline(lam, color="C3", ls="--", lw=1, label=f"top {len(top_eigenvalues)} eigenvalues" if i == 0 else None)
    ax.set_xscale("symlog", linthresh=symlog_threshold(density, top_eigenvalues))
    ax.set_yscale("log")
    ax.set(xlabel="eigenvalue λ of ∇²L (symlog scale)", ylabel="density ρ(λ) (log scale)")
    data = figures.data_text(split, examples)
    ax.set_title(f"Hessian spectral density, {density.n_parameters:,} parameters\n{data}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=floor / 10)
    hi = max([float(grid[-1]), *[float(x) for x in top_eigenvalues]])
    if hi > 0:  # room right of the largest eigenvalue's spike on the symlog axis
        ax.set_xlim(right=hi * 1.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figures.save_figure(fig, path, title=title)


def plot_path_curvature(
    path: str | os.PathLike,
    spectra: PathSpectra,
    *,
    title: str = "",
    split: str = "train",
    examples: int | None = None,
    xlabel: str = "λ",
) -> SavedFigure:
    """Top eigenvalue and tr ∇²L (95% CI as error bars) against λ (t on a curve: `xlabel`), one line per path
    or curve, a marker at each λ."""
    data = figures.data_text(split, examples)
    rows = spectra.rows()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for i, name in enumerate(spectra.spectra):
        mine = [r for r in rows if r["path"] == name]
        lam = [r["lambda"] for r in mine]
        top = [np.nan if r["top_eigenvalue"] is None else r["top_eigenvalue"] for r in mine]
        if not all(np.isnan(top)):
            axes[0].plot(lam, top, "-", color=f"C{i}", label=name, **figures.POINTS)
        if all("trace" in r for r in mine):
            est = np.asarray([r["trace"] for r in mine])
            err = np.asarray(
                [[r["trace"] - r["trace_ci_low"] for r in mine], [r["trace_ci_high"] - r["trace"] for r in mine]]
            )
            axes[1].errorbar(lam, est, yerr=err, fmt="-o", ms=3.2, color=f"C{i}", capsize=3, label=f"{name} (95% CI)")
    axes[0].set(xlabel=xlabel, ylabel="top eigenvalue λ_max(∇²L)")
    where = "along the path" if len(spectra.spectra) == 1 else "along the paths"
    axes[0].set_title(f"top eigenvalue {where}\n{data}", fontsize=10)
    axes[1].set(xlabel=xlabel, ylabel="tr ∇²L (Hutchinson)")
    axes[1].set_title(f"Hessian trace {where}\n{data}", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return figures.save_figure(fig, path, title=title)
