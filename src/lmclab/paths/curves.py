"""Loss and accuracy along a straight path, with the chosen handling of normalisation statistics, and
Singh's measured barrier of a set of layers.

Layer-set barrier (Singh et al., Prop. 2's left-hand side, eq. 18/21's measured counterpart): with only
the tensors of a set P interpolated,

    B_P(α) = (1−α)L(θ_{2→1}) + αL(θ_{1→2}) − [(1−α)L_1 + αL_2],

θ_{2→1} = θ_1 with P's tensors at (1−α)θ_1 + αθ_2, θ_{1→2} = θ_2 with the same (``lerp(..., only=P,
base="a")`` and ``base="b"``); B_P(0) = B_P(1) = 0. All P is the whole-model barrier curve. Evaluated in
eval mode with the (interpolated) stored statistics, as the Hessian predictions assume.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lmclab.data import DeviceDataset
from lmclab.paths.batched import evaluate_points, metric_rows
from lmclab.paths.interpolate import default_lambdas
from lmclab.paths.normalization import endpoint_stats, has_batchnorm, repair, repair_points
from lmclab.points import PointLike, lerp

BN_MODES = ("none", "reset", "repair")


def path_values(rows: Iterable[Mapping[str, Any]], metric: str, split: str | None = None) -> list[float]:
    """The values of `metric` (on `split`, default: any) in λ order, from :func:`evaluate_path`'s tidy rows."""
    return [r["value"] for r in rows if r["metric"] == metric and (split is None or r["split"] == split)]


def default_bn_mode(model: torch.nn.Module) -> str:
    """ "reset" for models with BatchNorm, "none" otherwise (LayerNorm models need nothing)."""
    return "reset" if has_batchnorm(model) else "none"


@torch.no_grad()
def evaluate_path(
    model: torch.nn.Module,
    theta_a: PointLike,
    theta_b: PointLike,
    datasets: Mapping[str, DeviceDataset],
    *,
    lambdas: Sequence[float] | None = None,
    bn: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    only: Iterable[str] | None = None,
    base: str = "a",
    batch_size: int = 1000,
    chunk: int | None = None,
    progress: bool = True,
    desc: str = "path",
) -> list[dict[str, Any]]:
    """Tidy rows {lambda, split, metric, value} for loss, accuracy and error at every λ on every split.

    θ_λ = lerp(θ_A, θ_B, λ) on `only` (default: all tensors; others from `base`). `bn`: "reset"
    recomputes BN statistics at every λ (endpoints included) from `bn_data` (one pass, or the first
    `bn_examples`); "repair" applies REPAIR; "none" uses the interpolated statistics. `model` is
    only a template: it is copied, never modified.

    The λ points are evaluated `chunk` at a time with :func:`lmclab.paths.batched.evaluate_points` (one
    vmap'd forward per data batch, BN reset batched too; equal to one at a time up to float rounding);
    default: its memory estimate on an accelerator, 1 on the CPU. REPAIR's statistics are taken one λ at
    a time with the model, the repaired points then evaluated in chunks. ``chunk=1``: one λ at a time
    with the model itself.
    """
    bn = bn or default_bn_mode(model)
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn mode {bn!r}; valid: {', '.join(BN_MODES)}")
    if bn != "none" and bn_data is None:
        raise ValueError(f"bn={bn!r} needs bn_data (the training split) to estimate statistics")
    lambdas = list(lambdas) if lambdas is not None else default_lambdas()
    scratch = copy.deepcopy(model).eval()
    stats = None
    if bn == "repair":
        assert bn_data is not None
        example = next(bn_data.batches(2))[0]
        points = repair_points(scratch, example)
        stats = tuple(
            endpoint_stats(scratch, th, points, bn_data, max_examples=bn_examples) for th in (theta_a, theta_b)
        )

    def point(lam: float) -> PointLike:
        theta = lerp(theta_a, theta_b, lam, only=only, base=base)
        if bn != "repair":
            return theta
        scratch.load_state_dict(theta)
        repaired = repair(scratch, stats[0], stats[1], lam, bn_data, max_examples=bn_examples)  # type: ignore[index,arg-type]
        return {k: t.detach().clone() for k, t in repaired.items()}

    metrics = evaluate_points(
        scratch,
        (point(lam) for lam in lambdas),
        datasets,
        bn="reset" if bn == "reset" else "none",
        bn_data=bn_data,
        bn_examples=bn_examples,
        chunk=chunk,
        batch_size=batch_size,
        total=len(lambdas),
        progress=progress,
        desc=desc,
        unit="λ",
    )
    return metric_rows([{"lambda": lam} for lam in lambdas], metrics)


def path_losses(
    model: torch.nn.Module,
    theta_a: PointLike,
    theta_b: PointLike,
    data: DeviceDataset,
    lambdas: Sequence[float],
    *,
    only: Iterable[str] | None = None,
    base: str = "a",
) -> np.ndarray:
    """L(θ_λ) on `data` at each λ (:func:`evaluate_path` with bn "none": eval mode, interpolated statistics)."""
    rows = evaluate_path(
        model, theta_a, theta_b, {"x": data}, lambdas=lambdas, only=only, base=base, bn="none", progress=False
    )
    return np.array(path_values(rows, "loss"))


def endpoint_losses(
    model: torch.nn.Module, theta_1: PointLike, theta_2: PointLike, data: DeviceDataset
) -> tuple[float, float]:
    """(L(θ_1), L(θ_2)) with the same evaluation as the paths (eval mode, stored statistics)."""
    ends = path_losses(model, theta_1, theta_2, data, [0.0, 1.0])
    return float(ends[0]), float(ends[1])


def layer_set_barrier(
    model: torch.nn.Module,
    theta_1: PointLike,
    theta_2: PointLike,
    data: DeviceDataset,
    lambdas: Sequence[float],
    tensors: Iterable[str],
    endpoints: tuple[float, float] | None = None,
) -> np.ndarray:
    """B_P(α) = (1−α)L(θ_{2→1}) + αL(θ_{1→2}) − [(1−α)L_1 + αL_2] at each α, P = `tensors` (see the
    module docstring; 0 at α ∈ {0, 1}).

    Only the interior α are evaluated; `endpoints` = (L_1, L_2) from :func:`endpoint_losses` saves
    recomputing them for every layer set."""
    lam = np.asarray(lambdas, dtype=np.float64)
    loss_1, loss_2 = endpoints if endpoints is not None else endpoint_losses(model, theta_1, theta_2, data)
    tensors = list(tensors)
    out = np.zeros_like(lam)
    interior = (lam > 0) & (lam < 1)
    if interior.any():
        a = lam[interior]
        from_1 = path_losses(model, theta_1, theta_2, data, a.tolist(), only=tensors, base="a")
        from_2 = path_losses(model, theta_1, theta_2, data, a.tolist(), only=tensors, base="b")
        out[interior] = (1 - a) * from_1 + a * from_2 - ((1 - a) * loss_1 + a * loss_2)
    return out
