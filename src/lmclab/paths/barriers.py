"""Barrier definitions on a curve L(θ_λ) sampled at λ_0 = 0 < … < λ_{N−1} = 1.

curve      B(λ) = L(θ_λ) − [(1−λ)L(θ_A) + λL(θ_B)]
barrier    max_λ B(λ)                         (Frankle et al.; Singh et al.)
rebasin    max_λ L(θ_λ) − ½(L(θ_A) + L(θ_B))  (Git Re-Basin)
midpoint   B(½), linearly interpolated between grid points if ½ is not on the grid
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

DEFINITIONS = ("barrier", "rebasin", "midpoint")


def barrier_curve(lambdas: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> np.ndarray:
    lam, v = _check(lambdas, values)
    return v - ((1 - lam) * v[0] + lam * v[-1])


def barriers(lambdas: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Every definition above, plus the λ where the barrier curve peaks."""
    lam, v = _check(lambdas, values)
    curve = v - ((1 - lam) * v[0] + lam * v[-1])
    peak = int(np.argmax(curve))
    return {
        "barrier": float(curve[peak]),
        "rebasin": float(v.max() - 0.5 * (v[0] + v[-1])),
        "midpoint": float(np.interp(0.5, lam, curve)),
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
    """One row per curve (rows grouped by `keys` that are present), with every barrier definition."""
    curves: dict[tuple, list[tuple[float, float]]] = {}
    for r in rows:
        if r["metric"] in metrics:
            curves.setdefault(tuple(r.get(k) for k in keys), []).append((r["lambda"], r["value"]))
    report = []
    for key, points in curves.items():
        points.sort()
        lam, val = zip(*points)
        report.append({**{k: v for k, v in zip(keys, key) if v is not None}, **barriers(lam, val)})
    return report
