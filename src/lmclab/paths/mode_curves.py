"""Low-loss curves between two modes (Garipov et al. 2018): parametrisations, training, evaluation.

A curve φ: [0, 1] → parameter space with φ(0) = θ_A and φ(1) = θ_B is a weighted sum of its control
points P_0 = θ_A, P_1 … P_K (the K bends), P_{K+1} = θ_B:  φ(t) = Σ_i w_i(t) P_i, dφ/dt = Σ_i w_i'(t) P_i.

bezier     Bernstein weights of degree n = K+1: w_i(t) = C(n, i) tⁱ (1−t)ⁿ⁻ⁱ. K = 1 is Garipov's quadratic
           φ(t) = (1−t)²θ_A + 2t(1−t)θ_c + t²θ_B; its tangent is dφ/dt = n Σ_i C(n−1, i) tⁱ(1−t)ⁿ⁻¹⁻ⁱ (P_{i+1} − P_i).
polychain  the polygonal chain through the bends, at evenly spaced t_i = i/(K+1): on segment j
           (t_j ≤ t ≤ t_{j+1}) φ(t) = (1−s)P_j + sP_{j+1}, s = (K+1)(t − t_j); dφ/dt = (K+1)(P_{j+1} − P_j).
           At a bend the tangent is the one of the segment that starts there (t = 1: the last segment).

Training (Garipov et al. eq. 2–3): minimise E_{t~U(0,1)} L(φ(t)) over the bends only, endpoints fixed: each
step draws one t and one batch; the model runs in train mode at φ(t), so BatchNorm uses batch statistics.
Bends start on the straight line (P_i = lerp(θ_A, θ_B, i/(K+1)): both kinds then trace the straight path).

Evaluation along a curve gives the same tidy rows as :func:`lmclab.paths.evaluate_path`, with t in the
``lambda`` column, so :func:`lmclab.paths.barriers` and ``barrier_report`` apply unchanged. BatchNorm
statistics are recomputed at every evaluated t (``bn="reset"``, :func:`reset_bn_stats`); "none" uses the
curve's combination of the control points' statistics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lmclab.data import DeviceDataset
from lmclab.paths.batched import BATCHED_BN_MODES, evaluate_points, metric_rows
from lmclab.paths.curves import default_bn_mode
from lmclab.paths.interpolate import default_lambdas
from lmclab.points import Point, PointLike, lerp, mixture, parameter_names

__all__ = [
    "CURVE_BN_MODES",
    "KINDS",
    "MAX_BENDS",
    "OPTIMIZERS",
    "Curve",
    "CurveTraining",
    "curve_params",
    "curve_point",
    "curve_segment",
    "curve_tangent",
    "curve_weights",
    "evaluate_curve",
    "straight_curve",
    "train_curve",
    "weight_derivatives",
]

KINDS = ("bezier", "polychain")
MAX_BENDS = 3
CURVE_BN_MODES = BATCHED_BN_MODES
OPTIMIZERS = ("adam", "sgd")

Scalar = float | torch.Tensor


def _check_kind(kind: str, bends: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; valid: {', '.join(KINDS)}")
    if isinstance(bends, bool) or not isinstance(bends, int) or not 1 <= bends <= MAX_BENDS:
        raise ValueError(f"bends must be an int in 1..{MAX_BENDS}, got {bends!r}")


def curve_segment(kind: str, bends: int, t: float) -> int:
    """The polychain segment j holding t (t_j ≤ t < t_{j+1}; t = 1 in the last one); 0 for a Bezier curve."""
    _check_kind(kind, bends)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    return 0 if kind == "bezier" else min(int(math.floor(t * (bends + 1))), bends)


def curve_weights(kind: str, bends: int, t: Scalar, segment: int | None = None) -> list[Scalar]:
    """w_i(t), i = 0 … K+1, the weights of θ_A, the bends and θ_B in φ(t) (see the module docstring).

    ``t`` is a float or a scalar tensor (differentiable: the weights are polynomials in t). A polychain's
    ``segment`` defaults to :func:`curve_segment` of t; give it for a tensor t under a transform."""
    _check_kind(kind, bends)
    n = bends + 1
    if kind == "bezier":
        return [math.comb(n, i) * t**i * (1 - t) ** (n - i) for i in range(n + 1)]
    j = curve_segment(kind, bends, float(t)) if segment is None else segment
    s = (t - j / n) * n
    zero = t * 0
    return [1 - s if i == j else s if i == j + 1 else zero for i in range(n + 1)]


def weight_derivatives(kind: str, bends: int, t: Scalar, segment: int | None = None) -> list[Scalar]:
    """w_i'(t): dφ/dt = Σ_i w_i'(t) P_i (Bezier: d/dt C(n,i)tⁱ(1−t)ⁿ⁻ⁱ; polychain: ∓(K+1) on the segment)."""
    _check_kind(kind, bends)
    n = bends + 1
    if kind == "bezier":
        out: list[Scalar] = []
        for i in range(n + 1):
            rise = i * t ** (i - 1) * (1 - t) ** (n - i) if i > 0 else t * 0
            fall = (n - i) * t**i * (1 - t) ** (n - i - 1) if i < n else t * 0
            out.append(math.comb(n, i) * (rise - fall))
        return out
    j = curve_segment(kind, bends, float(t)) if segment is None else segment
    zero = t * 0
    return [zero - n if i == j else zero + n if i == j + 1 else zero for i in range(n + 1)]


@dataclass(frozen=True)
class Curve:
    """φ(t) through θ_A (``start``), the ``bends`` and θ_B (``end``): full points (parameters and buffers)."""

    kind: str
    start: Point
    bends: tuple[Point, ...]
    end: Point

    def __post_init__(self) -> None:
        _check_kind(self.kind, len(self.bends))
        for i, p in enumerate((*self.bends, self.end)):
            if p.keys() != self.start.keys():
                raise KeyError(f"control point {i + 1} differs in tensors: {sorted(set(p) ^ set(self.start))}")

    @property
    def points(self) -> list[Point]:
        """The control points P_0 = θ_A, P_1 … P_K, P_{K+1} = θ_B."""
        return [self.start, *self.bends, self.end]

    @property
    def n_bends(self) -> int:
        return len(self.bends)


def straight_curve(kind: str, theta_a: PointLike, theta_b: PointLike, bends: int = 1) -> Curve:
    """A curve of `kind` whose bends lie on the straight line, P_i = lerp(θ_A, θ_B, i/(K+1)) (cloned):
    φ(t) = (1−t)θ_A + tθ_B for both kinds (collinear evenly spaced Bernstein control points)."""
    _check_kind(kind, bends)
    start, end = dict(theta_a), dict(theta_b)
    bend_points = tuple(
        {k: v.detach().clone() for k, v in lerp(start, end, i / (bends + 1)).items()} for i in range(1, bends + 1)
    )
    return Curve(kind, start, bend_points, end)


def curve_point(curve: Curve, t: float) -> Point:
    """φ(t) = Σ_i w_i(t) P_i on every floating tensor (in θ_A's dtype; integer buffers from θ_A);
    φ(0) = θ_A and φ(1) = θ_B exactly."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    if t == 0.0:
        return dict(curve.start)
    if t == 1.0:
        return {k: v if v.is_floating_point() else curve.start[k] for k, v in curve.end.items()}
    return mixture(curve.points, [float(w) for w in curve_weights(curve.kind, curve.n_bends, t)])


def curve_tangent(curve: Curve, t: float, keys: Sequence[str] | None = None) -> Point:
    """dφ/dt = Σ_i w_i'(t) P_i on `keys` (default: every floating tensor of θ_A)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], got {t}")
    names = [k for k, v in curve.start.items() if v.is_floating_point()] if keys is None else list(keys)
    points = [{k: p[k] for k in names} for p in curve.points]
    return mixture(points, [float(w) for w in weight_derivatives(curve.kind, curve.n_bends, t)])


def curve_params(
    curve: Curve, t: torch.Tensor, keys: Sequence[str], segment: int | None = None, dtype: torch.dtype | None = None
) -> Point:
    """φ(t) on `keys` for a scalar tensor t, differentiable in t (forward mode) and in the control points:
    the map the Taylor expansion of t ↦ L(φ(t)) and the training differentiate. ``dtype``: of the result
    (default: θ_A's per tensor)."""
    weights = curve_weights(curve.kind, curve.n_bends, t, segment)
    out: Point = {}
    for k in keys:
        target = dtype or curve.start[k].dtype
        acc = None
        for w, p in zip(weights, curve.points):
            term = p[k].to(target) * w
            acc = term if acc is None else acc + term
        assert acc is not None
        out[k] = acc
    return out


# ------------------------------------------------------------------------------------------ training


@dataclass
class CurveTraining:
    """What :func:`train_curve` did: the mean training loss of each epoch (from epoch `start_epoch` on)."""

    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's data order and t draws: resuming at an epoch redraws the same."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def make_optimizer(
    params: Sequence[torch.Tensor], optimizer: str, lr: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Adam(lr) or SGD(lr, momentum) over the bends' parameters."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def cosine_lr(lr: float, step: int, total: int) -> float:
    """lr · ½(1 + cos(π step/total)): from lr down to 0 over `total` steps."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_curve(
    model: nn.Module,
    curve: Curve,
    data: DeviceDataset,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 128,
    optimizer: str = "adam",
    schedule: str = "cosine",
    seed: int = 0,
    start_epoch: int = 0,
    optimizer_state: Callable[[torch.optim.Optimizer], None] | None = None,
    on_epoch: Callable[[int, Curve, torch.optim.Optimizer, list[dict[str, float]]], None] | None = None,
    progress: bool = True,
) -> tuple[Curve, CurveTraining]:
    """Minimise E_{t~U(0,1)} L(φ(t)) over the bends' trainable parameters (θ_A, θ_B and buffers fixed).

    Each epoch visits `data` once in a random order, `batch_size` examples per step, with one t ~ U(0,1)
    per step; the model is in train mode at φ(t) (BatchNorm: batch statistics). ``schedule``: "cosine"
    (lr decays to 0 over all `epochs`) or "constant". Seeded and deterministic on CPU: epoch e's order and
    t draws come from (`seed`, e) alone, so a run resumed at ``start_epoch`` (bends of that epoch's start,
    ``optimizer_state`` loading the optimizer's) ends as an uninterrupted one. ``on_epoch(epoch + 1,
    curve, optimizer, history)`` is called after each epoch (e.g. to checkpoint). `model` is a template,
    never modified. Returns the trained curve (new bend tensors) and the history."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}; valid: cosine, constant")
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    names = parameter_names(model)
    module = copy.deepcopy(model).train()
    device = curve.start[names[0]].device
    buffers = {k: v.detach().clone() for k, v in curve.start.items() if k not in names}
    leaves = [{k: p[k].detach().clone().requires_grad_(True) for k in names} for p in curve.bends]
    fixed = [{k: curve.start[k].detach() for k in names}, {k: curve.end[k].detach() for k in names}]
    opt = make_optimizer([v for bend in leaves for v in bend.values()], optimizer, lr)
    if optimizer_state is not None:
        optimizer_state(opt)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    total = epochs * steps_per_epoch
    history: list[dict[str, float]] = []

    def current() -> Curve:
        bends = tuple({**p, **{k: v.detach().clone() for k, v in leaf.items()}} for p, leaf in zip(curve.bends, leaves))
        return Curve(curve.kind, curve.start, bends, curve.end)

    bar = tqdm(
        total=(epochs - start_epoch) * steps_per_epoch,
        desc=f"{curve.kind} curve",
        unit="step",
        disable=not progress,
        leave=False,
    )
    try:
        for epoch in range(start_epoch, epochs):
            gen = _epoch_generator(seed, epoch)
            order = torch.randperm(len(data), generator=gen)
            ts = torch.rand(steps_per_epoch, generator=gen, dtype=torch.float64)
            loss_sum, seen = 0.0, 0
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(lr, step, total) if schedule == "cosine" else lr
                x, y = data.batch(order[i * batch_size : (i + 1) * batch_size].to(data.device))
                points = [fixed[0], *leaves, fixed[1]]
                params = mixture(points, [float(w) for w in curve_weights(curve.kind, curve.n_bends, float(ts[i]))])
                logits = functional_call(module, {**buffers, **params}, (x.to(device),))
                loss = F.cross_entropy(logits, y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.4f}")
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1)})
            if on_epoch is not None:
                on_epoch(epoch + 1, current(), opt, history)
    finally:
        bar.close()
    return current(), CurveTraining(epochs, history)


# ------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_curve(
    model: nn.Module,
    curve: Curve,
    datasets: Mapping[str, DeviceDataset],
    *,
    ts: Sequence[float] | None = None,
    bn: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    batch_size: int = 1000,
    chunk: int | None = None,
    progress: bool = True,
    desc: str = "curve",
) -> list[dict[str, Any]]:
    """Tidy rows {lambda (= t), split, metric, value} for loss, accuracy and error at every t on every split,
    in :func:`lmclab.paths.evaluate_path`'s format. ``bn``: "reset" recomputes BatchNorm statistics at every
    t from `bn_data` (endpoints included); "none" uses φ(t)'s own; default reset for BN models. The points
    are evaluated `chunk` at a time by :func:`lmclab.paths.batched.evaluate_points` (default: its memory
    estimate on an accelerator, 1 on the CPU). `model` is a template, never modified."""
    bn = bn or default_bn_mode(model)
    if bn not in CURVE_BN_MODES:
        raise ValueError(f"bn mode {bn!r} is not available along a curve; valid: {', '.join(CURVE_BN_MODES)}")
    ts = list(ts) if ts is not None else default_lambdas()
    metrics = evaluate_points(  # raises if bn='reset' comes without bn_data
        model,
        (curve_point(curve, float(t)) for t in ts),
        datasets,
        bn=bn,
        bn_data=bn_data,
        bn_examples=bn_examples,
        chunk=chunk,
        batch_size=batch_size,
        total=len(ts),
        progress=progress,
        desc=desc,
        unit="t",
    )
    return metric_rows([{"lambda": t} for t in ts], metrics)
