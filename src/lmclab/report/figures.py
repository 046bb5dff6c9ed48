"""Shared figure plumbing: the Agg backend and atomic saving. The report modules call
`figures.save_figure` through this module, so that one name sees every figure saved (tests record them).

Conventions every report figure follows (tests/figures.py checks them):

- a line drawn from values evaluated at a grid of λ (or α) has a marker at each evaluated point
  (:data:`POINTS`), so a reader sees where the path was evaluated and where the line only joins points;
- a path's barrier is written on its curve, at the point where the barrier curve peaks
  (:func:`annotate_barrier`, text :func:`barrier_text`);
- a panel drawn from an evaluation on data names the split and the number of examples in its title
  (:func:`data_text`);
- every heat map has a colour bar with a label;
- layouts are constrained (tick labels, colour bars and legends are never clipped).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402

from lmclab.paths.barriers import barrier_curve, spread  # noqa: E402
from lmclab.store import atomic_write  # noqa: E402

#: Sampled values: a sequence of floats or a 1-D array.
Values = Sequence[float] | np.ndarray
#: Marker style of lines drawn through evaluated points.
POINTS: dict[str, Any] = {"marker": "o", "ms": 3.2}
#: Metrics where lower is worse: their barrier is the drop below the endpoint line (= the error barrier).
LOWER_IS_WORSE = frozenset({"accuracy"})


@dataclass(frozen=True, eq=False)
class SavedFigure:
    """A figure written to `path`, and the (closed) matplotlib Figure itself: its axes, lines, images,
    labels and legends are exactly what was drawn, for inspection. It stands in for the path it was
    saved to: ``str()`` and ``os.fspath()`` give the path, so ``Path(saved)`` and ``open(saved)`` work."""

    path: Path
    figure: Figure
    dpi: int

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)


def save_figure(fig: Figure, path: str | os.PathLike, title: str = "", dpi: int = 130) -> SavedFigure:
    """Give the figure its title, write it atomically (format from the suffix, default PNG), close it."""
    if title:
        fig.suptitle(title, wrap=True)  # a title wider than the figure is wrapped, not clipped
    _spread_barrier_notes(fig)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    plt.close(fig)
    return SavedFigure(path, fig, dpi)


# ------------------------------------------------------------------------------------ data in titles


def count(v: Any) -> int | None:
    """A number of examples from a table cell or argument (None, "" and NaN: unknown)."""
    if v is None or v == "":
        return None
    f = float(v)
    return None if not math.isfinite(f) else int(f)


def examples_of(
    rows: Iterable[Mapping[str, Any]], examples: Mapping[str, Any] | int | None = None, column: str = "examples"
) -> dict[str, int | None]:
    """Examples per split: `examples` (a mapping split -> n, or one n for every split) where given, else
    the rows' `column` (the first value per split); splits in the rows' order (a split without rows but
    in `examples` too)."""
    rows = list(rows)
    splits = list(dict.fromkeys(str(r["split"]) for r in rows if "split" in r))
    if isinstance(examples, Mapping):
        splits += [str(s) for s in examples if str(s) not in splits]
        return {s: count(examples.get(s)) for s in splits}
    if examples is not None:
        return {s: count(examples) for s in splits}
    out: dict[str, int | None] = {s: None for s in splits}
    for r in rows:
        if "split" in r and out.get(str(r["split"])) is None:
            out[str(r["split"])] = count(r.get(column))
    return out


def data_text(split: str, n: int | None) -> str:
    """ "test, 10,000 examples" (the split alone when the number is unknown)."""
    return split if n is None else f"{split}, {n:,} examples"


def splits_text(examples: Mapping[str, int | None]) -> str:
    """ "train, 60,000 examples; test, 10,000 examples"."""
    return "; ".join(data_text(s, n) for s, n in examples.items())


# ------------------------------------------------------------------------------------ barriers on curves


def barrier_text(values: Values, std: bool = True) -> str:
    """ "barrier 0.123" for one value, "barrier 0.123 ± 0.004" for the mean ± SD of several (3 significant
    digits)."""
    s = spread(np.asarray(values, dtype=float).ravel())
    text = f"barrier {s.mean:.3g}"
    return text + (f" ± {s.sd:.2g}" if std and s.n > 1 else "")


def curve_barriers(curves: Sequence[tuple[Values, Values]], metric: str = "loss") -> list[float]:
    """The barrier max_λ B(λ) of each finite curve (λ, values) of `metric` (accuracy: of −accuracy, i.e.
    the error barrier); curves with missing values are left out."""
    sign = -1.0 if metric in LOWER_IS_WORSE else 1.0
    out = []
    for lam, values in curves:
        v = sign * np.asarray(values, dtype=float)
        x = np.asarray(lam, dtype=float)
        if len(v) >= 2 and len(x) == len(v) and x[0] == 0.0 and x[-1] == 1.0 and np.isfinite(v).all():
            out.append(float(barrier_curve(x, v).max()))
    return out


def barrier_position(lam: Values, y: Values, metric: str = "loss") -> tuple[float, float] | None:
    """(λ, y) where the drawn curve's barrier curve peaks (finite points only), or None."""
    x, v = np.asarray(lam, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(v):
        return None
    ok = np.isfinite(v)
    if ok.sum() < 2 or x[ok][0] != x[0] or x[ok][-1] != x[-1]:
        return None
    sign = -1.0 if metric in LOWER_IS_WORSE else 1.0
    curve = sign * v[ok] - ((1 - x[ok]) * sign * v[0] + x[ok] * sign * v[-1])
    i = int(np.argmax(curve))
    return float(x[ok][i]), float(v[ok][i])


def annotate_barrier(
    ax: Axes, xy: tuple[float, float], text: str, color: Any, metric: str = "loss", offset: float = 0.0
) -> Any:
    """Write `text` next to the curve's peak `xy` (below it for metrics where lower is worse), with a tick."""
    below = metric in LOWER_IS_WORSE
    low, high = ax.get_xlim() if ax.has_data() else (0.0, 1.0)
    where = (xy[0] - low) / ((high - low) or 1.0)
    note = ax.annotate(
        text,
        xy,
        xytext=(offset, -14 if below else 10),
        textcoords="offset points",
        ha="left" if where < 0.12 else "right" if where > 0.88 else "center",
        va="top" if below else "bottom",
        fontsize=7.5,
        color=color,
        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.8},
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        zorder=6,
        gid=BARRIER_GID_BELOW if below else BARRIER_GID,
    )
    return note


BARRIER_GID, BARRIER_GID_BELOW = "barrier", "barrier-below"


def _spread_barrier_notes(fig: Figure, tries: int = 12) -> None:
    """Move barrier annotations that would overlap another one in the same panel away from their curve
    (up above a curve, down below it) until they are clear, keeping their tick to the peak; then widen
    the y range of a panel whose notes reach past its frame (into the title), so that they sit inside."""
    notes = {ax: [t for t in ax.texts if t.get_gid() in (BARRIER_GID, BARRIER_GID_BELOW)] for ax in fig.axes}
    notes = {ax: group for ax, group in notes.items() if group}
    if not notes:
        return
    fig.canvas.draw()  # the final layout, so that the boxes are where they will be drawn
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for group in notes.values():
        placed: list[Any] = []
        for note in group:
            for _ in range(tries):
                box = Text.get_window_extent(note, renderer).padded(2)
                if not any(box.overlaps(other) for other in placed):
                    break
                assert isinstance(note, Annotation)
                dx, dy = note.xyann
                step = box.height * 72 / fig.dpi
                note.xyann = (dx, dy + (-step if note.get_gid() == BARRIER_GID_BELOW else step))
            placed.append(Text.get_window_extent(note, renderer).padded(2))
    for _ in range(3):
        changed = False
        for ax, group in notes.items():
            if ax.get_yscale() != "linear":
                continue
            frame = ax.get_window_extent(renderer)
            boxes = [Text.get_window_extent(n, renderer) for n in group]
            above, below = max(b.y1 for b in boxes) - frame.y1, frame.y0 - min(b.y0 for b in boxes)
            if above <= 0 and below <= 0:
                continue
            low, high = ax.get_ylim()
            per_pixel = (high - low) / max(frame.height, 1.0)
            ax.set_ylim(
                low - 1.3 * (below + 4) * per_pixel if below > 0 else low,
                high + 1.3 * (above + 4) * per_pixel if above > 0 else high,
            )
            changed = True
        if not changed:
            return
        fig.canvas.draw()
