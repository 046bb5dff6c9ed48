"""Sinkhorn re-basin (Peña et al., CVPR 2023): learned soft permutations of model B onto model A.

Every permutation group g of the spec (n_g units) gets a learnable log-assignment matrix M_g ∈ ℝ^{n×n}.
Its soft permutation at temperature τ is the Sinkhorn projection of exp(M_g / τ) onto the doubly
stochastic matrices (:func:`sinkhorn`, in the log domain: alternately subtract the row and the column
log-sum-exp). A soft permutation acts on a point like a hard one, with the index selection replaced by a
contraction along every axis of the group (:func:`soft_apply`): π_P(θ)[…, i, …] = Σ_j P[i, j] θ[…, j, …]
(a permutation p is the matrix P[i, p[i]] = 1, so π_P = π for hard P).

Training (:func:`sinkhorn_matching`): each mini-batch draws λ (½, or λ ~ U(0, 1)), forms
θ_λ = (1 − λ) θ_A + λ π_P(θ_B) and takes an Adam step on the M_g against the cross-entropy of the model at
θ_λ (``torch.func.functional_call``, via :func:`lmclab.align.ste.mixture_loss`); τ decreases geometrically
from `tau_start` to `tau_end` over the run, so the soft permutations harden as training goes. The result
is hardened by a linear assignment, p_g = argmax_p Σ_i M_g[i, p(i)] (:func:`harden`; the τ → 0 limit of
the Sinkhorn projection), and is an exact symmetry of B.

BatchNorm, as in STE (:mod:`lmclab.align.ste`): the interpolated model runs in train mode (batch
statistics); the floating buffers are the same mixture of A's and the soft-permuted B's buffers, without
gradient. Held-out selection: with `val_data`, the hardened permutation of the initialisation (epoch 0)
and of every epoch's end is scored by the held-out loss of the midpoint (eval mode, BN reset for BN
models) and the best is returned; without it, the last epoch's.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lmclab.align.assignment import solve_assignment
from lmclab.align.registry import register_pair_method
from lmclab.align.results import MatchResult
from lmclab.align.ste import BN_RESET_EXAMPLES, check_hyper, check_points, mixture_loss, pair_draw, trainable_names
from lmclab.align.weight_matching import match_distances, weight_matching
from lmclab.data import DeviceDataset
from lmclab.paths.population import merged_metrics
from lmclab.permutation.spec import AxisRef, Permutation, PermutationSpec
from lmclab.points import Point, PointLike, inner

__all__ = [
    "INITS",
    "harden",
    "permutation_matrices",
    "sinkhorn",
    "sinkhorn_matching",
    "soft_apply",
    "temperature",
]

#: Initialisations of the log-assignment matrices: one-hot at weight matching's permutation, or at the identity.
INITS: tuple[str, ...] = ("weight", "identity")


def sinkhorn(log_alpha: torch.Tensor, tau: float = 1.0, iters: int = 20) -> torch.Tensor:
    """log P of the Sinkhorn projection of exp(M / τ) (M = `log_alpha`, square): `iters` rounds of
    z ← z − logsumexp_rows(z), z ← z − logsumexp_cols(z) from z = M / τ. Columns of P = exp(log P) sum to
    1 exactly, rows to 1 up to the convergence of the iterations; as τ → 0, P tends to the permutation
    matrix maximising ⟨M, P⟩ (when it is unique)."""
    if log_alpha.ndim != 2 or log_alpha.shape[0] != log_alpha.shape[1]:
        raise ValueError(f"log_alpha must be a square matrix, got shape {tuple(log_alpha.shape)}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    z = log_alpha / tau
    for _ in range(iters):
        z = z - torch.logsumexp(z, dim=1, keepdim=True)
        z = z - torch.logsumexp(z, dim=0, keepdim=True)
    return z


def temperature(step: int, total: int, tau_start: float, tau_end: float) -> float:
    """Geometric schedule τ_t = τ_start · (τ_end / τ_start)^(t / max(total − 1, 1)), t = 0 … total − 1."""
    frac = min(max(step / max(total - 1, 1), 0.0), 1.0)
    return tau_start * (tau_end / tau_start) ** frac


def permutation_matrices(perm: Permutation, spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """Group name -> the float32 permutation matrix P with P[i, p[i]] = 1 (unit i of π(θ) is unit p[i] of θ)."""
    return {g.name: nn.functional.one_hot(perm[g.name], g.size).float() for g in spec.groups}


def _soft_permute_axis(t: torch.Tensor, ax: AxisRef, matrix: torch.Tensor) -> torch.Tensor:
    """Entries [offset, offset + n·block) of axis `ax.axis`, as n units of `block` entries: unit i becomes
    Σ_j P[i, j] · unit j."""
    n = matrix.shape[0]
    span = n * ax.block
    moved = t.movedim(ax.axis, 0)
    part = moved[ax.offset : ax.offset + span]
    rest = part.shape[1:]
    mixed = (matrix.to(device=t.device, dtype=t.dtype) @ part.reshape(n, -1)).reshape(span, *rest)
    if ax.offset > 0 or span < moved.shape[0]:
        mixed = torch.cat([moved[: ax.offset], mixed, moved[ax.offset + span :]])
    return mixed.movedim(0, ax.axis)


def soft_apply(
    params: PointLike,
    spec: PermutationSpec,
    matrices: Mapping[str, torch.Tensor],
    keys: Collection[str] | None = None,
) -> Point:
    """π_P(θ): every floating tensor of `params` (of `keys`, default all) with each spec axis contracted with
    its group's matrix (``matrices[g]``, n_g × n_g; differentiable in the matrices); other tensors copied
    by reference.
    With permutation matrices (:func:`permutation_matrices`) this equals ``Permutation.apply`` exactly."""
    missing = [g.name for g in spec.groups if g.name not in matrices]
    if missing:
        raise ValueError(f"soft permutation lacks groups {missing}")
    sizes = {g.name: g.size for g in spec.groups}
    bad = [k for k, m in matrices.items() if k in sizes and tuple(m.shape) != (sizes[k], sizes[k])]
    if bad:
        raise ValueError(f"soft permutation matrices of the wrong shape for groups {bad}")
    out = dict(params)
    for tensor, axes in spec.axes_by_tensor().items():
        if tensor not in out:
            raise ValueError(f"spec names tensor {tensor!r}, which the parameters do not have")
        t = out[tensor]
        if not t.is_floating_point() or (keys is not None and tensor not in keys):
            continue
        for group, ax in axes:
            t = _soft_permute_axis(t, ax, matrices[group])
        out[tensor] = t
    return out


def harden(log_alphas: Mapping[str, torch.Tensor], spec: PermutationSpec) -> Permutation:
    """The permutation maximising Σ_i M_g[i, p(i)] for every group (linear assignment, scipy)."""
    return Permutation({g.name: solve_assignment(log_alphas[g.name].detach()) for g in spec.groups})


def _initial_log_alphas(
    perm: Permutation, spec: PermutationSpec, scale: float, noise: float, seed: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """M_g = scale · P_g + noise · N(0, 1) (P_g the permutation matrix of `perm`), learnable float32."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, matrix in permutation_matrices(perm, spec).items():
        m = scale * matrix + noise * torch.randn(matrix.shape, generator=gen)
        out[name] = m.to(device).requires_grad_(True)
    return out


def _midpoint_val_loss(
    model: nn.Module, theta_a: Point, theta_b: Point, perm: Permutation, spec: PermutationSpec, val: Any, data: Any
) -> dict[str, float]:
    m = merged_metrics(
        model, [theta_a, perm.apply(theta_b, spec)], {"val": val}, bn_data=data, bn_examples=BN_RESET_EXAMPLES
    )["val"]
    return {"val_loss": m.loss, "val_accuracy": m.accuracy}


def _check_options(init: str, tau_start: float, tau_end: float, iters: int, init_scale: float, noise: float) -> None:
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    if not (tau_start > 0 and tau_end > 0 and tau_end <= tau_start):
        raise ValueError(f"need tau_start >= tau_end > 0, got tau_start={tau_start}, tau_end={tau_end}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not (math.isfinite(init_scale) and init_scale >= 0 and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"init_scale and noise must be finite and >= 0, got {init_scale}, {noise}")


@register_pair_method(
    "sinkhorn",
    "learned soft permutations (Sinkhorn re-basin), trained on the training split, hardened by assignment",
    needs=("model", "data"),
    accepts=("seed", "device", "progress", "val_data"),
    title="Sinkhorn matching",
    revision=2,  # 2: its weight-matching initialisation uses the anchored start for specs with attention heads
)
def sinkhorn_matching(
    params_a: PointLike,
    params_b: PointLike,
    spec: PermutationSpec,
    *,
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    lr: float = 0.01,
    batch_size: int = 500,
    lam: str = "half",
    tau_start: float = 0.1,
    tau_end: float = 0.01,
    iters: int = 10,
    init: str = "weight",
    init_scale: float = 1.0,
    noise: float = 0.01,
    seed: int = 0,
    val_data: Any = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> MatchResult:
    """Sinkhorn matching of B to A (method "sinkhorn"): learn M_g (initialised at `init_scale` × the one-hot of
    weight matching's permutation, or of the identity, plus `noise` × N(0, 1)); each step P_g = exp(sinkhorn(M_g,
    τ, `iters`)), loss CE((1 − λ)θ_A + λ π_P(θ_B)) with λ = ½ (``lam="half"``) or λ ~ U(0, 1) (``"random"``),
    Adam(`lr`) on the M_g; τ geometric from `tau_start` to `tau_end` over all steps; `epochs` passes over `data`
    in batches of `batch_size` (the method's own option: it does not take the common ``epochs`` setting, which
    callers size for STE, since a Sinkhorn step costs far more). Hardened by linear assignment; the permutation
    kept is the one with the lowest held-out midpoint loss (`val_data`, the initialisation included) or the last.
    ``objective`` holds J(π) = Σ_t ⟨θ_A, π(θ_B)⟩ over the spec's tensors; ``info`` the per-epoch losses,
    temperatures and timing."""
    draw = pair_draw(lam)
    if spec.structured:
        raise ValueError(
            "Sinkhorn matching learns one free soft permutation per group; it does not handle "
            "block-structured groups (attention heads, grouped convolutions)"
        )
    check_points([params_a, params_b])
    check_hyper(epochs, lr, batch_size)
    _check_options(init, tau_start, tau_end, iters, init_scale, noise)
    for name, d in (("data", data), ("val_data", val_data)):
        if d is not None and not isinstance(d, DeviceDataset):
            raise ValueError(f"{name} must be a lmclab.data.DeviceDataset, got {type(d).__name__}")
    if data is None or len(data) == 0:
        raise ValueError("data must be a non-empty DeviceDataset (the training split)")
    dev = torch.device(device) if device is not None else data.device
    for name, d in (("data", data), ("val_data", val_data)):
        if d is not None and d.device.type != dev.type:
            raise ValueError(f"{name} lives on {d.device} but the alignment runs on {dev}: load it there")
    start = time.perf_counter()
    theta_a = {k: v.detach().to(dev) for k, v in params_a.items()}
    theta_b = {k: v.detach().to(dev) for k, v in params_b.items()}
    trainable = set(trainable_names(model, theta_a))
    net = copy.deepcopy(model).to(dev).train()
    for p in net.parameters():
        p.requires_grad_(False)
    buffer_names = {k for k in theta_b if k not in trainable}
    init_perm = weight_matching(theta_a, theta_b, spec, seed=seed).perm if init == "weight" else None
    init_perm = init_perm or Permutation.identity(spec)
    log_alphas = _initial_log_alphas(init_perm, spec, init_scale, noise, seed, dev)
    optimizer = torch.optim.Adam(list(log_alphas.values()), lr=lr)
    rng = np.random.default_rng(seed)
    order_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=data.device).manual_seed(seed)
    n = len(data)
    steps = -(-n // batch_size)
    total = epochs * steps
    history: list[dict[str, Any]] = []
    best: tuple[float, int, Permutation] | None = None
    if val_data is not None:
        entry0 = _midpoint_val_loss(net, theta_a, theta_b, harden(log_alphas, spec), spec, val_data, data)
        history.append({"epoch": 0, **entry0})
        best = (entry0["val_loss"], 0, harden(log_alphas, spec))
    bar = tqdm(total=total, desc="sinkhorn", unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    step = 0
    try:
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(n, generator=order_gen).to(data.device)
            acc, seen = 0.0, 0
            for b in range(steps):
                x, y = data.batch(order[b * batch_size : (b + 1) * batch_size], aug_gen)
                x, y = x.to(dev), y.to(dev)
                tau = temperature(step, total, tau_start, tau_end)
                mats = {g: sinkhorn(m, tau, iters).exp() for g, m in log_alphas.items()}
                soft_b = soft_apply(theta_b, spec, mats, keys=trainable)
                with torch.no_grad():  # buffers: soft-permuted, no gradient (BN updates them in place)
                    buffers = soft_apply(theta_b, spec, mats, keys=buffer_names)
                soft_b.update({k: buffers[k] for k in buffer_names})
                loss = mixture_loss(net, [theta_a, soft_b], draw(rng), x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                acc += float(loss.detach()) * len(y)
                seen += len(y)
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, tau=f"{tau:.3g}", loss=f"{acc / seen:.4f}")
            perm = harden(log_alphas, spec)
            entry: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": acc / seen,
                "tau": tau,
                "seconds": time.perf_counter() - t0,
            }
            if val_data is not None:
                entry.update(_midpoint_val_loss(net, theta_a, theta_b, perm, spec, val_data, data))
                if best is None or entry["val_loss"] < best[0]:
                    best = (entry["val_loss"], epoch, perm)
            history.append(entry)
    finally:
        bar.close()
    perm, best_epoch = (best[2], best[1]) if best is not None else (harden(log_alphas, spec), epochs)
    before, after = match_distances(params_a, params_b, spec, perm)
    permuted = perm.apply(params_b, spec)
    tensors = [t for t in spec.axes_by_tensor() if params_a[t].is_floating_point()]
    objective = inner({t: params_a[t] for t in tensors}, {t: permuted[t].to(params_a[t].device) for t in tensors})
    info = {
        "epochs": history,
        "best_epoch": best_epoch,
        "selected_by": "val_loss" if best is not None else "last",
        "init": init,
        "units_moved_from_init": {g.name: int((perm[g.name] != init_perm[g.name]).sum()) for g in spec.groups},
        "lam": lam,
        "lr": lr,
        "batch_size": batch_size,
        "tau_start": tau_start,
        "tau_end": tau_end,
        "iters": iters,
        "init_scale": init_scale,
        "noise": noise,
        "seed": seed,
        "steps_per_epoch": steps,
        "seconds": time.perf_counter() - start,
        "device": str(dev),
    }
    return MatchResult(
        perm=perm,
        spec=spec,
        sweeps=epochs,
        objective=[objective],
        distance_before=before,
        distance_after=after,
        method="sinkhorn",
        converged=True,
        info=info,
    )
