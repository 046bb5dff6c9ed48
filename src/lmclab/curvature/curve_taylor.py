"""Derivatives of the loss along a curve in parameter space, of any order: the Taylor expansion of
g(t) = L(φ(t)) at any t₀ (Benkő's analysis, with the straight line replaced by a mode-connecting curve).

For a curve φ (:class:`lmclab.paths.mode_curves.Curve`, control points P_i, weights w_i(t)):

    g(t₀ + s) = Σ_k g⁽ᵏ⁾(t₀) sᵏ/k!,      g'(t₀) = ∇L(φ(t₀))·φ'(t₀),
    g''(t₀) = φ'ᵀ∇²L φ' + ∇L·φ'',        …  (Faà di Bruno; no term is formed by hand)

Every g⁽ᵏ⁾(t₀) comes from one nested forward-mode pass per batch
(:func:`lmclab.curvature.derivatives.directional_taylor`) through t ↦ φ(t) = Σ_i w_i(t) P_i, whose weights
are polynomials in t (:func:`lmclab.paths.mode_curves.curve_params`): the curve's own curvature (φ'' ≠ 0
for a Bezier curve) enters exactly. On a straight segment of a polygonal chain φ'' = 0 and the
coefficients are those of the line through φ(t₀) along φ'(t₀); at a bend they are one-sided, of the
segment that starts there (t₀ = 1: the last one).

As for straight lines: eval mode with the buffers (BN statistics) of the point φ(t₀) held fixed, the
curve moving the trainable parameters only; per-batch sums (``loss_fn`` sums over the batch) accumulate
in float64 and are divided by N.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lmclab.curvature.derivatives import LossDerivatives, directional_taylor, ieee_fp32
from lmclab.curvature.functional import Batch, LossFn, functional_model, iterate_batches, summed_cross_entropy
from lmclab.curvature.taylor import taylor_polynomial
from lmclab.data import DeviceDataset
from lmclab.paths.mode_curves import Curve, curve_params, curve_point, curve_segment

__all__ = ["curve_loss_derivatives", "curve_taylor_values"]


def curve_loss_derivatives(
    model: nn.Module,
    curve: Curve,
    t0: float,
    data: DeviceDataset | Iterable[Batch],
    *,
    order: int = 2,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    dtype: torch.dtype = torch.float32,
    allow_tf32: bool = False,
) -> LossDerivatives:
    """g⁽ᵏ⁾(t₀), k = 0..``order``, of g(t) = L(φ(t)) = (1/N) Σ_n ℓ(z(φ(t); x_n), y_n), by nested forward mode
    (method "jvp"). ``loss_fn(logits, y)`` must SUM over the batch. Buffers fixed at φ(t₀)'s; computed in
    ``dtype`` (float64 for checks), on CUDA in IEEE fp32 unless ``allow_tf32``. `model` is never modified."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be an int ≥ 0, got {order!r}")
    segment = curve_segment(curve.kind, curve.n_bends, float(t0))
    fm = functional_model(model, curve_point(curve, float(t0)))
    buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in fm.buffers.items()}
    names = list(fm.params)
    like = fm.params[names[0]]
    points = [{k: p[k].detach().to(like.device) for k in names} for p in curve.points]
    local = Curve(curve.kind, points[0], tuple(points[1:-1]), points[-1])
    t_at = torch.tensor(float(t0), dtype=dtype, device=like.device)
    total = torch.zeros(order + 1, dtype=torch.float64)
    n = 0
    for x, y in iterate_batches(data, batch_size, max_examples):
        x = x.to(device=like.device, dtype=dtype) if x.is_floating_point() else x.to(like.device)
        y = y.to(like.device)

        def g(t: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            params = curve_params(local, t, names, segment=segment, dtype=dtype)
            return loss_fn(fm.logits({**buffers, **params}, x), y)

        with torch.no_grad(), ieee_fp32(like.device, allow_tf32):
            coeffs = directional_taylor(g, order, t_at)
        total += torch.stack([c.detach().reshape(()).to("cpu", torch.float64) for c in coeffs])
        n += len(y)
    if n == 0:
        raise ValueError("no examples in data")
    return LossDerivatives(total / n, n, "jvp")


def curve_taylor_values(
    derivatives: LossDerivatives | torch.Tensor, t0: float, ts: Sequence[float], order: int
) -> torch.Tensor:
    """The order-`order` Taylor approximation Σ_{k ≤ order} g⁽ᵏ⁾(t₀)(t − t₀)ᵏ/k! of L(φ(t)) at each t (float64)."""
    coefficients = derivatives.coefficients if isinstance(derivatives, LossDerivatives) else derivatives
    s = torch.as_tensor([float(t) - float(t0) for t in ts], dtype=torch.float64)
    return taylor_polynomial(coefficients, s, order)
