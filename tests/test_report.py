"""Every report figure checked by its content against the rows it was drawn from (tests/figures.py), from
the rows themselves and from their CSV; and the checks themselves fail when a series is missing or
drawn with other numbers."""

from __future__ import annotations

import csv
import itertools
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pytest

import figures as F
from lmclab.report import (
    SavedFigure,
    benko,
    ito,
    paths,
    predict,
    singh,
    training,
    write_csv,
    zipit,
)
from lmclab.report import figures as report_figures

LAMBDAS = [0.0, 0.25, 0.5, 0.75, 1.0]
EXAMPLES = {"train": 60000, "test": 10000}  # the evaluated examples of each split, written in the titles


def wave(*seed: float) -> Callable[[float], float]:
    """A deterministic, distinct smooth curve for each seed."""
    s = sum((i + 1) * 0.37 * v for i, v in enumerate(seed)) + 0.1
    return lambda x: round(1.0 + math.sin(3 * x + s) * (0.5 + s % 1) + 0.1 * s, 6)


# ------------------------------------------------------------------------------------ the tables


def path_rows() -> list[dict[str, Any]]:
    rows = [
        {
            "pair": pair,
            "path": name,
            "layers": "all",
            "split": split,
            "lambda": lam,
            "metric": metric,
            "value": wave(pair, i, j, m)(lam),
            "examples": EXAMPLES[split],
        }
        for pair in (0, 1)
        for i, name in enumerate(("naive", "weight-matched"))
        for j, split in enumerate(("train", "test"))
        for m, metric in enumerate(("loss", "accuracy", "error"))
        for lam in LAMBDAS
    ]
    rows[2]["value"] = math.nan  # one missing loss: left out of the mean, counted in the title
    return rows


def histories() -> dict[str, list[dict[str, Any]]]:
    out = {}
    for s in (0, 1):
        out[f"seed {s}"] = [
            {
                "epoch": e,
                "train_loss": wave(s, e)(0.1) + 0.5,
                "train_accuracy": wave(s, e)(0.2) / 3,
                **({"test_loss": wave(s, e)(0.3) + 0.5, "test_accuracy": wave(s, e)(0.4) / 3} if e % 2 == 0 else {}),
            }
            for e in range(5)
        ]
    return out


def loss_rows() -> list[dict[str, Any]]:
    rows = []
    for pair in (0, 1):
        for p, name in enumerate(("naive", "aligned")):
            for s, split in enumerate(("train", "test")):
                common = {"setting": "mlp_tiny", "pair": pair, "path": name, "split": split, "examples": 500 + s}
                rows += [
                    {
                        **common,
                        "lambda": lam,
                        "curve": "true",
                        "center": "",
                        "order": "",
                        "value": wave(pair, p, s)(lam),
                    }
                    for lam in LAMBDAS
                ]
                rows += [
                    {
                        **common,
                        "lambda": lam,
                        "curve": "taylor",
                        "center": c,
                        "order": k,
                        "value": wave(pair, p, s, k, ord(c))(lam),
                    }
                    for c in ("a", "b")
                    for k in (1, 2, 3)
                    for lam in LAMBDAS
                ]
    return rows


def example_rows() -> list[dict[str, Any]]:
    return [
        {"path": name, "input": 17, "label": 7, "class": c, "curve": curve, "lambda": lam, "value": wave(p, c, q)(lam)}
        for p, name in enumerate(("naive", "aligned"))
        for c in (7, 3)
        for q, curve in enumerate(("true", "direct", "a1", "a2", "b1", "b2"))
        for lam in LAMBDAS
    ]


def rmse_rows() -> list[dict[str, Any]]:
    return [
        {
            "pair": pair,
            "path": name,
            "approximation": approx,
            "lambda": lam,
            "rmse": abs(wave(pair, p, q)(lam)),
            "examples": 200,
        }
        for pair in (0, 1)
        for p, name in enumerate(("naive", "aligned"))
        for q, approx in enumerate(("direct", "a1", "a2", "b1", "b2"))
        for lam in LAMBDAS
    ]


METHODS = ("naive", "merge_many", "ste_mm")


def merged_rows() -> list[dict[str, Any]]:
    rows = []
    for m, method in enumerate(METHODS):
        for k in (2, 3, 4):
            for s, split in enumerate(("train", "test")):
                for q, metric in enumerate(("loss", "accuracy", "error")):
                    common = {
                        "setting": "mlp_tiny",
                        "method": method,
                        "k": k,
                        "split": split,
                        "metric": metric,
                        "examples": EXAMPLES[split],
                    }
                    rows.append({**common, "model": "merged", "member": "", "value": wave(m, k, s, q)(0.3)})
                    rows += [{**common, "model": "member", "member": i, "value": wave(i, s, q)(0.7)} for i in range(k)]
    rows[5]["value"] = math.nan  # a missing member value: left out of the members' mean
    return rows


def summary_rows() -> list[dict[str, Any]]:
    return [
        {
            "method": method,
            "k": k,
            "kind": "pairs",
            "split": split,
            "metric": metric,
            "definition": definition,
            "max": wave(m, k, s, q)(0.9) + 1,
            "mean": wave(m, k, s, q)(0.5),
            "std": 0.1 + 0.01 * k,
            "n": k * (k - 1) // 2,
            "n_missing": 0,
            "examples": EXAMPLES[split],
        }
        for m, method in enumerate(METHODS)
        for k in (2, 3, 4)
        for s, split in enumerate(("train", "test"))
        for q, metric in enumerate(("loss", "error"))
        for definition in ("barrier", "mean_barrier")
    ]


def trace_rows() -> list[dict[str, Any]]:
    rows = []
    for m, method in enumerate(METHODS):
        for k in (2, 3, 4):
            for kind in ("trace", "scale_aware_trace"):
                est = 10 + 5 * wave(m, k)(0.2)
                rows.append(
                    {
                        "method": method,
                        "k": k,
                        "kind": kind,
                        "estimate": est,
                        "ci_low": est - 1 - m,
                        "ci_high": est + 2,
                        "confidence": 0.95,
                        "split": "train",
                        "examples": 1000,
                    }
                )
    return rows


def pair_rows() -> list[dict[str, Any]]:
    rows = [
        {
            "method": method,
            "k": 4,
            "i": i,
            "j": j,
            "split": split,
            "metric": metric,
            "barrier": wave(m, i, j)(0.4),
            "examples": EXAMPLES[split],
        }
        for m, method in enumerate(METHODS)
        for i in range(4)
        for j in range(i + 1, 4)
        for split in ("train", "test")
        for metric in ("loss", "error")
    ]
    rows[3]["barrier"] = math.nan  # a diverged pair: n/a in its cells
    return rows


def segment_rows() -> list[dict[str, Any]]:
    return [
        {
            "setting": "mlp_tiny",
            "fork_epoch": fork,
            "pair": pair,
            "child_epoch": t,
            "metric": metric,
            "lambda": lam,
            "value": wave(fork, pair, t, q)(lam),
            "barrier": wave(fork, pair, t, q)(lam) - 1,
            "examples": 3000,
        }
        for fork in (0, 1)
        for pair in (0, 1)
        for t in [fork + 0.5 * i for i in range(4)]
        for q, metric in enumerate(("error", "loss"))
        for lam in LAMBDAS
    ]


def angle_rows() -> list[dict[str, Any]]:
    return [
        {"fork_epoch": fork, "pair": pair, "base": base, "angle_degrees": 30 + 10 * fork + pair + b}
        for fork in (0, 1, 2)
        for pair in (0, 1)
        for b, base in enumerate(("origin", "fork"))
    ]


def geometry_rows() -> list[dict[str, Any]]:
    return [
        {
            "fork_epoch": fork,
            "pair": pair,
            "child_epoch": t,
            "plane_cos": wave(fork, pair)(t) / 3,
            "distance": 2 + wave(pair, fork)(t),
        }
        for fork in (0, 1, 2)
        for pair in (0, 1)
        for t in (0.0, 1.0, 2.0, 3.0)
    ]


def prediction_rows() -> list[dict[str, Any]]:
    return [
        {
            "fork_epoch": fork,
            "pair": pair,
            "measured_max": 0.5 + 0.1 * fork + 0.01 * pair,
            "measured_bn_reset_max": math.nan,
            "predicted_max": 0.4 + 0.12 * fork,
            "examples": 3000,
        }
        for fork in (0, 1, 2)
        for pair in (0, 1)
    ]


def curve_rows() -> list[dict[str, Any]]:
    return [
        {
            "fork_epoch": fork,
            "pair": pair,
            "alpha": a,
            "measured": wave(fork, pair)(a) - 0.5,
            "predicted": wave(fork, pair, 1)(a) - 0.5,
        }
        for fork in (0, 1, 2)
        for pair in (0, 1)
        for a in LAMBDAS
    ]


LAYERS = ("layers.0.linear", "layers.1.linear", "head")


def layer_rows() -> list[dict[str, Any]]:
    return [
        {
            "fork_epoch": 0,
            "pair": 0,
            "layer_index": li,
            "layer": layer,
            "child_epoch": t,
            "layer_set_barrier_half": wave(li)(t) - 1,
            "predicted_half": wave(li, 1)(t) - 1,
            "distance": abs(wave(li, 2)(t)),
            "examples": 3000,
        }
        for li, layer in enumerate(LAYERS)
        for t in (0.0, 0.5, 1.0, 1.5)
    ]


def sum_rows() -> list[dict[str, Any]]:
    return [
        {"fork_epoch": 0, "pair": 0, "child_epoch": t, "quantity": q, "value": wave(i)(t) - 1}
        for i, q in enumerate(
            ("measured B(½)", "Prop. 1 at ½", "eq. 20: Σ all blocks", "Σ diagonal blocks", "Σ off-diagonal blocks")
        )
        for t in (0.0, 0.5, 1.0, 1.5)
    ]


def toy_rows() -> list[dict[str, Any]]:
    """Like lmclab.experiments.singh.toy_table: L(θ) = Π (θ − m_i)² and the segments between adjacent minima."""
    rows: list[dict[str, Any]] = []
    for name, minima in (("two minima", (-1.0, 1.0)), ("four minima", (-1.5, -0.5, 0.5, 1.5))):

        def loss(x: float, m: tuple[float, ...] = minima) -> float:
            return float(np.prod([(x - v) ** 2 for v in m]))

        rows += [
            {"landscape": name, "kind": "landscape", "theta": float(x), "loss": loss(x)} for x in np.linspace(-2, 2, 81)
        ]
        for a, b in itertools.pairwise(minima):
            curve = [loss((1 - t) * a + t * b) for t in LAMBDAS]
            rows += [
                {
                    "landscape": name,
                    "kind": "pair",
                    "pair": f"{a:g} → {b:g}",
                    "alpha": t,
                    "theta": (1 - t) * a + t * b,
                    "loss": v,
                    "predicted": 1.2 * t * (1 - t) * max(curve),
                    "barrier": max(curve),
                    "barrier_alpha": 0.5,
                }
                for t, v in zip(LAMBDAS, curve)
            ]
    return rows


def prediction_tables() -> tuple[list, list, list, list, np.ndarray]:
    curve = [{"alpha": a, "measured": wave(0)(a) - 0.5, "predicted": wave(1)(a) - 0.5} for a in LAMBDAS]
    layers = [
        {"layer": name, "layer_set_barrier_half": wave(i)(0.5) - 1, "predicted_half": wave(i, 1)(0.5) - 1}
        for i, name in enumerate(LAYERS)
    ]
    cumulative = [
        {"order": order, "k": k, "layer_set_barrier_half": wave(o, k)(0.5), "predicted_eq21": wave(o, k, 1)(0.5)}
        for o, order in enumerate(("shallow", "deep"))
        for k in (1, 2, 3)
    ]
    matrix = np.array([[wave(i, j)(0.1) - 1 for j in range(3)] for i in range(3)])
    return curve, layers, cumulative, list(LAYERS), matrix


def zipit_rows() -> list[dict[str, Any]]:
    """Summary rows of one setting and rule: every method, ZipIt! at 1 and 2 (= all) zipped groups."""
    metrics = ("joint_accuracy", "task_accuracy_0", "task_accuracy_1", "task_accuracy_mean")
    methods = [(m, "") for m in ("model_a", "model_b", "ensemble", "average", "weight_matching")]
    methods += [("activation_matching", ""), ("zipit", 1), ("zipit", 2), ("zipit_across", "")]
    return [
        {
            "setting": "s",
            "method": m,
            "zipped_groups": z,
            "groups": 2,
            "combine": "mean",
            "metric": metric,
            "mean": round(0.3 + 0.06 * i + 0.01 * j, 6),
            "sd": round(0.01 * (1 + j), 6),
            "pairs": 2,
        }
        for i, (m, z) in enumerate(methods)
        for j, metric in enumerate(metrics)
    ]


# ------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    plot: Callable[..., SavedFigure]
    check: Callable[..., None]
    tables: Callable[[], tuple]
    drop: Callable[[Mapping[str, Any]], bool]  # rows of the first table whose series a broken figure leaves out
    perturb: str  # a column of the first table: a broken figure draws other numbers there
    kwargs: Mapping[str, Any] | None = None


CASES = {
    "paths": Case(
        paths.plot_paths,
        F.check_paths,
        lambda: (path_rows(),),
        lambda r: r["path"] == "weight-matched" and r["split"] == "test",
        "value",
    ),
    "histories": Case(
        training.plot_histories,
        F.check_histories,
        lambda: (histories(),),
        lambda r: False,
        "",
        {"examples": EXAMPLES},
    ),
    "loss_approximations": Case(
        benko.plot_loss_approximations,
        F.check_loss_approximations,
        lambda: (loss_rows(),),
        lambda r: r["order"] == 3,
        "value",
    ),
    "logit_example": Case(
        benko.plot_logit_example,
        F.check_logit_example,
        lambda: (example_rows(),),
        lambda r: r["class"] == 3 and r["curve"] == "a2",
        "value",
    ),
    "logit_rmse": Case(
        benko.plot_logit_rmse, F.check_logit_rmse, lambda: (rmse_rows(),), lambda r: r["approximation"] == "b1", "rmse"
    ),
    "merged_vs_k": Case(
        ito.plot_merged_vs_k,
        F.check_merged_vs_k,
        lambda: (merged_rows(),),
        lambda r: r["method"] == "merge_many" and r["split"] == "test",
        "value",
    ),
    "barriers_vs_k": Case(
        ito.plot_barriers_vs_k,
        F.check_barriers_vs_k,
        lambda: (summary_rows(),),
        lambda r: r["method"] == "ste_mm" and r["metric"] == "error",
        "mean",
    ),
    "trace_vs_k": Case(
        ito.plot_trace_vs_k,
        F.check_trace_vs_k,
        lambda: (trace_rows(),),
        lambda r: r["method"] == "naive" and r["kind"] == "trace",
        "ci_high",
    ),
    "heatmaps": Case(
        ito.plot_heatmaps,
        F.check_heatmaps,
        lambda: (pair_rows(), 4),
        lambda r: r["method"] == "ste_mm",
        "barrier",
        {"split": "test", "metric": "error"},
    ),
    "segments": Case(
        singh.plot_segments,
        F.check_segments,
        lambda: (segment_rows(),),
        lambda r: r["fork_epoch"] == 1 and r["child_epoch"] == 2.0,
        "value",
        {"metric": "loss"},
    ),
    "geometry": Case(
        singh.plot_geometry,
        F.check_geometry,
        lambda: (angle_rows(), geometry_rows()),
        lambda r: r["fork_epoch"] == 2 and r["base"] == "fork",
        "angle_degrees",
    ),
    "barrier_predictions": Case(
        singh.plot_barrier_predictions,
        F.check_barrier_predictions,
        lambda: (prediction_rows(), curve_rows(), geometry_rows()),
        lambda r: r["fork_epoch"] == 1,
        "predicted_max",
    ),
    "layerwise": Case(
        singh.plot_layerwise,
        F.check_layerwise,
        lambda: (layer_rows(), sum_rows()),
        lambda r: r["layer"] == "head" and r["child_epoch"] == 1.0,
        "predicted_half",
    ),
    "toy_landscapes": Case(
        singh.plot_toy_landscapes,
        F.check_toy_landscapes,
        lambda: (toy_rows(),),
        lambda r: r["kind"] == "pair" and r["landscape"] == "two minima",
        "predicted",
    ),
    "zipit": Case(
        zipit.plot_zipit,
        F.check_zipit,
        lambda: (zipit_rows(),),
        lambda r: r["method"] == "zipit" and r["zipped_groups"] == 1,
        "mean",
        {"tasks": ((0, 1, 2, 3, 4), (5, 7)), "n_test": 1000},
    ),
    "predictions": Case(
        predict.plot_predictions,
        F.check_predictions,
        prediction_tables,
        lambda r: r["alpha"] == 1.0,
        "measured",
        {"split": "test", "examples": 1000},
    ),
}


def draw(case: Case, tmp_path: Path, tables: tuple, name: str = "f.png") -> SavedFigure:
    return case.plot(tmp_path / name, *tables, **(case.kwargs or {}))


def via_csv(tables: tuple, tmp_path: Path) -> tuple:
    """The tables as written to CSV and read back (strings; NaN as written)."""
    out: list[Any] = []
    for i, table in enumerate(tables):
        if isinstance(table, list) and table and isinstance(table[0], Mapping):
            write_csv(tmp_path / f"t{i}.csv", table)
            with open(tmp_path / f"t{i}.csv") as fh:
                table = list(csv.DictReader(fh))
        out.append(table)
    return tuple(out)


@pytest.mark.parametrize("name", CASES)
def test_figure_draws_its_table(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    tables = case.tables()
    saved = draw(case, tmp_path, tables)
    assert isinstance(saved, SavedFigure) and saved.path == tmp_path / "f.png"
    assert str(saved) == os.fspath(saved) == str(tmp_path / "f.png") and Path(saved) == saved.path
    assert saved.figure.number not in plt.get_fignums()  # closed, but still inspectable
    assert F.drawn(tmp_path / "f.png") is saved
    case.check(saved, *tables, **(case.kwargs or {}))
    case.check(saved, *via_csv(tables, tmp_path), **(case.kwargs or {}))


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.perturb])
def test_figure_checks_fail_on_a_missing_series_or_other_numbers(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    tables = case.tables()
    first, rest = tables[0], tables[1:]
    missing = [r for r in first if not case.drop(r)]
    assert 0 < len(missing) < len(first)
    with pytest.raises(AssertionError):
        case.check(draw(case, tmp_path, (missing, *rest), "missing.png"), *tables, **(case.kwargs or {}))
    other = [dict(r) for r in first if case.drop(r)]
    for r in other:
        r[case.perturb] = r[case.perturb] + 0.25
    changed = [r for r in first if not case.drop(r)] + other
    with pytest.raises(AssertionError):
        case.check(draw(case, tmp_path, (changed, *rest), "other.png"), *tables, **(case.kwargs or {}))


def test_history_checks_fail_on_a_missing_run_or_epoch(tmp_path: Path) -> None:
    full = histories()
    with pytest.raises(AssertionError):
        F.check_histories(training.plot_histories(tmp_path / "a.png", {"seed 0": full["seed 0"]}), full)
    with pytest.raises(AssertionError):
        F.check_histories(training.plot_histories(tmp_path / "b.png", {k: v[:-1] for k, v in full.items()}), full)


def test_paths_title_counts_missing_values(tmp_path: Path) -> None:
    saved = paths.plot_paths(tmp_path / "p.png", path_rows())
    loss, accuracy = saved.figure.axes
    data = "train, 60,000 examples; test, 10,000 examples"
    assert loss.get_title() == f"loss (1 non-finite values omitted)\n{data}"
    assert accuracy.get_title() == f"accuracy\n{data}"
    assert [t.get_text() for t in loss.get_xticklabels()] == ["Model A", "0.25", "0.5", "0.75", "Model B"]


def test_png_check_fails_on_a_wrong_size_or_a_blank_image(tmp_path: Path) -> None:
    from PIL import Image

    saved = paths.plot_paths(tmp_path / "p.png", path_rows())
    F.check_png(saved)
    with Image.open(saved.path) as image:
        size = image.size
    Image.new("RGB", size, "white").save(saved.path)
    with pytest.raises(AssertionError, match="uniform"):
        F.check_png(saved)
    Image.new("RGB", (size[0] - 1, size[1]), "black").save(saved.path)
    with pytest.raises(AssertionError):
        F.check_png(saved)


def test_content_checks_fail_without_markers_barriers_data_or_colour_bar_labels(tmp_path: Path) -> None:
    """The figure conventions are checked: markers at the evaluated λ, the barrier written on the curve
    (with the right value), the split and its number of examples in the title, labelled colour bars."""
    rows = path_rows()
    saved = paths.plot_paths(tmp_path / "p.png", rows)
    F.check_paths(saved, rows)
    ax = saved.figure.axes[0]
    ax.get_lines()[0].set_marker("None")
    with pytest.raises(AssertionError, match="no markers"):
        F.check_paths(saved, rows)
    saved = paths.plot_paths(tmp_path / "p.png", rows)
    note = next(t for t in saved.figure.axes[0].texts if t.get_text().startswith("barrier"))
    note.set_text("barrier 9.99")
    with pytest.raises(AssertionError, match="barriers written"):
        F.check_paths(saved, rows)
    with pytest.raises(AssertionError, match="60,000 examples"):  # the figure was told another count
        F.check_paths(paths.plot_paths(tmp_path / "q.png", rows, examples={"train": 600, "test": 10000}), rows)
    tables = prediction_tables()
    saved = predict.plot_predictions(tmp_path / "r.png", *tables, split="test", examples=1000)
    F.check_predictions(saved, *tables, split="test", examples=1000)
    with pytest.raises(AssertionError, match="test, 999 examples"):
        F.check_predictions(saved, *tables, split="test", examples=999)
    F.colorbars(saved)[0].set_ylabel("")
    with pytest.raises(AssertionError, match="colour bar without a label"):
        F.check_predictions(saved, *tables, split="test", examples=1000)


def test_png_check_finds_something_clipped_at_the_edge(tmp_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(3, 2), constrained_layout=True)
    ax.plot([0, 1], [0, 1])
    fig.text(1.0, 0.5, "a label running off the figure", ha="center")
    with pytest.raises(AssertionError, match="edge"):
        F.check_png(report_figures.save_figure(fig, tmp_path / "clipped.png"))
    long = "a title far longer than the figure is wide, which save_figure wraps instead of clipping it " * 2
    fig, ax = plt.subplots(figsize=(3, 2), constrained_layout=True)
    ax.plot([0, 1], [0, 1])
    F.check_png(report_figures.save_figure(fig, tmp_path / "wrapped.png", title=long))


def test_midpoint_is_none_off_the_grid_in_barrier_rows() -> None:
    """barrier_report (barriers.csv, --json, Ito's tables) reports no midpoint where λ = ½ was not evaluated."""
    from lmclab.paths import barrier_report, default_lambdas

    for points, has_half in ((4, False), (25, True)):
        rows = [
            {"path": "naive", "split": "test", "metric": "loss", "lambda": x, "value": 1 + x * (1 - x)}
            for x in default_lambdas(points)
        ]
        (row,) = barrier_report(rows)
        assert (row["midpoint"] is not None) == has_half
        if has_half:
            assert row["midpoint"] == pytest.approx(0.25)
