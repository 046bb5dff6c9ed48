"""Evaluating a population of K aligned points θ_0 … θ_{K−1} (Ito et al.: LMC among many models).

- **Merged model** θ̄ = (1/K) Σ_i θ_i (:func:`lmclab.points.mean` of the points already permuted into
  one frame); BatchNorm models
  get their running statistics recomputed on training data (:func:`reset_bn_stats`) before the
  loss and accuracy are measured.
- **All pairs**: for every i < j the straight path θ_i → θ_j (:func:`evaluate_path`) and its barriers
  (:func:`barrier_report`: every definition of :mod:`lmclab.paths.barriers`, loss and error, every
  split), K(K−1)/2 paths; and each model's path θ_i → θ̄ to the merged model, K paths.
- **Summary** over pairs (max, mean, SD, min) and the K × K matrix of one definition.

Symmetry of the pair matrix M[i, j] (path θ_i → θ_j): swapping the endpoints maps λ to 1 − λ, so
``barrier`` (max of the endpoint-subtracted curve), ``rebasin`` and ``midpoint`` are symmetric
(up to float rounding of the two grids); ``argmax_lambda`` is not: M[j, i] = 1 − M[i, j] (exact for a
unique peak; a tie, e.g. a curve whose maximum 0 is at both ends, resolves to the smallest λ in each
direction). The diagonal is 0 for the barrier definitions (a point's path to itself is flat) and NaN
for ``argmax_lambda``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lmclab.data import DeviceDataset
from lmclab.paths.barriers import DEFINITIONS, barrier_report, spread
from lmclab.paths.curves import default_bn_mode, evaluate_path
from lmclab.paths.interpolate import default_lambdas
from lmclab.paths.normalization import reset_bn_stats
from lmclab.points import Point, PointLike, mean
from lmclab.training.evaluate import evaluate

__all__ = [
    "PAIR_FIELDS",
    "POPULATION_BN_MODES",
    "SYMMETRIC",
    "PopulationBarriers",
    "SplitMetrics",
    "all_pairs_barriers",
    "barrier_matrix",
    "merged_metrics",
    "merged_point",
    "summarize_barriers",
]

#: BN handling for merged models and population paths ("repair" is defined for two endpoints only).
POPULATION_BN_MODES = ("none", "reset")
#: Fields of a barrier row: the definitions of :func:`lmclab.paths.barriers.barriers` and the peak's λ.
PAIR_FIELDS = (*DEFINITIONS, "argmax_lambda")
#: Whether M[j, i] == M[i, j] for each field of the pair matrix (argmax_lambda: M[j, i] = 1 − M[i, j]).
SYMMETRIC: dict[str, bool] = {**{d: True for d in DEFINITIONS}, "argmax_lambda": False}


def _bn_mode(model: torch.nn.Module, bn: str | None, bn_data: DeviceDataset | None) -> str:
    bn = bn or default_bn_mode(model)
    if bn not in POPULATION_BN_MODES:
        raise ValueError(f"bn mode {bn!r} is not defined for a population; valid: {', '.join(POPULATION_BN_MODES)}")
    if bn == "reset" and bn_data is None:
        raise ValueError("bn='reset' needs bn_data (the training split) to estimate BatchNorm statistics")
    return bn


def merged_point(
    model: torch.nn.Module,
    points: Sequence[PointLike] | PointLike,
    *,
    bn: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
) -> Point:
    """θ̄ = (1/K) Σ_i θ_i (a single mapping is taken as θ̄ itself), with BatchNorm running statistics
    recomputed on `bn_data` when `bn` is "reset" (default for BN models). `model` is only a template."""
    bn = _bn_mode(model, bn, bn_data)
    if isinstance(points, Mapping):
        merged = dict(points)
    else:
        if len(points) == 0:
            raise ValueError("merging needs at least one point, got none")
        merged = mean(list(points))
    if bn == "none":
        return merged
    scratch = copy.deepcopy(model)
    scratch.load_state_dict(merged)
    reset_bn_stats(scratch, bn_data, max_examples=bn_examples)  # type: ignore[arg-type]
    return {k: v.detach().clone() for k, v in scratch.state_dict().items()}


@dataclass(frozen=True)
class SplitMetrics:
    """Loss and accuracy of a model on one split; error = 1 − accuracy."""

    loss: float
    accuracy: float

    @property
    def error(self) -> float:
        return 1.0 - self.accuracy

    def to_json(self) -> dict[str, float]:
        return {"loss": self.loss, "accuracy": self.accuracy, "error": self.error}


@torch.no_grad()
def merged_metrics(
    model: torch.nn.Module,
    points_or_merged: Sequence[PointLike] | PointLike,
    datasets: Mapping[str, DeviceDataset],
    *,
    bn: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    batch_size: int = 1000,
) -> dict[str, SplitMetrics]:
    """{split: SplitMetrics} of the merged model θ̄ (see :func:`merged_point`) on every split."""
    scratch = copy.deepcopy(model)
    scratch.load_state_dict(merged_point(model, points_or_merged, bn=bn, bn_data=bn_data, bn_examples=bn_examples))
    out = {}
    for split, data in datasets.items():
        m = evaluate(scratch, data, batch_size)
        out[split] = SplitMetrics(loss=m["loss"], accuracy=m["accuracy"])
    return out


def _path_barriers(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """barrier_report of one path, one curve at a time, so a non-finite curve gives NaN barriers
    (reported as missing) instead of stopping the whole population."""
    out = []
    for split in dict.fromkeys(r["split"] for r in rows):
        for metric in metrics:
            curve = [r for r in rows if r["split"] == split and r["metric"] == metric]
            try:
                out += barrier_report(curve, keys=("split", "metric"), metrics=(metric,))
            except ValueError:
                out.append({"split": split, "metric": metric, **{f: math.nan for f in PAIR_FIELDS}})
    return out


@dataclass
class PopulationBarriers:
    """Barriers among K points: ``pairs`` rows {i, j, split, metric, barrier, rebasin, midpoint,
    argmax_lambda} for i < j (path θ_i → θ_j) and ``to_merged`` rows {i, …} for the paths θ_i → θ̄."""

    k: int
    lambdas: list[float]
    pairs: list[dict[str, Any]]
    to_merged: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> list[dict[str, Any]]:
        """Rows {kind: pairs|to_merged, split, metric, definition, n, n_missing, max, mean, std, min}."""
        return [{"kind": "pairs", **r} for r in summarize_barriers(self.pairs)] + [
            {"kind": "to_merged", **r} for r in summarize_barriers(self.to_merged)
        ]

    def matrix(self, split: str, metric: str = "loss", definition: str = "barrier") -> np.ndarray:
        return barrier_matrix(self.pairs, self.k, split, metric, definition)

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "lambdas": self.lambdas,
            "pairs": self.pairs,
            "to_merged": self.to_merged,
            "summary": self.summary(),
        }


def all_pairs_barriers(
    model: torch.nn.Module,
    aligned_points: Sequence[PointLike],
    datasets: Mapping[str, DeviceDataset],
    *,
    lambdas: Sequence[float] | None = None,
    bn: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    to_merged: bool = True,
    metrics: Sequence[str] = ("loss", "error"),
    batch_size: int = 1000,
    progress: bool = True,
) -> PopulationBarriers:
    """Barriers on the K(K−1)/2 paths θ_i → θ_j (i < j) and, with `to_merged`, on θ_i → θ̄, θ̄ = (1/K) Σ θ_i.

    Each path is :func:`evaluate_path` at `lambdas` (default 25 points) with `bn` ("reset" for BN models:
    statistics recomputed from `bn_data` at every λ; "none") and :func:`barrier_report` of its curves.
    """
    k = len(aligned_points)
    if k < 2:
        raise ValueError(f"barriers among a population need at least 2 points, got {k}")
    bn = _bn_mode(model, bn, bn_data)
    lambdas = list(lambdas) if lambdas is not None else default_lambdas()
    merged = mean(list(aligned_points)) if to_merged else None
    paths: list[tuple[dict[str, Any], PointLike, PointLike]] = [
        ({"i": i, "j": j}, aligned_points[i], aligned_points[j]) for i in range(k) for j in range(i + 1, k)
    ]
    if merged is not None:
        paths += [({"i": i, "j": "merged"}, aligned_points[i], merged) for i in range(k)]
    pairs: list[dict[str, Any]] = []
    to_merged_rows: list[dict[str, Any]] = []
    for ends, a, b in tqdm(paths, desc=f"paths among {k} models", unit="path", disable=not progress, leave=False):
        rows = evaluate_path(
            model,
            a,
            b,
            datasets,
            lambdas=lambdas,
            bn=bn,
            bn_data=bn_data,
            bn_examples=bn_examples,
            batch_size=batch_size,
            progress=False,
        )
        report = _path_barriers(rows, metrics)
        if ends["j"] == "merged":
            to_merged_rows += [{"i": ends["i"], **r} for r in report]
        else:
            pairs += [{**ends, **r} for r in report]
    return PopulationBarriers(k, lambdas, pairs, to_merged_rows)


def summarize_barriers(
    rows: Sequence[Mapping[str, Any]], definitions: Sequence[str] = DEFINITIONS
) -> list[dict[str, Any]]:
    """Per (split, metric, definition): n rows, n_missing (NaN/None), and max, mean, SD, min over the finite
    values (:func:`lmclab.paths.barriers.spread`; NaN when none is finite)."""
    out = []
    groups = dict.fromkeys((r["split"], r["metric"]) for r in rows)
    for split, metric in groups:
        sel = [r for r in rows if r["split"] == split and r["metric"] == metric]
        for definition in definitions:
            s = spread(r.get(definition) for r in sel)
            out.append(
                {
                    "split": split,
                    "metric": metric,
                    "definition": definition,
                    "n": len(sel),
                    "n_missing": s.missing,
                    "max": s.max,
                    "mean": s.mean,
                    "std": s.sd,
                    "min": s.min,
                }
            )
    return out


def barrier_matrix(
    pair_rows: Sequence[Mapping[str, Any]], k: int, split: str, metric: str = "loss", definition: str = "barrier"
) -> np.ndarray:
    """K × K matrix of `definition` from pair rows (i < j); lower triangle by :data:`SYMMETRIC`
    (1 − x for argmax_lambda); diagonal 0 (NaN for argmax_lambda); missing pairs NaN."""
    if definition not in SYMMETRIC:
        raise ValueError(f"unknown definition {definition!r}; valid: {', '.join(SYMMETRIC)}")
    m = np.full((k, k), np.nan)
    if definition != "argmax_lambda":
        np.fill_diagonal(m, 0.0)
    for r in pair_rows:
        if r["split"] != split or r["metric"] != metric:
            continue
        i, j = int(r["i"]), int(r["j"])
        if not (0 <= i < j < k):
            raise ValueError(f"pair ({i}, {j}) is not i < j < K = {k}")
        v = np.nan if r.get(definition) is None else float(r[definition])
        m[i, j] = v
        m[j, i] = v if SYMMETRIC[definition] else 1.0 - v
    return m
