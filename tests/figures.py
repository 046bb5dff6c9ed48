"""Figures checked by their content: what each `lmclab.report` figure drew (lines, bars, images, labels,
legend entries), compared with the tidy rows it was drawn from, and the saved PNG decoded.

Every report function returns a `SavedFigure` (the path and the closed matplotlib Figure). Figures drawn
inside experiments are recorded by `record_figures` (installed for the whole session by conftest.py) and
found again by path with `drawn(path)`: a PNG's size or pixels would not tell which data it shows. Rows
may be the dicts given to the plot function or the same table read back from its CSV (strings; empty
cells are missing values): both give the same expected figure. The expected series are rebuilt here
from the rows directly, independently of the plotting code, so a figure missing a series, with a series
too many, or drawing other numbers fails (tests/test_report.py shows each check failing so).
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.contour import ContourSet
from PIL import Image

from lmclab.experiments.zipit import METHODS as ZIPIT_METHODS
from lmclab.report import figures as report_figures
from lmclab.report.figures import SavedFigure

Rows = Sequence[Mapping[str, Any]]
Series = tuple[str | None, Sequence[float], Sequence[float]]  # (legend label or None, x, y)

# ------------------------------------------------------------------------------------ recording

_SAVED: dict[Path, SavedFigure] = {}
# The most recent figures kept: a closed figure still holds its last renderer (~8 MB of RSS each). A test
# checks the figures its own module's experiment drew (conftest forgets them after each module).
KEEP = 16


def forget_figures() -> None:
    """Drop the recorded figures (conftest does at the end of each test module)."""
    _SAVED.clear()


def record_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrap `lmclab.report.figures.save_figure` (which every report module calls) to keep each figure saved."""
    real = report_figures.save_figure

    def recording(*args: Any, **kwargs: Any) -> SavedFigure:
        saved = real(*args, **kwargs)
        _SAVED.pop(saved.path.resolve(), None)
        _SAVED[saved.path.resolve()] = saved
        while len(_SAVED) > KEEP:
            del _SAVED[next(iter(_SAVED))]
        return saved

    monkeypatch.setattr(report_figures, "save_figure", recording)


def drawn(path: str | os.PathLike) -> SavedFigure:
    """The figure last saved at `path` (by this test module, among the last `KEEP` saved)."""
    key = Path(path).resolve()
    assert key in _SAVED, f"no figure saved at {path} is recorded"
    return _SAVED[key]


# ------------------------------------------------------------------------------------ generic checks


def num(v: Any) -> float:
    """A table cell as a float: empty cells and None are missing (NaN)."""
    return math.nan if v is None or v == "" else float(v)


def key(v: Any) -> str:
    """A grouping key that is the same for a value and its CSV text (0 and "0")."""
    return str(v)


def check_png(saved: SavedFigure) -> None:
    """The file decodes as a PNG of the figure's size in pixels at the saved dpi, and is not blank."""
    with Image.open(saved.path) as image:
        image.verify()
    with Image.open(saved.path) as image:
        image.load()
        assert image.format == "PNG"
        width, height = saved.figure.get_size_inches() * saved.dpi
        assert image.size == (round(width), round(height)), (image.size, width, height)
        grey = image.convert("L")
        low, high = grey.getextrema()
        assert high - low > 100, "the image is (nearly) uniform"
        w, h = grey.size
        frame = [
            grey.crop(box).getextrema()[0] for box in ((0, 0, w, 1), (0, h - 1, w, h), (0, 0, 1, h), (w - 1, 0, w, h))
        ]
        assert min(frame) >= 245, "something is drawn up to the image's edge (a clipped title, label or tick label)"
    check_inside(saved)


_INSIDE: weakref.WeakSet[Any] = weakref.WeakSet()  # figures check_inside already checked (a redraw is slow)


def check_inside(saved: SavedFigure, tolerance: float = 1.0) -> None:
    """No title, axis label or tick label reaches past the figure's edge (none is clipped)."""
    fig = saved.figure
    if fig in _INSIDE:
        return
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)  # closed: a new one
    canvas.draw()  # the layout as saved
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    texts: list[Any] = [fig.get_suptitle() and fig._suptitle]  # type: ignore[attr-defined]
    for ax in fig.axes:
        axes = [ax.xaxis, ax.yaxis, *([ax.zaxis] if hasattr(ax, "zaxis") else [])]
        texts += [ax.title, *(axis.label for axis in axes)]
        if not hasattr(ax, "zaxis"):  # (3-D tick labels are placed while drawing: the PNG frame check covers them)
            texts += [tick.label1 for axis in axes for tick in axis._update_ticks()]  # the ticks drawn (in view)
    for text in texts:
        if not text or not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        inside = (
            box.x0 >= -tolerance
            and box.y0 >= -tolerance
            and box.x1 <= width + tolerance
            and box.y1 <= height + tolerance
        )
        assert inside, f"{text.get_text()!r} is clipped: {box} outside the figure ({width} × {height})"
    _INSIDE.add(fig)


def assert_close(actual: Any, expected: Any, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=float),
        np.asarray(expected, dtype=float),
        rtol=1e-9,
        atol=1e-12,
        equal_nan=True,
        err_msg=what,
    )


def _label(artist: Any) -> str | None:
    label = artist.get_label()
    return None if label is None or str(label).startswith("_") else str(label)


def lines(ax: Axes, exclude: Iterable[Any] = ()) -> list[Any]:
    skip = {id(a) for a in exclude}
    return [line for line in ax.get_lines() if id(line) not in skip]


def assert_lines(ax: Axes, expected: Sequence[Series], where: str, exclude: Iterable[Any] = ()) -> None:
    """The lines of `ax` (in drawing order, those in `exclude` left out) are exactly `expected`: same count,
    labels (None: not in the legend) and x/y data."""
    actual = lines(ax, exclude)
    got = [_label(line) for line in actual]
    want = [label for label, _, _ in expected]
    assert len(actual) == len(expected), f"{where}: drew {len(actual)} line(s) {got}, expected {len(expected)} {want}"
    for line, (label, x, y) in zip(actual, expected):
        assert _label(line) == label, f"{where}: line {_label(line)!r}, expected {label!r}"
        assert_close(line.get_xdata(), x, f"{where}: x of {label!r}")
        assert_close(line.get_ydata(), y, f"{where}: y of {label!r}")


def legend_labels(owner: Any) -> list[str]:
    """Texts of the legend of an Axes or of a Figure's (first) legend."""
    legend = owner.get_legend() if isinstance(owner, Axes) else (owner.legends[0] if owner.legends else None)
    assert legend is not None, "no legend"
    return [t.get_text() for t in legend.get_texts()]


def panels(saved: SavedFigure, n: int) -> list[Axes]:
    """The n panels (axes in creation order: row by row), colour bars left out; there are no others."""
    axes = [ax for ax in saved.figure.axes if ax.get_label() != "<colorbar>"]
    assert len(axes) == n, f"{len(axes)} panels, expected {n}"
    assert saved.figure.axes[:n] == axes, "colour bars before panels"
    return axes


def colorbars(saved: SavedFigure) -> list[Axes]:
    return [ax for ax in saved.figure.axes if ax.get_label() == "<colorbar>"]


def assert_colorbars_labelled(saved: SavedFigure, n: int) -> None:
    """Exactly n colour bars, each with a non-empty label."""
    bars = colorbars(saved)
    assert len(bars) == n, f"{len(bars)} colour bars, expected {n}"
    for bar in bars:
        assert (bar.get_ylabel() or bar.get_xlabel()).strip(), "a colour bar without a label"


def assert_markers(line: Any, where: str) -> None:
    """The line marks its data points (the evaluated λ), not only joins them."""
    assert line.get_marker() not in (None, "", "None", " "), f"{where}: no markers at the evaluated points"


def examples_by_split(rows: Rows, column: str = "examples") -> dict[str, int | None]:
    """The number of examples of each split as the rows give it (None where they do not)."""
    out: dict[str, int | None] = {}
    for r in rows:
        split = key(r.get("split", "train"))
        v = num(r.get(column))
        if out.get(split) is None:
            out[split] = None if not math.isfinite(v) else int(v)
    return out


def assert_data_title(text: str, split: str, n: int | None, where: str) -> None:
    """A title naming the split and, where known, its number of examples (as "10,000 examples")."""
    assert split in text, f"{where}: title {text!r} does not name the split {split!r}"
    if n is not None:
        assert f"{split}, {n:,} examples" in text, f"{where}: title {text!r} lacks '{split}, {n:,} examples'"


def expected_barrier_text(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]], metric: str = "loss"
) -> str | None:
    """The barrier written on a curve, rebuilt by hand: max_λ v(λ) − [(1−λ)v(0) + λv(1)] of each complete
    curve (accuracy: of −accuracy), mean (3 significant digits) ± SD (2) over curves."""
    sign = -1.0 if metric == "accuracy" else 1.0
    found = []
    for lam, values in curves:
        x, v = np.asarray(lam, dtype=float), sign * np.asarray(values, dtype=float)
        if len(v) >= 2 and np.isfinite(v).all():
            found.append(float(np.max(v - ((1 - x) * v[0] + x * v[-1]))))
    if not found:
        return None
    return f"barrier {np.mean(found):.3g}" + (f" ± {np.std(found):.2g}" if len(found) > 1 else "")


def assert_barriers_written(ax: Axes, expected: Sequence[str | None], where: str) -> None:
    """The annotations of `ax` are the expected barrier texts (None: a curve without one), each at a point
    of a drawn line."""
    notes = [t for t in ax.texts if type(t).__name__ == "Annotation"]
    want = sorted(e for e in expected if e is not None)
    got = sorted(t.get_text().split(" (")[0] for t in notes)
    assert got == want, f"{where}: barriers written {got}, expected {want}"
    points = [
        (float(x), float(y))
        for line in ax.get_lines()
        for x, y in zip(np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float))
    ]
    for t in notes:
        x, y = map(float, t.xy)
        assert any(abs(x - a) < 1e-12 and abs(y - b) <= 1e-12 + 1e-9 * abs(b) for a, b in points), (
            f"{where}: {t.get_text()!r} at {(x, y)} is not on a drawn curve"
        )


def mean_by(
    rows: Rows, x: str, y: str, group: Callable[[Mapping[str, Any]], Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """x values (sorted) and the mean over groups (pairs) of y at each x, missing values left out; NaN
    where none is finite. Within a group the last row at an x counts."""
    table: dict[float, dict[Any, float]] = {}
    for i, r in enumerate(rows):
        table.setdefault(num(r[x]), {})[group(r) if group else i] = num(r[y])
    xs = sorted(table)
    ys = []
    for v in xs:
        finite = [u for u in table[v].values() if math.isfinite(u)]
        ys.append(sum(finite) / len(finite) if finite else math.nan)
    return np.array(xs, dtype=float), np.array(ys, dtype=float)


def by_pair(r: Mapping[str, Any]) -> str:
    return key(r.get("pair", 0))


def _order(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


# ------------------------------------------------------------------------------------ paths, training


def check_paths(
    saved: SavedFigure,
    rows: Rows,
    metrics: Sequence[str] = ("loss", "accuracy"),
    endpoint_labels: tuple[str, str] = ("Model A", "Model B"),
    examples: Mapping[str, int] | None = None,
) -> None:
    """plot_paths: one panel per metric, a line per path × split (mean over pairs) with a marker at every
    λ, each line's barrier (mean ± SD over pairs) written on it; the panel title names every split and
    its number of examples (the rows' ``examples`` column, or `examples`)."""
    check_png(saved)
    paths, splits = _order(r.get("path", "path") for r in rows), _order(r["split"] for r in rows)
    counts = examples_by_split(rows)
    counts.update(examples or {})
    for ax, metric in zip(panels(saved, len(metrics)), metrics, strict=True):
        expected: list[Series] = []
        written: list[str | None] = []
        for name in paths:
            for split in splits:
                sel = [
                    r for r in rows if r.get("path", "path") == name and r["split"] == split and r["metric"] == metric
                ]
                if sel:
                    n = len({by_pair(r) for r in sel})
                    lam, mean = mean_by(sel, "lambda", "value", by_pair)
                    expected.append((f"{name} {split}" + (f" (n={n})" if n > 1 else ""), lam, mean))
                    curves = [
                        mean_by([r for r in sel if by_pair(r) == p], "lambda", "value")
                        for p in _order(by_pair(r) for r in sel)
                    ]
                    written.append(expected_barrier_text(curves, metric))
        assert expected, f"no rows for {metric}"
        assert_lines(ax, expected, f"paths {metric}")
        for line in ax.get_lines():
            assert_markers(line, f"paths {metric}")
        assert_barriers_written(ax, written, f"paths {metric}")
        assert legend_labels(ax) == [label for label, _, _ in expected]
        assert ax.get_xlabel() == "λ" and ax.get_ylabel() == metric and ax.get_title().startswith(metric)
        for split in splits:
            assert_data_title(ax.get_title(), split, counts.get(split), f"paths {metric}")
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks[0] == endpoint_labels[0] and ticks[-1] == endpoint_labels[1]


def check_histories(
    saved: SavedFigure,
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    examples: Mapping[str, int] | None = None,
) -> None:
    """plot_histories: loss and accuracy panels; per run a train line and (where logged) a test line, the
    legend saying the train values are running means over the epoch and the test values end-of-epoch
    evaluations; with `examples`, the titles give each split's number of examples."""
    check_png(saved)
    for ax, metric in zip(panels(saved, 2), ("loss", "accuracy"), strict=True):
        expected: list[Series] = []
        for label, history in histories.items():
            expected.append(
                (
                    f"{label} train (running mean over the epoch)",
                    [h["epoch"] for h in history],
                    [h[f"train_{metric}"] for h in history],
                )
            )
            test = [h for h in history if f"test_{metric}" in h]
            if test:
                expected.append(
                    (
                        f"{label} test (evaluated at epoch end)",
                        [h["epoch"] for h in test],
                        [h[f"test_{metric}"] for h in test],
                    )
                )
        assert_lines(ax, expected, f"histories {metric}")
        for line in ax.get_lines():
            assert_markers(line, f"histories {metric}")
        assert legend_labels(ax) == [label for label, _, _ in expected]
        assert ax.get_xlabel() == "epoch" and ax.get_title().split("\n")[0] == metric
        for split, n in (examples or {}).items():
            assert_data_title(ax.get_title(), split, n, f"histories {metric}")


# ------------------------------------------------------------------------------------ Benkő

BENKO_PATHS = {"naive": "naive: θ_A → θ_B", "aligned": "weight-matched: θ_A → π(θ_B)"}


def _halves(label: str | None, lam: np.ndarray, y: np.ndarray, center: str) -> list[Series]:
    """An approximation centred at A (B) is drawn solid for λ ≤ ½ (≥ ½) and faded on the rest (½ in both)."""
    near = lam <= 0.5 if center == "a" else lam >= 0.5
    far = ~near | (lam == 0.5)
    return [(label, lam[near], y[near]), (None, lam[far], y[far])]


def check_loss_approximations(saved: SavedFigure, rows: Rows) -> None:
    """Benkő Figs 1–6: a panel per split × path with the true loss (mean over pairs) and each Taylor
    order centred at A and at B."""
    check_png(saved)
    splits = _order(r["split"] for r in rows)
    paths = [p for p in BENKO_PATHS if any(r["path"] == p for r in rows)]
    orders = sorted({int(num(r["order"])) for r in rows if r["curve"] == "taylor"})
    assert splits and paths and orders
    counts = examples_by_split(rows)
    axes = panels(saved, len(splits) * len(paths))
    for i, split in enumerate(splits):
        for j, name in enumerate(paths):
            ax = axes[i * len(paths) + j]
            sel = [r for r in rows if r["split"] == split and r["path"] == name]
            lam, mean = mean_by([r for r in sel if r["curve"] == "true"], "lambda", "value", by_pair)
            expected: list[Series] = [("true loss", lam, mean)]
            for center in ("a", "b"):
                for k in orders:
                    approx = [
                        r for r in sel if r["curve"] == "taylor" and r["center"] == center and int(num(r["order"])) == k
                    ]
                    expected += _halves(
                        f"order {k}, centred at {center.upper()}", *mean_by(approx, "lambda", "value", by_pair), center
                    )
            assert_lines(ax, expected, f"loss {split} {name}")
            assert_markers(lines(ax)[0], f"true loss {split} {name}")
            true = [r for r in sel if r["curve"] == "true"]
            curves = [
                mean_by([r for r in true if by_pair(r) == p], "lambda", "value") for p in _order(map(by_pair, true))
            ]
            assert_barriers_written(ax, [expected_barrier_text(curves)], f"loss {split} {name}")
            assert ax.get_xlabel() == "λ" and ax.get_ylabel() == f"{split} loss"
            n = counts.get(split)
            assert ax.get_title() == f"{BENKO_PATHS[name]}\n{split}" + (f", {n:,} examples" if n is not None else "")
    assert legend_labels(axes[len(paths) - 1]) == ["true loss"] + [
        f"order {k}, centred at {c.upper()}" for c in ("a", "b") for k in orders
    ]


def check_logit_example(saved: SavedFigure, rows: Rows) -> None:
    """Benkő Fig. 7: per path, each class's logit along λ, its direct interpolation and the linear and
    quadratic approximations centred at A and B."""
    check_png(saved)
    paths = [p for p in BENKO_PATHS if any(r["path"] == p for r in rows)]
    assert paths
    for ax, name in zip(panels(saved, len(paths)), paths, strict=True):
        sel = [r for r in rows if r["path"] == name]
        expected: list[Series] = []
        for c in _order(key(r["class"]) for r in sel):
            for curve in _order(r["curve"] for r in sel):
                pts = sorted(
                    (num(r["lambda"]), num(r["value"])) for r in sel if key(r["class"]) == c and r["curve"] == curve
                )
                lam, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
                if curve in ("true", "direct"):
                    expected.append((None, lam, y))
                elif curve[1:] in ("1", "2"):
                    expected += _halves(None, lam, y, curve[0])
        assert_lines(ax, expected, f"logits {name}")
        for line in ax.get_lines():
            if line.get_linewidth() == 2.4:  # the true logits, evaluated at each λ
                assert_markers(line, f"logits {name}")
        assert ax.get_ylabel() == "logit"
        assert f"test input {sel[0]['input']} (label {sel[0]['label']}, 1 example)" in ax.get_title()
    assert legend_labels(saved.figure.axes[len(paths) - 1]) == [
        "z_k(θ_λ)",
        "(1−λ)z(θ_A) + λz(θ_B)",
        "linear, centred at A",
        "quadratic, centred at A",
        "linear, centred at B",
        "quadratic, centred at B",
    ]


def check_logit_rmse(saved: SavedFigure, rows: Rows) -> None:
    """Benkő Fig. 8: per path, the RMSE of each approximation along λ (mean over pairs)."""
    check_png(saved)
    paths = [p for p in BENKO_PATHS if any(r["path"] == p for r in rows)]
    assert paths
    for ax, name in zip(panels(saved, len(paths)), paths, strict=True):
        sel = [r for r in rows if r["path"] == name]
        expected: list[Series] = []
        for approx in _order(r["approximation"] for r in sel):
            label = (
                "direct interpolation"
                if approx == "direct"
                else f"order {int(approx[1:])}, centred at {approx[0].upper()}"
            )
            expected.append(
                (label, *mean_by([r for r in sel if r["approximation"] == approx], "lambda", "rmse", by_pair))
            )
        assert_lines(ax, expected, f"rmse {name}")
        for line in ax.get_lines():
            assert_markers(line, f"rmse {name}")
        n = examples_by_split([{**r, "split": "test"} for r in sel]).get("test")
        assert ax.get_title() == f"{BENKO_PATHS[name]}\ntest" + (f", {n:,} examples" if n is not None else "")
        if ax is saved.figure.axes[len(paths) - 1]:
            assert legend_labels(ax) == [label for label, _, _ in expected]


# ------------------------------------------------------------------------------------ Ito et al.


def _ito_splits(rows: Rows) -> list[str]:
    present = _order(r["split"] for r in rows)
    return [s for s in ("train", "test") if s in present] + [s for s in present if s not in ("train", "test")]


def _method_styles() -> Mapping[str, Mapping[str, Any]]:
    """Ito's method colours and labels (imported here, not when conftest imports this module)."""
    from lmclab.report.ito import METHOD_STYLE

    return METHOD_STYLE


def _ito_methods(rows: Rows) -> list[str]:
    METHOD_STYLE = _method_styles()
    present = _order(r["method"] for r in rows)
    return [m for m in METHOD_STYLE if m in present] + [m for m in present if m not in METHOD_STYLE]


def _method_label(method: str) -> str:
    METHOD_STYLE = _method_styles()
    return METHOD_STYLE[method]["label"] if method in METHOD_STYLE else method


def check_merged_vs_k(saved: SavedFigure, rows: Rows, metrics: Sequence[str] = ("loss", "accuracy")) -> None:
    """Ito: per metric × split, the members' mean at each K (grey) and each method's merged model."""
    check_png(saved)
    splits, methods = _ito_splits(rows), _ito_methods(rows)
    axes = panels(saved, len(metrics) * len(splits))
    first: list[str | None] = []
    for a, metric in enumerate(metrics):
        for b, split in enumerate(splits):
            sel = [r for r in rows if r["split"] == split and r["metric"] == metric]
            members = [r for r in sel if r["model"] == "member"]
            expected: list[Series] = []
            if members:
                expected.append(
                    ("individual models (mean, min–max)", *mean_by(members, "k", "value", lambda r: key(r["member"])))
                )
            for method in methods:
                merged = [r for r in sel if r["method"] == method and r["model"] == "merged"]
                if merged:
                    expected.append((_method_label(method), *mean_by(merged, "k", "value")))
            ax = axes[a * len(splits) + b]
            assert_lines(ax, expected, f"merged {metric} {split}")
            assert ax.get_ylabel() == f"{split} {metric}" and ax.get_xlabel() == "number of models K"
            assert_data_title(ax.get_title(), split, examples_by_split(rows).get(split), f"merged {metric}")
            first = first or [label for label, _, _ in expected]
    assert legend_labels(saved.figure) == first


def _errorbars(ax: Axes) -> list[ErrorbarContainer]:
    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def _assert_errorbar(
    container: ErrorbarContainer, ks: np.ndarray, y: np.ndarray, low: np.ndarray, high: np.ndarray, where: str
) -> None:
    """Markers at y, dodged around each K (never by ½ or more), bars from low to high."""
    line, _, (bars, *_) = container
    x = np.asarray(line.get_xdata(), dtype=float)
    assert len(x) == len(ks) and np.all(np.abs(x - ks) < 0.5), f"{where}: x {x}, K {ks}"
    assert_close(line.get_ydata(), y, f"{where}: y")
    segments = bars.get_segments()
    finite = np.isfinite(low) & np.isfinite(high)
    assert len(segments) == len(ks), f"{where}: {len(segments)} error bars for {len(ks)} K"
    ends = np.array([[s[0][1], s[1][1]] if len(s) else [np.nan, np.nan] for s in segments], dtype=float)
    assert_close(np.sort(ends, axis=1)[finite], np.stack([low, high], 1)[finite], f"{where}: error bars")


def check_barriers_vs_k(
    saved: SavedFigure, rows: Rows, definition: str = "barrier", metrics: Sequence[str] = ("loss", "error")
) -> None:
    """Ito: per metric × split and method, the mean over pairs ± SD (error bars) and the max (dashed) vs K."""
    check_png(saved)
    rows = [r for r in rows if r["definition"] == definition]
    splits, methods = _ito_splits(rows), _ito_methods(rows)
    axes = panels(saved, len(metrics) * len(splits))
    for a, metric in enumerate(metrics):
        for b, split in enumerate(splits):
            ax, where = axes[a * len(splits) + b], f"barriers {metric} {split}"
            sel = [r for r in rows if r["split"] == split and r["metric"] == metric]
            bars = _errorbars(ax)
            present = [m for m in methods if any(r["method"] == m for r in sel)]
            assert len(bars) == len(present), f"{where}: {len(bars)} error-bar series for methods {present}"
            drawn_lines: list[Any] = []
            expected_max: list[Series] = []
            for container, method in zip(bars, present):
                mine = sorted(
                    (num(r["k"]), num(r["mean"]), num(r["std"]), num(r["max"])) for r in sel if r["method"] == method
                )
                ks, mean, std, top = (np.array(c, dtype=float) for c in zip(*mine))
                _assert_errorbar(container, ks, mean, mean - std, mean + std, f"{where} {method}")
                drawn_lines += [container.lines[0], *container.lines[1]]
                expected_max.append((None, container.lines[0].get_xdata(), top))
            zero = [line for line in lines(ax, drawn_lines) if list(line.get_ydata()) == [0.0, 0.0]]
            assert len(zero) == 1, f"{where}: the zero line"
            assert_lines(ax, expected_max, f"{where} (max)", exclude=[*drawn_lines, *zero])
            assert ax.get_ylabel() == f"{split} {metric} barrier"
            assert ax.get_title().startswith(f"{definition} ({metric}, {split})")
            assert_data_title(ax.get_title(), split, examples_by_split(rows).get(split), where)
    assert legend_labels(saved.figure) == [_method_label(m) for m in methods] + ["mean ± SD", "max"]


def check_trace_vs_k(saved: SavedFigure, rows: Rows) -> None:
    """Ito: per trace kind, each method's estimate vs K with its confidence interval."""
    check_png(saved)
    kinds = [k for k in ("trace", "scale_aware_trace") if any(r["kind"] == k for r in rows)]
    methods = _ito_methods(rows)
    for ax, kind in zip(panels(saved, len(kinds)), kinds, strict=True):
        sel = [r for r in rows if r["kind"] == kind]
        present = [m for m in methods if any(r["method"] == m for r in sel)]
        bars = _errorbars(ax)
        assert [c.get_label() for c in bars] == [_method_label(m) for m in present], f"trace {kind}"
        for container, method in zip(bars, present):
            mine = sorted(
                (num(r["k"]), num(r["estimate"]), num(r["ci_low"]), num(r["ci_high"]))
                for r in sel
                if r["method"] == method
            )
            ks, est, low, high = (np.array(c, dtype=float) for c in zip(*mine))
            _assert_errorbar(container, ks, est, low, high, f"trace {kind} {method}")
        for split, n in examples_by_split([r for r in sel if r.get("split") not in (None, "")]).items():
            assert_data_title(ax.get_title(), split, n, f"trace {kind}")
    assert legend_labels(saved.figure) == [c.get_label() for c in _errorbars(saved.figure.axes[0])]


def pair_matrix(rows: Rows, k: int, split: str, metric: str, definition: str) -> np.ndarray:
    """The K × K matrix of pair rows (i < j), symmetric, zero diagonal, NaN where missing."""
    assert definition != "argmax_lambda", "not rebuilt here"
    m = np.full((k, k), np.nan)
    np.fill_diagonal(m, 0.0)
    for r in rows:
        if r["split"] == split and r["metric"] == metric:
            i, j = int(num(r["i"])), int(num(r["j"]))
            m[i, j] = m[j, i] = num(r[definition])
    return m


def check_heatmaps(
    saved: SavedFigure, rows: Rows, k: int, split: str = "test", metric: str = "loss", definition: str = "barrier"
) -> None:
    """Ito: per method the K × K matrix of pair barriers, each value written in its cell ("n/a" if missing)."""
    check_png(saved)
    methods = _ito_methods(rows)
    for ax, method in zip(panels(saved, len(methods)), methods, strict=True):
        expected = pair_matrix([r for r in rows if r["method"] == method], k, split, metric, definition)
        images = ax.get_images()
        assert len(images) == 1, f"heat map {method}: {len(images)} images"
        assert_close(
            np.ma.filled(np.ma.asarray(images[0].get_array(), dtype=float), np.nan), expected, f"heat map {method}"
        )
        texts = [t.get_text() for t in ax.texts]
        assert texts == ["n/a" if not np.isfinite(v) else f"{v:.3g}" for v in expected.flat]
        n = examples_by_split([r for r in rows if r["split"] == split]).get(split)
        assert ax.get_title() == f"{_method_label(method)}\n{split}" + (f", {n:,} examples" if n is not None else "")
    assert_colorbars_labelled(saved, 1)
    colorbar = saved.figure.axes[len(methods)]
    assert colorbar.get_ylabel() == f"{split} {metric} {definition}"


# ------------------------------------------------------------------------------------ Singh et al.


def _forks(rows: Rows) -> list[int]:
    return sorted({int(num(r["fork_epoch"])) for r in rows})


def check_segments(saved: SavedFigure, rows: Rows, metric: str = "error") -> None:
    """Singh Figs 1 / 10: per fork, a 3-D curve of `metric` (top) and of its barrier version (bottom) along
    the segment between siblings at each child epoch (pair 0)."""
    check_png(saved)
    rows = [r for r in rows if r["metric"] == metric and int(num(r.get("pair", 0))) == 0]
    forks = _forks(rows)
    assert forks
    n = examples_by_split([{**r, "split": "train"} for r in rows]).get("train")
    axes = panels(saved, 2 * len(forks))
    for i, epoch in enumerate(forks):
        sel = [r for r in rows if int(num(r["fork_epoch"])) == epoch]
        epochs = sorted({num(r["child_epoch"]) for r in sel})
        for j, column in enumerate(("value", "barrier")):
            ax = axes[2 * i + j]  # created fork by fork, top then bottom
            assert len(ax.get_lines()) == len(epochs), f"segments fork {epoch} {column}"
            for line, t in zip(ax.get_lines(), epochs):
                lam, z = mean_by([r for r in sel if num(r["child_epoch"]) == t], "lambda", column)
                x, y, zz = line.get_data_3d()
                assert_close(x, lam, f"fork {epoch}, epoch {t}: α")
                assert_close(y, np.full_like(lam, t), f"fork {epoch}: child epoch")
                assert_close(zz, z, f"fork {epoch}, epoch {t}: {column}")
                assert_markers(line, f"segments fork {epoch}")
            assert ax.get_ylabel() == "child epoch" and metric in ax.get_zlabel()
            assert str(epoch) in ax.get_title()
            assert_data_title(ax.get_title(), "train", n, f"segments fork {epoch}")


def _bars(ax: Axes) -> tuple[np.ndarray, np.ndarray]:
    """Centres and heights of the bars of `ax`."""
    return (
        np.array([p.get_x() + p.get_width() / 2 for p in ax.patches]),
        np.array([p.get_height() for p in ax.patches]),
    )


def check_geometry(saved: SavedFigure, angles: Rows, geometry: Rows) -> None:
    """Singh Figs 2 / 13: bars of the sibling angle per fork (base origin, base fork point); the
    solution-plane cosine over child epochs per fork."""
    check_png(saved)
    axes = panels(saved, 3)
    for ax, base in zip(axes[:2], ("origin", "fork")):
        sel = [r for r in angles if r["base"] == base]
        forks, values = mean_by(sel, "fork_epoch", "angle_degrees")
        finite = np.isfinite(values)
        positions, heights = _bars(ax)
        assert_close(positions, np.arange(len(forks))[finite], f"angle bars ({base})")
        assert_close(heights, values[finite], f"angles ({base})")
        assert [t.get_text() for t in ax.get_xticklabels()] == [str(int(f)) for f in forks]
        assert [t.get_text() for t in ax.texts if t.get_text() != "no data"] == [
            f"{v:.3g}°" if ok else "n/a" for v, ok in zip(values, finite)
        ]
    expected = [
        (f"fork {e}", *mean_by([r for r in geometry if int(num(r["fork_epoch"])) == e], "child_epoch", "plane_cos"))
        for e in _forks(geometry)
    ]
    assert_lines(axes[2], expected, "solution plane")
    if expected:
        assert legend_labels(axes[2]) == [label for label, _, _ in expected]


def check_barrier_predictions(saved: SavedFigure, predictions: Rows, curves: Rows, geometry: Rows) -> None:
    """Singh Figs 4 / 14: measured and predicted barrier per fork; whole curves; sibling distance."""
    check_png(saved)
    axes = panels(saved, 3)
    forks = _forks(predictions)
    bn_reset = any(math.isfinite(num(r.get("measured_bn_reset_max"))) for r in predictions)
    series = [
        ("measured_max", "measured (interpolated BN statistics)" if bn_reset else "measured"),
        ("measured_bn_reset_max", "measured (BN statistics reset)"),
        ("predicted_max", "Prop. 1 prediction"),
    ]
    expected: list[Series] = []
    for k, (column, label) in enumerate(series):
        values = np.array(
            [
                mean_by([r for r in predictions if int(num(r["fork_epoch"])) == f], "fork_epoch", column)[1][0]
                for f in forks
            ]
        )
        finite = np.isfinite(values)
        if finite.any():
            expected.append((label, np.arange(len(forks))[finite] + (k - 1) * 0.08, values[finite]))
    assert_lines(axes[0], expected, "predicted vs measured")
    expected = []
    for e in forks:
        sel = [r for r in curves if int(num(r["fork_epoch"])) == e]
        expected += [
            (f"fork {e}: measured", *mean_by(sel, "alpha", "measured")),
            (f"fork {e}: Prop. 1", *mean_by(sel, "alpha", "predicted")),
        ]
    assert_lines(axes[1], expected, "barrier curves")
    written = []
    for e in forks:
        sel = [r for r in curves if int(num(r["fork_epoch"])) == e]
        assert_markers(lines(axes[1])[2 * forks.index(e)], f"measured curve, fork {e}")
        written.append(
            expected_barrier_text(
                [mean_by([r for r in sel if by_pair(r) == p], "alpha", "measured") for p in _order(map(by_pair, sel))]
            )
        )
    assert_barriers_written(axes[1], written, "barrier curves")
    n = examples_by_split([{**r, "split": "train"} for r in [*predictions, *curves]]).get("train")
    for ax in axes[:2]:
        assert_data_title(ax.get_title(), "train", n, "barrier predictions")
    expected = [
        (f"fork {e}", *mean_by([r for r in geometry if int(num(r["fork_epoch"])) == e], "child_epoch", "distance"))
        for e in _forks(geometry)
    ]
    assert_lines(axes[2], expected, "sibling distance")


def layer_grid(rows: Rows, column: str) -> np.ndarray:
    layers = [name for _, name in sorted({(int(num(r["layer_index"])), r["layer"]) for r in rows})]
    epochs = sorted({num(r["child_epoch"]) for r in rows})
    grid = np.full((len(layers), len(epochs)), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), epochs.index(num(r["child_epoch"]))] = num(r[column])
    return grid


def check_layerwise(saved: SavedFigure, rows: Rows, sums: Rows) -> None:
    """Singh Figs 5, 15–20: heat maps (layer × child epoch) of the measured layer barrier, Prop. 2's
    prediction and the layer distance; the cross-block sums over child epochs."""
    check_png(saved)
    axes = panels(saved, 4)
    n = examples_by_split([{**r, "split": "train"} for r in [*rows, *sums]]).get("train")
    maps = 0
    for ax, column in zip(axes[:3], ("layer_set_barrier_half", "predicted_half", "distance")):
        grid = layer_grid(rows, column)
        images = ax.get_images()
        if column != "distance":
            assert_data_title(ax.get_title(), "train", n, f"layer-wise {column}")
        if not np.isfinite(grid).any():
            assert not images
            continue
        maps += 1
        assert len(images) == 1, column
        assert_close(np.ma.filled(np.ma.asarray(images[0].get_array(), dtype=float), np.nan), grid, column)
        layers = [name for _, name in sorted({(int(num(r["layer_index"])), r["layer"]) for r in rows})]
        assert [t.get_text() for t in ax.get_yticklabels()] == layers
    expected = [
        (q, *mean_by([r for r in sums if r["quantity"] == q], "child_epoch", "value"))
        for q in _order(r["quantity"] for r in sums)
    ]
    assert_colorbars_labelled(saved, maps)
    assert "layer-set barrier" in axes[0].get_title()  # Singh's B_P, not interpolate's layerwise_barrier
    zero = [line for line in axes[3].get_lines() if _label(line) is None and list(line.get_ydata()) == [0.0, 0.0]]
    assert len(zero) == 1
    assert_lines(axes[3], expected, "cross-block sums", exclude=zero)


def check_toy_landscapes(saved: SavedFigure, rows: Rows) -> None:
    """Singh Fig. 6: each toy landscape, Prop. 1's prediction between adjacent minima, the minima."""
    check_png(saved)
    names = _order(r["landscape"] for r in rows)
    for ax, name in zip(panels(saved, len(names)), names, strict=True):
        land = [r for r in rows if r["landscape"] == name]
        theta, loss = mean_by([r for r in land if r["kind"] == "landscape"], "theta", "loss")
        expected: list[Series] = [("L(θ)", theta, loss)]
        for pair in _order(r["pair"] for r in land if r["kind"] == "pair"):
            sel = sorted((r for r in land if r.get("pair") == pair), key=lambda r: num(r["theta"]))
            predicted = [num(r["predicted"]) for r in sel]
            expected.append(
                (
                    f"{pair}: Prop. 1 peak {max(predicted):.3g}, exact barrier {num(sel[0]['barrier']):.3g}",
                    [num(r["theta"]) for r in sel],
                    predicted,
                )
            )
        minima = sorted({num(r["theta"]) for r in land if r["kind"] == "pair" and num(r["alpha"]) in (0.0, 1.0)})
        expected.append(("minima", minima, [0.0] * len(minima)))
        assert_lines(ax, expected, f"toy {name}")
        assert legend_labels(ax) == [label for label, _, _ in expected] and ax.get_title() == name


# ------------------------------------------------------------------------------------ predictions


def check_predictions(
    saved: SavedFigure,
    curve: Rows,
    layers: Rows,
    cumulative: Rows,
    names: Sequence[str],
    matrix: Any,
    split: str = "test",
    examples: int | None = None,
) -> None:
    """Measured against predicted barriers: whole model (markers, the measured barrier written on it), per
    layer (bars of Singh's layer-set barrier), cumulative sets, cross-blocks (labelled colour bar); every
    panel names the split and its number of examples."""
    check_png(saved)
    axes = panels(saved, 4)
    for ax in axes:
        assert_data_title(ax.get_title(), split, examples, "predictions")
    assert_colorbars_labelled(saved, 1)
    alpha = [num(r["alpha"]) for r in curve]
    assert_markers(lines(axes[0])[0], "measured B(α)")
    assert_barriers_written(axes[0], [expected_barrier_text([(alpha, [num(r["measured"]) for r in curve])])], "whole")
    assert_lines(
        axes[0],
        [
            ("measured B(α)", alpha, [num(r["measured"]) for r in curve]),
            ("Prop. 1 prediction", alpha, [num(r["predicted"]) for r in curve]),
        ],
        "whole model",
    )
    widths = [p.get_width() for p in axes[1].patches]
    assert_close(
        widths,
        [num(r["layer_set_barrier_half"]) for r in layers] + [num(r["predicted_half"]) for r in layers],
        "layer bars",
    )
    assert [t.get_text() for t in axes[1].get_yticklabels()] == [r["layer"] for r in layers]
    expected: list[Series] = []
    for order in _order(r["order"] for r in cumulative):
        sel = [r for r in cumulative if r["order"] == order]
        k = [num(r["k"]) for r in sel]
        expected += [
            (f"{order}: measured B_P(½)", k, [num(r["layer_set_barrier_half"]) for r in sel]),
            (f"{order}: eq. 21", k, [num(r["predicted_eq21"]) for r in sel]),
        ]
    assert_lines(axes[2], expected, "cumulative")
    images = axes[3].get_images()
    assert len(images) == 1, "cross-blocks"
    assert_close(images[0].get_array(), matrix, "cross-blocks")
    assert [t.get_text() for t in axes[3].get_xticklabels()] == list(names)


# ------------------------------------------------------------------------------------ zipit


def _task_text(task: Sequence[int]) -> str:
    """Classes 0, 1, 2, 3, 4 as "0–4"; others (or two classes) listed: "1,3"."""
    t = list(task)
    return f"{t[0]}–{t[-1]}" if len(t) > 2 and t == list(range(t[0], t[0] + len(t))) else ",".join(map(str, t))


def check_zipit(saved: SavedFigure, rows: Rows, *, tasks: Sequence[Sequence[int]], n_test: int | None = None) -> None:
    """ZipIt!: left, per method present, bars of joint and each task's accuracy at 100·mean with ±100·SD
    error bars; right, ZipIt!'s joint and mean per-task accuracy against the groups zipped (0: the
    ensemble), and the matching merges' joint accuracy as horizontal lines. `rows`: the summary rows of
    one setting and rule (or the same from zipit_summary.csv)."""
    check_png(saved)
    bar_ax, line_ax = panels(saved, 2)
    for ax in (bar_ax, line_ax):
        assert ax.get_ylabel() == "test accuracy (%)"
        assert_data_title(ax.get_title(), "test", n_test, "zipit")
    assert legend_labels(bar_ax) == [
        "joint (all classes)",
        f"task A ({_task_text(tasks[0])})",
        f"task B ({_task_text(tasks[1])})",
    ]
    groups = max(int(num(r["groups"])) for r in rows)

    def cell(method: str, metric: str, zipped: int | None = None) -> tuple[float, float] | None:
        for r in rows:
            level = zipped is None or num(r["zipped_groups"]) == zipped
            if r["method"] == method and r["metric"] == metric and level:
                return 100 * num(r["mean"]), 100 * num(r["sd"])
        return None

    # bars in the experiment's declared table and figure order (ZipIt!: its full zip only)
    full = {m: (groups if m == "zipit" else None) for m in ZIPIT_METHODS}
    present = [m for m in ZIPIT_METHODS if cell(m, "joint_accuracy", full[m]) is not None]
    assert len(bar_ax.get_xticklabels()) == len(present), f"zipit bars: methods {present}"
    containers = [c for c in bar_ax.containers if type(c).__name__ == "BarContainer"]
    metrics = ("joint_accuracy", "task_accuracy_0", "task_accuracy_1")
    assert len(containers) == len(metrics), f"zipit: {len(containers)} bar series"
    for container, metric in zip(containers, metrics):
        want = [cell(m, metric, full[m]) or (math.nan, 0.0) for m in present]
        assert_close([p.get_height() for p in container.patches], [v for v, _ in want], f"zipit bars {metric}")
        segments = container.errorbar.lines[2][0].get_segments()
        assert_close([s[1][1] - s[0][1] for s in segments], [2 * e for _, e in want], f"zipit error bars {metric}")
    levels = sorted({int(num(r["zipped_groups"])) for r in rows if r["method"] == "zipit"})
    bars = _errorbars(line_ax)
    assert len(bars) == 2, f"zipit: {len(bars)} partial-zip series"
    drawn_lines: list[Any] = []
    for container, metric in zip(bars, ("joint_accuracy", "task_accuracy_mean")):
        start = cell("ensemble", metric)
        points = [(0, *start)] if start is not None else []
        points += [(k, *v) for k in levels if (v := cell("zipit", metric, k)) is not None]
        ks, y, e = (np.array(c, dtype=float) for c in zip(*points))
        _assert_errorbar(container, ks, y, y - e, y + e, f"zipit partial {metric}")
        drawn_lines += [container.lines[0], *container.lines[1]]
    flat = [
        (f"{label} + avg: joint", [0.0, 1.0], [v[0], v[0]])
        for method, label in (("weight_matching", "weight matching"), ("activation_matching", "activation matching"))
        if (v := cell(method, "joint_accuracy")) is not None
    ]
    assert_lines(line_ax, flat, "zipit merges", exclude=drawn_lines)


# ------------------------------------------------------------------------------------ loss planes

#: Filled contour levels of a loss plane: log-spaced from the smallest to the largest positive value.
PLANE_LEVELS = 24


def check_plane(saved: SavedFigure, grid: Rows, points: Rows, metric: str = "loss") -> None:
    """Loss plane: one panel per split of the grid rows, showing exactly the grid's u and v range, filled
    contours at PLANE_LEVELS log-spaced levels from the smallest to the largest finite positive value of
    `metric` on that split, and every point of `points` (point, u, v) marked at its coordinates and
    labelled."""
    check_png(saved)
    splits = _order(key(r["split"]) for r in grid)
    axes = panels(saved, len(splits))
    marks = {str(r["point"]): (num(r["u"]), num(r["v"])) for r in points}
    for ax, split in zip(axes, splits):
        sel = [r for r in grid if key(r["split"]) == split and r["metric"] == metric]
        us, vs, z = (np.array([num(r[c]) for r in sel], dtype=float) for c in ("u", "v", "value"))
        assert_close(ax.get_xlim(), (us.min(), us.max()), f"plane {split}: u range")
        assert_close(ax.get_ylim(), (vs.min(), vs.max()), f"plane {split}: v range")
        good = z[np.isfinite(z) & (z > 0)]
        filled = [c for c in ax.collections if isinstance(c, ContourSet) and c.filled]
        assert len(filled) == 1, f"plane {split}: {len(filled)} filled contour sets"
        assert_close(filled[0].levels, np.geomspace(good.min(), good.max(), PLANE_LEVELS), f"plane {split}: levels")
        drawn_marks = {_label(m): (float(m.get_xdata()[0]), float(m.get_ydata()[0])) for m in ax.get_lines()}
        assert list(drawn_marks) == list(marks), f"plane {split}: marked {list(drawn_marks)}, expected {list(marks)}"
        for label, (u, v) in marks.items():
            assert_close(drawn_marks[label], (u, v), f"plane {split}: {label} at")
        assert [t.get_text() for t in ax.texts] == list(marks)
        assert split in ax.get_title() and metric in ax.get_title()


# ------------------------------------------------------------------------------------ Hessian spectra


def _rug_in_axes_units(line: Any, ax: Axes) -> bool:
    """The line's x is in data units and its y in axes units (a rug along the bottom)."""
    return tuple(line.get_transform().contains_branch_seperately(ax.transData)) == (True, False)


def check_density(
    saved: SavedFigure,
    density: Mapping[str, Any],
    top: Sequence[float] = (),
    *,
    split: str = "train",
    examples: int | None = None,
) -> None:
    """plot_density: one panel; the SLQ density ρ on its grid (floored at 10⁻⁸ of its largest value) labelled
    with σ; every start's Gauss nodes, start after start, as a rug at 3% of the height; one dashed vertical
    line at each top eigenvalue (in the legend once); λ on a symlog axis, ρ on a log axis; the title gives
    the number of parameters and the data. `density`: SpectralDensity.to_json() (as spectrum.json stores it)."""
    check_png(saved)
    (ax,) = panels(saved, 1)
    grid, rho = np.asarray(density["grid"], dtype=float), np.asarray(density["density"], dtype=float)
    nodes = np.concatenate([np.asarray(t, dtype=float) for t in density["nodes"]])
    starts, steps = len(density["nodes"]), int(density["steps"])
    top = [float(x) for x in top]
    expected: list[Series] = [
        (f"SLQ density (σ = {float(density['sigma']):.3g})", grid, np.maximum(rho, rho.max() * 1e-8)),
        (f"Gauss nodes ({starts} starts × ≤{steps} steps)", nodes, np.full_like(nodes, 0.03)),
    ]
    expected += [(f"top {len(top)} eigenvalues" if i == 0 else None, [x, x], [0.0, 1.0]) for i, x in enumerate(top)]
    assert_lines(ax, expected, "density")
    drawn_lines = lines(ax)
    assert _rug_in_axes_units(drawn_lines[1], ax), "density: the Gauss nodes are not a rug in axes units"
    for line in drawn_lines[2:]:
        assert line.get_linestyle() == "--" and _rug_in_axes_units(line, ax), "density: eigenvalue lines"
    assert ax.get_xscale() == "symlog" and ax.get_yscale() == "log"
    assert ax.get_xlabel().startswith("eigenvalue λ") and ax.get_ylabel().startswith("density ρ(λ)")
    assert f"{int(density['n_parameters']):,} parameters" in ax.get_title()
    assert_data_title(ax.get_title(), split, examples, "density")
    assert legend_labels(ax) == [label for label, _, _ in expected if label is not None]


def check_path_curvature(
    saved: SavedFigure,
    rows: Rows,
    *,
    split: str = "train",
    examples: int | None = None,
    xlabel: str = "λ",
) -> None:
    """plot_path_curvature: left, the top eigenvalue against λ, a line with markers per path (paths in the
    rows' order; a path without eigenvalues drawn none); right, tr ∇²L per path with its 95% CI as error
    bars (paths with a trace at every λ), each path in the same colour in both panels. `rows`:
    PathSpectra.rows() or path_curvature.csv read back."""
    check_png(saved)
    top_ax, trace_ax = panels(saved, 2)
    names = _order(str(r["path"]) for r in rows)
    expected: list[Series] = []
    traced: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for name in names:
        mine = [r for r in rows if str(r["path"]) == name]
        lam = np.array([num(r["lambda"]) for r in mine])
        top = np.array([num(r.get("top_eigenvalue")) for r in mine])
        if np.isfinite(top).any():
            expected.append((name, lam, top))
        trace = np.array([num(r.get("trace")) for r in mine])
        if np.isfinite(trace).all():
            low, high = (np.array([num(r[c]) for r in mine]) for c in ("trace_ci_low", "trace_ci_high"))
            traced.append((name, lam, trace, low, high))
    assert_lines(top_ax, expected, "top eigenvalue")
    for line in top_ax.get_lines():
        assert_markers(line, "top eigenvalue")
    bars = _errorbars(trace_ax)
    assert [c.get_label() for c in bars] == [f"{name} (95% CI)" for name, *_ in traced], "trace: paths"
    for container, (name, lam, trace, low, high) in zip(bars, traced):
        line = container.lines[0]
        assert_close(line.get_xdata(), lam, f"trace {name}: λ")
        _assert_errorbar(container, lam, trace, low, high, f"trace {name}")
        assert_markers(line, f"trace {name}")
    colours = {name: line.get_color() for name, line in zip([n for n, _, _ in expected], top_ax.get_lines())}
    for container, (name, *_) in zip(bars, traced):
        if name in colours:
            assert container.lines[0].get_color() == colours[name], f"{name}: other colours in the two panels"
    where = "along the path" if len(names) == 1 else "along the paths"
    for ax, what, ylabel in (
        (top_ax, "top eigenvalue", "top eigenvalue λ_max(∇²L)"),
        (trace_ax, "Hessian trace", "tr ∇²L (Hutchinson)"),
    ):
        assert ax.get_xlabel() == xlabel and ax.get_ylabel() == ylabel
        assert ax.get_title().startswith(f"{what} {where}\n"), ax.get_title()
        assert_data_title(ax.get_title(), split, examples, what)
    if expected:
        assert legend_labels(top_ax) == [label for label, _, _ in expected]
    if traced:
        assert legend_labels(trace_ax) == [c.get_label() for c in bars]
