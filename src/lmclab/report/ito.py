"""Figures of Ito et al. (LMC among many models): merged-model loss/accuracy vs K, barriers among all
permuted pairs (and model → merged) vs K, Hessian trace at the merged model vs K, and the K × K
pair-barrier heat map per method. One colour per alignment method throughout. Missing values (NaN,
stored as empty) leave gaps and are counted in the panel title, never drawn as numbers. Panel titles
name the split and its number of examples (`examples`: split -> n, or one n; default the rows'
``examples`` column); the heat maps' colour bar names the split, metric and barrier definition."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from lmclab.paths.population import barrier_matrix
from lmclab.report import figures
from lmclab.report.figures import SavedFigure

METHOD_STYLE: dict[str, dict[str, Any]] = {
    "naive": {"color": "#d62728", "label": "naive (no permutation)"},
    "pairwise": {"color": "#ff7f0e", "label": "weight matching to model 0"},
    "merge_many": {"color": "#2ca02c", "label": "MergeMany"},
    "ste_mm": {"color": "#1f77b4", "label": "STE-MM"},
    "c2m3": {"color": "#9467bd", "label": "C2M3 (universe)"},
}
METRIC_LABEL = {"loss": "loss", "accuracy": "accuracy", "error": "error"}


def _style(method: str, i: int) -> dict[str, Any]:
    return METHOD_STYLE.get(method, {"color": f"C{i + 4}", "label": method})


def _num(v: Any) -> float:
    return math.nan if v is None or v == "" else float(v)


def _splits(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    present = list(dict.fromkeys(r["split"] for r in rows))
    return [x for x in ("train", "test") if x in present] + [x for x in present if x not in ("train", "test")]


def _methods(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    present = list(dict.fromkeys(r["method"] for r in rows))
    return [m for m in METHOD_STYLE if m in present] + [m for m in present if m not in METHOD_STYLE]


def _dodge(ks: np.ndarray, i: int, n: int, width: float = 0.16) -> np.ndarray:
    """x positions of method i of n, spread over `width` around each K so error bars do not overlap."""
    return ks + (i - (n - 1) / 2) * (width / max(n - 1, 1))


def _k_axis(ax: plt.Axes, ks: Sequence[int]) -> None:
    ax.set_xticks(sorted(set(ks)))
    ax.set_xlabel("number of models K")
    ax.grid(alpha=0.3)


def _title(ax: plt.Axes, text: str, missing: int, data: str = "") -> None:
    ax.set_title(
        text + (f"\n{data}" if data else "") + (f"\n({missing} missing value(s) not drawn)" if missing else ""),
        fontsize=10,
    )


def plot_merged_vs_k(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    title: str = "",
    metrics: Sequence[str] = ("loss", "accuracy"),
    examples: Mapping[str, Any] | int | None = None,
) -> SavedFigure:
    """Rows {method, k, model (merged|member), member, split, metric, value}: one panel per metric × split;
    the merged model per method, and the members' mean (grey, band = min … max over the first K)."""
    rows = list(rows)
    splits = _splits(rows)
    counts = figures.examples_of(rows, examples)
    methods = _methods(rows)
    fig, axes = plt.subplots(
        len(metrics),
        len(splits),
        figsize=(5.2 * len(splits), 3.8 * len(metrics)),
        constrained_layout=True,
        squeeze=False,
    )
    for a, metric in enumerate(metrics):
        for b, split in enumerate(splits):
            ax, missing = axes[a][b], 0
            sel = [r for r in rows if r["split"] == split and r["metric"] == metric]
            members: dict[int, dict[Any, float]] = {}
            for r in sel:
                if r["model"] == "member":
                    members.setdefault(int(r["k"]), {})[r["member"]] = _num(r["value"])
            if members:
                ks = sorted(members)
                vals = [np.array(list(members[k].values())) for k in ks]
                ok = [v[np.isfinite(v)] for v in vals]
                missing += sum(int((~np.isfinite(v)).sum()) for v in vals)
                mean = [v.mean() if v.size else math.nan for v in ok]
                ax.fill_between(
                    ks,
                    [v.min() if v.size else math.nan for v in ok],
                    [v.max() if v.size else math.nan for v in ok],
                    color="grey",
                    alpha=0.2,
                    lw=0,
                )
                ax.plot(ks, mean, color="grey", ls="--", marker=".", label="individual models (mean, min–max)")
            for i, method in enumerate(methods):
                pts = sorted(
                    (int(r["k"]), _num(r["value"])) for r in sel if r["method"] == method and r["model"] == "merged"
                )
                if not pts:
                    continue
                method_ks, ys = zip(*pts)
                missing += sum(not math.isfinite(y) for y in ys)
                ax.plot(method_ks, ys, marker="o", lw=1.8, **_style(method, i))
            _k_axis(ax, [int(r["k"]) for r in sel])
            ax.set_ylabel(f"{split} {METRIC_LABEL.get(metric, metric)}")
            _title(ax, f"merged model: {split} {metric}", missing, figures.data_text(split, counts.get(split)))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    return figures.save_figure(fig, path, title)


def plot_barriers_vs_k(
    path: str | os.PathLike,
    rows: Iterable[Mapping[str, Any]],
    title: str = "",
    definition: str = "barrier",
    metrics: Sequence[str] = ("loss", "error"),
    examples: Mapping[str, Any] | int | None = None,
) -> SavedFigure:
    """Summary rows {method, k, split, metric, definition, max, mean, std, n, n_missing}: per metric × split,
    mean ± SD (solid, error bars) and max (dashed) over pairs (or models) vs K, one colour per method."""
    rows = [r for r in rows if r["definition"] == definition]
    splits = _splits(rows)
    counts = figures.examples_of(rows, examples)
    methods = _methods(rows)
    fig, axes = plt.subplots(
        len(metrics),
        len(splits),
        figsize=(5.2 * len(splits), 3.8 * len(metrics)),
        constrained_layout=True,
        squeeze=False,
    )
    for a, metric in enumerate(metrics):
        for b, split in enumerate(splits):
            ax = axes[a][b]
            sel = [r for r in rows if r["split"] == split and r["metric"] == metric]
            missing = sum(int(_num(r.get("n_missing", 0)) or 0) for r in sel)
            for i, method in enumerate(methods):
                pts = sorted(
                    (int(r["k"]), _num(r["mean"]), _num(r["std"]), _num(r["max"])) for r in sel if r["method"] == method
                )
                if not pts:
                    continue
                ks, mean, std, top = (np.array(c, dtype=float) for c in zip(*pts))
                style = _style(method, i)
                x = _dodge(ks, i, len(methods))
                ax.errorbar(x, mean, yerr=std, marker="o", lw=1.8, capsize=3, color=style["color"])
                ax.plot(x, top, ls="--", marker="^", lw=1.2, color=style["color"], alpha=0.8)
            ax.axhline(0.0, color="black", lw=0.6)
            _k_axis(ax, [int(r["k"]) for r in sel])
            ax.set_ylabel(f"{split} {metric} barrier")
            _title(ax, f"{definition} ({metric}, {split})", missing, figures.data_text(split, counts.get(split)))
    handles = [Line2D([], [], marker="o", **_style(m, i)) for i, m in enumerate(methods)]
    handles += [
        Line2D([], [], color="black", marker="o", label="mean ± SD"),
        Line2D([], [], color="black", ls="--", marker="^", label="max"),
    ]
    fig.legend(handles=handles, loc="outside right center", fontsize=8)
    return figures.save_figure(fig, path, title)


def plot_trace_vs_k(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], title: str = "") -> SavedFigure:
    """Rows {method, k, kind (trace|scale_aware_trace), estimate, ci_low, ci_high, confidence, and
    optionally split, examples}: estimate vs K with its confidence interval as error bars; log scale when
    all values are positive and span > 30×. The title names the split and number of examples."""
    rows = list(rows)
    kinds = [k for k in ("trace", "scale_aware_trace") if any(r["kind"] == k for r in rows)]
    methods = _methods(rows)
    labels = {"trace": "tr ∇²L(θ̄)", "scale_aware_trace": "tr(D ∇²L(θ̄) D), D = diag|θ̄|"}
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.4 * len(kinds), 4.0), constrained_layout=True, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        sel = [r for r in rows if r["kind"] == kind]
        missing = 0
        for i, method in enumerate(methods):
            pts = sorted(
                (int(r["k"]), _num(r["estimate"]), _num(r["ci_low"]), _num(r["ci_high"]))
                for r in sel
                if r["method"] == method
            )
            if not pts:
                continue
            ks, est, lo, hi = (np.array(c, dtype=float) for c in zip(*pts))
            missing += int((~np.isfinite(est)).sum())
            ax.errorbar(
                _dodge(ks, i, len(methods)),
                est,
                yerr=np.vstack([est - lo, hi - est]),
                marker="o",
                capsize=3,
                lw=1.8,
                **_style(method, i),
            )
        values = np.array([_num(r["ci_low"]) for r in sel] + [_num(r["ci_high"]) for r in sel])
        values = values[np.isfinite(values)]
        if values.size and values.min() > 0 and values.max() / values.min() > 30:
            ax.set_yscale("log")
        _k_axis(ax, [int(r["k"]) for r in sel])
        conf = sel[0]["confidence"] if sel else 0.95
        ax.set_ylabel(labels[kind])
        data = figures.splits_text(figures.examples_of([r for r in sel if r.get("split") not in (None, "")]))
        _title(ax, f"{labels[kind]} ({_num(conf):.0%} CI)", missing, data)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    return figures.save_figure(fig, path, title)


def plot_heatmaps(
    path: str | os.PathLike,
    pair_rows: Iterable[Mapping[str, Any]],
    k: int,
    split: str = "test",
    metric: str = "loss",
    definition: str = "barrier",
    title: str = "",
    examples: Any = None,
) -> SavedFigure:
    """Pair rows {method, i, j, split, metric, <definition>} of one K: the K × K matrix per method, one
    shared colour scale, values written in the cells; missing values grey and marked n/a. Panel titles
    name `split` and its number of examples (`examples`, default the rows' ``examples`` column)."""
    pair_rows = list(pair_rows)
    n = figures.examples_of([r for r in pair_rows if r["split"] == split], examples).get(split)
    methods = _methods(pair_rows)
    mats = {
        m: barrier_matrix([r for r in pair_rows if r["method"] == m], k, split, metric, definition) for m in methods
    }
    finite = np.concatenate([m[np.isfinite(m)] for m in mats.values()]) if mats else np.array([])
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(float(finite.max()), vmin + 1e-12) if finite.size else 1.0
    fig, axes = plt.subplots(
        1, max(len(methods), 1), figsize=(3.6 * max(len(methods), 1) + 0.8, 4.5), constrained_layout=True, squeeze=False
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = None
    for ax, method in zip(axes[0], methods):
        m = mats[method]
        image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=vmax)
        for (i, j), v in np.ndenumerate(m):
            text = "n/a" if not np.isfinite(v) else f"{v:.3g}"
            bright = np.isfinite(v) and (v - vmin) / (vmax - vmin) > 0.6
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7 if k > 6 else 8,
                color="black" if bright or not np.isfinite(v) else "white",
            )
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set(xlabel="model j", ylabel="model i")
        ax.set_title(f"{_style(method, 0)['label']}\n{figures.data_text(split, n)}", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.85, label=f"{split} {metric} {definition}")
    return figures.save_figure(fig, path, title)
