"""Hessian-based barrier predictions (Singh et al., Prop. 1, Prop. 2, eq. 20–21).

Notation of the paper: θ_α = (1−α)θ_1 + αθ_2 (α = 0 at θ_1, α = 1 at θ_2), d = Δθ = θ_2 − θ_1,
H_i = ∇²L(θ_i), barrier curve B(α) = L(θ_α) − [(1−α)L(θ_1) + αL(θ_2)].

- **Prop. 1** (eq. 1/10): B(α) ≈ α(1−α)/2 · dᵀ(α H_1 + (1−α) H_2) d. Note the pairing: the
  weight α (large near θ_2) multiplies the Hessian at θ_1. Proof: the Taylor model centred at θ_1,
  L(θ_α) ≈ L_1 + α²/2 dᵀH_1d (eq. 4, ∇L(θ_1) = 0), weighted by 1−α, plus the one centred at θ_2,
  L(θ_α) ≈ L_2 + (1−α)²/2 dᵀH_2d (eq. 6), weighted by α: (1−α)α² q_1 + α(1−α)² q_2 = α(1−α)(α q_1 +
  (1−α) q_2). With q_i = dᵀH_i d: B(α) ≈ α(1−α)/2 · (α q_1 + (1−α) q_2).
- **Prop. 2** (eq. 18): the same for Singh's layer barrier B_ℓ(α) = (1−α)L(θ_{2→1}) + αL(θ_{1→2}) −
  [(1−α)L_1 + αL_2] (only layer ℓ interpolated; other layers from θ_1 resp. θ_2), with d replaced by
  d[ℓ] (d restricted to ℓ) and H_i by the (ℓ, ℓ) diagonal block of the full-model Hessian at θ_i.
- **Eq. 19–21**: assuming H_1 ≈ H_2, at α = ½: B* ≈ ⅛ Σ_{ℓ,ℓ'} d[ℓ]ᵀ ∇²L(θ_1)[ℓ,ℓ'] d[ℓ'] = Σ B*_{ℓ,ℓ'},
  the Hessian **at θ_1 only**; for a set P of layers B*_P ≈ Σ_{ℓ,ℓ'∈P} B*_{ℓ,ℓ'}.

Caveat (follows from the paper's own eq. 4 at α = 1 and eq. 6 at α = 0): with both gradients zero,
L_2 − L_1 = ½q_1 + O(‖d‖³) and L_1 − L_2 = ½q_2 + O(‖d‖³), so q_1 + q_2 = O(‖d‖³): the prediction is
of the order of the neglected remainder, a model rather than an asymptotic expansion (Singh Fig. 4
compares it with measured barriers empirically).

Extension (off by default; not in the paper): the paper drops the first-order terms because both
ends are stationary. With g_i = ∇L(θ_i)ᵀd (d[ℓ] for a layer) kept, the same weighting gives
B(α) ≈ α(1−α)(g_1 − g_2) + α(1−α)/2 (α q_1 + (1−α) q_2), which is *exact* for a quadratic loss and
useful at non-converged endpoints (e.g. during training of forked children).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmclab.curvature.functional import LossFn, summed_cross_entropy
from lmclab.curvature.hessian import Data, HessianOperator, working_dtype
from lmclab.paths import default_lambdas
from lmclab.points import Point, PointLike, direction, inner, parameter_names, parameters_of

__all__ = [
    "BarrierPrediction",
    "CrossBlocks",
    "PairPrediction",
    "barrier_prediction",
    "cross_block_matrix",
    "gradient_dot",
    "masked_directions",
    "predicted_barrier_curve",
    "predicted_set_barrier",
]


def predicted_barrier_curve(
    q1: float, q2: float, alphas: Sequence[float] | np.ndarray, *, g1: float = 0.0, g2: float = 0.0
) -> np.ndarray:
    """Singh Prop. 1 (eq. 1): B(α) ≈ α(1−α)/2 · (α q1 + (1−α) q2), q_i = dᵀ∇²L(θ_i)d, d = θ_2 − θ_1.

    α = 0 is θ_1, α = 1 is θ_2. `g1`, `g2` (= ∇L(θ_i)ᵀd, default 0 as in the paper) add the first-order
    term α(1−α)(g1 − g2) for non-stationary endpoints. With d[ℓ] and the (ℓ, ℓ) Hessian blocks in q_i, g_i
    this is Prop. 2 for a layer.
    """
    a = np.asarray(alphas, dtype=np.float64)
    return a * (1 - a) * (g1 - g2) + a * (1 - a) / 2 * (a * q1 + (1 - a) * q2)


@dataclass
class BarrierPrediction:
    """Prop. 1 (whole model) or Prop. 2 (one block ℓ: d → d[ℓ], H_i → H_i[ℓ,ℓ]) on a grid of α:
    B(α) ≈ α(1−α)(g1 − g2) + α(1−α)/2 · (α q1 + (1−α) q2) (:func:`predicted_barrier_curve`)."""

    alphas: np.ndarray  # the grid, float64
    q1: float  # dᵀ∇²L(θ_1)d
    q2: float  # dᵀ∇²L(θ_2)d
    g1: float  # ∇L(θ_1)ᵀd (0 unless gradient terms were asked for)
    g2: float  # ∇L(θ_2)ᵀd
    curve: np.ndarray  # B(α) on `alphas`
    max: float  # max of `curve` over the grid
    argmax_alpha: float  # the α where it is reached (the first, on ties)

    def at(self, alpha: float) -> float:
        """B(α) at one α, off the grid too."""
        return float(predicted_barrier_curve(self.q1, self.q2, [alpha], g1=self.g1, g2=self.g2)[0])


@dataclass
class CrossBlocks:
    """Singh eq. 20 at both endpoints: M_i[ℓ,ℓ'] = ⅛ d[ℓ]ᵀ∇²L(θ_i)[ℓ,ℓ']d[ℓ'] over the blocks
    `names`."""

    names: list[str]
    theta_1: np.ndarray  # M_1 (the paper's: Hessian at θ_1)
    theta_2: np.ndarray  # M_2


@dataclass
class PairPrediction(BarrierPrediction):
    """Prop. 1 for the whole model and, when blocks were given, Prop. 2 per block and eq. 20's matrices."""

    layers: dict[str, BarrierPrediction]  # block -> Prop. 2 for d[ℓ] (empty without blocks)
    cross_blocks: CrossBlocks  # eq. 20 at θ_1 and θ_2 (no names, 0 × 0 matrices without blocks)


def _blocks(model: nn.Module, layer_blocks: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """Parameter names of each block (buffer names dropped); unknown names and overlaps are errors."""
    params = set(parameter_names(model))
    known = params | {n for n, _ in model.named_buffers()}
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for block, names in layer_blocks.items():
        names = list(names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"block {block!r} names unknown tensors {unknown}")
        out[block] = [n for n in names if n in params]
        for n in out[block]:
            if n in seen:
                raise ValueError(f"parameter {n!r} is in blocks {seen[n]!r} and {block!r}")
            seen[n] = block
    return out


def masked_directions(d: PointLike, blocks: Mapping[str, Sequence[str]]) -> dict[str, Point]:
    """d[ℓ] = P_ℓ d for each block ℓ: d on ℓ's parameters, zero elsewhere."""
    out: dict[str, Point] = {}
    for b, names in blocks.items():
        own = set(names)
        out[b] = {n: (t if n in own else torch.zeros_like(t)) for n, t in d.items()}
    return out


def gradient_dot(
    model: nn.Module,
    theta: PointLike,
    directions: Sequence[PointLike],
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
) -> list[float]:
    """[∇L(θ)ᵀ d_k]_k for the mean loss over the data (one pass)."""
    op = HessianOperator(model, theta, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn)
    names = list(op.params)
    grad = {n: torch.zeros_like(p) for n, p in op.params.items()}
    total = 0
    for x, y in op._batches():
        leaves = [op.params[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            loss = loss_fn(op.fm.logits(dict(zip(names, leaves)), x), y)
            gs = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        for n, g in zip(names, gs):
            grad[n].add_(g)
        total += len(y)
    if total == 0:
        raise ValueError("the data yielded no examples")
    return [inner(grad, d) / total for d in directions]


def _argmax(alphas: np.ndarray, curve: np.ndarray) -> tuple[float, float]:
    i = int(np.argmax(curve))
    return float(curve[i]), float(alphas[i])


def barrier_prediction(
    model: nn.Module,
    theta_1: PointLike,
    theta_2: PointLike,
    data: Data,
    *,
    alphas: Sequence[float] | None = None,
    layers: Mapping[str, Iterable[str]] | None = None,
    gradient_terms: bool = False,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    method: str = "double_backward",
) -> PairPrediction:
    """Singh Prop. 1 for the whole model and, with `layers` (block name -> tensor names, e.g.
    `lmclab.paths.layer_groups(model)`; buffers are ignored), Prop. 2 per block and the eq. 20 cross-block
    matrices at θ_1 and θ_2 (free by-products of the same HVPs).

    d = θ_2 − θ_1 over the parameters, in the HVPs' precision (:func:`working_dtype` of θ_1). One data pass
    per endpoint (all masked directions go through `HessianOperator.matmat`), plus one gradient pass per
    endpoint if `gradient_terms` (else g1 = g2 = 0). The curves are on `alphas` (default 25 points); with
    `layers`, ``layers`` holds one :class:`BarrierPrediction` per block (for d[ℓ]) and ``cross_blocks`` the
    eq. 20 matrices (:class:`CrossBlocks`); without, both are empty.
    """
    if alphas is None:
        alphas = default_lambdas(25)
    a = np.asarray(alphas, dtype=np.float64)
    names_p = parameter_names(model)
    d = direction(theta_1, theta_2, keys=names_p, dtype=working_dtype(theta_1, names_p))
    blocks = _blocks(model, layers) if layers is not None else {}
    masked = masked_directions(d, blocks)
    names = list(masked)
    vectors = [d, *masked.values()]
    products = [
        HessianOperator(
            model, th, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn, method=method
        ).matmat(vectors)
        for th in (theta_1, theta_2)
    ]
    grads = (
        [
            gradient_dot(model, th, vectors, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn)
            for th in (theta_1, theta_2)
        ]
        if gradient_terms
        else [[0.0] * len(vectors)] * 2
    )

    def summary(k: int) -> dict:
        q1, q2 = inner(vectors[k], products[0][k]), inner(vectors[k], products[1][k])
        g1, g2 = grads[0][k], grads[1][k]
        curve = predicted_barrier_curve(q1, q2, a, g1=g1, g2=g2)
        peak, at = _argmax(a, curve)
        return {"alphas": a, "q1": q1, "q2": q2, "g1": g1, "g2": g2, "curve": curve, "max": peak, "argmax_alpha": at}

    return PairPrediction(
        **summary(0),
        layers={b: BarrierPrediction(**summary(k + 1)) for k, b in enumerate(names)},
        cross_blocks=CrossBlocks(
            names, *(_rows_to_matrix(names, list(masked.values()), prods[1:]) for prods in products)
        ),
    )


def _rows_to_matrix(names: list[str], masked: list[Point], rows: list[Point]) -> np.ndarray:
    """M[ℓ,ℓ'] = ⅛ d[ℓ']ᵀ (H d[ℓ]) = ⅛ d[ℓ]ᵀ H[ℓ,ℓ'] d[ℓ'], symmetrised (H is symmetric; removes rounding)."""
    n = len(names)
    m = np.array([[inner(masked[j], rows[i]) for j in range(n)] for i in range(n)], dtype=np.float64)
    m = m.reshape(n, n) / 8.0
    return (m + m.T) / 2


def cross_block_matrix(
    model: nn.Module,
    theta: PointLike | Sequence[PointLike],
    d: PointLike,
    layer_blocks: Mapping[str, Iterable[str]],
    data: Data,
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    method: str = "double_backward",
) -> tuple[list[str], np.ndarray]:
    """Singh eq. 20: B*_{ℓ,ℓ'} = ⅛ d[ℓ]ᵀ ∇²L(θ)[ℓ,ℓ'] d[ℓ'] for the blocks of `layer_blocks`.

    The paper evaluates the Hessian at θ = θ_1 (pass θ_1, d = θ_2 − θ_1). `theta` may also be a sequence
    of points: the matrices are averaged, e.g. (θ_1, θ_2) gives ⅛ d[ℓ]ᵀ ½(H_1 + H_2)[ℓ,ℓ'] d[ℓ'], the
    α = ½ value of Prop. 1/2 without the H_1 ≈ H_2 simplification. One data pass per point: one HVP per
    masked direction d[ℓ] gives the whole row ℓ. Sum of all entries = ⅛ d_Pᵀ H d_P for the parameters P
    the blocks cover (= ⅛ dᵀHd when they cover all); the diagonal is ⅛ d[ℓ]ᵀH[ℓ,ℓ]d[ℓ] (Prop. 2 at α = ½).
    Returns (block names, symmetric matrix).
    """
    points = [theta] if isinstance(theta, Mapping) else list(theta)
    if not points:
        raise ValueError("theta: give a point or a non-empty sequence of points")
    blocks = _blocks(model, layer_blocks)
    names = list(blocks)
    masked = list(masked_directions(parameters_of(d, model), blocks).values())
    total = np.zeros((len(names), len(names)))
    for th in points:
        op = HessianOperator(
            model, th, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn, method=method
        )
        cast = [op._cast(v) for v in masked]
        total += _rows_to_matrix(names, cast, op.matmat(cast))
    return names, total / len(points)


def predicted_set_barrier(matrix: np.ndarray, names: Sequence[str], subset: Iterable[str]) -> float:
    """Singh eq. 21: B*_P ≈ Σ_{ℓ,ℓ'∈P} B*_{ℓ,ℓ'} (the blocks of the cross-block matrix inside P)."""
    index = {n: i for i, n in enumerate(names)}
    chosen = list(dict.fromkeys(subset))
    unknown = [n for n in chosen if n not in index]
    if unknown:
        raise KeyError(f"unknown blocks {unknown}; known: {list(names)}")
    idx = [index[n] for n in chosen]
    m = np.asarray(matrix)
    return float(m[np.ix_(idx, idx)].sum())
