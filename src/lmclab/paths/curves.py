"""Loss and accuracy along a straight path, with the chosen handling of normalisation statistics."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lmclab.data import DeviceDataset
from lmclab.paths.interpolate import default_lambdas, lerp
from lmclab.paths.normalization import endpoint_stats, has_batchnorm, repair, repair_points, reset_bn_stats
from lmclab.training.evaluate import evaluate

BN_MODES = ("none", "reset", "repair")


def path_values(rows: Iterable[Mapping[str, Any]], metric: str, split: str | None = None) -> list[float]:
    """The values of `metric` (on `split`, default: any) in λ order, from :func:`evaluate_path`'s tidy rows."""
    return [r["value"] for r in rows if r["metric"] == metric and (split is None or r["split"] == split)]


def default_bn_mode(model: torch.nn.Module) -> str:
    """"reset" for models with BatchNorm, "none" otherwise (LayerNorm models need nothing)."""
    return "reset" if has_batchnorm(model) else "none"


@torch.no_grad()
def evaluate_path(
    model: torch.nn.Module,
    theta_a: Mapping[str, torch.Tensor],
    theta_b: Mapping[str, torch.Tensor],
    datasets: Mapping[str, DeviceDataset],
    *,
    lambdas: Sequence[float] | None = None,
    bn: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    only: Iterable[str] | None = None,
    base: str = "a",
    batch_size: int = 1000,
    progress: bool = True,
    desc: str = "path",
) -> list[dict[str, Any]]:
    """Tidy rows {lambda, split, metric, value} for loss, accuracy and error at every λ on every split.

    θ_λ = lerp(θ_A, θ_B, λ) on `only` (default: all tensors; others from `base`). `bn`: "reset"
    recomputes BN statistics at every λ (endpoints included) from `bn_data` (one pass, or the first
    `bn_examples`); "repair" applies REPAIR; "none" uses the interpolated statistics. `model` is
    only a template: it is copied, never modified.
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
        stats = tuple(endpoint_stats(scratch, th, points, bn_data, max_examples=bn_examples) for th in (theta_a, theta_b))
    rows: list[dict[str, Any]] = []
    for lam in tqdm(lambdas, desc=desc, unit="λ", disable=not progress, leave=False):
        scratch.load_state_dict(lerp(theta_a, theta_b, lam, only=only, base=base))
        if bn == "reset":
            reset_bn_stats(scratch, bn_data, max_examples=bn_examples)  # type: ignore[arg-type]
        elif bn == "repair":
            repair(scratch, stats[0], stats[1], lam, bn_data, max_examples=bn_examples)  # type: ignore[index,arg-type]
        for split, data in datasets.items():
            m = evaluate(scratch, data, batch_size)
            for metric, value in (("loss", m["loss"]), ("accuracy", m["accuracy"]), ("error", 1.0 - m["accuracy"])):
                rows.append({"lambda": lam, "split": split, "metric": metric, "value": value})
    return rows
