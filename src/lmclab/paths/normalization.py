"""Repairing normalisation statistics along a path: BN reset and REPAIR.

BN reset: running statistics of every BatchNorm recomputed with one pass over training data,
as a cumulative average over batches (momentum=None): running_mean = mean of the batch means,
running_var = mean of the batch (unbiased) variances.

REPAIR (Jordan et al. 2022): at each correction point (the output of every affine norm layer, or
of every Conv/Linear with a bias except the network's head when the model has no norm layers) the
interpolated network's per-channel mean and std are rescaled to the interpolation of the
endpoints' — goal μ = (1−λ)μ_A + λμ_B, goal σ = (1−λ)σ_A + λσ_B — and the per-channel affine map
y ↦ (y − μ_λ)·σ_goal/σ_λ + μ_goal is folded into that layer's weight and bias. μ_λ, σ_λ are
estimated in one pass in which every point is already corrected with its batch statistics (the
later points see the corrected earlier ones).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lmclab.data import DeviceDataset
from lmclab.models.norms import LayerNorm2d
from lmclab.points import Point

NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.LayerNorm, nn.GroupNorm, LayerNorm2d)
EPS = 1e-10  # only guards divisions by a dead channel's zero std


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def input_batches(dataset: DeviceDataset, batch_size: int, max_examples: int | None) -> Iterator[torch.Tensor]:
    """The inputs of `dataset` in order, `batch_size` at a time, stopping once `max_examples` (None: all) are seen."""
    seen = 0
    for x, _ in dataset.batches(batch_size):
        if max_examples is not None and seen >= max_examples:
            return
        if max_examples is not None:
            x = x[: max_examples - seen]
        seen += x.shape[0]
        yield x


@torch.no_grad()
def reset_bn_stats(
    model: nn.Module, dataset: DeviceDataset, batch_size: int = 500, max_examples: int | None = None
) -> None:
    """Recompute every BatchNorm's running statistics (cumulative average over one pass); eval mode after."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in input_batches(dataset, batch_size, max_examples):
            model(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.eval()


def output_module(model: nn.Module, example: torch.Tensor) -> str | None:
    """Name of the module whose output *is* the network's output (the head), if any."""
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, o, n=n: outputs.__setitem__(n, o)) for n, m in model.named_modules() if n
    ]
    try:
        with torch.no_grad():
            y = model(example)
    finally:
        for h in handles:
            h.remove()
    heads = [n for n, o in outputs.items() if o is y]
    return heads[-1] if heads else None


def repair_points(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Modules whose outputs REPAIR corrects: affine norm layers; else biased Conv/Linear but the head."""
    norms = [
        n for n, m in model.named_modules() if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None
    ]
    if norms:
        return norms
    head = output_module(model, example)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None and n != head
    ]


@dataclass
class ChannelStats:
    """Per-channel mean and std (over batch and spatial positions) at each point."""

    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]


class _Accumulator:
    def __init__(self) -> None:
        self.n = 0
        self.mean_sum: torch.Tensor | float = 0.0
        self.var_sum: torch.Tensor | float = 0.0

    def add(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dims = [d for d in range(y.dim()) if d != 1]
        mean = y.mean(dims)
        var = y.var(dims, unbiased=False)
        self.mean_sum = self.mean_sum + mean
        self.var_sum = self.var_sum + var
        self.n += 1
        return mean, var

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean_sum, var_sum = self.mean_sum, self.var_sum
        if not isinstance(mean_sum, torch.Tensor) or not isinstance(var_sum, torch.Tensor):
            raise ValueError("no activations were recorded at this point (no examples were run)")
        return mean_sum / self.n, torch.sqrt(var_sum / self.n)


def _broadcast(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (y.dim() - 2)))


@contextlib.contextmanager
def _hooks(
    model: nn.Module, points: list[str], fn: Callable[[str, torch.Tensor], torch.Tensor | None]
) -> Iterator[None]:
    modules = dict(model.named_modules())
    handles = [modules[p].register_forward_hook(lambda _m, _i, y, p=p: fn(p, y)) for p in points]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def channel_stats(
    model: nn.Module, points: list[str], dataset: DeviceDataset, batch_size: int = 500, max_examples: int | None = None
) -> ChannelStats:
    """Mean over batches of per-batch channel means / variances at each point (eval mode)."""
    acc = {p: _Accumulator() for p in points}
    model.eval()

    def record(p: str, y: torch.Tensor) -> None:
        acc[p].add(y.float())

    with _hooks(model, points, record):
        for x in input_batches(dataset, batch_size, max_examples):
            model(x)
    res = {p: a.result() for p, a in acc.items()}
    return ChannelStats({p: r[0] for p, r in res.items()}, {p: r[1] for p, r in res.items()})


@torch.no_grad()
def repair(
    model: nn.Module,
    stats_a: ChannelStats,
    stats_b: ChannelStats,
    lam: float,
    dataset: DeviceDataset,
    batch_size: int = 500,
    max_examples: int | None = None,
) -> Point:
    """REPAIR the parameters loaded in `model` (the point θ_λ) in place; returns the repaired state dict."""
    points = list(stats_a.mean)
    goal_mean = {p: (1 - lam) * stats_a.mean[p] + lam * stats_b.mean[p] for p in points}
    goal_std = {p: (1 - lam) * stats_a.std[p] + lam * stats_b.std[p] for p in points}
    acc = {p: _Accumulator() for p in points}

    def correct_with_batch_stats(p: str, y: torch.Tensor) -> torch.Tensor:
        mean, var = acc[p].add(y.float())
        scale = goal_std[p] / torch.sqrt(var + EPS)
        return (y - _broadcast(mean, y)) * _broadcast(scale, y) + _broadcast(goal_mean[p], y)

    model.eval()
    with _hooks(model, points, correct_with_batch_stats):
        for x in input_batches(dataset, batch_size, max_examples):
            model(x)
    modules = dict(model.named_modules())
    for p in points:
        mean, std = acc[p].result()
        scale = goal_std[p] / torch.sqrt(std**2 + EPS)
        _fold_affine(modules[p], scale, goal_mean[p] - mean * scale)
    return model.state_dict()


def _fold_affine(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make module(x) ↦ scale·module(x) + shift per output channel, by editing its weight and bias."""
    weight, bias = module.weight, module.bias
    if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
        raise ValueError(f"cannot fold REPAIR's correction into {module}: it needs a weight and a bias")
    view = (-1,) + (1,) * (weight.dim() - 1)
    weight.mul_(scale.view(view).to(weight.dtype))
    bias.mul_(scale.to(bias.dtype)).add_(shift.to(bias.dtype))


def endpoint_stats(
    model: nn.Module,
    theta: Mapping[str, torch.Tensor],
    points: list[str],
    dataset: DeviceDataset,
    batch_size: int = 500,
    max_examples: int | None = None,
) -> ChannelStats:
    model.load_state_dict(theta)
    return channel_stats(model, points, dataset, batch_size, max_examples)
