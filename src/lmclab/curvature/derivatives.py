"""Exact directional derivatives of the loss and of every logit along a straight line in parameter space.

For a point θ, a direction d (over the trainable parameters) and data {(x_n, y_n)}, n = 1..N:

    f(t)       = L(θ + t d) = (1/N) Σ_n ℓ(z(θ + t d; x_n), y_n)        (mean loss)
    g_{n,c}(t) = z_c(θ + t d; x_n)                                     (every logit of every input)

and we want f⁽ᵏ⁾(0) and g⁽ᵏ⁾_{n,c}(0) for k = 0..K: f'(0) = ∇L·d, f''(0) = dᵀ∇²L d, f'''(0) =
∇³L[d, d, d], … — the coefficients of the Taylor approximations of Benkő et al. (eq. for L(θ_λ)
and for [z(θ_λ)]_k), see :mod:`lmclab.curvature.taylor`.

Two routes:

* ``"jvp"`` — nested forward mode over a *scalar* t. With g_0(t) = f(θ + t d) (a whole batch of
  logits and its loss), level k differentiates level k−1 by ``torch.func.jvp(·, (t,), (1,))``;
  each level hands the orders below it on as un-differentiated auxiliary output, so ONE nested
  pass gives every order 0..K of the batch loss and of all N×C logits at once. Its cost grows as
  about 2ᴷ forward passes (each level doubles the dual components), so it is meant for small K.
* ``"hvp"`` (K ≤ 2) — the paper's procedure: f'(0) = ∇L·d from one backward pass and
  f''(0) = dᵀ(∇²L d) from a double backward (a Hessian-vector product, ``create_graph=True``).

``"auto"`` is ``"hvp"`` for K ≤ 2 and ``"jvp"`` above (see :data:`AUTO_ORDER2` for the measurement).

Derivatives are taken in eval mode with buffers fixed (:func:`lmclab.curvature.functional_model`):
for BatchNorm models that means the point's OWN running statistics, so the line θ + t d moves the
weights only, not the BN statistics (d is over parameters). The mean over the data is exact for an
uneven last batch: per-batch sums (``loss_fn`` sums over the batch) accumulate in float64 and are
divided by N at the end.

Three traps handled here: torch's nested forward mode differentiates fused ``layer_norm`` (and
instance / train-mode batch norm) wrongly at order ≥ 2, so those run as elementary ops inside the
nested jvp (:class:`_ComposedNorms`); torch's fused attention kernels have no forward-mode derivative
and no double backward, so attention runs on SDPA's math backend (:func:`exact_attention`); and cuDNN
convolutions default to TF32 on CUDA, which is switched off while derivatives are taken (:func:`ieee_fp32`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from lmclab.curvature.functional import (
    Batch,
    FunctionalModel,
    LossFn,
    functional_model,
    iterate_batches,
    summed_cross_entropy,
)
from lmclab.data import DeviceDataset
from lmclab.models.attention import exact_attention
from lmclab.points import Point, PointLike

__all__ = [
    "AUTO_ORDER2",
    "METHODS",
    "LossDerivatives",
    "directional_taylor",
    "ieee_fp32",
    "logit_derivatives",
    "loss_derivatives",
    "resolve_method",
]

METHODS = ("jvp", "hvp", "auto")

#: The method ``"auto"`` uses for loss orders ≤ 2: "hvp" (double backward), faster than the nested jvp
#: in every measurement. ``python bench/logit_derivatives.py --only-loss [--threads 1]`` times
#: ``loss_derivatives(order=2)`` on 4 batches of 50 (random init, d = 0.1·(θ_B − θ_A), jvp and hvp
#: interleaved, fastest of 5, per batch); jvp / hvp in ms (hvp/jvp):
#:
#:   machine (shared with other jobs)     MLP 784-512³-10 (MNIST)   ResNet-20 ×1 LN       ResNet-20 ×1 BN (eval)
#:   2-core CPU, torch 2.13, 2 threads    80 / 18   (0.23)          1247 / 371  (0.30)    426 / 375  (0.88)
#:   same, a later, busier run            228 / 147 (0.65)          570 / 428   (0.75)    435 / 329  (0.76)
#:   same, 1 thread                       49 / 21   (0.42)          1363 / 1247 (0.91)    850 / 687  (0.81)
#:   H100, torch 2.11, IEEE fp32 (¹)      19.8 / 4.8 (0.24)         234 / 66    (0.28)    176 / 41   (0.23)
#:
#: (¹) MLP on random 1×28×28 images there. The CPU timings vary with the other processes on the
#: machine; the ordering never changed.
#: DESIGN.md's H100 costs agree (double backward 2.2× a gradient vs 5.5× for nested forward at ×1).
#: For orders > 2 only "jvp" exists.
AUTO_ORDER2 = "hvp"


@dataclass
class LossDerivatives:
    """f⁽ᵏ⁾(0), k = 0..K, of f(t) = L(θ + t d) (mean loss over ``n_examples``), by ``method``; the Taylor
    polynomial Σ_k f⁽ᵏ⁾(0) tᵏ/k! is :func:`lmclab.curvature.taylor.taylor_polynomial` of ``coefficients``."""

    coefficients: torch.Tensor  # float64, shape (K+1,)
    n_examples: int
    method: str  # the route actually used: "jvp" or "hvp"

    @property
    def order(self) -> int:
        return self.coefficients.numel() - 1


def resolve_method(method: str, order: int) -> str:
    """ "jvp" or "hvp" for ``method`` in :data:`METHODS` at derivative ``order``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if method == "auto":
        return AUTO_ORDER2 if order <= 2 else "jvp"
    if method == "hvp" and order > 2:
        raise ValueError(f"method 'hvp' gives orders ≤ 2 only, asked for {order}; use 'jvp'")
    return method


def _check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"order must be an int ≥ 0, got {order!r}")
    return order


def _norm(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """(x − mean) / sqrt(biased var + eps) over ``dims``, from elementary (correctly nested-differentiable) ops."""
    centred = x - x.mean(dim=dims, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(dim=dims, keepdim=True) + eps)


def _affine(
    y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shape: tuple[int, ...]
) -> torch.Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


class _ComposedNorms(TorchFunctionMode):
    """Normalisations with batch statistics as elementary ops while nesting forward mode.

    torch's fused kernels have a first-order JVP rule that is not itself differentiated
    correctly: nested ``jvp`` (forward over forward) of ``layer_norm``, ``instance_norm`` and
    training-mode ``batch_norm`` gives WRONG second and higher derivatives, silently (measured on
    torch 2.13: e.g. d²/dt² of a layer norm −9.13 by nested jvp vs −9.34 by double backward and
    finite differences; pytorch/pytorch#196700, #196699, umbrella #198017). Under this mode those
    calls are replaced by mean/var/rsqrt compositions, whose nested derivatives are exact.
    ``group_norm``, ``rms_norm`` and eval-mode ``batch_norm`` (fixed statistics) are correct as they
    are. Calls that would update running statistics fall through unchanged.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Iterable[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.instance_norm:
            return _instance_norm(func, *args, **kwargs)
        if func is F.batch_norm:
            return _batch_norm(func, *args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(
    input: torch.Tensor,
    normalized_shape: Iterable[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    k = len(tuple(normalized_shape))
    shape = tuple(input.shape[input.ndim - k :])
    return _affine(_norm(input, tuple(range(input.ndim - k, input.ndim)), eps), weight, bias, shape)


def _instance_norm(
    func: Callable[..., torch.Tensor],
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    if not use_input_stats or running_mean is not None or running_var is not None:
        return func(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    shape = (1, -1) + (1,) * (input.ndim - 2)
    return _affine(_norm(input, tuple(range(2, input.ndim)), eps), weight, bias, shape)


def _batch_norm(
    func: Callable[..., torch.Tensor],
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    if not training or running_mean is not None or running_var is not None:
        return func(input, running_mean, running_var, weight, bias, training, momentum, eps)
    shape = (1, -1) + (1,) * (input.ndim - 2)
    return _affine(_norm(input, (0, *range(2, input.ndim)), eps), weight, bias, shape)


@contextlib.contextmanager
def ieee_fp32(device: torch.device | str, allow_tf32: bool = False) -> Iterator[None]:
    """Within: CUDA matmuls and convolutions in IEEE fp32, not TF32 (restored after; a no-op off CUDA).

    cuDNN convolutions default to TF32 (10-bit mantissa): on an H100 it left ResNet-20's order-1/2
    logit coefficients 1e-2 (relative) off the double-backward values, which are exact to 1e-6 on CPU.
    """
    if allow_tf32 or torch.device(device).type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    settings: list[tuple[object, str, object]]
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        settings = [(cudnn.conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    else:  # torch < 2.9
        settings = [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    try:
        for obj, name, value in settings:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def directional_taylor(fn: Callable[[torch.Tensor], Any], order: int, t0: torch.Tensor) -> list[Any]:
    """[fn(t0), fn'(t0), …, fn⁽ᴷ⁾(t0)] of ``fn``: scalar tensor t -> pytree of tensors, K = ``order``.

    Nested forward mode, one pass: h_0(t) = (fn(t), ()) and h_k(t) = (∂_t p, (*aux, p)) where
    (p, ∂_t p, aux) = jvp(h_{k−1}, (t,), (1,), has_aux=True); the top level returns fn⁽ᴷ⁾ and the
    auxiliary tuple (fn, fn', …, fn⁽ᴷ⁻¹⁾), so every order comes out of the same evaluation. For
    K ≥ 2 the batch-statistics normalisations run as elementary ops (see :class:`_ComposedNorms`);
    attention always runs on SDPA's math backend (its fused kernels have no forward-mode derivative,
    :func:`lmclab.models.attention.exact_attention`).
    """

    def level(k: int) -> Callable[[torch.Tensor], tuple[Any, tuple[Any, ...]]]:
        if k == 0:
            return lambda t: (fn(t), ())
        inner = level(k - 1)

        def h(t: torch.Tensor) -> tuple[Any, tuple[Any, ...]]:
            # torch.func.jvp is annotated 2-tuple | 3-tuple; with has_aux=True it is always the 3-tuple.
            out = cast(tuple[Any, Any, Any], jvp(inner, (t,), (torch.ones_like(t),), has_aux=True))
            primal, tangent, aux = out
            return tangent, (*aux, primal)

        return h

    order = _check_order(order)
    norms = _ComposedNorms() if order >= 2 else contextlib.nullcontext()
    with warnings.catch_warnings(), exact_attention(), norms:
        # torch's first forward-AD call scripts its jvp decompositions and warns that jit.script is deprecated
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
        top, lower = level(order)(t0)
    return [*lower, top]


# ---------------------------------------------------------------------------------------------- setup


def _prepare(
    model: nn.Module, theta: PointLike, direction: PointLike, dtype: torch.dtype
) -> tuple[FunctionalModel, Point]:
    """The functional model at θ in ``dtype`` (floating buffers too) and d over its parameters."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be floating point, got {dtype}")
    fm = functional_model(model, theta)
    params = {k: theta[k].detach().to(device=v.device, dtype=dtype) for k, v in fm.params.items()}  # no fp32 round trip
    buffers = {k: v.to(dtype) if v.is_floating_point() else v for k, v in fm.buffers.items()}
    missing = set(params) - set(direction)
    if missing:
        raise KeyError(f"direction lacks parameters {sorted(missing)}")
    unknown = set(direction) - set(params) - set(buffers)
    if unknown:
        raise KeyError(f"direction has tensors the model does not: {sorted(unknown)}")
    d: Point = {}
    for k, p in params.items():
        v = direction[k]
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"direction[{k!r}] has shape {tuple(v.shape)}, the parameter {tuple(p.shape)}")
        d[k] = v.detach().to(device=p.device, dtype=dtype)
    return FunctionalModel(fm.module, params, buffers), d


def _batches(
    data: DeviceDataset | Iterable[Batch], batch_size: int, max_examples: int | None, progress: bool, desc: str
) -> Iterable[Batch]:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    total = None
    if isinstance(data, DeviceDataset):
        n = len(data) if max_examples is None else min(len(data), max_examples)
        total = math.ceil(n / batch_size)
    return tqdm(
        iterate_batches(data, batch_size, max_examples),
        total=total,
        desc=desc,
        unit="batch",
        disable=not progress,
        leave=False,
    )


def _line(fm: FunctionalModel, d: Point, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """t -> z(θ + t d; x), the logits of the batch along the line."""
    return lambda t: fm.logits({k: p + t * d[k] for k, p in fm.params.items()}, x)


def _to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.to(device=like.device, dtype=like.dtype) if x.is_floating_point() else x.to(like.device)


# ---------------------------------------------------------------------------------------------- per batch


def _loss_jvp(
    fm: FunctionalModel, d: Point, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, order: int
) -> list[torch.Tensor]:
    line = _line(fm, d, x)
    like = next(iter(fm.params.values()))
    t0 = torch.zeros((), dtype=like.dtype, device=like.device)
    return directional_taylor(lambda t: loss_fn(line(t), y), order, t0)


def _loss_hvp(
    fm: FunctionalModel, d: Point, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, order: int
) -> list[torch.Tensor]:
    """[L, ∇L·d, dᵀ(∇²L d)] of the batch (summed) loss by backward and double backward."""
    names = list(fm.params)
    leaves = [fm.params[k].detach().requires_grad_(True) for k in names]
    dirs = [d[k] for k in names]
    with torch.enable_grad():
        loss = loss_fn(fm.logits(dict(zip(names, leaves)), x), y)
        out = [loss.detach()]
        if order >= 1:
            zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
            if not loss.requires_grad:  # constant in θ
                return out + [zero] * order
            grads = torch.autograd.grad(loss, leaves, create_graph=order >= 2, allow_unused=True)
            gd = sum(((g * v).sum() for g, v in zip(grads, dirs) if g is not None), zero)
            out.append(gd.detach())
            if order >= 2:
                if not gd.requires_grad:  # L linear in θ
                    return out + [zero]
                hd = torch.autograd.grad(gd, leaves, allow_unused=True)
                out.append(sum(((h * v).sum() for h, v in zip(hd, dirs) if h is not None), zero).detach())
    return out


# ---------------------------------------------------------------------------------------------- public


def loss_derivatives(
    model: nn.Module,
    theta: PointLike,
    direction: PointLike,
    data: DeviceDataset | Iterable[Batch],
    *,
    order: int = 2,
    method: str = "auto",
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    allow_tf32: bool = False,
) -> LossDerivatives:
    """f⁽ᵏ⁾(0), k = 0..``order``, of f(t) = L(θ + t d) = (1/N) Σ_n ℓ(z(θ + t d; x_n), y_n).

    f(0) = L(θ), f'(0) = ∇L(θ)·d, f''(0) = dᵀ∇²L(θ)d, f⁽ᵏ⁾(0) = ∇ᵏL(θ)[d, …, d]. ``method``: "jvp"
    (nested forward mode, any order), "hvp" (gradient + double-backward Hessian-vector product,
    order ≤ 2, as in Benkő et al. §3.1) or "auto" (:data:`AUTO_ORDER2` for order ≤ 2, else "jvp").
    ``loss_fn(logits, y)`` must SUM over the batch; batch sums accumulate in float64 and are divided
    by N. ``data``: a DeviceDataset (``batch_size`` at a time, in order) or any iterable of (x, y)
    batches (used as given). Eval mode, buffers (BN statistics) fixed at θ's own; computed in
    ``dtype`` (float32 by default; float64 for checks), on CUDA in IEEE fp32 unless ``allow_tf32``.
    ``model`` is a template, never modified.
    """
    order = _check_order(order)
    route = resolve_method(method, order)
    fm, d = _prepare(model, theta, direction, dtype)
    like = next(iter(fm.params.values()))
    per_batch = _loss_jvp if route == "jvp" else _loss_hvp
    total = torch.zeros(order + 1, dtype=torch.float64)
    n = 0
    for x, y in _batches(data, batch_size, max_examples, progress, f"loss derivatives ({route})"):
        x, y = _to(x, like), y.to(like.device)
        with torch.no_grad(), ieee_fp32(like.device, allow_tf32):
            coeffs = per_batch(fm, d, x, y, loss_fn, order)
        total += torch.stack([c.detach().reshape(()).to("cpu", torch.float64) for c in coeffs])
        n += len(y)
    if n == 0:
        raise ValueError("no examples in data")
    return LossDerivatives(total / n, n, route)


def logit_derivatives(
    model: nn.Module,
    theta: PointLike,
    direction: PointLike,
    data: DeviceDataset | Iterable[Batch],
    *,
    order: int = 2,
    batch_size: int = 50,
    max_examples: int | None = None,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """(N, C, K+1): d^k/dt^k z_c(θ + t d; x_n) at t = 0 for every input n, class c and k = 0..K.

    The coefficients of Benkő et al.'s [z(θ_λ)]_k ≈ [z(θ_A)]_k + (θ_λ−θ_A)ᵀ∇[z(θ_A)]_k +
    ½(θ_λ−θ_A)ᵀ∇²[z(θ_A)]_k(θ_λ−θ_A) with θ_λ − θ_A = λd: k=1 is the Jacobian row times d, k=2 the
    logit's dᵀ∇²z d. One nested forward-mode pass per batch gives all inputs, classes and orders
    (no loop over either). Eval mode, buffers fixed; returned in ``dtype`` on θ's device (on CUDA
    computed in IEEE fp32 unless ``allow_tf32``).
    """
    order = _check_order(order)
    fm, d = _prepare(model, theta, direction, dtype)
    like = next(iter(fm.params.values()))
    t0 = torch.zeros((), dtype=dtype, device=like.device)
    chunks = []
    for x, _ in _batches(data, batch_size, max_examples, progress, "logit derivatives"):
        x = _to(x, like)
        with torch.no_grad(), ieee_fp32(like.device, allow_tf32):
            coeffs = directional_taylor(_line(fm, d, x), order, t0)
        chunks.append(torch.stack([c.detach() for c in coeffs], dim=-1))
    if not chunks:
        raise ValueError("no examples in data")
    return torch.cat(chunks)
