"""Stochastic trace estimators with confidence intervals, and the top Hessian eigenvalue.

- **Hutchinson** (1989): tr(A) = E[vᵀAv] for probes with E[vvᵀ] = I (Rademacher ±1 or standard
  normal); estimate = mean of n samples vᵢᵀAvᵢ; CI = mean ± t_{(1+c)/2, n−1} · s/√n (Student t, s the
  sample standard deviation). The samples are i.i.d., so the CI is the usual t-interval (approximate:
  the samples are not normal, but their mean is close to normal for n ≳ 10).
- **Adaptive stopping**: with `target_ci_width` = w, probes are added until the *relative* half-width
  (t · s/√n) / |mean| ≤ w (or `max_probes`). Relative, because traces span orders of magnitude across
  models. `probes` is then the minimum sample size before the first check. Each step adds the predicted
  shortfall n·(half/(w·|mean|))² − n probes, at least 1 and at most `block` (one data pass), so batching
  probes does not overshoot the stopping point by a whole block.
  (Stopping on the observed width biases coverage slightly below nominal.)
- **Hutch++** (Meyer, Musco, Musco, Woodruff 2021): with m matvecs, k = ⌊m/3⌋, l = m − 2k: sketch
  Y = A S (S: k Rademacher columns), Q = orth(Y); tr(A) = tr(QᵀAQ) + tr((I−QQᵀ)A(I−QQᵀ)), the first
  exact (k matvecs), the second by Hutchinson with l probes (I−QQᵀ)g. CI: tr(QᵀAQ) ± the t-interval of
  the l remainder samples — valid conditionally on the sketch, approximate like Hutchinson's. With a
  target width the sketch is fixed and remainder probes are added until the relative half-width is met
  (deflating the top of the spectrum shrinks the per-probe variance 2‖A‖_F² − 2Σ A_ii²).
- **GGN control variate** (``hessian_trace(control_variate="ggn")``): tr H = tr G + tr R with tr G exact
  (:func:`lmclab.curvature.ggn.ggn_trace`) and Hutchinson on R = H − G only (`offset` = tr G); the CI is
  tr G ± the t-interval of the zᵀRz samples. Worth it when ‖R‖_F ≪ ‖H‖_F (low loss; diag R = 0 for
  piecewise-linear nets).
- **Scale-aware trace** (STE-MM): tr(D A D) with D = diag|θ|, i.e. Hutchinson with probes v = z ⊙ |θ|
  (vᵀAv = zᵀDADz); both estimators take `scale` = θ and work on the operator v ↦ D A (D v).

Vectors are parameter dicts (`like` gives names, shapes, dtype and device). A `matmat` (list of
vectors -> list of products) lets several probes share one pass over the data (`hvp_many`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from lmclab.curvature.functional import LossFn, summed_cross_entropy
from lmclab.curvature.ggn import ggn_trace
from lmclab.curvature.hessian import Data, HessianOperator
from lmclab.points import Point, PointLike, flatten, inner, unflatten

__all__ = [
    "TraceEstimate",
    "hessian_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_top",
    "random_probe",
    "t_interval",
    "top_eigenvalue",
    "trace_from_json",
    "trace_json",
]

Matvec = Callable[[Point], Point]
Matmat = Callable[[list[Point]], list[Point]]


@dataclass
class TraceEstimate:
    """A trace estimate with its `confidence`-level interval [ci_low, ci_high]."""

    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    n_probes: int  # Hutchinson: probes (= matvecs); Hutch++: remainder probes l
    method: str
    samples: list[float] = field(repr=False)  # Hutchinson: vᵢᵀAvᵢ; Hutch++: remainder samples
    n_matvecs: int = 0  # products with A in all

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2

    @property
    def relative_half_width(self) -> float:
        return self.half_width / abs(self.estimate) if self.estimate != 0 else math.inf


def trace_json(est: TraceEstimate) -> dict[str, Any]:
    """A trace estimate as `lmclab sharpness` prints it (no per-probe samples)."""
    return {
        "estimate": est.estimate,
        "ci_low": est.ci_low,
        "ci_high": est.ci_high,
        "confidence": est.confidence,
        "probes": est.n_probes,
        "method": est.method,
    }


def trace_from_json(d: Mapping[str, Any]) -> TraceEstimate:
    """The estimate :func:`trace_json` wrote (without its per-probe samples)."""
    return TraceEstimate(
        float(d["estimate"]),
        float(d["ci_low"]),
        float(d["ci_high"]),
        float(d["confidence"]),
        int(d["probes"]),
        str(d["method"]),
        [],
        int(d["probes"]),
    )


def t_interval(samples: Sequence[float], confidence: float) -> tuple[float, float]:
    """(mean, half-width) of the Student-t interval mean ± t_{(1+c)/2, n−1} s/√n of the samples; half-width
    inf for fewer than 2 samples."""
    x = np.asarray(samples, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, math.inf
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, half


def _next_block(samples: Sequence[float], half: float, target: float, block: int) -> int:
    """Probes to add next: the predicted shortfall n·(half/(target·|mean|))² − n, at least 1, at most `block`."""
    n, mean = len(samples), abs(float(np.mean(samples)))
    if mean == 0 or not math.isfinite(half):
        return block
    need = math.ceil(n * (half / (target * mean)) ** 2) - n
    return max(1, min(block, need))


def random_probe(like: PointLike, generator: torch.Generator, distribution: str) -> Point:
    """One probe drawn on the CPU from `generator` (reproducible across devices), cast like `like`."""
    out: Point = {}
    for k, t in like.items():
        if distribution == "rademacher":
            z = torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8).to(torch.float64) * 2 - 1
        elif distribution == "gaussian":
            z = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        else:
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
        out[k] = z.to(t.device, t.dtype)
    return out


def _operator(matvec: Matvec | None, matmat: Matmat | None, like: PointLike, scale: PointLike | None) -> Matmat:
    """The list-of-vectors operator of A, or of D A D with D = diag|scale|."""
    if matvec is None and matmat is None:
        raise ValueError("give matvec or matmat")

    def apply(vs: list[Point]) -> list[Point]:
        return matmat(vs) if matmat is not None else [matvec(v) for v in vs]  # type: ignore[misc]

    if scale is None:
        return apply
    d = {k: scale[k].detach().abs().to(t.device, t.dtype) for k, t in like.items()}

    def scaled(vs: list[Point]) -> list[Point]:
        out = apply([{k: v[k] * d[k] for k in d} for v in vs])
        return [{k: w[k] * d[k] for k in d} for w in out]

    return scaled


def hutchinson_trace(
    matvec: Matvec | None,
    like: PointLike,
    *,
    probes: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
    scale: PointLike | None = None,
    distribution: str = "rademacher",
    target_ci_width: float | None = None,
    max_probes: int = 10_000,
    matmat: Matmat | None = None,
    block: int = 1,
    offset: float = 0.0,
) -> TraceEstimate:
    """Hutchinson: tr(A) ≈ (1/n) Σᵢ vᵢᵀAvᵢ with a Student-t CI (tr(DAD), D = diag|scale|, if `scale`).

    `offset` c: the estimate is c + (1/n) Σᵢ vᵢᵀAvᵢ (a known part of the trace, e.g. an exact control
    variate), with the same half-width; the relative stopping test is taken against |c + mean|.

    `target_ci_width`: stop once the relative CI half-width ≤ target (`probes` = minimum, `max_probes`
    = cap). `matmat` + `block`: apply A to `block` probes at a time (e.g. one data pass each). Probes
    come from one seeded generator in sequence, so the samples do not depend on `block`.
    """
    if probes < 2:
        raise ValueError(f"probes must be ≥ 2 for a confidence interval, got {probes}")
    op = _operator(matvec, matmat, like, scale)
    gen = torch.Generator().manual_seed(seed)
    block = max(1, int(block))
    samples: list[float] = []
    goal = probes if target_ci_width is None else min(probes, max_probes)
    while True:
        while len(samples) < goal:
            vs = [random_probe(like, gen, distribution) for _ in range(min(block, goal - len(samples)))]
            samples += [inner(v, av) for v, av in zip(vs, op(vs))]
        mean, half = t_interval(samples, confidence)
        mean += offset
        if target_ci_width is None or len(samples) >= max_probes:
            break
        if half <= target_ci_width * abs(mean):
            break
        shifted = [offset + x for x in samples] if offset else samples
        goal = min(max_probes, len(samples) + _next_block(shifted, half, target_ci_width, block))
    name = "hutchinson" + ("-scaled" if scale is not None else "")
    return TraceEstimate(mean, mean - half, mean + half, confidence, len(samples), name, samples, len(samples))


def hutchpp_trace(
    matvec: Matvec | None,
    like: PointLike,
    *,
    matvecs: int = 99,
    seed: int = 0,
    scale: PointLike | None = None,
    confidence: float = 0.95,
    matmat: Matmat | None = None,
    block: int | None = None,
    sketch: int | None = None,
    target_ci_width: float | None = None,
    max_matvecs: int = 10_000,
) -> TraceEstimate:
    """Hutch++: tr(QᵀAQ) (Q = orth(A S), k = ⌊m/3⌋ columns) + Hutchinson on (I−QQᵀ)A(I−QQᵀ) with l = m − 2k.

    CI from the l remainder samples (t-interval, conditional on the sketch; approximate). `sketch` sets k
    explicitly (l = m − 2k). `target_ci_width`: after the first l remainder probes, add remainder probes
    (`block` at a time) until the relative half-width ≤ target or `max_matvecs` products in all (the
    sketch is kept: adaptive in the remainder only). Keeps k vectors of the parameters' size in memory
    (float64 for the QR). `block`: products per `matmat` call (default: all of a stage at once).
    """
    k = matvecs // 3 if sketch is None else int(sketch)
    rest = matvecs - 2 * k  # l, the remainder probes
    if k < 1 or rest < 2:
        raise ValueError(f"Hutch++ needs a sketch k ≥ 1 and ≥ 2 remainder probes; got k={k}, l={rest}")
    op = _operator(matvec, matmat, like, scale)
    gen = torch.Generator().manual_seed(seed)
    ref = next(iter(like.values()))
    chunk = max(1, int(block)) if block else None
    names = list(like)

    def apply(cols: torch.Tensor) -> torch.Tensor:
        """A applied to the columns of a float64 (P, c) matrix, returned as float64 (P, c)."""
        vs = [unflatten(cols[:, j], like) for j in range(cols.shape[1])]
        step = chunk or len(vs)
        out: list[Point] = []
        for s in range(0, len(vs), step):
            out += op(vs[s : s + step])
        return torch.stack([flatten(w, names).to(torch.float64) for w in out], dim=1)

    def rademacher(cols: int) -> torch.Tensor:
        return torch.stack(
            [flatten(random_probe(like, gen, "rademacher"), names).to(torch.float64) for _ in range(cols)], dim=1
        ).to(ref.device)

    q, _ = torch.linalg.qr(apply(rademacher(k)))
    exact = float(torch.sum(q * apply(q)))

    def remainder(cols: int) -> list[float]:
        g = rademacher(cols)
        g = g - q @ (q.T @ g)
        return torch.sum(g * apply(g), dim=0).tolist()

    samples = remainder(rest)
    step = chunk or rest
    while True:
        mean, half = t_interval(samples, confidence)
        if target_ci_width is None or 2 * k + len(samples) >= max_matvecs:
            break
        if half <= target_ci_width * abs(exact + mean):
            break
        shifted = [exact + x for x in samples]  # same spread, relative to the whole estimate
        more = _next_block(shifted, half, target_ci_width, step)
        samples += remainder(min(more, max_matvecs - 2 * k - len(samples)))
    name = "hutchpp" + ("-scaled" if scale is not None else "")
    est = exact + mean
    return TraceEstimate(est, est - half, est + half, confidence, len(samples), name, samples, 2 * k + len(samples))


def hessian_trace(
    model: nn.Module,
    theta: PointLike | None,
    data: Data,
    *,
    method: str = "hutchinson",
    scale_aware: bool = False,
    probes: int = 100,
    confidence: float = 0.95,
    target_ci_width: float | None = None,
    max_probes: int = 10_000,
    probes_per_pass: int = 10,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    hvp_method: str = "double_backward",
    vectorize: bool = False,
    seed: int = 0,
    distribution: str = "rademacher",
    sketch: int | None = None,
    control_variate: str | None = None,
) -> TraceEstimate:
    """tr ∇²L(θ) (or STE-MM's tr(D ∇²L D), D = diag|θ|, with `scale_aware`) over fixed data, eval mode.

    `control_variate="ggn"` (Hutchinson only, not scale-aware): tr H = tr G (exact, :func:`ggn_trace`) +
    Hutchinson on R = H − G (products with R, `HessianOperator(part="residual")`); the samples are zᵀRz, the
    CI is tr G ± their t-interval, `n_probes` counts R products (tr G costs about C backward passes more).
    Default None: plain Hutchinson on H, as before.

    `method` "hutchinson" (`probes` probes; with `target_ci_width` the minimum, `max_probes` the cap) or
    "hutchpp" (`probes` matvecs, `sketch` columns, adaptive in the remainder with `target_ci_width`, at
    most `max_probes` matvecs). `probes_per_pass` products share each data pass (`HessianOperator.matmat`);
    `hvp_method`/`vectorize` choose how (see `hessian.py`; measure per model and device).
    """
    if control_variate not in (None, "ggn"):
        raise ValueError(f"control_variate must be None or 'ggn', got {control_variate!r}")
    if control_variate is not None and (method != "hutchinson" or scale_aware):
        raise ValueError("control_variate='ggn' is implemented for method='hutchinson' without scale_aware only")
    exact = 0.0
    if control_variate == "ggn":
        exact = ggn_trace(model, theta, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn)
    op = HessianOperator(
        model,
        theta,
        data,
        batch_size=batch_size,
        max_examples=max_examples,
        loss_fn=loss_fn,
        method=hvp_method,
        vectorize=vectorize,
        part="residual" if control_variate == "ggn" else "hessian",
    )
    like = op.params
    scale = like if scale_aware else None
    if method == "hutchinson":  # with control_variate="ggn": on R = H − G, offset tr G (and scale None)
        est = hutchinson_trace(
            None,
            like,
            probes=probes,
            confidence=confidence,
            seed=seed,
            scale=scale,
            distribution=distribution,
            target_ci_width=target_ci_width,
            max_probes=max_probes,
            matmat=op.matmat,
            block=probes_per_pass,
            offset=exact,
        )
        if control_variate == "ggn":
            est.method = "hutchinson-ggn"
        return est
    if method == "hutchpp":
        return hutchpp_trace(
            None,
            like,
            matvecs=probes,
            seed=seed,
            scale=scale,
            confidence=confidence,
            matmat=op.matmat,
            block=probes_per_pass,
            sketch=sketch,
            target_ci_width=target_ci_width,
            max_matvecs=max_probes,
        )
    raise ValueError(f"method must be 'hutchinson' or 'hutchpp', got {method!r}")


def lanczos_top(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    v0: torch.Tensor,
    tol: float,
    steps: int,
    error_tol: float | None = None,
) -> tuple[float, int]:
    """(λ_max, products) of a symmetric operator on flat float64 vectors by Lanczos with full reorthogonalisation.

    From q₁ = v0/‖v0‖: w = A q_j − β_{j−1} q_{j−1}, α_j = q_jᵀw, w ⊥ q_1..q_j (twice), β_j = ‖w‖. After each
    step the largest Ritz value θ of T_j = tridiag(β, α, β) with eigenvector u has residual
    ‖A y − θ y‖ = β_j |u_j| (y = Q_j u); stop when β_j |u_j| ≤ tol · |θ| (ARPACK's / eigsh's criterion), when
    β_j = 0 (invariant subspace: θ exact) or after `steps` products (then RuntimeError: not converged).
    `error_tol` (replaces the residual test): stop when the estimated relative eigenvalue error
    r²/(gap·|θ|) ≤ error_tol, r = β_j |u_j| and gap = θ − θ₂ (the next Ritz value) — the first-order
    error of a Ritz value, λ − θ ≈ r²/(λ − λ₂), with the unknown gap taken from the Ritz values (an
    estimate, not a bound: early on θ₂ can be far from λ₂). A (near-)degenerate top (gap ≈ 0) never
    passes: it runs to `steps` (then `top_eigenvalue` hands over to eigsh).
    """
    q = v0 / v0.norm()
    basis: list[torch.Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    beta_prev = 0.0
    for j in range(1, steps + 1):
        w = matvec(q)
        if basis:
            w = w - beta_prev * basis[-1]
        basis.append(q)
        alpha = float(q @ w)
        alphas.append(alpha)
        stack = torch.stack(basis, dim=1)
        for _ in range(2):
            w = w - stack @ (stack.T @ w)
        beta = float(w.norm())
        t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        vals, vecs = np.linalg.eigh(t)
        theta, resid = float(vals[-1]), beta * abs(float(vecs[-1, -1]))
        if error_tol is None:
            done = resid <= tol * abs(theta)
        else:
            done = j > 1 and resid**2 <= error_tol * (theta - float(vals[-2])) * abs(theta)
        if done or beta <= 1e-14 * max(1.0, abs(theta)) or j == len(v0):
            return theta, j
        betas.append(beta)
        beta_prev, q = beta, w / beta
    raise RuntimeError(
        f"Lanczos did not reach tol={tol:g} in {steps} products (residual/|θ| = {resid / abs(theta):.2e})"
    )


def top_eigenvalue(
    model: nn.Module,
    theta: PointLike | None,
    data: Data,
    *,
    iterations: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    batch_size: int = 50,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    hvp_method: str = "double_backward",
    start: str = "random",
    error_tol: float | None = None,
) -> float:
    """The largest *algebraic* eigenvalue of ∇²L(θ): Lanczos (:func:`lanczos_top`) on the HVP operator.

    `start`: "random" (a seeded standard normal vector) or "gradient" (ĝ + 0.1 r̂, ĝ = ∇L/‖∇L‖ read off
    the kept gradient graph, r̂ the random start normalised; the gradient lies mostly in the top
    eigenspace of the Hessian of a trained net (Gur-Ari et al. 2018), r̂ keeps every direction in the
    Krylov space; no gradient -> the random start). `error_tol`: stop on the estimated eigenvalue error
    instead of `tol` (see :func:`lanczos_top`).

    One product per Lanczos step (one data pass, or none when the data is one batch and its gradient graph
    is kept); stops when the top Ritz pair's residual ‖Hy − θy‖ ≤ `tol` · |θ| (eigsh's relative accuracy;
    the eigenvalue error is then about residual² / gap). Unrestarted, so it keeps one vector per step: after
    `iterations` steps (default 100) without convergence it hands over to scipy's restarted `eigsh` (ARPACK,
    ncv = 20 vectors) from the same start.
    Power iteration would find the largest |λ| instead, which can be a negative one.
    """
    op = HessianOperator(
        model, theta, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn, method=hvp_method
    )
    like = op.params
    n = op.num_parameters
    ref = next(iter(like.values()))

    def mv(x: torch.Tensor) -> torch.Tensor:
        return flatten(op.matvec(unflatten(x.to(ref.device), like))).detach().cpu().double()

    if start not in ("random", "gradient"):
        raise ValueError(f"start must be 'random' or 'gradient', got {start!r}")
    v0 = np.random.default_rng(seed).standard_normal(n)
    if start == "gradient" and hvp_method == "double_backward":
        g = flatten(op.gradient()).detach().cpu().double().numpy()
        if np.linalg.norm(g) > 0:
            v0 = g / np.linalg.norm(g) + 0.1 * v0 / np.linalg.norm(v0)
    elif start == "gradient":
        raise ValueError("start='gradient' reads the double-backward graph: use hvp_method='double_backward'")
    try:
        return lanczos_top(mv, torch.from_numpy(v0), tol, min(n, iterations or 100), error_tol)[0]
    except RuntimeError:  # not converged: ARPACK's restarted Lanczos from the same start (memory ncv · n)
        from scipy.sparse.linalg import LinearOperator, eigsh

        def np_mv(x: np.ndarray) -> np.ndarray:
            return mv(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))).numpy()

        lin = LinearOperator((n, n), matvec=np_mv, dtype=np.float64)
        return float(eigsh(lin, k=1, which="LA", v0=v0, tol=tol, return_eigenvectors=False)[0])
