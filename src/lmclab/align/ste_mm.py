"""STE-MM (Ito, Yamada, Kumagai, ICML 2025): straight-through permutation search for K models at once.

Reference A = θ_0 (never permuted) and K − 1 proxies θ̃_i (initialised at A), one per other model.
Each mini-batch: weight-match every B_i to its proxy (warm-started), P_i = π_i(θ_{B_i}); straight-through
weights ste_i = P_i + (θ̃_i − sg θ̃_i); mixing weights w over {A, ste_1 … ste_{K−1}} with Σ w = 1;
cross-entropy at θ_mix = w_0 θ_A + Σ_i w_i ste_i; Adam on the proxies (paper: lr 1e-3, 10 epochs,
batch 256). The result's merged model is the uniform mean of A and the π_i(θ_{B_i}) (BN models: reset
the statistics). The loop itself is shared with two-model STE: :func:`lmclab.align.ste.learn_permutations`.

Mixing weights (``mixing``):

- ``"uniform"`` — rescaled uniform draw: u_k ~ U(0, 1) independently for k = 0 … K − 1, w = u / Σ u.
  (The project's copy of the paper holds only the abstract; this is the draw DESIGN.md and the
  issue describe. For K = 2 it is *not* λ ~ U(0, 1): w_1 = u_1/(u_0 + u_1) concentrates around ½.)
- ``"dirichlet"`` — w ~ Dirichlet(α, …, α) with α = `dirichlet_alpha` (α = 1: uniform on the simplex).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lmclab.align.registry import register_population_method
from lmclab.align.results import PopulationAlignment
from lmclab.align.ste import WeightDraw, learn_permutations
from lmclab.permutation.spec import PermutationSpec
from lmclab.points import PointLike

__all__ = ["MIXINGS", "mixing_draw", "ste_mm"]

#: Mixing-weight distributions of :func:`ste_mm`.
MIXINGS: tuple[str, ...] = ("uniform", "dirichlet")


def mixing_draw(k: int, mixing: str = "uniform", dirichlet_alpha: float = 1.0) -> WeightDraw:
    """draw(rng) -> K mixing weights summing to 1: rescaled uniform (u ~ U(0,1)^K, w = u/Σu) or Dirichlet(α·1)."""
    if k < 2:
        raise ValueError(f"mixing needs at least 2 models, got {k}")
    if mixing not in MIXINGS:
        raise ValueError(f"unknown mixing {mixing!r}; valid: {', '.join(MIXINGS)}")
    if mixing == "dirichlet":
        if not dirichlet_alpha > 0:
            raise ValueError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha}")
        return lambda rng: rng.dirichlet(np.full(k, float(dirichlet_alpha)))

    def uniform(rng: np.random.Generator) -> np.ndarray:
        u = rng.random(k)
        while u.sum() <= 0.0:  # all-zero draw (probability 2^-53K); redraw
            u = rng.random(k)
        return u / u.sum()

    return uniform


@register_population_method(
    "ste_mm",
    "learned matching of all K models at once (Ito et al.), trained on the training split",
    needs=("model", "data"),
    accepts=("seed", "device", "progress", "epochs", "val_data"),
    title="STE-MM",
)
def ste_mm(
    points: Sequence[PointLike],
    spec: PermutationSpec,
    *,
    model: nn.Module,
    data: Any,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 256,
    mixing: str = "uniform",
    dirichlet_alpha: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    val_data: Any = None,
) -> PopulationAlignment:
    """Permutations of models 1 … K−1 into model 0's frame by STE-MM (method "ste_mm"); perms[0] = identity.

    `model`: an instance of the architecture (copied, never modified); `data`: the training split
    (a :class:`lmclab.data.DeviceDataset`), iterated in a seeded order; `val_data`: a held-out split
    for keeping the permutations whose merged model has the lowest loss (checked after every epoch),
    else the last epoch's are returned. BatchNorm models are trained in train mode (batch statistics
    at the mixture); reset the merged model's statistics before using it. ``info``: per-epoch
    train (and held-out) loss and seconds, matching time, warm-solver counters, settings.
    """
    points = list(points)
    draw = mixing_draw(len(points), mixing, dirichlet_alpha)
    perms, info = learn_permutations(
        points[0],
        points[1:],
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
        desc=f"ste_mm K={len(points)}",
    )
    info.update(mixing=mixing, dirichlet_alpha=dirichlet_alpha if mixing == "dirichlet" else None)
    return PopulationAlignment(perms, spec, "ste_mm", info=info)
