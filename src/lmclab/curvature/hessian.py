"""Hessian-vector products of the mean loss over fixed data.

L(θ) = (1/N) Σ_{i≤N} ℓ(f(θ, x_i), y_i) over the examples of `data` (eval mode, buffers fixed, see
`functional.py`); H = ∇²L(θ) over the trainable parameters only. A product H v is accumulated batch
by batch from the *summed* loss of each batch and divided by N once, so an uneven last batch is
weighted exactly. Each call of `hvp` / `hvp_many` / `HessianOperator.matmat` is one pass over the data.

Two ways to form H v from one batch (Pearlmutter's identity H v = ∇_θ(∇_θL · v)):

- ``"double_backward"``: g = autograd.grad(L, θ, create_graph=True), then autograd.grad(g, θ, v).
  Several vectors reuse one forward and one first backward per batch (one extra backward each).
- ``"forward_over_reverse"``: torch.func.jvp(torch.func.grad(L), (θ,), (v,)) — a forward-mode
  derivative of the gradient; several vectors go through one jvp under ``vmap``.

Graph reuse (double backward): the forward pass and the first backward (g with create_graph) are built
once per batch and reused by every vector of that batch (``retain_graph``). When the data is a single
batch (N ≤ batch_size) the operator keeps that one graph across `matmat` calls (``reuse_graph=True``, the
default), so sequential products (Lanczos, power iteration, adaptive Hutchinson) cost one double
backward each, as PyHessian's single-batch mode; with several batches only one batch's graph is alive at a
time (memory bounded by one batch) and each call rebuilds them.

``vectorize=True`` pushes a chunk of vectors through at once (``is_grads_batched`` for double
backward, ``vmap`` over tangents for forward-over-reverse); otherwise vectors are looped over within
each batch (double backward reuses the graph; forward-over-reverse recomputes it per vector).

``part="residual"``: the same products of R = H − G instead of H (G the generalised Gauss–Newton matrix,
see `ggn.py`): R = ∇²φ with φ(θ) = Σ_n r̄_nᵀ f_n(θ), r̄_n = ∇_f ℓ(f_n, y_n) computed at θ and held fixed.

Precision: fp32, or fp64 when the point's parameters are fp64 (tests and checks); inputs are cast to
the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import chain

import torch
from torch import nn

from lmclab.curvature.functional import (
    Batch,
    FunctionalModel,
    LossFn,
    functional_model,
    iterate_batches,
    summed_cross_entropy,
)
from lmclab.data import DeviceDataset
from lmclab.points import Point, PointLike, flatten, inner, parameter_names, unflatten

__all__ = [
    "HVP_METHODS",
    "PARTS",
    "HessianOperator",
    "dense_hessian",
    "hvp",
    "hvp_many",
    "quadratic_form",
    "working_dtype",
]

HVP_METHODS: tuple[str, ...] = ("double_backward", "forward_over_reverse")
PARTS: tuple[str, ...] = ("hessian", "residual")

Data = DeviceDataset | Iterable[Batch]
# leaves θ, used gradient entries (with graph), their indices, the whole batch gradient (detached)
_Graph = tuple[list[torch.Tensor], list[torch.Tensor], list[int], list[torch.Tensor]]


# ------------------------------------------------------------------------------------------ helpers


def working_dtype(theta: PointLike, names: Iterable[str]) -> torch.dtype:
    """The precision Hessian products are taken in at θ: fp64 if any of θ's tensors `names` is fp64, else fp32."""
    return torch.float64 if any(theta[n].dtype == torch.float64 for n in names) else torch.float32


def _prepare(model: nn.Module, theta: PointLike | None) -> FunctionalModel:
    """`functional_model` with parameters in `model.named_parameters()` order; fp64 if θ's parameters are fp64."""
    fm = functional_model(model, theta)
    order = parameter_names(model)
    source = dict(theta) if theta is not None else dict(model.named_parameters())
    dtype = working_dtype(source, order)
    # functional_model rounds θ to fp32; re-take fp64 points from the source at full precision
    fm.params = {n: source[n].detach().to(fm.params[n].device, dtype) for n in order}
    if dtype == torch.float64:
        fm.buffers = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in fm.buffers.items()}
        fm.module = fm.module.to(dtype)
    return fm


class HessianOperator:
    """v ↦ ∇²L(θ) v for the mean loss over fixed data; each `matmat` call is one data pass (none with a kept graph).

    `data` must be re-iterable (a `DeviceDataset`, a list of batches) when more than one product is
    taken. `passes` counts data passes, `products` Hessian-vector products, `graphs_built` gradient graphs.
    θ and the data are fixed for the operator's life: with one batch its gradient graph is kept across calls
    (``reuse_graph``; `release` drops it), so do not modify θ's tensors or the data in place in between.
    `part="residual"`: products with R = H − G instead (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        theta: PointLike | None,
        data: Data,
        *,
        batch_size: int = 50,
        max_examples: int | None = None,
        loss_fn: LossFn = summed_cross_entropy,
        method: str = "double_backward",
        vectorize: bool = False,
        chunk_size: int | None = None,
        reuse_graph: bool = True,
        part: str = "hessian",
    ) -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"method must be one of {HVP_METHODS}, got {method!r}")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.part = part
        self.fm = _prepare(model, theta)
        self.data, self.batch_size, self.max_examples = data, batch_size, max_examples
        self.loss_fn, self.method, self.vectorize, self.chunk_size = loss_fn, method, vectorize, chunk_size
        self.reuse_graph = reuse_graph
        self.passes = 0
        self.products = 0
        self.graphs_built = 0  # gradient graphs built (double backward): one per batch per pass, or one in all
        self._graph: tuple[_Graph, int] | None = None  # the single batch's graph and its size, when kept

    @property
    def params(self) -> Point:
        """The point's parameters (detached), in `model.named_parameters()` order."""
        return self.fm.params

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.fm.params.values())

    def _batches(self) -> Iterator[Batch]:
        p = next(iter(self.fm.params.values()))
        for x, y in iterate_batches(self.data, self.batch_size, self.max_examples):
            if x.is_floating_point():
                x = x.to(p.device, p.dtype)
            yield x, y.to(p.device)

    def _cast(self, v: PointLike) -> Point:
        missing = set(self.fm.params) - set(v)
        if missing:
            raise KeyError(f"vector lacks parameters {sorted(missing)}")
        return {n: v[n].detach().to(p.device, p.dtype) for n, p in self.fm.params.items()}

    def matvec(self, v: PointLike) -> Point:
        """H v (one data pass)."""
        return self.matmat([v])[0]

    def matmat(self, vectors: Sequence[PointLike]) -> list[Point]:
        """[H v_1, …, H v_K] in one data pass (no pass at all when the single batch's graph is kept)."""
        vs = [self._cast(v) for v in vectors]
        if not vs:
            return []
        names = list(self.fm.params)
        acc = [{n: torch.zeros_like(p) for n, p in self.fm.params.items()} for _ in vs]
        total = 0
        chunk = len(vs) if self.chunk_size is None else max(1, self.chunk_size)
        if self.method == "double_backward":
            for graph, size in self._graphs(names):
                total += size
                for start in range(0, len(vs), chunk):
                    outs = self._double_backward(names, graph, vs[start : start + chunk])
                    for a, hv in zip(acc[start : start + chunk], outs):
                        for n in names:
                            a[n].add_(hv[n])
                del graph
        else:
            for x, y in self._batches():
                total += len(y)
                for start in range(0, len(vs), chunk):
                    outs = self._forward_over_reverse(names, vs[start : start + chunk], x, y)
                    for a, hv in zip(acc[start : start + chunk], outs):
                        for n in names:
                            a[n].add_(hv[n])
        if total == 0:
            raise ValueError("the data yielded no examples")
        self.passes += 1
        self.products += len(vs)
        for a in acc:
            for n in names:
                a[n].div_(total)
        return acc

    def _build(self, names: list[str], x: torch.Tensor, y: torch.Tensor) -> _Graph:
        """One batch's summed loss, its gradient g = ∇θ ℓ with create_graph, and the leaves θ."""
        leaves = [self.fm.params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            logits = self.fm.logits(dict(zip(names, leaves)), x)
            loss = self._objective(logits, y)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True, materialize_grads=True)
        self.graphs_built += 1
        # entries of the gradient that do not depend on θ (loss linear in that tensor) add nothing to H v
        used = [i for i, g in enumerate(grads) if g.requires_grad]
        return leaves, [grads[i] for i in used], used, [g.detach() for g in grads]

    def _objective(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The summed loss ("hessian"), or φ = Σ r̄ ⊙ f with r̄ = ∂ℓ/∂f held fixed ("residual": ∇²φ = R)."""
        if self.part == "hessian":
            return self.loss_fn(logits, y)
        with torch.enable_grad():
            f = logits.detach().requires_grad_(True)
            (r,) = torch.autograd.grad(self.loss_fn(f, y), f)
        return (r.detach() * logits).sum()

    def _graphs(self, names: list[str]) -> Iterator[tuple[_Graph, int]]:
        """(graph, batch size) per batch; one graph alive at a time; a single batch's graph kept if `reuse_graph`."""
        if self._graph is not None:
            yield self._graph
            return
        batches = self._batches()
        first = next(batches, None)
        if first is None:
            return
        second = next(batches, None)
        if second is None and self.reuse_graph:
            self._graph = (self._build(names, *first), len(first[1]))
            yield self._graph
            return
        rest = batches if second is None else chain([second], batches)
        for x, y in chain([first], rest):
            graph = self._build(names, x, y)
            yield graph, len(y)
            del graph

    def gradient(self) -> Point:
        """∇_θ of the operator's objective (the mean loss; φ/N with `part="residual"`), double backward only.

        Read off the gradient graphs the products use: free when the single batch's graph is kept (it is
        built now if not yet), one data pass otherwise.
        """
        if self.method != "double_backward":
            raise ValueError("gradient() reads the double-backward graph: use method='double_backward'")
        names = list(self.fm.params)
        acc = self.fm.zeros_like_params()
        total = 0
        for (_, _, _, grads), size in self._graphs(names):
            total += size
            for n, g in zip(names, grads):
                acc[n].add_(g)
        if total == 0:
            raise ValueError("the data yielded no examples")
        return {n: t.div_(total) for n, t in acc.items()}

    def release(self) -> None:
        """Drop the kept gradient graph (it is rebuilt at the next product)."""
        self._graph = None

    def _double_backward(self, names: list[str], graph: _Graph, vs: list[Point]) -> list[Point]:
        """H_b v for each v from one batch's gradient graph (kept: retain_graph)."""
        leaves, outputs, used, _ = graph
        if not used:
            return [{n: torch.zeros_like(self.fm.params[n]) for n in names} for _ in vs]
        if self.vectorize and len(vs) > 1:
            stacked = [torch.stack([v[names[i]] for v in vs]) for i in used]
            hvs = torch.autograd.grad(
                outputs,
                leaves,
                grad_outputs=stacked,
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            return [{n: hvs[j][k].detach() for j, n in enumerate(names)} for k in range(len(vs))]
        out = []
        for v in vs:
            hv = torch.autograd.grad(
                outputs,
                leaves,
                grad_outputs=[v[names[i]] for i in used],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            out.append({n: t.detach() for n, t in zip(names, hv)})
        return out

    def _forward_over_reverse(self, names: list[str], vs: list[Point], x: torch.Tensor, y: torch.Tensor) -> list[Point]:
        params = self.fm.params

        if self.part == "residual":
            r = torch.func.grad(lambda f: self.loss_fn(f, y))(self.fm.logits(params, x).detach())

            def loss(p: Point) -> torch.Tensor:
                return (r * self.fm.logits(p, x)).sum()
        else:

            def loss(p: Point) -> torch.Tensor:
                return self.loss_fn(self.fm.logits(p, x), y)

        grad_fn = torch.func.grad(loss)

        def one(tangent: Point) -> Point:
            return torch.func.jvp(grad_fn, (params,), (tangent,))[1]

        if self.vectorize and len(vs) > 1:
            stacked = {n: torch.stack([v[n] for v in vs]) for n in names}
            hvs = torch.func.vmap(one)(stacked)
            return [{n: hvs[n][k] for n in names} for k in range(len(vs))]
        return [one(v) for v in vs]


# ------------------------------------------------------------------------------------- public calls


def hvp_many(
    model: nn.Module,
    theta: PointLike | None,
    vectors: Sequence[PointLike],
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    method: str = "double_backward",
    vectorize: bool = False,
    chunk_size: int | None = None,
) -> list[Point]:
    """[∇²L(θ) v_k]_k for the mean loss over the data, all vectors in one data pass (parameters only)."""
    op = HessianOperator(
        model,
        theta,
        data,
        batch_size=batch_size,
        max_examples=max_examples,
        loss_fn=loss_fn,
        method=method,
        vectorize=vectorize,
        chunk_size=chunk_size,
    )
    return op.matmat(vectors)


def hvp(
    model: nn.Module,
    theta: PointLike | None,
    vector: PointLike,
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    method: str = "double_backward",
) -> Point:
    """∇²L(θ) v for the mean loss over the data (one data pass; parameters only)."""
    return hvp_many(
        model, theta, [vector], data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn, method=method
    )[0]


def quadratic_form(
    model: nn.Module,
    theta: PointLike | None,
    d: PointLike,
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    method: str = "double_backward",
) -> float:
    """dᵀ ∇²L(θ) d (one HVP; the second derivative of t ↦ L(θ + t d) at 0)."""
    hd = hvp(model, theta, d, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn, method=method)
    return inner(hd, {n: d[n].to(hd[n].device, hd[n].dtype) for n in hd})


def dense_hessian(
    model: nn.Module,
    theta: PointLike | None,
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    max_parameters: int = 5_000,
) -> torch.Tensor:
    """The full P×P Hessian of the mean loss (tiny models only: tests and checks).

    Rows/columns follow `model.named_parameters()` order, each tensor flattened row-major (the order of
    `lmclab.points.flatten(HessianOperator(...).params)`). Computed with torch.autograd.functional.hessian of
    the loss as a function of the flat parameter vector, independently of the HVP code.
    """
    fm = _prepare(model, theta)
    like = fm.params
    flat0 = flatten(like)
    if flat0.numel() > max_parameters:
        raise ValueError(f"{flat0.numel()} parameters > max_parameters={max_parameters}: use HVPs instead")

    def loss(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(fm.logits(unflatten(flat, like), x), y)

    def hess(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # autograd's (vectorised) double backward: torch.func's second derivatives (hessian, jacrev∘jacrev)
        # get layer_norm wrong when its input depends on θ (torch 2.x), while autograd's are right
        return torch.autograd.functional.hessian(lambda p: loss(p, x, y), flat, vectorize=True)

    total, acc = 0, torch.zeros(flat0.numel(), flat0.numel(), dtype=flat0.dtype, device=flat0.device)
    for x, y in iterate_batches(data, batch_size, max_examples):
        if x.is_floating_point():
            x = x.to(flat0.device, flat0.dtype)
        acc += hess(flat0, x, y.to(flat0.device))
        total += len(y)
    if total == 0:
        raise ValueError("the data yielded no examples")
    return acc / total
