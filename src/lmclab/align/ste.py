"""Straight-through (STE) learned matching: Git Re-Basin's two-model STE and the machinery STE-MM shares.

A reference θ_A (never permuted) and K − 1 other models θ_{B_i}. Learned *proxies* θ̃_i, one per
other model, all initialised at θ_A, stand in for the target of weight matching. Every mini-batch:

1. weight-match each B_i to its proxy, P_i = π_i(θ_{B_i}) with π_i = WM(θ̃_i, θ_{B_i}), warm-started
   from the previous step's permutation and LAP dual potentials (:class:`WeightMatchingState`);
2. straight-through weights ste_i = P_i + (θ̃_i − sg(θ̃_i)): the value of P_i, the gradient of θ̃_i
   (sg = stop-gradient, ``detach``);
3. mixing weights w over {A, B_1 … B_{K−1}} summing to 1, θ_mix = w_0 θ_A + Σ_i w_i ste_i;
4. cross-entropy of the model at θ_mix (``torch.func.functional_call``); Adam on the proxies, whose
   gradient is ∂L/∂θ̃_i = w_i ∇L(θ_mix) (= ∂L/∂P_i).

Two models with w = (1 − λ, λ), λ = ½ or λ ~ U(0, 1), is Ainsworth et al.'s STE
(:func:`ste_matching`); K models with random w is Ito et al.'s STE-MM (:mod:`lmclab.align.ste_mm`).

What is learned and matched: the model's *parameters* (``named_parameters``). Weight matching of
B_i to its proxy uses the parameters only (weight 0 for buffers: the proxies learn no BN
statistics). Floating buffers of the mixture are the same mixture of A's and the permuted B_i's
buffers (fresh tensors, so BatchNorm's in-place running-statistics updates touch no input).

BatchNorm: the mixture's forward runs in train mode, so BatchNorm normalises with the batch's own
statistics (the permuted models' running statistics do not describe the mixture). The merged model
θ̄ = mean of A and the π_i(B_i) then needs a BN reset before use (the caller does it; the held-out
selection below does it on at most :data:`BN_RESET_EXAMPLES` training examples).

Held-out selection: with `val_data`, at the end of every epoch the merged model of the current
permutations is evaluated (eval mode, BN reset for BN models) and the permutations with the lowest
held-out loss are returned (for two models the merged model is the midpoint, λ = ½); without it,
the last epoch's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lmclab.align.registry import register_pair_method
from lmclab.align.results import MatchResult
from lmclab.align.weight_matching import WeightMatchingState, match_distances, weight_matching
from lmclab.data import DeviceDataset
from lmclab.paths.population import merged_metrics
from lmclab.permutation.spec import Permutation, PermutationSpec
from lmclab.points import Point, PointLike, mixture
from lmclab.training.evaluate import autocast_for

__all__ = [
    "BN_RESET_EXAMPLES",
    "LAMBDAS",
    "STELoop",
    "WeightDraw",
    "check_hyper",
    "check_points",
    "learn_permutations",
    "mixture_loss",
    "pair_draw",
    "ste_matching",
    "straight_through",
    "trainable_names",
]

#: λ choices of :func:`ste_matching`.
LAMBDAS: tuple[str, ...] = ("half", "random")
#: Training examples used to reset BatchNorm statistics before a held-out evaluation.
BN_RESET_EXAMPLES = 10_000

#: draw(generator) -> mixing weights w (float64, K entries, summing to 1).
WeightDraw = Callable[[np.random.Generator], np.ndarray]


def straight_through(projected: PointLike, proxy: PointLike) -> Point:
    """ste = P + (θ̃ − sg(θ̃)) for every tensor of `proxy`: the value of P, the gradient of θ̃."""
    return {k: projected[k] + (p - p.detach()) for k, p in proxy.items()}


def mixture_loss(
    model: nn.Module,
    points: Sequence[PointLike],
    weights: torch.Tensor | np.ndarray | Sequence[float],
    x: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy of `model` at θ_mix = Σ_k w_k θ_k (:func:`lmclab.points.mixture`) on (x, y), via
    ``functional_call`` (in the module's current train/eval mode; bf16 autocast on CUDA)."""
    with autocast_for(x.device):
        logits = functional_call(model, mixture(points, weights), (x,))
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)


def trainable_names(model: nn.Module, point: PointLike) -> list[str]:
    """The model's parameter names that require grad (model order); ValueError if `point` lacks any."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in point]
    if missing:
        raise ValueError(
            f"the points lack the model's parameters {missing[:5]}{' …' if len(missing) > 5 else ''}: "
            "pass state dicts of this architecture"
        )
    return names


def check_points(points: Sequence[PointLike]) -> None:
    """ValueError unless there are >= 2 points, all with point 0's tensor names (same order) and shapes."""
    if len(points) < 2:
        raise ValueError(f"alignment needs at least 2 points, got {len(points)}")
    keys = list(points[0])
    for i, p in enumerate(points[1:], 1):
        if list(p) != keys:
            raise ValueError(f"point {i} has different tensors than point 0")
        bad = [k for k in keys if p[k].shape != points[0][k].shape]
        if bad:
            raise ValueError(f"point {i} differs from point 0 in the shapes of {bad[:5]}")


def check_hyper(epochs: int, lr: float, batch_size: int) -> None:
    """ValueError unless epochs >= 1, lr > 0 and batch_size >= 1 (a learned matching's training settings)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class STELoop:
    """The state of one STE / STE-MM run: reference, other models, proxies, warm matchings, Adam.

    ``step(x, y)`` does one mini-batch (match every other model to its proxy, draw the mixing
    weights, straight-through forward and backward at the mixture, Adam step on the proxies) and
    returns the loss; ``perms`` are the K permutations of the last matching (identity first).
    """

    def __init__(
        self,
        reference: PointLike,
        others: Sequence[PointLike],
        spec: PermutationSpec,
        model: nn.Module,
        *,
        draw: WeightDraw,
        lr: float,
        seed: int,
        device: torch.device,
    ) -> None:
        self.spec = spec
        self.device = device
        self.model = copy.deepcopy(model).to(device).train()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.reference = {k: v.detach().to(device) for k, v in reference.items()}
        self.others = [{k: v.detach().to(device) for k, v in o.items()} for o in others]
        self.names = trainable_names(model, self.reference)
        trainable = set(self.names)
        self.weights: Callable[[str], float] = lambda t: 1.0 if t in trainable else 0.0
        self.proxies = [
            {
                k: self.reference[k]
                .to(torch.promote_types(self.reference[k].dtype, torch.float32))
                .clone()
                .requires_grad_(True)
                for k in self.names
            }
            for _ in self.others
        ]
        self.optimizer = torch.optim.Adam([p for proxy in self.proxies for p in proxy.values()], lr=lr)
        self.states = [WeightMatchingState() for _ in self.others]
        self.draw = draw
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.perms: list[Permutation] = [Permutation.identity(spec) for _ in range(len(others) + 1)]
        self.match_seconds = 0.0
        self.sweeps: list[int] = []

    def match(self) -> list[Point]:
        """π_i = WM(θ̃_i, θ_{B_i}) (warm), stored in ``perms``; returns the permuted points π_i(θ_{B_i})."""
        start = time.perf_counter()
        projected = []
        for i, (other, proxy, state) in enumerate(zip(self.others, self.proxies, self.states)):
            target = {**self.reference, **{k: v.detach() for k, v in proxy.items()}}
            res = weight_matching(  # warm: from the last projection; the first from the identity, as published
                target,
                other,
                self.spec,
                seed=self.seed,
                weights=self.weights,
                warm=state,
                device=self.device,
                start="identity",
            )
            self.perms[i + 1] = res.perm
            self.sweeps.append(res.sweeps)
            projected.append(res.perm.apply(other, self.spec))
        self.match_seconds += time.perf_counter() - start
        return projected

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One mini-batch of STE / STE-MM; returns the mixture's loss (before the step)."""
        projected = self.match()
        w = self.draw(self.rng)
        members = [{**p, **straight_through(p, proxy)} for p, proxy in zip(projected, self.proxies)]
        loss = mixture_loss(self.model, [self.reference, *members], w, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def solver_stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for state in self.states:
            for k, n in state.stats().items():
                out[k] = out.get(k, 0) + n
        return out


def learn_permutations(
    reference: PointLike,
    others: Sequence[PointLike],
    spec: PermutationSpec,
    *,
    model: nn.Module,
    data: Any,
    draw: WeightDraw,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device | str | None,
    progress: bool,
    val_data: Any,
    desc: str,
) -> tuple[list[Permutation], dict[str, Any]]:
    """The STE loop over `epochs` of `data` (a DeviceDataset; order from a CPU generator seeded with
    `seed`, augmentation if the dataset has it); returns the permutations (identity first) kept by
    held-out loss of the merged model (or the last), and info (per-epoch loss, timing, solver stats)."""
    check_points([reference, *others])
    check_hyper(epochs, lr, batch_size)
    for name, d in (("data", data), ("val_data", val_data)):
        if d is not None and not isinstance(d, DeviceDataset):
            raise ValueError(f"{name} must be a lmclab.data.DeviceDataset, got {type(d).__name__}")
    if data is None or len(data) == 0:
        raise ValueError("data must be a non-empty DeviceDataset (the training split)")
    device = torch.device(device) if device is not None else data.device
    for name, d in (("data", data), ("val_data", val_data)):
        if d is not None and d.device.type != device.type:
            raise ValueError(
                f"{name} lives on {d.device} but the alignment runs on {device}: load it there "
                "(DeviceDataset.load(..., device=...))"
            )
    loop = STELoop(reference, others, spec, model, draw=draw, lr=lr, seed=seed, device=device)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=data.device).manual_seed(seed)
    n = len(data)
    steps = -(-n // batch_size)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, list[Permutation]] | None = None
    bar = tqdm(total=epochs * steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    try:
        for epoch in range(1, epochs + 1):
            t0, m0 = time.perf_counter(), loop.match_seconds
            order = torch.randperm(n, generator=order_gen).to(data.device)
            total, seen = 0.0, 0
            for b in range(steps):
                x, y = data.batch(order[b * batch_size : (b + 1) * batch_size], aug_gen)
                x, y = x.to(device), y.to(device)
                loss = loop.step(x, y)
                total += loss * len(y)
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")
            entry: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": total / seen,
                "seconds": time.perf_counter() - t0,
                "match_seconds": loop.match_seconds - m0,
            }
            if val_data is not None:
                aligned = [p.apply(theta, spec) for p, theta in zip(loop.perms, [loop.reference, *loop.others])]
                m = merged_metrics(loop.model, aligned, {"val": val_data}, bn_data=data, bn_examples=BN_RESET_EXAMPLES)[
                    "val"
                ]
                entry.update(val_loss=m.loss, val_accuracy=m.accuracy)
                if best is None or m.loss < best[0]:
                    best = (m.loss, epoch, list(loop.perms))
            history.append(entry)
    finally:
        bar.close()
    perms, best_epoch = (best[2], best[1]) if best is not None else (list(loop.perms), epochs)
    info = {
        "epochs": history,
        "best_epoch": best_epoch,
        "selected_by": "val_loss" if best is not None else "last",
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "steps_per_epoch": steps,
        "seconds": time.perf_counter() - start,
        "match_seconds": loop.match_seconds,
        "mean_sweeps_per_match": float(np.mean(loop.sweeps)) if loop.sweeps else 0.0,
        "solver": loop.solver_stats(),
        "device": str(device),
    }
    return perms, info


def pair_draw(lam: str) -> WeightDraw:
    """Mixing weights (1 − λ, λ) of a pair: λ = 1/2 (`half`) or λ ~ U(0, 1) (`random`) at each step."""
    if lam not in LAMBDAS:
        raise ValueError(f"unknown lam {lam!r}; valid: {', '.join(LAMBDAS)}")
    if lam == "half":
        return lambda rng: np.array([0.5, 0.5])

    def draw(rng: np.random.Generator) -> np.ndarray:
        t = rng.random()
        return np.array([1.0 - t, t])

    return draw


@register_pair_method(
    "ste",
    "learned straight-through matching (Git Re-Basin), trained on the training split",
    needs=("model", "data"),
    accepts=("seed", "device", "progress", "epochs", "val_data"),
    title="STE",
)
def ste_matching(
    params_a: PointLike,
    params_b: PointLike,
    spec: PermutationSpec,
    *,
    model: nn.Module,
    data: Any,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 256,
    lam: str = "half",
    seed: int = 0,
    val_data: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> MatchResult:
    """Git Re-Basin's straight-through matching of B to A (method "ste"): learn θ̃ (initialised at θ_A);
    each step weight-match θ_B to θ̃ (warm), forward at (1 − λ)θ_A + λ·ste, ste = π(θ_B) + (θ̃ − sg θ̃),
    λ = ½ (``lam="half"``) or λ ~ U(0, 1) (``"random"``), Adam step on θ̃. Returns the permutation kept by
    held-out loss at λ = ½ (`val_data`) or the last one; ``objective`` holds J(π) = Σ_t ⟨θ_A, π(θ_B)⟩
    over the spec's tensors, ``info`` the per-epoch losses and timing (see :func:`learn_permutations`)."""
    draw = pair_draw(lam)
    perms, info = learn_permutations(
        params_a,
        [params_b],
        spec,
        model=model,
        data=data,
        draw=draw,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=progress,
        val_data=val_data,
        desc="ste",
    )
    perm = perms[1]
    before, after = match_distances(params_a, params_b, spec, perm)
    permuted = perm.apply(params_b, spec)
    objective = float(
        sum(
            (params_a[t].double() * permuted[t].double().to(params_a[t].device)).sum()
            for t in spec.axes_by_tensor()
            if params_a[t].is_floating_point()
        )
    )
    return MatchResult(
        perm=perm,
        spec=spec,
        sweeps=len(info["epochs"]),
        objective=[objective],
        distance_before=before,
        distance_after=after,
        method="ste",
        converged=True,
        info={**info, "lam": lam},
    )
