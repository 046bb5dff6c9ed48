"""Barrier definitions on a curve L(θ_λ) sampled at λ_0 = 0 < … < λ_{N−1} = 1.

curve      B(λ) = L(θ_λ) − [(1−λ)L(θ_A) + λL(θ_B)]
barrier    max_λ B(λ)                         (Frankle et al.; Singh et al.)
rebasin    max_λ L(θ_λ) − ½(L(θ_A) + L(θ_B))  (Git Re-Basin)
midpoint   B(½), only where λ = ½ was evaluated: None otherwise (e.g. an even number of points), never
           interpolated between grid points nor taken from the nearest one

Two layer-wise quantities, different in general, carry different names in every table, JSON output and
figure label (:data:`QUANTITIES`):

layerwise_barrier   (``lmclab interpolate --layers``; Adilova et al.) the definitions above on the curve
                    of the one-sided path θ_λ^P: the tensors of a layer set P at (1−λ)θ_A + λθ_B, every
                    other tensor from the base endpoint (A by default). Its endpoints are θ_A and
                    θ_A with P taken from θ_B (base A), so L(θ_B) plays no part.
layer_set_barrier   (``lmclab predict``, ``lmclab run singh``; Singh et al. eq. 18/21, measured)
                    B_P(α) = (1−α)L(θ_{2→1}) + αL(θ_{1→2}) − [(1−α)L_1 + αL_2], both bases averaged,
                    relative to the two models' own losses (:func:`lmclab.paths.layer_set_barrier`).

With P = every tensor both are the whole-model barrier curve; for a proper subset they differ.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFINITIONS = ("barrier", "rebasin", "midpoint")

#: The quantity of whole-model barrier rows.
WHOLE_MODEL_BARRIER = "barrier"
#: One-sided layer-wise barrier (interpolate --layers): chosen layers interpolated, the others from the base.
LAYERWISE_BARRIER = "layerwise_barrier"
#: Singh's two-sided measured layer-set barrier B_P (predict, singh).
LAYER_SET_BARRIER = "layer_set_barrier"
#: Every barrier quantity by name, with what it is (tables carry the name in a `quantity` column or prefix).
QUANTITIES: dict[str, str] = {
    WHOLE_MODEL_BARRIER: "every tensor interpolated: the barrier definitions on L(θ_λ)",
    LAYERWISE_BARRIER: (
        "only the chosen layers interpolated, every other tensor from the base endpoint: the barrier "
        "definitions on that one-sided curve, relative to its own endpoints (Adilova et al.)"
    ),
    LAYER_SET_BARRIER: (
        "Singh's B_P(α) = (1−α)L(θ_{2→1}) + αL(θ_{1→2}) − [(1−α)L_1 + αL_2]: both bases, relative to "
        "the two models' losses"
    ),
}

#: How close to ½ a grid point must be to count as the midpoint (float rounding of a CSV round trip).
MIDPOINT_TOLERANCE = 1e-9


def barrier_curve(lambdas: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> np.ndarray:
    lam, v = _check(lambdas, values)
    return v - ((1 - lam) * v[0] + lam * v[-1])


def midpoint_index(lambdas: Sequence[float] | np.ndarray) -> int | None:
    """The index of λ = ½ in the grid, or None when ½ was not evaluated."""
    lam = np.asarray(lambdas, dtype=np.float64)
    hits = np.flatnonzero(np.abs(lam - 0.5) <= MIDPOINT_TOLERANCE)
    return int(hits[0]) if hits.size else None


def barriers(lambdas: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """Every definition above, plus the λ where the barrier curve peaks. ``midpoint`` is None when λ = ½
    is not on the grid."""
    lam, v = _check(lambdas, values)
    curve = v - ((1 - lam) * v[0] + lam * v[-1])
    peak = int(np.argmax(curve))
    half = midpoint_index(lam)
    return {
        "barrier": float(curve[peak]),
        "rebasin": float(v.max() - 0.5 * (v[0] + v[-1])),
        "midpoint": None if half is None else float(curve[half]),
        "argmax_lambda": float(lam[peak]),
    }


def _check(
    lambdas: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    lam, v = np.asarray(lambdas, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if lam.shape != v.shape or lam.ndim != 1 or len(lam) < 2:
        raise ValueError(f"need matching 1-D λ and values with ≥ 2 points, got {lam.shape} and {v.shape}")
    if lam[0] != 0.0 or lam[-1] != 1.0 or np.any(np.diff(lam) <= 0):
        raise ValueError("λ must increase from 0 to 1 (both endpoints included)")
    if not np.all(np.isfinite(v)):
        bad = [float(x) for x, y in zip(lam, v) if not np.isfinite(y)]
        raise ValueError(f"non-finite values on the path at λ = {bad}: no barrier is reported")
    return lam, v


def barrier_report(
    rows: Iterable[Mapping[str, Any]],
    keys: Sequence[str] = ("path", "pair", "split", "metric"),
    metrics: Sequence[str] = ("loss", "error"),
) -> list[dict[str, Any]]:
    """One row per curve (rows grouped by `keys` that are present), with every barrier definition
    (``midpoint`` None where λ = ½ was not evaluated: an empty cell in CSV, null in JSON)."""
    curves: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        if r["metric"] in metrics:
            curves.setdefault(tuple(r.get(k) for k in keys), []).append((float(r["lambda"]), float(r["value"])))
    report = []
    for key, points in curves.items():
        points.sort()
        lam, val = zip(*points)
        report.append({**{k: v for k, v in zip(keys, key) if v is not None}, **barriers(lam, val)})
    return report


def curve_barrier_rows(rows: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """:func:`barrier_report` of every curve (rows grouped by `keys`), each row naming its ``quantity``:
    :data:`WHOLE_MODEL_BARRIER`, or for the curve of a layer subset (``layers`` other than "all")
    :data:`LAYERWISE_BARRIER` with its ``base``. A curve with non-finite values gets one row with its
    ``error`` instead of failing the report."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    report: list[dict[str, Any]] = []
    for key, group in groups.items():
        first = group[0]
        quantity: dict[str, Any] = (
            {"quantity": WHOLE_MODEL_BARRIER}
            if first.get("layers", "all") == "all"
            else {"quantity": LAYERWISE_BARRIER, "base": first.get("base", "a")}
        )
        try:
            report += [{**{k: b[k] for k in keys if k in b}, **quantity, **b} for b in barrier_report(group, keys)]
        except ValueError as exc:
            report.append({**dict(zip(keys, key)), **quantity, "error": str(exc)})
    return report


@dataclass(frozen=True)
class Spread:
    """Values over repeats (pairs, seeds): `n` finite values and `missing` (NaN/None) ones; mean, SD, min and
    max over the finite ones (NaN when none is). SD is the population SD, √(Σ(x − x̄)²/n) (ddof 0, numpy's
    default), the one convention of every "mean ± SD" lmclab prints or stores."""

    n: int
    missing: int
    mean: float
    sd: float
    min: float
    max: float


def spread(values: Iterable[float | None]) -> Spread:
    """The :class:`Spread` of `values` (None and non-finite values counted as missing)."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=float)
    finite = v[np.isfinite(v)]
    if not finite.size:
        return Spread(0, int(v.size), *(4 * [float("nan")]))
    return Spread(
        int(finite.size),
        int(v.size - finite.size),
        float(finite.mean()),
        float(finite.std()),
        float(finite.min()),
        float(finite.max()),
    )
