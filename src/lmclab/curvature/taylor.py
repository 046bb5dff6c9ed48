"""Taylor approximations of the loss and of the logits along a straight path (Benkő et al., §3.1–3.2).

Path θ_λ = (1−λ)θ_A + λθ_B, d = θ_B − θ_A. Centred at A, with f_A(t) = L(θ_A + t d) and t = λ:

    L(θ_λ) ≈ L(θ_A) + λ ∇L(θ_A)·d + ½ λ² dᵀ∇²L(θ_A)d [+ Σ_{k≥3} f_A⁽ᵏ⁾(0) λᵏ/k!]     (Benkő eq. 1)

Centred at B, with f_B(s) = L(θ_B − s d) (direction −d) and s = 1 − λ:

    L(θ_λ) ≈ L(θ_B) − (1−λ) ∇L(θ_B)·d + ½ (1−λ)² dᵀ∇²L(θ_B)d + …

The same for every logit (Benkő eq. for [z(θ_λ)]_k):

    [z(θ_λ)]_k ≈ [z(θ_A)]_k + λ dᵀ∇[z(θ_A)]_k + ½ λ² dᵀ∇²[z(θ_A)]_k d

with coefficients from :func:`lmclab.curvature.derivatives.logit_derivatives`, shape (N, C, K+1).
Order 1 is the linear, order 2 the quadratic approximation.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lmclab.curvature.derivatives import ieee_fp32, logit_derivatives, loss_derivatives
from lmclab.curvature.functional import Batch, functional_model, iterate_batches
from lmclab.data import DeviceDataset
from lmclab.points import Point, PointLike, direction, lerp, parameter_names

__all__ = [
    "PathApproximations",
    "TaylorSeries",
    "centred_at",
    "interpolated_logits",
    "interpolated_outputs",
    "logit_errors",
    "logit_rmse",
    "logits_at",
    "path_approximations",
    "path_coefficients",
    "path_direction",
    "taylor_polynomial",
    "taylor_rows",
]


def _as_tensor(values: Sequence[float] | torch.Tensor | float) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float64)
    return torch.as_tensor(values, dtype=torch.float64)


def taylor_polynomial(
    coefficients: Sequence[float] | torch.Tensor, t: torch.Tensor | Sequence[float] | float, order: int
) -> torch.Tensor:
    """Σ_{k ≤ order} c_k tᵏ / k! in float64.

    ``coefficients`` (..., K+1) holds c_k = f⁽ᵏ⁾(0) on its trailing axis; ``t`` is a scalar or 1-D (L,).
    Returns (..., L) for 1-D t (e.g. (N, C, K+1) -> (N, C, L)) and (...) for a scalar t.
    """
    c = _as_tensor(coefficients)
    if c.ndim == 0:
        raise ValueError("coefficients need a trailing axis of K+1 derivatives")
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order < c.shape[-1]:
        raise ValueError(f"order must be an int in 0..{c.shape[-1] - 1} (K = {c.shape[-1] - 1}), got {order!r}")
    tt = _as_tensor(t).to(c.device)
    if tt.ndim > 1:
        raise ValueError(f"t must be a scalar or 1-D, got shape {tuple(tt.shape)}")
    k = torch.arange(order + 1, dtype=torch.float64, device=c.device)
    factorials = torch.tensor([math.factorial(i) for i in range(order + 1)], dtype=torch.float64, device=c.device)
    powers = tt.reshape(-1, 1) ** k / factorials  # (L, order+1)
    out = c[..., : order + 1] @ powers.T  # (..., L)
    return out[..., 0] if tt.ndim == 0 else out


@dataclass(frozen=True)
class TaylorSeries:
    """One approximation along the path: centre "a" (θ_A) or "b" (θ_B), order k, its values (..., L)."""

    center: str
    order: int
    values: torch.Tensor

    @property
    def name(self) -> str:
        """The centre and the order: "a2", "b1", …"""
        return f"{self.center}{self.order}"


@dataclass(frozen=True)
class PathApproximations:
    """The Taylor approximations of :func:`path_approximations`: for each order, centre "a" then "b"."""

    lambdas: torch.Tensor
    series: tuple[TaylorSeries, ...]

    def __iter__(self) -> Iterator[TaylorSeries]:
        return iter(self.series)

    def at(self, center: str, order: int) -> torch.Tensor:
        """The values (..., L) centred at `center` ("a" or "b") of order `order`."""
        for s in self.series:
            if s.center == center and s.order == order:
                return s.values
        have = ", ".join(f"({s.center!r}, {s.order})" for s in self.series)
        raise KeyError(f"no approximation ({center!r}, {order}); computed: {have}")


def path_approximations(
    coeffs_a: torch.Tensor,
    coeffs_b: torch.Tensor,
    lambdas: Sequence[float] | torch.Tensor,
    orders: Iterable[int] = (1, 2),
) -> PathApproximations:
    """Σ_{j≤k} f_A⁽ʲ⁾(0) λʲ/j! (centre "a") and Σ_{j≤k} f_B⁽ʲ⁾(0) (1−λ)ʲ/j! (centre "b") at every λ, each k.

    ``coeffs_a``: derivatives of f_A(t) = L(θ_A + t d); ``coeffs_b``: of f_B(s) = L(θ_B − s d), i.e.
    computed at θ_B with direction −d. Both (..., K+1); values (..., L), float64 (``.at(center, k)``).
    """
    lam = _as_tensor(lambdas)
    series: list[TaylorSeries] = []
    for k in orders:
        series.append(TaylorSeries("a", k, taylor_polynomial(coeffs_a, lam, k)))
        series.append(TaylorSeries("b", k, taylor_polynomial(coeffs_b, 1.0 - lam, k)))
    return PathApproximations(lam, tuple(series))


def taylor_rows(
    lambdas: Sequence[float],
    coeffs_a: torch.Tensor | Sequence[float],
    coeffs_b: torch.Tensor | Sequence[float],
    orders: Iterable[int] = (1, 2),
    true_values: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """Tidy rows {lambda, center ("a"/"b"), order, value} of the loss approximations (1-D coefficients),
    centre "a" first, then "b", each in `orders` order and λ order.

    With ``true_values`` (L(θ_λ) at the same λ) also rows with center "true" (order None), first, and every
    approximation row gets ``error`` = value − true.
    """
    a, b = _as_tensor(coeffs_a), _as_tensor(coeffs_b)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError("taylor_rows takes the 1-D loss coefficients (K+1,); use path_approximations for logits")
    lam = [float(x) for x in lambdas]
    if true_values is not None and len(true_values) != len(lam):
        raise ValueError(f"{len(true_values)} true values for {len(lam)} lambdas")
    orders = list(orders)
    approx = path_approximations(a, b, lam, orders)
    rows: list[dict[str, Any]] = []
    if true_values is not None:
        rows += [{"lambda": x, "center": "true", "order": None, "value": float(v)} for x, v in zip(lam, true_values)]
    for center in ("a", "b"):
        for k in orders:
            values = approx.at(center, k)
            for i, x in enumerate(lam):
                row: dict[str, Any] = {"lambda": x, "center": center, "order": k, "value": float(values[i])}
                if true_values is not None:
                    row["error"] = row["value"] - float(true_values[i])
                rows.append(row)
    return rows


def path_direction(model: nn.Module, theta_a: PointLike, theta_b: PointLike) -> Point:
    """d = θ_B − θ_A over the model's parameters, on θ_A's device, in the widest dtype of the two points'
    parameters and at least fp32 (float64 endpoints keep a float64 direction)."""
    names = parameter_names(model)
    dtype = functools.reduce(
        torch.promote_types, (p[n].dtype for p in (theta_a, theta_b) for n in names), torch.float32
    )
    return direction(theta_a, theta_b, keys=names, dtype=dtype)


def centred_at(center: str, theta_a: PointLike, theta_b: PointLike, d: PointLike) -> tuple[PointLike, Point]:
    """(θ, v) of the expansion at one end of the path, d = θ_B − θ_A: (θ_A, d) for center "a"
    (f_A(t) = g(θ_A + t d), t = λ) and (θ_B, −d) for center "b" (f_B(s) = g(θ_B − s d), s = 1 − λ)."""
    if center == "a":
        return theta_a, dict(d)
    if center == "b":
        return theta_b, {k: -v for k, v in d.items()}
    raise ValueError(f"center must be 'a' or 'b', got {center!r}")


def path_coefficients(
    model: nn.Module,
    theta_a: PointLike,
    theta_b: PointLike,
    data: DeviceDataset | Iterable[Batch],
    *,
    order: int = 2,
    kind: str = "loss",
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(coeffs_a, coeffs_b): derivatives of f_A(t) = g(θ_A + t d) and f_B(s) = g(θ_B − s d), d = θ_B − θ_A
    (:func:`path_direction`, :func:`centred_at`).

    ``kind="loss"``: g = mean loss, each (K+1,) float64 (:func:`loss_derivatives`; ``options`` e.g.
    method, batch_size, max_examples, loss_fn, dtype). ``kind="logits"``: g = every logit, each
    (N, C, K+1) (:func:`logit_derivatives`). Feed them to :func:`path_approximations`. ``data`` must
    be re-iterable (a DeviceDataset or a list of batches): it is read once per endpoint.
    """
    if kind not in ("loss", "logits"):
        raise ValueError(f"kind must be 'loss' or 'logits', got {kind!r}")
    d = path_direction(model, theta_a, theta_b)
    ends = [centred_at(center, theta_a, theta_b, d) for center in ("a", "b")]
    if kind == "loss":
        coeffs = [loss_derivatives(model, theta, v, data, order=order, **options).coefficients for theta, v in ends]
    else:
        coeffs = [logit_derivatives(model, theta, v, data, order=order, **options) for theta, v in ends]
    return coeffs[0], coeffs[1]


def logit_errors(true_logits: torch.Tensor, approx: torch.Tensor, reference_logits_a: torch.Tensor) -> torch.Tensor:
    """(L, N): z_k(θ_λ) − approx_k(λ) per λ and input n, with k = argmax_c z_c(θ_A; x_n) (Benkő Fig. 8).

    ``true_logits`` and ``approx`` are (L, N, C) (``approx`` may be (N, C, L) as returned by
    :func:`path_approximations` on logit coefficients: pass ``approx.permute(2, 0, 1)``).
    """
    if true_logits.shape != approx.shape or true_logits.ndim != 3:
        raise ValueError(
            f"true_logits {tuple(true_logits.shape)} and approx {tuple(approx.shape)} must both be (L, N, C)"
        )
    if tuple(reference_logits_a.shape) != tuple(true_logits.shape[1:]):
        raise ValueError(
            f"reference_logits_a must be (N, C) = {tuple(true_logits.shape[1:])}, got {tuple(reference_logits_a.shape)}"
        )
    k = reference_logits_a.argmax(dim=-1).to(true_logits.device)  # (N,)
    idx = k.view(1, -1, 1).expand(true_logits.shape[0], -1, 1)
    diff = true_logits.double().gather(2, idx) - approx.to(true_logits.device).double().gather(2, idx)
    return diff[..., 0]


def logit_rmse(true_logits: torch.Tensor, approx: torch.Tensor, reference_logits_a: torch.Tensor) -> torch.Tensor:
    """(L,): sqrt(mean_n (z_{k_n}(θ_λ) − approx_{k_n}(λ))²), k_n = argmax z(θ_A; x_n) (Benkő Fig. 8), float64."""
    return logit_errors(true_logits, approx, reference_logits_a).square().mean(dim=1).sqrt()


@torch.no_grad()
def logits_at(
    model: nn.Module,
    theta: PointLike,
    data: DeviceDataset | Iterable[Batch],
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
) -> torch.Tensor:
    """(N, C) logits z(θ; x_n) in eval mode with θ's own buffers (float32; IEEE, not TF32, on CUDA)."""
    fm = functional_model(model, theta)
    state = {**fm.buffers, **fm.params}
    like = next(iter(fm.params.values()))
    with ieee_fp32(like.device):
        out = [
            functional_call(fm.module, state, (x.to(like.device, like.dtype),))
            for x, _ in iterate_batches(data, batch_size, max_examples)
        ]
    if not out:
        raise ValueError("no examples in data")
    return torch.cat(out)


def interpolated_outputs(outputs_a: torch.Tensor, outputs_b: torch.Tensor, lambdas: Sequence[float]) -> torch.Tensor:
    """(L, …): (1−λ) z(θ_A) + λ z(θ_B) at every λ, the straight line between the endpoints' outputs
    (Benkő Figs. 7–8's "direct" interpolation, next to the true z(θ_λ)), in float64."""
    lam = torch.tensor(list(lambdas), dtype=torch.float64, device=outputs_a.device)
    shape = (-1,) + (1,) * outputs_a.ndim
    return (1 - lam).view(shape) * outputs_a + lam.view(shape) * outputs_b


@torch.no_grad()
def interpolated_logits(
    model: nn.Module,
    theta_a: PointLike,
    theta_b: PointLike,
    data: DeviceDataset | Iterable[Batch],
    lambdas: Sequence[float],
    *,
    batch_size: int = 50,
    max_examples: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """(L, N, C): the true z(θ_λ; x_n), θ_λ = (1−λ)θ_A + λθ_B, for every λ (Benkő Figs. 7–8).

    Eval mode. Every floating tensor is interpolated, BN running statistics included (integer
    buffers from θ_A), as in :func:`lmclab.points.lerp`: for BatchNorm models these are the
    interpolated statistics, NOT recomputed ones (for a BN reset, reset each point and call
    :func:`logits_at` on it). Note the Taylor coefficients are taken with each endpoint's own
    statistics held fixed, so for BN models the two differ by the statistics' change along the path.
    ``data`` must be re-iterable (read once per λ).
    """
    rows = []
    for lam in tqdm(list(lambdas), desc="logits", unit="λ", disable=not progress, leave=False):
        rows.append(
            logits_at(model, lerp(theta_a, theta_b, float(lam)), data, batch_size=batch_size, max_examples=max_examples)
        )
    if not rows:
        raise ValueError("no lambdas")
    return torch.stack(rows)
