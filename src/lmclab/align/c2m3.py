"""C2M3 (Crisostomi et al., NeurIPS 2024): cycle-consistent multi-model merging through a universe.

Each model i gets, per permutation group g, a map P_i^g of its units into a shared *universe*; the map
between two models is P_i P_jᵀ, so every composition of pairwise maps around a cycle is the identity
(:mod:`lmclab.align.cycle` measures it). The maps maximise the weight-matching objective summed over
all pairs of models, all groups jointly,

    F(P) = Σ_{i<j} Σ_t ⟨P_i(θ_i)[t], P_j(θ_j)[t]⟩,

P_i(θ)[t] the tensor t with each of its permuted axes multiplied by that axis's group matrix (the
mode product θ ×_a P, (θ ×_a P)[u, …] = Σ_v P[u, v] θ[v, …]; for a permutation matrix this is
:meth:`Permutation.apply`), t over the spec's floating tensors as in
:func:`lmclab.align.weight_matching`. For K = 2 and P_0 = I, F is weight matching's objective J.

Optimisation, Frank–Wolfe on the relaxation (every P_i^g doubly stochastic):

1. gradient G_i^g = ∂F/∂P_i^g = Σ_{(t, a) ∈ g} unfold_a(S_{−i}[t]) · unfold_a(θ̃_{i,t,a})ᵀ with
   S_{−i} = Σ_{j≠i} P_j(θ_j) and θ̃_{i,t,a} = θ_i[t] multiplied on all its permuted axes but a;
2. linear-minimisation step: Q_i^g = argmax_{Q permutation} ⟨G_i^g, Q⟩, one linear assignment per
   (model, group) (the vertices of the Birkhoff polytope maximise a linear function); block-structured
   groups (attention heads) sharing a block permutation take the structured permutation maximising
   Σ_g ⟨G_i^g, Q^g⟩ jointly (:func:`lmclab.align.weight_matching.head_block_assignment`), so the
   relaxation is the convex hull of the spec's own permutations (:func:`feasible_argmax`);
   Frank–Wolfe gap  Σ ⟨G, Q − P⟩ ≥ 0 (zero at a stationary point);
3. exact line search: along D = Q − P for all (model, group) at once, F(P + γD) is a polynomial in
   γ of degree ≤ 2·(most permuted axes of one tensor) (quadratic when every tensor has one permuted
   axis); its coefficients are computed exactly and γ* = argmax over [0, 1] (endpoints and the real
   roots of the derivative); P ← P + γ* D;

until the gap is at most `tol`·|F| or `max_iter` iterations. F never decreases (exact line search).
Then each P_i is projected to the permutation maximising Σ_g ⟨P_i^g, Π^g⟩ (the same linear step).

Gauge: F is invariant under P_i → U P_i for one U shared by all models; P_0 is fixed at the identity
throughout, so the universe is model 0's basis and ``perms[i]`` (P_i as a :class:`Permutation`) is the
:class:`PopulationAlignment` convention. The merged model is the mean in the universe, (1/K) Σ_i
P_i(θ_i), in model 0's basis; :func:`merged_in_basis` maps it to another member's basis. BN reset /
REPAIR afterwards are the callers' (as for every population method).

Start (`init`): "pairwise" (default) — P_i = weight matching of model i to model 0 (for K = 2 the
start is weight matching's optimum, a stationary point, so C2M3 returns it); "identity" — every P_i = I.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lmclab.align.assignment import solve_assignment
from lmclab.align.registry import register_population_method
from lmclab.align.results import PopulationAlignment
from lmclab.align.weight_matching import head_block_assignment, spec_tensor_names, weight_matching
from lmclab.permutation.spec import AxisRef, Permutation, PermutationSpec, permute_axis
from lmclab.points import Point, PointLike

__all__ = ["INITS", "C2M3Problem", "c2m3", "best_step", "feasible_argmax", "merged_in_basis"]

#: Starting points of the Frank–Wolfe iterations.
INITS = ("pairwise", "identity")


@dataclass(frozen=True)
class _Ref:
    """A permuted axis of a tensor: `group`'s `size` units, `block` entries each, from entry `offset`."""

    group: str
    axis: int
    block: int
    offset: int
    size: int


def mode_product(x: torch.Tensor, ref: _Ref, m: torch.Tensor) -> torch.Tensor:
    """x ×_ref M: (x ×_a M)[u, …] = Σ_v M[u, v] x[v, …] on the ref's slice of axis a (units of `block`
    consecutive entries); entries outside the slice unchanged. M a permutation matrix (M[u, p[u]] = 1):
    the same as :func:`lmclab.permutation.permute_axis` with p."""
    n, b = ref.size, ref.block
    xm = x.movedim(ref.axis, 0)
    part = xm.narrow(0, ref.offset, n * b)
    y = (m @ part.reshape(n, -1)).reshape(part.shape)
    full = xm.shape[0]
    if ref.offset != 0 or n * b != full:
        end = ref.offset + n * b
        y = torch.cat([xm.narrow(0, 0, ref.offset), y, xm.narrow(0, end, full - end)])
    return y.movedim(0, ref.axis)


def contract(s: torch.Tensor, x: torch.Tensor, ref: _Ref) -> torch.Tensor:
    """G[u, v] = Σ s[u, …] x[v, …] over the ref's slice, unfolded to (units, rest): ⟨x ×_ref M, s⟩ = ⟨M, G⟩
    for the slice's share of the inner product."""
    n, b = ref.size, ref.block
    su = s.movedim(ref.axis, 0).narrow(0, ref.offset, n * b).reshape(n, -1)
    xu = x.movedim(ref.axis, 0).narrow(0, ref.offset, n * b).reshape(n, -1)
    return su @ xu.T


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sum(a * b, dtype=torch.float64))


def best_step(coeffs: Sequence[float]) -> tuple[float, float]:
    """(γ*, f(γ*)) maximising the polynomial f(γ) = Σ_e coeffs[e] γ^e over [0, 1]: the best of the
    endpoints and the real roots of f' inside (0, 1). Ties keep the smallest γ."""
    c = np.asarray(coeffs, dtype=np.float64)
    candidates = [0.0, 1.0]
    if len(c) > 2:
        deriv = np.polynomial.polynomial.polyder(c)
        if np.any(deriv[1:] != 0):
            roots = np.polynomial.polynomial.polyroots(deriv)
            candidates += [float(r.real) for r in roots if abs(r.imag) < 1e-9 and 0.0 < r.real < 1.0]
    values = [float(np.polynomial.polynomial.polyval(g, c)) for g in candidates]
    best = max(range(len(candidates)), key=lambda i: (values[i], -candidates[i]))
    return candidates[best], values[best]


class C2M3Problem:
    """F(P) = Σ_{i<j} Σ_t ⟨P_i(θ_i)[t], P_j(θ_j)[t]⟩ over dense group matrices, its gradient and its
    restriction to a line (module docstring). ``mats[i][g]`` is P_i^g, (n_g, n_g) in `dtype`."""

    def __init__(
        self, points: Sequence[PointLike], spec: PermutationSpec, *, device: torch.device, dtype: torch.dtype
    ) -> None:
        for p in points:
            spec.check(p)
        self.spec, self.k, self.device, self.dtype = spec, len(points), device, dtype
        sizes = {g.name: g.size for g in spec.groups}
        by_tensor = spec.axes_by_tensor()
        names = spec_tensor_names(spec, points[0])
        self.refs = {t: [_Ref(g, ax.axis, ax.block, ax.offset, sizes[g]) for g, ax in by_tensor[t]] for t in names}
        self.thetas = [{t: p[t].detach().to(device=device, dtype=dtype) for t in names} for p in points]

    def identity(self) -> dict[str, torch.Tensor]:
        return {g.name: torch.eye(g.size, device=self.device, dtype=self.dtype) for g in self.spec.groups}

    def from_perm(self, perm: Permutation) -> dict[str, torch.Tensor]:
        """Permutation matrices M[u, p[u]] = 1 of `perm`'s groups."""
        return {
            g.name: torch.eye(g.size, device=self.device, dtype=self.dtype)[perm[g.name].to(self.device)]
            for g in self.spec.groups
        }

    def mapped(self, i: int, mats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """P_i(θ_i): every tensor multiplied on each permuted axis by its group's matrix."""
        out = {}
        for t, refs in self.refs.items():
            x = self.thetas[i][t]
            for r in refs:
                x = mode_product(x, r, mats[r.group])
            out[t] = x
        return out

    def objective(self, mats: Sequence[dict[str, torch.Tensor]]) -> float:
        """F = ½(‖Σ_i A_i‖² − Σ_i ‖A_i‖²), A_i = P_i(θ_i), summed in float64."""
        mapped = [self.mapped(i, m) for i, m in enumerate(mats)]
        total = 0.0
        for t in self.refs:
            s = sum(a[t] for a in mapped)
            assert isinstance(s, torch.Tensor)
            total += 0.5 * (_inner(s, s) - sum(_inner(a[t], a[t]) for a in mapped))
        return total

    def gradients(
        self,
        mats: Sequence[dict[str, torch.Tensor]],
        free: Sequence[int],
        mapped: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> dict[int, dict[str, torch.Tensor]]:
        """G_i^g = ∂F/∂P_i^g for each model i in `free` (module docstring, step 1); `mapped`: the
        A_i = P_i(θ_i) if already known."""
        if mapped is None:
            mapped = [self.mapped(i, m) for i, m in enumerate(mats)]
        total = {t: sum(a[t] for a in mapped) for t in self.refs}
        grads: dict[int, dict[str, torch.Tensor]] = {}
        for i in free:
            g_i = {g: torch.zeros_like(m) for g, m in mats[i].items()}
            for t, refs in self.refs.items():
                s = total[t] - mapped[i][t]
                assert isinstance(s, torch.Tensor)
                for a, ref in enumerate(refs):
                    x = self.thetas[i][t]
                    for b, other in enumerate(refs):
                        if b != a:
                            x = mode_product(x, other, mats[i][other.group])
                    g_i[ref.group] += contract(s, x, ref)
            grads[i] = g_i
        return grads

    def expand(
        self, mats: Sequence[dict[str, torch.Tensor]], targets: Mapping[int, Mapping[str, torch.Tensor]]
    ) -> list[dict[str, list[torch.Tensor]]]:
        """A_i(γ) = P_i(θ_i) at P + γD, D_i = Q_i − P_i (Q_i^g the permutation ``targets[i][g]``; D_i = 0
        for a model not in `targets`), as its coefficients [A_i^(0), A_i^(1), …] in γ per tensor.

        Expanded ref by ref, C'^(d) = C^(d) ×_r P + C^(d−1) ×_r D (linear in each factor), with
        x ×_r D = x ×_r Q − x ×_r P, where x ×_r Q is an index permutation of x."""
        out = []
        for i in range(self.k):
            per_tensor = {}
            for t, refs in self.refs.items():
                terms = [self.thetas[i][t]]
                for r in refs:
                    by_p = [mode_product(c, r, mats[i][r.group]) for c in terms]
                    if i in targets:
                        q = targets[i][r.group].to(self.device)
                        ax = AxisRef(t, r.axis, r.block, r.offset)
                        by_d = [permute_axis(c, ax, q) - cp for c, cp in zip(terms, by_p)]
                        terms = [by_p[0], *(by_p[d] + by_d[d - 1] for d in range(1, len(terms))), by_d[-1]]
                    else:
                        terms = by_p
                per_tensor[t] = terms
            out.append(per_tensor)
        return out

    def line(self, expansion: Sequence[dict[str, list[torch.Tensor]]]) -> list[float]:
        """Coefficients c_e of F(P + γD) = Σ_e c_e γ^e from :meth:`expand`:
        c_e = ½(Σ_{a+b=e} ⟨T^(a), T^(b)⟩ − Σ_i Σ_{a+b=e} ⟨A_i^(a), A_i^(b)⟩), T^(a) = Σ_i A_i^(a)."""
        degree = 2 * max((len(r) for r in self.refs.values()), default=0)
        coeffs = [0.0] * (degree + 1)
        for t in self.refs:
            per_model = [e[t] for e in expansion]
            top = max(len(terms) for terms in per_model)
            total = [sum(terms[d] for terms in per_model if d < len(terms)) for d in range(top)]
            for a in range(top):
                for b in range(top):
                    ta, tb = total[a], total[b]
                    assert isinstance(ta, torch.Tensor) and isinstance(tb, torch.Tensor)
                    own = sum(_inner(terms[a], terms[b]) for terms in per_model if a < len(terms) and b < len(terms))
                    coeffs[a + b] += 0.5 * (_inner(ta, tb) - own)
        return coeffs

    @staticmethod
    def at(expansion: Sequence[dict[str, list[torch.Tensor]]], gamma: float) -> list[dict[str, torch.Tensor]]:
        """A_i(γ) = Σ_d γ^d A_i^(d) for every model, from :meth:`expand`."""
        out = []
        for per_tensor in expansion:
            point = {}
            for t, terms in per_tensor.items():
                x = terms[-1]
                for c in reversed(terms[:-1]):  # Horner
                    x = c + gamma * x
                point[t] = x
            out.append(point)
        return out


def _project(mat: torch.Tensor) -> torch.Tensor:
    """The permutation p maximising Σ_u M[u, p[u]] (the permutation matrix closest to M in Frobenius norm)."""
    return solve_assignment(mat.double().cpu(), maximize=True)


def feasible_argmax(spec: PermutationSpec, mats: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutation of the spec maximising Σ_g ⟨M_g, Π_g⟩ (index vectors, Π_g[u, p[u]] = 1): flat groups one
    assignment each; structured groups sharing a block permutation jointly (one σ of whole blocks, a
    permutation within each block), as weight matching does — an assignment per group alone could move
    units between heads, which is not a symmetry."""
    out = {g.name: _project(mats[g.name]) for g in spec.groups if not g.structured}
    for members in spec.block_classes().values():
        costs = [mats[g.name].double().cpu() for g in members]
        perms, _, _ = head_block_assignment(costs, members[0].blocks)
        out.update({g.name: p for g, p in zip(members, perms)})
    return {g.name: out[g.name] for g in spec.groups}


@register_population_method(
    "c2m3",
    "maps into a shared universe by Frank–Wolfe on all pairs' weight matching at once; cycle-consistent (C2M3)",
    accepts=("seed", "device", "progress"),
    title="C2M3",
    revision=2,  # 2: its weight-matching starts use the anchored start for specs with attention heads
)
def c2m3(
    points: Sequence[PointLike],
    spec: PermutationSpec,
    *,
    init: str = "pairwise",
    max_iter: int = 100,
    tol: float = 1e-9,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> PopulationAlignment:
    """Joint, cycle-consistent alignment of K points by C2M3 (method "c2m3"); perms[0] = identity.

    `init` one of :data:`INITS` (pairwise: weight matching with `seed`); Frank–Wolfe for at most
    `max_iter` iterations, stopping when the gap ≤ `tol`·max(|F|, 1); products in `dtype` on `device`
    (default: where θ_0's tensors are). ``info``: objective (relaxed F after each iteration, F at the
    start first), gap and step per iteration, iterations, converged, objective_projected (F at the
    permutations returned), init, seconds.
    """
    points = list(points)
    k = len(points)
    if k < 2:
        raise ValueError(f"c2m3 needs at least 2 points, got {k}")
    if init not in INITS:
        raise ValueError(f"c2m3: init {init!r} is not one of {', '.join(INITS)}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    start = time.perf_counter()
    names = spec_tensor_names(spec, points[0])
    dev = torch.device(device) if device is not None else (points[0][names[0]].device if names else torch.device("cpu"))
    problem = C2M3Problem(points, spec, device=dev, dtype=dtype)
    if init == "pairwise":
        starts = [Permutation.identity(spec)] + [
            weight_matching(points[0], p, spec, seed=seed).perm for p in points[1:]
        ]
    else:
        starts = [Permutation.identity(spec) for _ in points]
    mats = [problem.from_perm(p) for p in starts]
    free = list(range(1, k))  # P_0 = I: the gauge
    mapped = [problem.mapped(i, m) for i, m in enumerate(mats)]
    objective = [problem.objective(mats)]
    gaps: list[float] = []
    steps: list[float] = []
    converged = False
    bar = tqdm(total=max_iter, desc=f"c2m3 K={k}", unit="it", disable=not progress, leave=False)
    try:
        for _ in range(max_iter):
            grads = problem.gradients(mats, free, mapped)
            targets: dict[int, dict[str, torch.Tensor]] = {}
            gap = 0.0
            for i in free:
                targets[i] = feasible_argmax(spec, grads[i])
                for g, grad in grads[i].items():
                    q = targets[i][g]
                    gap += float(grad.double().gather(1, q.to(grad.device)[:, None]).sum()) - _inner(grad, mats[i][g])
            gaps.append(gap)
            if gap <= tol * max(abs(objective[-1]), 1.0):
                converged = True
                break
            expansion = problem.expand(mats, targets)
            gamma, value = best_step(problem.line(expansion))
            if gamma == 0.0:  # no ascent along the direction (F'(0) = gap > 0 makes this rounding only)
                converged = True
                break
            steps.append(gamma)
            for i in free:
                for g, q in targets[i].items():
                    vertex = torch.eye(len(q), device=dev, dtype=dtype)[q.to(dev)]
                    mats[i][g] = (1 - gamma) * mats[i][g] + gamma * vertex
            mapped = problem.at(expansion, gamma)
            objective.append(value)
            bar.update(1)
            bar.set_postfix(objective=f"{value:.6g}", gap=f"{gap:.3g}", step=f"{gamma:.3g}")
    finally:
        bar.close()
    perms = [Permutation.identity(spec)] + [Permutation(feasible_argmax(spec, mats[i])) for i in free]
    projected = problem.objective([problem.from_perm(p) for p in perms])
    return PopulationAlignment(
        perms,
        spec,
        "c2m3",
        info={
            "init": init,
            "iterations": len(steps),
            "converged": converged,
            "objective": objective,
            "gap": gaps,
            "step": steps,
            "objective_projected": projected,
            "seconds": time.perf_counter() - start,
        },
    )


def merged_in_basis(points: Sequence[PointLike], alignment: PopulationAlignment, basis: int = 0) -> Point:
    """The merged model (1/K) Σ_i π_i(θ_i) (the mean in the universe) expressed in member `basis`'s
    units: π_basis⁻¹ applied to it (basis 0: the merged model itself, as perms[0] is the identity)."""
    if not 0 <= basis < alignment.k:
        raise ValueError(f"basis {basis} is not a member (0 … {alignment.k - 1})")
    return alignment.perms[basis].inverse().apply(alignment.merged(points), alignment.spec)
