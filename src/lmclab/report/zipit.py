"""The ZipIt! disjoint-task figure: accuracy of every merging method on the joint task, and ZipIt's accuracy
against how many groups are zipped (partial zipping; 0 = the ensemble of the two full models)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from lmclab.report import figures
from lmclab.report.figures import POINTS, SavedFigure, data_text

#: Bars: (metric, legend label); the task labels are filled in from the tasks.
_BARS = ("joint_accuracy", "task_accuracy_0", "task_accuracy_1")


def _value(
    rows: Sequence[Mapping[str, Any]], method: str, metric: str, zipped: Any = None
) -> tuple[float, float] | None:
    for r in rows:
        if r["method"] == method and r["metric"] == metric and (zipped is None or r["zipped_groups"] == zipped):
            return 100 * float(r["mean"]), 100 * float(r["sd"])
    return None


def _classes(task: Sequence[int]) -> str:
    t = list(task)
    contiguous = t == list(range(t[0], t[0] + len(t)))
    return f"{t[0]}–{t[-1]}" if contiguous and len(t) > 2 else ",".join(map(str, t))


def plot_zipit(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    tasks: Sequence[Sequence[int]],
    n_test: int | None = None,
    title: str = "",
) -> SavedFigure:
    """`rows`: the summary rows (method, zipped_groups, groups, metric, mean, sd) of one setting and rule.

    Left: per method, joint accuracy and each task's accuracy (mean ± SD over pairs). Right: ZipIt's joint and
    mean per-task accuracy against the number of zipped groups, next to the permutation-based merges."""
    groups = max((int(r["groups"]) for r in rows), default=0)
    full_zip = [r for r in rows if r["method"] == "zipit" and r["zipped_groups"] == groups]
    methods: list[tuple[str, str, Any]] = [
        ("model_a", f"model A (classes {_classes(tasks[0])})", None),
        ("model_b", f"model B (classes {_classes(tasks[1])})", None),
        ("ensemble", "ensemble", None),
        ("average", "average (no alignment)", None),
        ("weight_matching", "weight matching + avg", None),
        ("activation_matching", "activation matching + avg", None),
    ]
    if full_zip:
        methods.append(("zipit", "ZipIt! (full)", groups))
    methods.append(("zipit_across", "ZipIt! across models only", None))
    methods = [m for m in methods if _value(rows, m[0], "joint_accuracy", m[2]) is not None]
    labels = {
        "joint_accuracy": "joint (all classes)",
        "task_accuracy_0": f"task A ({_classes(tasks[0])})",
        "task_accuracy_1": f"task B ({_classes(tasks[1])})",
    }

    fig, (ax_bar, ax_line) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained", width_ratios=(1.5, 1))
    x = np.arange(len(methods))
    width = 0.8 / len(_BARS)
    for i, metric in enumerate(_BARS):
        vals = [_value(rows, m, metric, z) or (np.nan, 0.0) for m, _, z in methods]
        pos = x + (i - (len(_BARS) - 1) / 2) * width
        bars = ax_bar.bar(pos, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=2, label=labels[metric])
        if metric == "joint_accuracy":
            ax_bar.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax_bar.set_xticks(x, [label for _, label, _ in methods], rotation=25, ha="right")
    ax_bar.set_ylabel("test accuracy (%)")
    ax_bar.set_ylim(0, 122)
    ax_bar.set_yticks(range(0, 101, 20))
    ax_bar.set_title(f"merging methods ({data_text('test', n_test)})")
    ax_bar.legend(loc="upper center", ncol=3, fontsize=8)
    ax_bar.grid(axis="y", alpha=0.3)

    levels = sorted(int(r["zipped_groups"]) for r in rows if r["method"] == "zipit" and r["metric"] == "joint_accuracy")
    for metric, label, style in (
        ("joint_accuracy", "ZipIt!: joint", "-"),
        ("task_accuracy_mean", "ZipIt!: per-task mean", "--"),
    ):
        ks, ys, es = [], [], []
        start = _value(rows, "ensemble", metric)
        if start is not None:  # zipping nothing: the ensemble
            ks.append(0)
            ys.append(start[0])
            es.append(start[1])
        for k in levels:
            v = _value(rows, "zipit", metric, k)
            if v is not None:
                ks.append(k)
                ys.append(v[0])
                es.append(v[1])
        ax_line.errorbar(ks, ys, yerr=es, linestyle=style, capsize=2, label=label, color="C0", **POINTS)
    for method, label, color in (
        ("weight_matching", "weight matching + avg: joint", "C3"),
        ("activation_matching", "activation matching + avg: joint", "C2"),
    ):
        v = _value(rows, method, "joint_accuracy")
        if v is not None:
            ax_line.axhline(v[0], color=color, linestyle=":", label=label)
    ax_line.set_xlabel(f"groups zipped (0 = ensemble, {groups} = full zip)")
    ax_line.set_ylabel("test accuracy (%)")
    ax_line.set_xticks(range(0, groups + 1))
    ax_line.set_ylim(0, 122)
    ax_line.set_yticks(range(0, 101, 20))
    ax_line.set_title(f"partial zipping ({data_text('test', n_test)})")
    ax_line.legend(loc="upper center", ncol=2, fontsize=7)
    ax_line.grid(alpha=0.3)
    return figures.save_figure(fig, path, title)  # via the module: tests record every saved figure
