"""Activation matching: pair the units of B with those of A whose activations over data agree best.

For each group, the activations of its nodes (outputs of shape (N, C, ...) reshaped to rows of C
units: (N·H·W, C); the rows of all the group's nodes pooled) give, over all rows r of A's and B's
activations a_r, b_r on the same inputs,

    correlation:  corr_ij = cov(a_i, b_j) / (σ(a_i) σ(b_j) + eps)
    inner:        E[a_i b_j]

streamed in float64 over the batches; one linear assignment per group maximises Σ_i M[i, p[i]].
A unit that is constant over all rows (a dead ReLU) correlates 0 with everything: such units are
matched arbitrarily among themselves, so use enough data that live units are not mistaken for dead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lmclab.align.assignment import solve_assignment
from lmclab.align.registry import register_pair_method
from lmclab.align.results import MatchResult
from lmclab.align.weight_matching import match_distances
from lmclab.permutation import capture_activations
from lmclab.permutation.spec import Permutation, PermutationSpec
from lmclab.points import Point

__all__ = ["activation_matching", "ActivationStats", "STATISTICS", "collect_activations", "model_device"]

STATISTICS: tuple[str, ...] = ("correlation", "inner")

Capture = Callable[[nn.Module, torch.Tensor, list[str]], Mapping[str, torch.Tensor]]


class ActivationStats:
    """Running float64 sums over rows (a, b) ∈ R^C × R^C: n, Σa, Σb, Σa², Σb², Σ a bᵀ."""

    def __init__(self, size: int, device: torch.device) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        self.size = size
        self.n = 0
        self.sa, self.sb = zeros(size), zeros(size)
        self.saa, self.sbb = zeros(size), zeros(size)
        self.sab = zeros(size, size)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Add the rows of activations a, b of shape (N, C, *spatial) (C = group size)."""
        a, b = _rows(a, self.size), _rows(b, self.size)
        self.n += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += a.T @ b

    def matrix(self, statistic: str, eps: float = 1e-8) -> torch.Tensor:
        """corr_ij = (E[a_i b_j] − E[a_i]E[b_j]) / (σ_a_i σ_b_j + eps), or E[a_i b_j] for "inner"."""
        if self.n == 0:
            raise ValueError("no activations were accumulated")
        inner = self.sab / self.n
        if statistic == "inner":
            return inner
        ma, mb = self.sa / self.n, self.sb / self.n
        sd_a = (self.saa / self.n - ma * ma).clamp_min(0).sqrt()
        sd_b = (self.sbb / self.n - mb * mb).clamp_min(0).sqrt()
        return (inner - torch.outer(ma, mb)) / (torch.outer(sd_a, sd_b) + eps)


def _rows(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.ndim < 2 or x.shape[1] != size:
        raise ValueError(f"activation of shape {tuple(x.shape)} does not carry {size} units on dim 1")
    return x.detach().movedim(1, -1).reshape(-1, size).double()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (else first buffer; CPU for a model with neither)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def collect_activations(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Any],
    nodes: list[str],
    update: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], None],
    *,
    max_batches: int | None = None,
    capture: Capture | None = None,
) -> int:
    """Run both models on the same inputs and hand `update(acts_a, acts_b)` their activations at `nodes`
    (B's moved to A's device), batch by batch; returns the number of batches used.

    `batches` yields input tensors (or tuples/lists whose first entry is the input); the first `max_batches`
    are used. Both models run in eval mode without gradients (their modes are restored afterwards);
    `capture(model, x, nodes)` defaults to ``lmclab.permutation.capture_activations``.
    """
    capture = capture or capture_activations
    dev_a, dev_b = model_device(model_a), model_device(model_b)
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    used = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if max_batches is not None and used >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                acts_a = capture(model_a, x.to(dev_a), nodes)
                acts_b = capture(model_b, x.to(dev_b), nodes)
                update(acts_a, {k: v.to(dev_a) for k, v in acts_b.items()})
                used += 1
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    return used


def activation_matching(
    model_a: nn.Module,
    model_b: nn.Module,
    spec: PermutationSpec,
    batches: Iterable[Any],
    *,
    statistic: str = "correlation",
    max_batches: int | None = None,
    eps: float = 1e-8,
    capture: Capture | None = None,
) -> MatchResult:
    """Permutation π of B's units maximising, per group, Σ_i M[i, p[i]] with M the A×B statistic.

    `batches` yields input tensors (or tuples/lists whose first entry is the input); the first
    `max_batches` are used. Both models run in eval mode without gradients (their modes are restored
    afterwards); every group must name its activation nodes (`PermGroup.activations`), captured by
    `capture(model, x, node_names)` (default ``lmclab.permutation.capture_activations``). Groups are
    solved independently; ``objective == [Σ_groups Σ_i M[i, p[i]]]`` and ``sweeps == 1``.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid: {', '.join(STATISTICS)}")
    structured = [g.name for g in spec.groups if g.structured]
    if structured:
        raise ValueError(
            f"activation matching does not handle block-structured groups (attention heads) yet: {structured}; "
            "use weight matching"
        )
    missing = [g.name for g in spec.groups if not g.activations]
    if missing:
        raise ValueError(f"groups without activation nodes cannot be activation-matched: {missing}")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    spec.check(sd_a)
    spec.check(sd_b)
    nodes = sorted({n for g in spec.groups for n in g.activations})
    stats = {g.name: ActivationStats(g.size, model_device(model_a)) for g in spec.groups}

    def update(acts_a: Mapping[str, torch.Tensor], acts_b: Mapping[str, torch.Tensor]) -> None:
        for g in spec.groups:
            for node in g.activations:
                stats[g.name].update(acts_a[node], acts_b[node])

    used = collect_activations(model_a, model_b, batches, nodes, update, max_batches=max_batches, capture=capture)
    if used == 0:
        raise ValueError("activation matching got no batches")

    perms: dict[str, torch.Tensor] = {}
    matched: dict[str, float] = {}
    for g in spec.groups:
        m = stats[g.name].matrix(statistic, eps)
        p = solve_assignment(m, maximize=True)
        perms[g.name] = p
        matched[g.name] = float(m[torch.arange(g.size, device=m.device), p.to(m.device)].sum())
    perm = Permutation(perms)
    before, after = match_distances(sd_a, sd_b, spec, perm)
    return MatchResult(
        perm=perm,
        spec=spec,
        sweeps=1,
        objective=[sum(matched.values())],
        distance_before=before,
        distance_after=after,
        method="activation",
        info={
            "statistic": statistic,
            "batches": used,
            "rows": {g.name: stats[g.name].n for g in spec.groups},
            "mean_matched": {k: v / spec.group(k).size for k, v in matched.items()},
        },
    )


@register_pair_method(
    "activation",
    "pair the units whose activations on training examples correlate best",
    needs=("model", "batches"),
    title="activation matching",
)
def _activation(
    theta_a: Point, theta_b: Point, spec: PermutationSpec, *, model: nn.Module, batches: Iterable[Any], **kw: Any
) -> MatchResult:
    """Method "activation": :func:`activation_matching` of copies of `model` loaded with θ_A and θ_B."""
    return activation_matching(_loaded(model, theta_a), _loaded(model, theta_b), spec, batches, **kw)


def _loaded(model: nn.Module, theta: Point) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(theta)
    return m
