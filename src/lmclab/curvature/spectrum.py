"""Hessian spectra: top-k eigenpairs, the spectral density, per-block curvature, and all of these along a path.

H = ∇²L(θ) of the mean loss over fixed data (eval mode, buffers fixed; :class:`HessianOperator`, whose
products are the only way H is touched here), n = number of trainable parameters.

- **Top-k eigenpairs**: implicitly restarted Lanczos (ARPACK, ``scipy.sparse.linalg.eigsh``) on a
  ``LinearOperator`` wrapping the HVP; ``which="LA"`` gives the k largest *algebraic* eigenvalues. Each
  pair's relative residual ‖Hv − λv‖ / |λ| is measured with one more data pass.
- **Spectral density** (stochastic Lanczos quadrature; Golub & Meurant; Ghorbani, Krishnan & Xiao 2019):
  from a unit start q₁ = v/‖v‖, m Lanczos steps with full reorthogonalisation give the tridiagonal
  T_m = U diag(θ₁…θ_m) Uᵀ; nodes θ_k and weights τ_k = U₁ₖ² give the Gauss quadrature
  q₁ᵀ f(H) q₁ ≈ Σ_k τ_k f(θ_k), exact for polynomials of degree ≤ 2m − 1. Averaged over s random starts
  (Rademacher or Gaussian v, E[vvᵀ] = I), ρ(t) = (1/s) Σ_starts Σ_k τ_k g_σ(t − θ_k) estimates the
  spectral density (1/n) Σ_i δ(t − λ_i) smoothed by the Gaussian g_σ; ∫ρ = 1. Moments:
  n · (1/s) Σ_starts Σ_k τ_k θ_k^p estimates tr(H^p) (p ≤ 2m − 1); with Rademacher starts each start's
  n Σ_k τ_k θ_k = vᵀHv is exactly a Hutchinson sample, so the trace gets a Student-t CI for free. Starts
  run in lockstep, `parallel` chains per data pass (each keeps its m basis vectors: memory m·n per chain).
- **Per-block curvature**: for a partition of the parameters into blocks B (per layer: the tensors of
  each module, :func:`parameter_blocks`; per residual block: every parameter of a residual block
  together, the others per layer, :func:`residual_blocks`), the diagonal block H_BB acts as
  v_B ↦ (H [v_B; 0])_B. tr(H_BB) by Hutchinson restricted to the block (probes supported on B; 95% CI as
  :func:`hutchinson_trace`), λ_max(H_BB) by Lanczos on that operator. Σ_B tr(H_BB) = tr(H).
- **Along a path**: θ(λ) = lerp(θ_A, θ_B, λ) (naive) or lerp(θ_A, π(θ_B), λ) (aligned); BatchNorm
  statistics are recomputed at each λ (as `lmclab interpolate`'s default ``bn="reset"``), then
  everything above at θ(λ), with the same probe seeds at every λ (common random numbers). Along a trained
  curve φ(t) (Bezier or polygonal chain, :mod:`lmclab.paths.mode_curves`) the same at φ(t), statistics
  recomputed at each t.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from lmclab.curvature.functional import LossFn, parameter_blocks, summed_cross_entropy
from lmclab.curvature.hessian import Data, HessianOperator
from lmclab.curvature.trace import (
    TraceEstimate,
    hutchinson_trace,
    random_probe,
    t_interval,
    trace_from_json,
    trace_json,
)
from lmclab.data import DeviceDataset
from lmclab.models.layers import BasicBlock
from lmclab.paths import has_batchnorm, reset_bn_stats
from lmclab.paths.mode_curves import Curve, curve_point
from lmclab.points import Point, PointLike, flatten, lerp, parameter_names, unflatten

__all__ = [
    "BLOCK_KINDS",
    "BlockCurvature",
    "Eigenpairs",
    "PathSpectra",
    "SpectralDensity",
    "Spectrum",
    "block_curvature",
    "block_partition",
    "curve_spectra",
    "density_on_grid",
    "hessian_spectrum",
    "lanczos",
    "path_spectra",
    "residual_blocks",
    "slq_density",
    "spectrum_units",
    "top_eigenpairs",
    "with_bn_stats",
]

#: Block partitions of the parameters: one block per module with parameters, or per residual block.
BLOCK_KINDS: tuple[str, ...] = ("layer", "residual")
#: Module types that are residual blocks (their parameters form one block of the "residual" partition).
RESIDUAL_TYPES: tuple[type[nn.Module], ...] = (BasicBlock,)
DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "gaussian")


# ------------------------------------------------------------------------------------- results


@dataclass
class Eigenpairs:
    """The k largest algebraic eigenvalues (descending), their eigenvectors (points over the parameters;
    not serialised) and relative residuals ‖Hv − λv‖ / |λ| (absolute where λ = 0)."""

    values: list[float]
    residuals: list[float]
    vectors: list[Point] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values, "residuals": self.residuals}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Eigenpairs:
        return cls([float(v) for v in d["values"]], [float(r) for r in d["residuals"]])


@dataclass
class SpectralDensity:
    """SLQ: per start, Gauss nodes θ_k and weights τ_k (Σ_k τ_k = 1); the smoothed density on a grid."""

    nodes: list[list[float]]
    weights: list[list[float]]
    n_parameters: int
    sigma: float
    grid: list[float]
    density: list[float]
    steps: int
    distribution: str
    seed: int

    @property
    def starts(self) -> int:
        return len(self.nodes)

    def moment(self, p: int) -> float:
        """(1/s) Σ_starts Σ_k τ_k θ_k^p ≈ tr(H^p) / n (exact in expectation for p ≤ 2·steps − 1)."""
        return float(np.mean(self.start_moments(p)))

    def start_moments(self, p: int) -> list[float]:
        """Σ_k τ_k θ_k^p of each start (q₁ᵀ H^p q₁ for p ≤ 2·steps − 1)."""
        return [float(np.dot(w, np.asarray(t, dtype=np.float64) ** p)) for t, w in zip(self.nodes, self.weights)]

    def trace(self, confidence: float = 0.95) -> TraceEstimate:
        """tr H ≈ n · moment(1), with the Student-t interval over starts (Hutchinson samples for Rademacher starts)."""
        samples = [self.n_parameters * m for m in self.start_moments(1)]
        mean, half = t_interval(samples, confidence)
        return TraceEstimate(mean, mean - half, mean + half, confidence, len(samples), "slq", samples, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": self.nodes,
            "weights": self.weights,
            "n_parameters": self.n_parameters,
            "sigma": self.sigma,
            "grid": self.grid,
            "density": self.density,
            "steps": self.steps,
            "starts": self.starts,
            "distribution": self.distribution,
            "seed": self.seed,
            "moments": {"trace": self.n_parameters * self.moment(1), "trace_h2": self.n_parameters * self.moment(2)},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SpectralDensity:
        return cls(
            [[float(x) for x in t] for t in d["nodes"]],
            [[float(x) for x in w] for w in d["weights"]],
            int(d["n_parameters"]),
            float(d["sigma"]),
            [float(x) for x in d["grid"]],
            [float(x) for x in d["density"]],
            int(d["steps"]),
            str(d["distribution"]),
            int(d["seed"]),
        )


@dataclass
class BlockCurvature:
    """tr(H_BB) (Hutchinson restricted to the block, with its CI) and λ_max(H_BB) of one block B."""

    name: str
    kind: str  # "layer" or "residual"
    tensors: list[str]
    parameters: int
    trace: TraceEstimate
    top_eigenvalue: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "tensors": self.tensors,
            "parameters": self.parameters,
            "trace": trace_json(self.trace),
            "top_eigenvalue": self.top_eigenvalue,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BlockCurvature:
        top = d.get("top_eigenvalue")
        return cls(
            str(d["name"]),
            str(d["kind"]),
            list(d["tensors"]),
            int(d["parameters"]),
            trace_from_json(d["trace"]),
            None if top is None else float(top),
        )


@dataclass
class Spectrum:
    """Everything computed at one point θ: top eigenpairs, tr H (Hutchinson, CI), SLQ density, blocks."""

    n_parameters: int
    examples: int
    eigen: Eigenpairs | None = None
    trace: TraceEstimate | None = None
    density: SpectralDensity | None = None
    blocks: list[BlockCurvature] = field(default_factory=list)
    hvps: int = 0  # Hessian-vector products in all
    passes: int = 0  # data passes in all

    @property
    def top_eigenvalues(self) -> list[float]:
        return [] if self.eigen is None else list(self.eigen.values)

    def to_json(self) -> dict[str, Any]:
        return {
            "n_parameters": self.n_parameters,
            "examples": self.examples,
            "top_eigenvalues": self.top_eigenvalues,
            "eigen": None if self.eigen is None else self.eigen.to_json(),
            "trace": None if self.trace is None else trace_json(self.trace),
            "density": None if self.density is None else self.density.to_json(),
            "blocks": [b.to_json() for b in self.blocks],
            "hvps": self.hvps,
            "passes": self.passes,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Spectrum:
        return cls(
            int(d["n_parameters"]),
            int(d["examples"]),
            None if d.get("eigen") is None else Eigenpairs.from_json(d["eigen"]),
            None if d.get("trace") is None else trace_from_json(d["trace"]),
            None if d.get("density") is None else SpectralDensity.from_json(d["density"]),
            [BlockCurvature.from_json(b) for b in d.get("blocks", [])],
            int(d.get("hvps", 0)),
            int(d.get("passes", 0)),
        )


@dataclass
class PathSpectra:
    """Spectra at points θ(λ) of one or more straight paths (e.g. "naive", "weight-matched"), or φ(t) of a
    curve (t in place of λ)."""

    lambdas: list[float]
    spectra: dict[str, list[Spectrum]]  # path name -> one Spectrum per λ

    def rows(self) -> list[dict[str, Any]]:
        """Tidy rows: path, λ, top eigenvalue (k = 1), tr H with its CI, the SLQ trace where computed."""
        out = []
        for path, spectra in self.spectra.items():
            for lam, s in zip(self.lambdas, spectra):
                row: dict[str, Any] = {"path": path, "lambda": lam, "examples": s.examples}
                row["top_eigenvalue"] = s.top_eigenvalues[0] if s.top_eigenvalues else None
                if s.trace is not None:
                    row.update(trace=s.trace.estimate, trace_ci_low=s.trace.ci_low, trace_ci_high=s.trace.ci_high)
                out.append(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "lambdas": self.lambdas,
            "spectra": {k: [s.to_json() for s in v] for k, v in self.spectra.items()},
            "rows": self.rows(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PathSpectra:
        return cls(
            [float(x) for x in d["lambdas"]],
            {k: [Spectrum.from_json(s) for s in v] for k, v in d["spectra"].items()},
        )


# ------------------------------------------------------------------------------------- blocks


def residual_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Parameters grouped by residual block (modules of `RESIDUAL_TYPES`, outermost wins); a parameter outside
    every residual block goes with the other parameters of its top-level module (e.g. ResNet's ``stem``,
    ``head``). A partition, in model order; for a model without residual blocks, the layer partition
    (:func:`parameter_blocks`)."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, RESIDUAL_TYPES)]
    if not blocks:
        return {k: v for k, v in parameter_blocks(model).items() if v}
    outer = [b for b in blocks if not any(b.startswith(o + ".") for o in blocks if o != b)]
    out: dict[str, list[str]] = {}
    for name in parameter_names(model):
        owner = next((b for b in outer if name.startswith(b + ".")), name.split(".")[0] if "." in name else "")
        out.setdefault(owner, []).append(name)
    return out


def block_partition(model: nn.Module, kind: str = "layer") -> dict[str, list[str]]:
    """The blocks of `kind` ("layer": one per module with parameters; "residual": :func:`residual_blocks`)."""
    if kind == "layer":
        return {k: v for k, v in parameter_blocks(model).items() if v}
    if kind == "residual":
        return residual_blocks(model)
    raise ValueError(f"block kind must be one of {BLOCK_KINDS}, got {kind!r}")


class _Restricted:
    """H_BB: v_B ↦ (H [v_B; 0])_B over the tensors `names` of the operator's parameters (all if None)."""

    def __init__(
        self, op: HessianOperator, names: Sequence[str] | None = None, hook: Callable[[], None] | None = None
    ) -> None:
        self.op, self.hook = op, hook
        full = op.params
        chosen = list(full) if names is None else list(names)
        unknown = [n for n in chosen if n not in full]
        if unknown:
            raise KeyError(f"not parameters of the model: {unknown}")
        self.like: Point = {n: full[n] for n in chosen}
        self.n = sum(t.numel() for t in self.like.values())
        self.ref = next(iter(self.like.values()))

    def points(self, vs: list[Point]) -> list[Point]:
        """[H_BB v]: one data pass for all vectors (then `hook()`)."""
        zeros = {n: torch.zeros_like(p) for n, p in self.op.params.items() if n not in self.like}
        out = self.op.matmat([{**zeros, **v} for v in vs] if zeros else vs)
        if self.hook is not None:
            self.hook()
        return [{n: hv[n] for n in self.like} for hv in out]

    def flat(self, vs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same on flat vectors (in the block's tensor order)."""
        return [flatten(hv, list(self.like)) for hv in self.points([unflatten(v, self.like) for v in vs])]

    def scipy(self) -> LinearOperator:
        """A float64 scipy LinearOperator of H_BB (matvec: one data pass; matmat: one pass for all columns)."""

        def to_torch(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).to(self.ref.device, self.ref.dtype)

        def mv(x: np.ndarray) -> np.ndarray:
            return self.flat([to_torch(x.reshape(-1))])[0].detach().cpu().double().numpy()

        def mm(x: np.ndarray) -> np.ndarray:
            cols = self.flat([to_torch(x[:, j]) for j in range(x.shape[1])])
            return torch.stack(cols, dim=1).detach().cpu().double().numpy()

        return LinearOperator((self.n, self.n), matvec=mv, matmat=mm, dtype=np.float64)


# ------------------------------------------------------------------------------------- top-k


def _eigenpairs(
    restricted: _Restricted, k: int, *, which: str, tol: float, seed: int, maxiter: int | None, vectors: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """(values descending, columns) of H_BB by eigsh; tiny blocks (n ≤ k + 2, too small for ARPACK) densely."""
    lin = restricted.scipy()
    n = restricted.n
    if k > n:
        raise ValueError(f"asked for {k} eigenvalues of a {n}×{n} Hessian block")
    if n <= k + 2:
        dense = lin.matmat(np.eye(n))
        values, cols = np.linalg.eigh((dense + dense.T) / 2)
        order = np.argsort(values if which == "SA" else (-np.abs(values) if which == "LM" else -values))[:k]
        return values[order], cols[:, order]
    v0 = np.random.default_rng(seed).standard_normal(n)
    cols_or_none: np.ndarray | None = None
    if vectors:
        values, cols_or_none = eigsh(lin, k=k, which=which, v0=v0, tol=tol, maxiter=maxiter)
    else:
        values = eigsh(lin, k=k, which=which, v0=v0, tol=tol, maxiter=maxiter, return_eigenvectors=False)
    order = np.argsort(values if which == "SA" else (-np.abs(values) if which == "LM" else -values))
    return values[order], None if cols_or_none is None else cols_or_none[:, order]


def top_eigenpairs(
    op: HessianOperator,
    k: int = 5,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    seed: int = 0,
    maxiter: int | None = None,
    names: Sequence[str] | None = None,
    hook: Callable[[], None] | None = None,
) -> Eigenpairs:
    """The k largest algebraic (``which="LA"``; "LM": largest |λ|; "SA": smallest) eigenpairs of H (or of
    the diagonal block over `names`): ARPACK Lanczos on the HVP, `tol` its relative accuracy; then one data
    pass for the relative residuals ‖Hv − λv‖ / |λ|. `hook()` is called after each data pass."""
    if which not in ("LA", "LM", "SA"):
        raise ValueError(f"which must be LA, LM or SA, got {which!r}")
    restricted = _Restricted(op, names, hook)
    values, cols = _eigenpairs(restricted, k, which=which, tol=tol, seed=seed, maxiter=maxiter, vectors=True)
    assert cols is not None
    ref = restricted.ref
    flat = [torch.from_numpy(np.ascontiguousarray(cols[:, j])).to(ref.device, ref.dtype) for j in range(k)]
    products = restricted.flat(flat)
    residuals = [  # relative to |λ|; absolute for λ = 0
        float(torch.linalg.vector_norm((hv - lam * v).double())) / (abs(float(lam)) or 1.0)
        for hv, v, lam in zip(products, flat, values)
    ]
    vectors = [unflatten(v, restricted.like) for v in flat]
    return Eigenpairs([float(v) for v in values], residuals, vectors)


# ------------------------------------------------------------------------------------- SLQ


def lanczos(
    apply: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    starts: Sequence[torch.Tensor],
    steps: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lanczos with full reorthogonalisation from each start (normalised), all chains in lockstep:
    `apply` maps a list of flat vectors to their products (one data pass). Returns per start the
    tridiagonal's diagonal α (length j ≤ `steps`) and off-diagonal β (length j − 1); a chain stops early
    when β_j ≤ 1e-10 · max|α| (an invariant subspace: its quadrature is then exact).

    Each step: w = A q_j − α_j q_j − β_{j−1} q_{j−1}, then w −= Q(Qᵀw) twice (classical Gram–Schmidt against
    every earlier basis vector, repeated), β_j = ‖w‖, q_{j+1} = w / β_j."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    chains: list[dict[str, Any]] = []
    for v in starts:
        basis = torch.zeros(min(steps, v.numel()), v.numel(), dtype=v.dtype, device=v.device)
        basis[0] = v / torch.linalg.vector_norm(v)
        chains.append({"basis": basis, "j": 0, "alpha": [], "beta": [], "done": False})
    for _ in range(steps):
        live = [c for c in chains if not c["done"]]
        if not live:
            break
        products = apply([c["basis"][c["j"]] for c in live])
        for c, w in zip(live, products):
            j, basis = c["j"], c["basis"]
            q = basis[j]
            alpha = float(torch.dot(q.double(), w.double()))
            c["alpha"].append(alpha)
            if j + 1 >= len(basis):  # m steps taken, or the whole space spanned
                c["done"] = True
                continue
            w = w - alpha * q
            if j > 0:
                w = w - c["beta"][-1] * basis[j - 1]
            prev = basis[: j + 1]
            for _twice in range(2):
                w = w - prev.T @ (prev @ w)
            beta = float(torch.linalg.vector_norm(w.double()))
            if beta <= 1e-10 * (max(abs(a) for a in c["alpha"]) or 1.0):
                c["done"] = True
                continue
            c["beta"].append(beta)
            basis[j + 1] = w / beta
            c["j"] = j + 1
        if progress is not None:
            progress(1)
    return [(np.asarray(c["alpha"], dtype=np.float64), np.asarray(c["beta"], dtype=np.float64)) for c in chains]


def gauss_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes θ_k (eigenvalues of the tridiagonal T) and weights τ_k = U₁ₖ² (first components of its eigenvectors)."""
    t = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    nodes, u = np.linalg.eigh(t)
    return nodes, u[0] ** 2


def density_on_grid(
    nodes: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], sigma: float, points: int = 400
) -> tuple[list[float], list[float]]:
    """ρ(t) = (1/s) Σ_starts Σ_k τ_k g_σ(t − θ_k) on a grid: `points` evenly spaced over [min θ − 5σ, max θ + 5σ]
    joined with 33 points within ±4σ of every node (so each spike is resolved however wide the range)."""
    all_nodes = np.concatenate([np.asarray(t, dtype=np.float64) for t in nodes])
    all_weights = np.concatenate([np.asarray(w, dtype=np.float64) for w in weights]) / len(nodes)
    lo, hi = float(all_nodes.min()) - 5 * sigma, float(all_nodes.max()) + 5 * sigma
    local = (all_nodes[:, None] + sigma * np.linspace(-4, 4, 33)[None, :]).ravel()
    grid = np.unique(np.concatenate([np.linspace(lo, hi, points), local]))
    z = (grid[:, None] - all_nodes[None, :]) / sigma
    rho = (np.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))) @ all_weights
    return grid.tolist(), rho.tolist()


def slq_density(
    op: HessianOperator,
    *,
    starts: int = 10,
    steps: int = 60,
    distribution: str = "rademacher",
    seed: int = 0,
    sigma: float | None = None,
    sigma_relative: float = 0.003,
    parallel: int = 1,
    start_vectors: Sequence[PointLike] | None = None,
    progress: Callable[[int], None] | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature: `starts` random starts (or the given `start_vectors`), `steps` Lanczos
    steps each, `parallel` chains sharing each data pass. σ defaults to `sigma_relative` × (max θ − min θ)
    (Ghorbani et al.'s σ² = 1e-5 on a spectrum scaled to [−1, 1] is σ_relative ≈ 0.0016)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    restricted = _Restricted(op)
    like, names = restricted.like, list(restricted.like)
    gen = torch.Generator().manual_seed(seed)
    if start_vectors is None:
        vs = [flatten(random_probe(like, gen, distribution), names) for _ in range(starts)]
    else:
        vs = [flatten({n: v[n].to(like[n].device, like[n].dtype) for n in names}, names) for v in start_vectors]
    chunk = max(1, int(parallel))
    nodes: list[list[float]] = []
    weights: list[list[float]] = []
    for s in range(0, len(vs), chunk):
        for alpha, beta in lanczos(restricted.flat, vs[s : s + chunk], steps, progress=progress):
            t, w = gauss_quadrature(alpha, beta)
            nodes.append(t.tolist())
            weights.append(w.tolist())
    spread = max(max(t) for t in nodes) - min(min(t) for t in nodes)
    width = sigma if sigma is not None else sigma_relative * spread if spread > 0 else 1e-3
    grid, rho = density_on_grid(nodes, weights, width)
    return SpectralDensity(nodes, weights, restricted.n, width, grid, rho, steps, distribution, seed)


# ------------------------------------------------------------------------------------- blocks


def block_curvature(
    op: HessianOperator,
    blocks: Mapping[str, Sequence[str]],
    *,
    kind: str = "layer",
    probes: int = 50,
    probes_per_pass: int = 10,
    confidence: float = 0.95,
    eigenvalue: bool = True,
    tol: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[BlockCurvature]:
    """Per block B: tr(H_BB) by Hutchinson restricted to B (`probes` Rademacher probes supported on B, seed
    `seed` + index; Student-t CI) and λ_max(H_BB) by Lanczos (eigsh, "LA")."""
    out = []
    for i, (name, tensors) in enumerate(blocks.items()):
        restricted = _Restricted(op, tensors)
        est = hutchinson_trace(
            None,
            restricted.like,
            probes=probes,
            confidence=confidence,
            seed=seed + i,
            matmat=restricted.points,
            block=probes_per_pass,
        )
        top = None
        if eigenvalue:
            values, _ = _eigenpairs(restricted, 1, which="LA", tol=tol, seed=seed + i, maxiter=None, vectors=False)
            top = float(values[0])
        out.append(BlockCurvature(name, kind, list(tensors), restricted.n, est, top))
        if progress is not None:
            progress(1)
    return out


# ------------------------------------------------------------------------------------- one point, a path


def hessian_spectrum(
    model: nn.Module,
    theta: PointLike | None,
    data: Data,
    *,
    top: int = 5,
    trace_probes: int = 100,
    density: bool = False,
    starts: int = 10,
    steps: int = 60,
    sigma: float | None = None,
    blocks: Iterable[str] = (),
    block_probes: int = 50,
    block_eigenvalues: bool = True,
    tol: float = 1e-6,
    seed: int = 0,
    batch_size: int = 500,
    max_examples: int | None = None,
    loss_fn: LossFn = summed_cross_entropy,
    hvp_method: str = "double_backward",
    probes_per_pass: int = 10,
    parallel: int = 1,
    progress: Callable[[str, int], None] | None = None,
) -> Spectrum:
    """At θ: the `top` largest eigenpairs (0: none), tr H by Hutchinson with `trace_probes` probes (0: none),
    the SLQ density if `density`, and per-block traces and top eigenvalues for each block kind in `blocks`
    ("layer", "residual"). `progress(stage, n)` is told of each unit of work done (n = 0: a stage starts).
    Units: 1 for the top eigenpairs, 1 for the trace, one per Lanczos step of each `parallel` chunk of starts,
    one per block (:func:`spectrum_units`)."""

    def tick(stage: str) -> Callable[[int], None] | None:
        return None if progress is None else (lambda n: progress(stage, n))

    op = HessianOperator(
        model, theta, data, batch_size=batch_size, max_examples=max_examples, loss_fn=loss_fn, method=hvp_method
    )
    examples = len(data) if isinstance(data, DeviceDataset) else 0
    if isinstance(data, DeviceDataset) and max_examples is not None:
        examples = min(examples, max_examples)
    result = Spectrum(op.num_parameters, examples)
    if top:

        def passes() -> None:
            if progress is not None:
                progress(f"top {top} eigenvalues (Lanczos, {op.passes} HVP passes)", 0)

        passes()
        result.eigen = top_eigenpairs(op, top, tol=tol, seed=seed, hook=passes)
        if progress is not None:
            progress("top eigenvalues", 1)
    if trace_probes:
        if progress is not None:
            progress("trace", 0)
        result.trace = hutchinson_trace(
            None, op.params, probes=trace_probes, seed=seed, matmat=op.matmat, block=probes_per_pass
        )
        if progress is not None:
            progress("trace", 1)
    if density:
        result.density = slq_density(
            op, starts=starts, steps=steps, seed=seed, sigma=sigma, parallel=parallel, progress=tick("density")
        )
    for kind in blocks:
        partition = block_partition(model, kind)
        result.blocks += block_curvature(
            op,
            partition,
            kind=kind,
            probes=block_probes,
            probes_per_pass=probes_per_pass,
            eigenvalue=block_eigenvalues,
            seed=seed,
            progress=tick(f"{kind} blocks"),
        )
    result.hvps, result.passes = op.products, op.passes
    return result


def spectrum_units(
    model: nn.Module,
    *,
    top: int,
    trace_probes: int,
    density: bool,
    starts: int,
    steps: int,
    blocks: Iterable[str] = (),
    parallel: int = 1,
) -> int:
    """The units of work :func:`hessian_spectrum` reports to `progress` with these options (at most: Lanczos
    chains that reach an invariant subspace stop early)."""
    units = int(bool(top)) + int(bool(trace_probes))
    if density:
        units += -(-starts // max(1, parallel)) * steps
    return units + sum(len(block_partition(model, kind)) for kind in blocks)


def with_bn_stats(
    model: nn.Module, point: PointLike, bn_data: DeviceDataset | None = None, bn_examples: int | None = None
) -> Point:
    """`point` with its BatchNorm statistics recomputed on `bn_data` where the model has BatchNorm (the point is
    loaded into `model` for that); otherwise `point` itself."""
    if bn_data is None or not has_batchnorm(model):
        return dict(point)
    model.load_state_dict(point)
    reset_bn_stats(model, bn_data, max_examples=bn_examples)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def path_point(
    model: nn.Module,
    theta_a: PointLike,
    theta_b: PointLike,
    lam: float,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
) -> Point:
    """θ(λ) = lerp(θ_A, θ_B, λ), with BatchNorm statistics recomputed on `bn_data` (:func:`with_bn_stats`)."""
    return with_bn_stats(model, lerp(theta_a, theta_b, lam), bn_data, bn_examples)


def _check_bn(model: nn.Module, bn_data: DeviceDataset | None) -> None:
    if has_batchnorm(model) and bn_data is None:
        raise ValueError("a BatchNorm model's statistics must be recomputed along the path: give bn_data")


def _spectra_along(
    model: nn.Module,
    name: str,
    point_at: Callable[[float], Point],
    data: Data,
    xs: Sequence[float],
    at_a: Spectrum | None,
    on_point: Callable[[str, float], None] | None,
    options: Mapping[str, Any],
) -> tuple[list[Spectrum], Spectrum | None]:
    """:func:`hessian_spectrum` at `point_at(x)` for each x (x = 0 is θ_A: `at_a` where given); the spectra and
    the spectrum at θ_A (for the next path)."""
    out: list[Spectrum] = []
    for x in xs:
        if x == 0 and at_a is not None:
            out.append(at_a)
        else:
            out.append(hessian_spectrum(model, point_at(float(x)), data, **options))
            if x == 0:
                at_a = out[-1]
        if on_point is not None:
            on_point(name, float(x))
    return out, at_a


def path_spectra(
    model: nn.Module,
    theta_a: PointLike,
    ends: Mapping[str, PointLike],
    data: Data,
    lambdas: Sequence[float],
    *,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    on_point: Callable[[str, float], None] | None = None,
    at_a: Spectrum | None = None,
    **options: Any,
) -> PathSpectra:
    """:func:`hessian_spectrum` at θ(λ) on the straight path from θ_A to each end (name -> θ_B or π(θ_B)),
    BatchNorm statistics reset at each λ from `bn_data` (needed for BatchNorm models). θ(0) = θ_A is the same
    point on every path: computed once (or given as `at_a`, computed with the same options; not for BatchNorm
    models, whose θ(0) has recomputed statistics). `on_point(path, λ)` is called after each point."""
    _check_bn(model, bn_data)
    if has_batchnorm(model):
        at_a = None
    spectra: dict[str, list[Spectrum]] = {}
    for name, end in ends.items():

        def point_at(lam: float, end: PointLike = end) -> Point:
            return path_point(model, theta_a, end, lam, bn_data, bn_examples)

        spectra[name], at_a = _spectra_along(model, name, point_at, data, lambdas, at_a, on_point, options)
    return PathSpectra([float(x) for x in lambdas], spectra)


def curve_spectra(
    model: nn.Module,
    curve: Curve,
    data: Data,
    ts: Sequence[float],
    *,
    name: str | None = None,
    bn_data: DeviceDataset | None = None,
    bn_examples: int | None = None,
    on_point: Callable[[str, float], None] | None = None,
    at_a: Spectrum | None = None,
    **options: Any,
) -> PathSpectra:
    """:func:`hessian_spectrum` at φ(t) = :func:`curve_point` of a curve from θ_A (Garipov et al. 2018: Bezier
    or polygonal chain), BatchNorm statistics reset at each t from `bn_data` as on the straight paths (needed
    for BatchNorm models); one path named `name` (default: the curve's kind). φ(0) = θ_A: `at_a` where given
    (not for BatchNorm models), as :func:`path_spectra`; φ(1) is the curve's end. The t play the part of λ in
    the result (:attr:`PathSpectra.lambdas`)."""
    _check_bn(model, bn_data)
    if has_batchnorm(model):
        at_a = None
    if any(not 0.0 <= float(t) <= 1.0 for t in ts):
        raise ValueError(f"t must lie in [0, 1], got {list(ts)}")
    label = name or curve.kind

    def point_at(t: float) -> Point:
        return with_bn_stats(model, curve_point(curve, t), bn_data, bn_examples)

    spectra, _ = _spectra_along(model, label, point_at, data, ts, at_a, on_point, options)
    return PathSpectra([float(x) for x in ts], {label: spectra})
