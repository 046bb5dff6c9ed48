"""The generalised Gauss–Newton part of the Hessian: its exact trace and its products.

For the mean loss L(θ) = (1/N) Σ_n ℓ(f_n(θ), y_n) with logits f_n ∈ ℝᶜ, J_n = ∂f_n/∂θ (C×P):

    H = G + R,   G = (1/N) Σ_n J_nᵀ S_n J_n,   S_n = ∇²_f ℓ(f_n, y_n),
                 R = (1/N) Σ_n Σ_k r_{n,k} ∇²_θ f_{n,k},   r_n = ∇_f ℓ(f_n, y_n).

- **Exact tr(G)**: with S_n = Σ_c λ_{n,c} u_{n,c} u_{n,c}ᵀ, tr(G) = (1/N) Σ_n Σ_c λ_{n,c} ‖J_nᵀ u_{n,c}‖² —
  per-sample squared gradient norms of C back-propagated vectors. Cross-entropy (closed form, λ = 1):
  S_n = diag(p) − p pᵀ = M Mᵀ with M = diag(√p) − p √pᵀ (Σ p = 1), u_{n,c} = M[:, c]. Other losses:
  S_n by double backward of the summed loss over the logits (C passes), and ``eigh``.
  Per-sample norms without forming per-sample gradients where the layer allows: an ``nn.Linear`` called
  once with input a_n (rows a_{n,t}) and output signal g_n has per-sample gradient Σ_t g_{n,t} a_{n,t}ᵀ, whose
  squared norm is ‖g_n‖² ‖a_n‖² for 2-D inputs and Σ_{t,t'} (g_tᵀg_t')(a_tᵀa_t') otherwise (bias: ‖Σ_t g_t‖²);
  the signals come from C backward passes to the layers' outputs (no weight gradients). Every other
  parameter goes through per-sample vector-Jacobian products (``torch.func.vmap`` over samples, chunked).
  Before use, the Linear route's batch-summed gradient is checked against autograd's on a few examples
  (a parameter also used outside its layer would otherwise be missed): on a mismatch everything takes the
  per-sample route.
- **G v** = (1/N) Σ_n J_nᵀ (S_n (J_n v)): a jvp of the logits, S_n, a vjp (:func:`ggn_products`).
- **Control variate for the trace**: tr(H) = tr(G) + tr(R), tr(R) by Hutchinson on R alone: each probe's
  zᵀ(H − G)z is formed directly as zᵀRz, R = ∇²φ with φ(θ) = Σ_n r̄_nᵀ f_n(θ) (r̄ held fixed), by one
  double backward (``HessianOperator(part="residual")``), so a probe costs one product, as for H. For
  piecewise-linear networks (ReLU MLP/CNN without normalisation) diag R = 0 (f is linear in each single
  weight), so tr(R) = 0 and the per-probe variance 2(‖R‖_F² − Σ R_ii²) replaces 2(‖H‖_F² − Σ H_ii²).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from lmclab.curvature.functional import FunctionalModel, LossFn, iterate_batches, summed_cross_entropy
from lmclab.curvature.hessian import Data, _prepare
from lmclab.points import Point, PointLike

__all__ = ["ggn_products", "ggn_trace", "loss_curvature_factors"]


def loss_curvature_factors(
    logits: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, U) with S_n = ∇²_f ℓ(f_n, y_n) = U_n diag(λ_n) U_nᵀ: λ (N, C), U (N, C, C) (columns u_{n,c}).

    Cross-entropy (`summed_cross_entropy`): U_n = diag(√p) − p √pᵀ, λ = 1 (S = U Uᵀ). Otherwise the
    per-sample Hessian of ``loss_fn`` w.r.t. the logits (``loss_fn`` must be a sum over samples), eigen-decomposed.
    """
    f = logits.detach().clone()
    if f.ndim != 2:
        raise ValueError(f"the GGN needs (N, C) logits, got shape {tuple(f.shape)}")
    if loss_fn is summed_cross_entropy:
        p = torch.softmax(f, dim=1)
        s = p.sqrt()
        u = torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)
        return torch.ones_like(p), u

    with torch.enable_grad():  # the summed loss is a sum over samples: its Hessian over f is block diagonal
        z = f.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(z, targets), z, create_graph=True)
        cols = [torch.autograd.grad(grad[:, c].sum(), z, retain_graph=True)[0] for c in range(f.shape[1])]
    s_mat = torch.stack(cols, dim=2).detach()  # (N, C, C): S_n[:, c]
    lam, u = torch.linalg.eigh((s_mat + s_mat.transpose(1, 2)) / 2)
    return lam, u


def _x(fm: FunctionalModel, x: torch.Tensor) -> torch.Tensor:
    p = next(iter(fm.params.values()))
    return x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)


def _linear_owners(fm: FunctionalModel) -> dict[str, tuple[str, str | None]]:
    """Linear module name -> (weight name, bias name or None) for Linear layers whose tensors are all parameters."""
    names = set(fm.params)
    out: dict[str, tuple[str, str | None]] = {}
    for mod_name, mod in fm.module.named_modules():
        if type(mod) is not nn.Linear:
            continue
        w = f"{mod_name}.weight" if mod_name else "weight"
        b = f"{mod_name}.bias" if mod_name else "bias"
        if w not in names or (mod.bias is not None and b not in names):
            continue
        out[mod_name] = (w, b if mod.bias is not None else None)
    return out


class _Recorder:
    """Forward hooks on Linear layers: (input, output) of each call, by module name."""

    def __init__(self, fm: FunctionalModel, modules: Sequence[str]) -> None:
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in modules}
        lookup = dict(fm.module.named_modules())
        self.handles = [lookup[m].register_forward_hook(self._hook(m)) for m in modules]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.calls[name].append((inputs[0].detach(), output))

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _sq_norm_linear(a: torch.Tensor, g: torch.Tensor, bias: bool) -> torch.Tensor:
    """Per-sample ‖Σ_t g_t a_tᵀ‖² (+ ‖Σ_t g_t‖² with a bias) for a (N, …, in), g (N, …, out): shape (N,)."""
    n = a.shape[0]
    if a.ndim == 2:
        gg = (g * g).sum(1)
        return gg * (a * a).sum(1) + (gg if bias else 0)
    a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    t = a3.shape[1]
    if t * t <= a3.shape[2] * g3.shape[2]:
        out = ((g3 @ g3.transpose(1, 2)) * (a3 @ a3.transpose(1, 2))).sum((1, 2))
    else:
        out = (g3.transpose(1, 2) @ a3).square().sum((1, 2))
    return out + (g3.sum(1).square().sum(1) if bias else 0)


def _linear_route_ok(fm: FunctionalModel, owners: dict[str, tuple[str, str | None]], x: torch.Tensor) -> bool:
    """Does Σ_n (per-sample Linear gradients of a random cotangent) equal autograd's gradient on a few examples?"""
    x = x[:8]
    names = list(fm.params)
    leaves = {n: fm.params[n].detach().requires_grad_(True) for n in names}
    rec = _Recorder(fm, list(owners))
    try:
        with torch.enable_grad():
            f = fm.logits(leaves, x)
            cot = torch.randn(f.shape, generator=torch.Generator().manual_seed(0), dtype=f.dtype).to(f.device)
            outs = [out for m in owners for _, out in rec.calls[m]]
            if any(len(rec.calls[m]) != 1 for m in owners):
                return False
            wanted = [leaves[n] for m in owners for n in owners[m] if n is not None]
            grads = torch.autograd.grad(f, [*wanted, *outs], cot, allow_unused=True, materialize_grads=True)
    finally:
        rec.remove()
    auto, signals = grads[: len(wanted)], grads[len(wanted) :]
    mine: list[torch.Tensor] = []
    for m, sig in zip(owners, signals):
        a = rec.calls[m][0][0]
        mine.append(torch.einsum("...o,...i->oi", sig, a))
        if owners[m][1] is not None:
            mine.append(sig.reshape(-1, sig.shape[-1]).sum(0))
    return all(torch.allclose(u, v, rtol=1e-4, atol=1e-6 * max(1.0, float(v.abs().max()))) for u, v in zip(mine, auto))


def _per_sample_sq_norms(
    fm: FunctionalModel, names: list[str], x: torch.Tensor, lam: torch.Tensor, u: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Σ_n Σ_c λ_{n,c} ‖(J_nᵀ u_{n,c}) restricted to `names`‖² by per-sample vjps (vmap over samples, chunked)."""
    fixed = {k: v for k, v in fm.params.items() if k not in names}

    def sample(sub: Point, xn: torch.Tensor, un: torch.Tensor, ln: torch.Tensor) -> torch.Tensor:
        def fn(s: Point) -> torch.Tensor:
            return fm.logits({**fixed, **s}, xn.unsqueeze(0))[0]

        pullback = torch.func.vjp(fn, sub)[1]
        cols = torch.func.vmap(lambda c: pullback(c)[0])(un.T)  # rows: J_nᵀ u_{n,c}
        return torch.stack([(ln.view(-1, *[1] * (t.ndim - 1)) * t.square()).sum() for t in cols.values()]).sum()

    sub = {k: fm.params[k] for k in names}
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for s in range(0, len(x), chunk):
        per = torch.func.vmap(sample, in_dims=(None, 0, 0, 0))(
            sub, x[s : s + chunk], u[s : s + chunk], lam[s : s + chunk]
        )
        total += per.double().sum()
    return total


def ggn_trace(
    model: nn.Module,
    theta: PointLike | None,
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    route: str = "auto",
    chunk: int = 16,
    batched: bool = False,
) -> float:
    """tr G exactly (see the module docstring), eval mode, buffers fixed, float64 accumulation; one data pass.

    `route`: "auto" (Linear layers by the norm identity, the rest per sample), or "per_sample" (all
    parameters by per-sample vjps: slower, an independent check). `chunk`: samples per vmap call.
    """
    if route not in ("auto", "per_sample"):
        raise ValueError(f"route must be 'auto' or 'per_sample', got {route!r}")
    fm = _prepare(model, theta)
    owners = _linear_owners(fm) if route == "auto" else {}
    checked = False
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for x, y in iterate_batches(data, batch_size, max_examples):
        x, y = _x(fm, x), y.to(next(iter(fm.params.values())).device)
        if owners and not checked:
            checked = True
            if not _linear_route_ok(fm, owners, x):
                owners = {}
        covered = {n for ws in owners.values() for n in ws if n is not None}
        rest = [n for n in fm.params if n not in covered]
        rec = _Recorder(fm, list(owners))
        try:
            with torch.enable_grad():  # leaves only make the graph: grads are asked of the Linear outputs
                f = fm.logits({n: t.detach().requires_grad_(True) for n, t in fm.params.items()}, x)
        finally:
            rec.remove()
        lam, u = loss_curvature_factors(f, y, loss_fn)
        if owners:
            outs = [rec.calls[m][0][1] for m in owners]
            acts = [rec.calls[m][0][0] for m in owners]
            if batched:  # all C cotangents in one vmapped backward: (C, N, out) signals per layer
                sigs = torch.autograd.grad(
                    f, outs, u.permute(2, 0, 1), is_grads_batched=True, allow_unused=True, materialize_grads=True
                )
                per_c = [[sg[c] for sg in sigs] for c in range(u.shape[2])]
            else:
                per_c = [
                    list(
                        torch.autograd.grad(
                            f, outs, u[:, :, c], retain_graph=True, allow_unused=True, materialize_grads=True
                        )
                    )
                    for c in range(u.shape[2])
                ]
            for c, sig in enumerate(per_c):
                for m, a, g in zip(owners, acts, sig):
                    total += (lam[:, c] * _sq_norm_linear(a, g, owners[m][1] is not None)).double().sum().cpu()
        del f, rec
        if rest:
            total += _per_sample_sq_norms(fm, rest, x, lam, u, chunk).cpu()
        count += len(y)
    if count == 0:
        raise ValueError("the data yielded no examples")
    return float(total) / count


def ggn_products(
    model: nn.Module,
    theta: PointLike | None,
    vectors: Sequence[PointLike],
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
) -> list[Point]:
    """[G v_k]_k, G v = (1/N) Σ_n J_nᵀ S_n J_n v: per batch a jvp of the logits, S_n, a vjp (one data pass)."""
    fm = _prepare(model, theta)
    names = list(fm.params)
    vs = [{n: v[n].detach().to(fm.params[n].device, fm.params[n].dtype) for n in names} for v in vectors]
    acc = [fm.zeros_like_params() for _ in vs]
    count = 0
    for x, y in iterate_batches(data, batch_size, max_examples):
        x = _x(fm, x)

        def logits(p: Point, x: torch.Tensor = x) -> torch.Tensor:
            return fm.logits(p, x)

        f, pullback = torch.func.vjp(logits, fm.params)[:2]
        lam, u = loss_curvature_factors(f, y.to(f.device), loss_fn)
        for a, v in zip(acc, vs):
            jv = torch.func.jvp(logits, (fm.params,), (v,))[1]
            w = torch.einsum("nkc,nc,njc,nj->nk", u, lam, u, jv)  # S_n (J_n v)
            for n, t in pullback(w)[0].items():
                a[n].add_(t)
        count += len(y)
    if count == 0:
        raise ValueError("the data yielded no examples")
    for a in acc:
        for t in a.values():
            t.div_(count)
    return acc
