"""Activation matching: pair the units of B with those of A whose activations over data agree best.

For each group, the activations of its nodes (outputs of shape (N, C, ...) reshaped to rows of C
units: (N·H·W, C); the rows of all the group's nodes pooled) give, over all rows r of A's and B's
activations a_r, b_r on the same inputs,

    correlation:  corr_ij = cov(a_i, b_j) / (σ(a_i) σ(b_j) + eps)
    inner:        E[a_i b_j]

streamed in float64 over the batches; one linear assignment per group maximises Σ_i M[i, p[i]].
A unit that is constant over all rows (a dead ReLU) correlates 0 with everything: such units are
matched arbitrarily among themselves, so use enough data that live units are not mistaken for dead.

Groups whose units live on the last axis of (tokens × features) tensors have no activation nodes in a
derived spec; their activations are recorded with module hooks instead (:func:`module_sources`): the
input of an ``nn.Linear`` that reads the group, and for ``nn.MultiheadAttention`` the projected
queries, keys and values and the heads' output (the input of ``out_proj``).

Block-structured groups (attention heads) sharing a block permutation σ are solved together with the
same two-level solver as weight matching (:func:`lmclab.align.weight_matching.head_block_assignment`):
the cost of matching head i of A to head j of B is  H[i, j] = Σ_g max_α Σ_k M_g[i·d + k, j·d + α(k)]
(the optimal within-head assignment value of the d × d correlation blocks, summed over the groups
sharing σ, e.g. an attention layer's query/key and value/output groups), σ maximises Σ_i H[i, σ(i)],
and each group's within-head permutations are its block LAP solutions for (i, σ(i)).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmclab.align.assignment import solve_assignment
from lmclab.align.registry import register_pair_method
from lmclab.align.results import MatchResult
from lmclab.align.weight_matching import head_block_assignment, match_distances
from lmclab.permutation import capture_activations
from lmclab.permutation.spec import Permutation, PermutationSpec
from lmclab.points import Point

__all__ = [
    "activation_matching",
    "ActivationStats",
    "STATISTICS",
    "collect_activations",
    "model_device",
    "module_sources",
    "with_module_sources",
]

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


def module_sources(model: nn.Module, spec: PermutationSpec) -> dict[str, list[tuple[str, str]]]:
    """group -> [(module name, kind)] recording activations with module hooks.

    Every group normalised by an ``nn.LayerNorm`` / ``nn.RMSNorm`` over its units alone gets that norm's
    "input" (a transformer's residual stream is then correlated at every block, not only where it is
    produced). A group without activation nodes also gets, by the other kinds: "input" (the input of an
    ``nn.Linear`` whose whole input axis is the group, weight axis 1); "output" (the output of an
    ``nn.Linear`` whose whole output axis is the group, weight axis 0; used only for a group without
    other sources, e.g. queries and keys of attention written out); "q", "k", "v"
    (``nn.MultiheadAttention``'s projected queries / keys / values: rows [0, E), [E, 2E), [2E, 3E) of
    ``in_proj_weight``, or ``q/k/v_proj_weight``, axis 0); "o" (the heads' output, the input of its
    ``out_proj``). The units are on the last axis of each.
    """
    modules = dict(model.named_modules())
    out: dict[str, list[tuple[str, str]]] = {}
    for g in spec.groups:
        found: list[tuple[str, str]] = []
        outputs: list[tuple[str, str]] = []
        for ax in g.axes:
            owner, _, pname = ax.tensor.rpartition(".")
            m = modules.get(owner)
            src: tuple[str, str] | None = None
            if ax.block != 1:
                continue
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and pname == "weight":
                if tuple(m.normalized_shape) == (g.size,):
                    src = (owner, "input")
            elif g.activations:
                continue
            elif isinstance(m, nn.Linear) and pname == "weight" and ax.axis == 1 and m.in_features == g.size:
                parent, _, leaf = owner.rpartition(".")
                attn = isinstance(modules.get(parent), nn.MultiheadAttention) and leaf == "out_proj"
                src = (parent, "o") if attn else (owner, "input")
            elif isinstance(m, nn.Linear) and pname == "weight" and ax.axis == 0 and m.out_features == g.size:
                if (owner, "output") not in outputs:
                    outputs.append((owner, "output"))
            elif isinstance(m, nn.MultiheadAttention) and ax.axis == 0 and g.size == m.embed_dim:
                e = m.embed_dim
                if pname == "in_proj_weight" and ax.offset in (0, e, 2 * e):
                    src = (owner, "qkv"[ax.offset // e])
                elif pname in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    src = (owner, pname[0])
            if src is not None and src not in found:
                found.append(src)
        if found or outputs:
            out[g.name] = found or outputs
    return out


def _attention_activations(
    m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """{"q", "k", "v", "o"} of ``m`` on its call's inputs, rows of E units (no masks, no bias_k/zero_attn)."""
    names = ("query", "key", "value")
    query, key, value = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names))
    if any(kwargs.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or kwargs.get("is_causal"):
        raise ValueError("activation matching through nn.MultiheadAttention does not support masks")
    if m.bias_k is not None or m.add_zero_attn:
        raise ValueError("activation matching through nn.MultiheadAttention does not support bias_kv/add_zero_attn")
    e, h = m.embed_dim, m.num_heads
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight.split(e)
    else:
        w = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
    b = m.in_proj_bias.split(e) if m.in_proj_bias is not None else (None, None, None)
    q, k, v = (F.linear(t, wi, bi) for t, wi, bi in zip((query, key, value), w, b))
    if q.dim() == 2:  # unbatched (L, E)
        q, k, v = q[None], k[None], v[None]
    elif not m.batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], h, e // h).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2)
    return {"q": q, "k": k, "v": v, "o": o.reshape(q.shape[0], q.shape[1], e)}


def with_module_sources(capture: Capture, sources: Collection[tuple[str, str]]) -> Capture:
    """`capture` that also records the (module, kind) `sources` (see :func:`module_sources`) with forward
    hooks, under the keys ``"<module>:<kind>"`` as (rows, units) matrices (a module called several
    times contributes the rows of every call)."""

    def run(model: nn.Module, x: torch.Tensor, nodes: list[str]) -> Mapping[str, torch.Tensor]:
        modules = dict(model.named_modules())
        got: dict[str, list[torch.Tensor]] = {}

        def hook(name: str, kinds: set[str]) -> Callable[..., None]:
            def record(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                if isinstance(m, nn.MultiheadAttention):
                    acts = {k: v for k, v in _attention_activations(m, args, kwargs).items() if k in kinds}
                else:
                    x = args[0] if args else next(iter(kwargs.values()))
                    acts = {k: v for k, v in (("input", x), ("output", output)) if k in kinds}
                for kind, t in acts.items():
                    got.setdefault(f"{name}:{kind}", []).append(t.detach().reshape(-1, t.shape[-1]))

            return record

        handles = [
            modules[name].register_forward_hook(hook(name, {k for n, k in sources if n == name}), with_kwargs=True)
            for name in dict.fromkeys(n for n, _ in sources)
        ]
        try:
            out = dict(capture(model, x, nodes))
        finally:
            for handle in handles:
                handle.remove()
        out.update({k: torch.cat(v) for k, v in got.items()})
        return out

    return run


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
    `capture(model, x, node_names)` (default ``lmclab.permutation.capture_activations``), or have
    :func:`module_sources` (recorded by hooks). Flat groups are solved independently, the groups sharing
    a block permutation together (module docstring); ``objective == [Σ_groups Σ_i M[i, p[i]]]`` and
    ``sweeps == 1``.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; valid: {', '.join(STATISTICS)}")
    sources = module_sources(model_a, spec)
    missing = [g.name for g in spec.groups if not g.activations and g.name not in sources]
    if missing:
        raise ValueError(f"groups without activation nodes or module sources cannot be activation-matched: {missing}")
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    spec.check(sd_a)
    spec.check(sd_b)
    nodes = sorted({n for g in spec.groups for n in g.activations})
    keys = {g.name: [*g.activations, *(f"{m}:{k}" for m, k in sources.get(g.name, []))] for g in spec.groups}
    stats = {g.name: ActivationStats(g.size, model_device(model_a)) for g in spec.groups}
    if sources:
        capture = with_module_sources(capture or capture_activations, [s for v in sources.values() for s in v])

    def update(acts_a: Mapping[str, torch.Tensor], acts_b: Mapping[str, torch.Tensor]) -> None:
        for g in spec.groups:
            for key in keys[g.name]:
                stats[g.name].update(acts_a[key], acts_b[key])

    used = collect_activations(model_a, model_b, batches, nodes, update, max_batches=max_batches, capture=capture)
    if used == 0:
        raise ValueError("activation matching got no batches")

    perms: dict[str, torch.Tensor] = {}
    matched: dict[str, float] = {}
    mats = {g.name: stats[g.name].matrix(statistic, eps) for g in spec.groups}
    classes: dict[str, list[str]] = {}
    for g in spec.groups:
        if g.structured:
            classes.setdefault(str(g.block_perm), []).append(g.name)
        else:
            perms[g.name] = solve_assignment(mats[g.name], maximize=True)
    for names in classes.values():
        solved, _, _ = head_block_assignment([mats[n] for n in names], spec.group(names[0]).blocks)
        perms.update(zip(names, solved))
    for g in spec.groups:
        m, p = mats[g.name], perms[g.name]
        matched[g.name] = float(m[torch.arange(g.size, device=m.device), p.to(m.device)].sum())
    perm = Permutation({g.name: perms[g.name] for g in spec.groups})
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
            "module_sources": {k: [f"{m}:{kind}" for m, kind in v] for k, v in sources.items()},
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
