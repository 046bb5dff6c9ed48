"""Linear assignment: the permutation p maximising (or minimising) Σ_i S[i, p[i]].

Two solvers:

- :func:`solve_assignment`: scipy's ``linear_sum_assignment`` (cold), with an optional cheap check
  that returns a given permutation unchanged when every row's entry is a row extremum.
- :class:`WarmAssignment`: a solver for a *sequence* of similar matrices that keeps the LAP dual
  potentials between calls (Jonker–Volgenant shortest augmenting paths, started from the previous
  solution), so re-solving a slightly changed matrix costs O(n²) plus a few augmentations.

Duals, in cost form (minimise Σ_i C[i, p(i)], C = −S when maximising): row potentials u and column
potentials v are *feasible* when the reduced costs C̄_ij = C_ij − u_i − v_j are ≥ 0 everywhere, and
the assignment is *tight* when C̄_{i,p(i)} = 0 for every row. Feasible + tight proves p optimal
(Σ_i C_{i,p(i)} = Σu + Σv ≤ Σ_i C_{i,σ(i)} for every σ).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["WarmAssignment", "assignment_value", "reduced_assignment", "solve_assignment"]


def assignment_value(score: torch.Tensor, perm: torch.Tensor) -> float:
    """⟨S, P⟩ = Σ_i S[i, p[i]], summed in float64."""
    rows = torch.arange(score.shape[0], device=score.device)
    return float(score[rows, perm.to(score.device)].double().sum())


def _row_optimal(score: torch.Tensor, perm: torch.Tensor, maximize: bool) -> bool:
    """True when every row's assigned entry is a row extremum: then no permutation does better.

    (Σ_i S[i, p[i]] ≥ Σ_i max_j S[i, j] ≥ Σ_i S[i, σ(i)] for every σ.) A sufficient, O(n²) check.
    """
    rows = torch.arange(score.shape[0], device=score.device)
    chosen = score[rows, perm.to(score.device)]
    best = score.amax(dim=1) if maximize else score.amin(dim=1)
    return bool((chosen >= best).all()) if maximize else bool((chosen <= best).all())


def _as_matrix(score: torch.Tensor | np.ndarray) -> np.ndarray:
    """A fresh float64 NumPy copy of a square, finite matrix (ValueError otherwise)."""
    s = (
        score.detach().to(device="cpu", dtype=torch.float64, copy=True).numpy()
        if isinstance(score, torch.Tensor)
        else np.array(score, dtype=np.float64, copy=True)
    )
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"score must be a square matrix, got shape {tuple(s.shape)}")
    if not np.isfinite(s).all():
        raise ValueError("score matrix has non-finite entries")
    return s


def _scipy_perm(cost: np.ndarray) -> np.ndarray:
    """p minimising Σ_i C[i, p[i]] (scipy), as an int64 array with p[i] the column of row i."""
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def solve_assignment(
    score: torch.Tensor, maximize: bool = True, warm_start: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 permutation p (on CPU) with p[i] the column assigned to row i, optimising Σ_i S[i, p[i]].

    Solved by scipy's ``linear_sum_assignment`` on a float64 NumPy copy of the square matrix `score`.
    `warm_start` (a permutation) is not used to seed the solver (scipy has no warm start); it is
    returned unchanged when a cheap sufficient check proves it optimal: every row's assigned entry
    is that row's maximum (minimum when ``maximize=False``). Otherwise the solver runs. For real warm
    starting across a sequence of matrices use :class:`WarmAssignment`.
    """
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"score must be a square matrix, got shape {tuple(score.shape)}")
    if warm_start is not None:
        warm = torch.as_tensor(warm_start, dtype=torch.int64)
        if warm.shape != (score.shape[0],):
            raise ValueError(f"warm_start has shape {tuple(warm.shape)}, expected ({score.shape[0]},)")
        if not torch.equal(warm.sort().values, torch.arange(len(warm), device=warm.device)):
            raise ValueError("warm_start is not a permutation")
        if _row_optimal(score, warm, maximize):
            return warm.cpu().clone()
    s = _as_matrix(score)
    return torch.from_numpy(_scipy_perm(-s if maximize else s))


def reduced_assignment(
    score: torch.Tensor, current: torch.Tensor | None = None, potentials: np.ndarray | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """(p maximising Σ_i S[i, p[i]], column potentials w for the next, similar matrix), via scipy on a reduced matrix.

    Solves R = S − w_j − a_i − b_j (float64; w = `potentials`, default 0; a_i the row maxima of S − w,
    b_j the column maxima of what is left), which differs from S by a constant on every permutation and
    so has the same optimal assignments: R ≤ 0 with a zero in every row and column, and with w the
    potentials of a previous, similar matrix most rows' optimal entries are already zeros, which
    spares scipy's shortest-augmenting-path solver most of its searches. If `current` already sits on
    zeros of R it is optimal (⟨R, P⟩ ≤ 0 = ⟨R, P_current⟩) and is returned without solving.

    The returned potentials are w + b (not an exact dual: any w is valid, only speed depends on it).
    Refining them by Bellman–Ford rounds on the optimal assignment's difference constraints (as
    :class:`WarmAssignment` does) was measured slower in weight matching: 1.4–2.3× the float32 port's
    speed on random-init MLPs against 2.2–3.1× without, and within 7 % on a trained pair (2.8–3.0× against
    3.0–3.2×); two rounds cost ≈ 4 ms at n = 512, more than the scipy solve they shorten.

    R is rounded in float64 (w is arbitrary), so where two assignments' values differ by less than
    about 1e-16 relative (ties) the one returned may differ from scipy's on S itself; the optimal value
    agrees to that rounding.
    """
    if score.ndim != 2 or score.shape[0] != score.shape[1]:
        raise ValueError(f"score must be a square matrix, got shape {tuple(score.shape)}")
    r = _as_matrix(score)
    n = r.shape[0]
    w = np.zeros(n) if potentials is None else np.asarray(potentials, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"potentials have shape {w.shape}, expected ({n},)")
    if potentials is not None:
        r -= w
    r -= r.max(axis=1, keepdims=True) if n else 0.0
    b = r.max(axis=0) if n else np.zeros(0)
    r -= b
    rows = np.arange(n)
    if current is not None:
        cur = torch.as_tensor(current, dtype=torch.int64).cpu().numpy()
        if cur.shape == (n,) and (r[rows, cur] == 0).all() and np.array_equal(np.sort(cur), rows):
            return torch.from_numpy(cur.copy()), w + b
    np.negative(r, out=r)  # cost form C = −R ≥ 0
    perm = _scipy_perm(r) if n else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(perm), w + b


def center_potentials(
    cost: np.ndarray, perm: np.ndarray, v: np.ndarray, sweeps: int, cols: np.ndarray | None = None
) -> np.ndarray:
    """Move feasible column potentials v (for the tight assignment `perm`) towards the middle of the dual face.

    Eliminating u (u_i = C_{i,p(i)} − v_{p(i)}), each v_j may range over [lo_j, hi_j] with the others
    fixed: hi_j = min_{i ≠ r(j)} (v_{p(i)} + C_ij − C_{i,p(i)}) (feasibility of column j) and
    lo_j = max_{k ≠ j} (v_k − C_{r(j),k} + C_{r(j),j}) (feasibility of its row r(j) = p⁻¹(j)). One
    Jacobi sweep sets every v_j of `cols` (default all) to (lo_j + hi_j)/2 at once; each moves by at
    most half of the slack of any constraint it is in, so two moving ends never cross and v stays
    feasible. Shortest-path potentials make many non-assigned entries tight, so any perturbation of
    the matrix loosens many rows; centred potentials keep a margin, and a slightly changed matrix
    frees few rows. Cost O(n·|cols|) per sweep. Returns a new array.
    """
    n = cost.shape[0]
    v = v.copy()
    if n < 2 or sweeps <= 0:
        return v
    cols = np.arange(n) if cols is None else np.asarray(cols, dtype=np.int64)
    if cols.size == 0:
        return v
    rows = np.arange(n)
    row_of_col = np.empty(n, dtype=np.int64)
    row_of_col[perm] = rows
    r = row_of_col[cols]
    k = np.arange(cols.size)
    into = cost[:, cols] - cost[rows, perm][:, None]  # W[i, j] = C_ij − C_{i,p(i)}, j ∈ cols
    into[r, k] = np.inf
    out_of = cost[r] - cost[r, cols][:, None]  # row j ∈ cols: C_{r(j),k} − C_{r(j),j}
    out_of[k, cols] = np.inf
    for _ in range(sweeps):
        hi = (v[perm][:, None] + into).min(axis=0)
        lo = (v[None, :] - out_of).max(axis=1)
        v[cols] = 0.5 * (hi + lo)
    return v


def column_potentials(
    cost: np.ndarray, perm: np.ndarray, tol: float, max_iter: int | None = None, start: np.ndarray | None = None
) -> np.ndarray:
    """Column potentials v making the optimal assignment `perm` of `cost` tight and (to `tol`) feasible.

    With u_i = C_{i,p(i)} − v_{p(i)}, feasibility u_i + v_j ≤ C_ij reads as the difference constraints
    v_j ≤ v_{p(i)} + C_ij − C_{i,p(i)}: shortest distances in the graph with an edge p(i) → j of
    weight C_ij − C_{i,p(i)} for every (i, j), from a virtual source joined to every column by a
    0 edge (or an edge of weight `start`_j: the greatest solution ≤ `start`, which takes few rounds when
    `start` is nearly feasible, e.g. the previous potentials of a slightly changed matrix). (An optimal
    p leaves no negative cycle.) Solved by Bellman–Ford rounds, vectorised: each
    round relaxes all edges out of the columns whose distance dropped in the previous round;
    improvements below `tol` are ignored (float ties would otherwise cycle). At most `max_iter`
    rounds (default n + 1, Bellman–Ford's bound); if that runs out the result is still a valid start
    for :class:`WarmAssignment`, whose tightness test frees the rows it leaves loose.
    """
    n = cost.shape[0]
    v = np.zeros(n) if start is None else np.array(start, dtype=np.float64)
    if n == 0:
        return v
    reduced = cost - cost[np.arange(n), perm][:, None]  # W[i, j] = C_ij − C_{i,p(i)}
    row_of_col = np.empty(n, dtype=np.int64)
    row_of_col[perm] = np.arange(n)
    active = np.arange(n)  # rows whose source column p(i) moved
    for _ in range(max_iter if max_iter is not None else n + 1):
        cand = (v[perm[active]][:, None] + reduced[active]).min(axis=0)
        improved = np.flatnonzero(cand < v - tol)
        if improved.size == 0:
            break
        v[improved] = cand[improved]
        active = row_of_col[improved]
    return v


#: Weight of the latest warm attempt in the running success rate, and the rate below which a cold solve does
#: not recover potentials (a recovery costs about one scipy solve and pays off only over a run of warm solves).
SUCCESS_RATE, MIN_SUCCESS = 0.3, 0.6


@dataclass
class WarmAssignment:
    """Solves a sequence of similar assignment problems, keeping (permutation, column potentials).

    ``solve(S)``, warm (when the previous solve left potentials v): set u_i = min_j (C_ij − v_j)
    (dual-feasible; O(n²)); keep the previous assignment of the rows that are still tight (reduced
    cost ≤ tol = `rtol` × max|C|), free the others, and re-assign just those by shortest augmenting
    paths (Dijkstra on reduced costs, Jonker–Volgenant / Crouse, one vectorised O(n) relaxation per
    scanned column), which update the potentials. With no row freed this is a proof that the old
    permutation is still optimal. If more than `max_free_fraction` of the rows are free, the warm
    attempt is abandoned (``fallback``) for a cold solve.

    Cold (first solve, size change, fallback, or no potentials): scipy's solver. Its potentials are
    recovered (:func:`column_potentials`, Bellman–Ford on the difference constraints, then
    :func:`center_potentials`; about the cost of one scipy solve) only when the new permutation
    differs from the previous one in at most `max_free_fraction` of the rows and recent warm
    attempts mostly succeeded (running rate ≥ :data:`MIN_SUCCESS`; the rate drifts back up with every
    cold solve that skips the recovery, so warm starts are probed again): while the optimum keeps
    moving a lot, the next solve would fall back anyway, and plain scipy is cheaper. Potentials are
    centred (`center_sweeps` Jacobi sweeps, over all columns after recovery, over the columns whose
    potential changed after a warm solve) so that the next, slightly different matrix frees few
    rows. Free rows whose reduced-cost minimum lies in a free column nobody else wants are assigned
    to it directly (Jonker–Volgenant's cheap first phase) before any path search. A warm result that
    is no longer tight to n·tol (float rounding) is re-solved cold.

    The result is an optimal permutation: the same as a cold solve whenever the optimum is unique,
    and the same optimal value always (up to float tolerance). ``maximize`` selects max Σ_i S[i, p[i]]
    (C = −S) or min (C = S). ``stats`` counts cold and warm solves, fallbacks, potential recoveries,
    rows freed and columns scanned.

    Cost: the warm path is O(n²) NumPy plus about 0.2 ms (Python-level Dijkstra) per freed row that
    needs a path search; scipy's C solver takes ~10 ms at n = 512. So warm starts pay off when few
    rows change between solves; when ~10 % or more do (STE-MM's per-batch re-matches of briefly
    trained MLPs, see ``bench/ste_mm.py``) they are about as fast as, or slower than, scipy alone.
    """

    maximize: bool = True
    max_free_fraction: float = 0.2
    rtol: float = 1e-12
    center_sweeps: int = 3
    perm: np.ndarray | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {"cold": 0, "warm": 0, "fallback": 0, "potentials": 0, "rows_freed": 0, "scanned": 0}
    )
    _u: np.ndarray | None = field(default=None, repr=False, init=False)
    _v: np.ndarray | None = field(default=None, repr=False, init=False)
    _cost: np.ndarray | None = field(default=None, repr=False, init=False)  # last cost while its potentials are unknown
    _success: float = field(default=1.0, repr=False, init=False)  # running success rate of warm attempts

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_free_fraction <= 1.0:
            raise ValueError(f"max_free_fraction must lie in [0, 1], got {self.max_free_fraction}")
        if self.rtol < 0:
            raise ValueError(f"rtol must be >= 0, got {self.rtol}")
        if self.center_sweeps < 0:
            raise ValueError(f"center_sweeps must be >= 0, got {self.center_sweeps}")

    def reset(self) -> None:
        """Forget the previous solution: the next solve is cold."""
        self.perm, self._u, self._v, self._cost = None, None, None, None

    def duals(self) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) of the last solve in the score's own sense: u_i + v_j ≥ S_ij when maximising
        (≤ when minimising), with equality on the assignment; Σu + Σv is the optimal value.
        (Recovered now if the last solve skipped them.)"""
        if self.perm is None:
            raise ValueError("no solve yet: duals exist after the first solve")
        if self._v is None:
            assert self._cost is not None
            self._recover(self._cost, self._tol(self._cost))
        assert self._u is not None and self._v is not None
        sign = -1.0 if self.maximize else 1.0
        return sign * self._u, sign * self._v

    def solve(self, score: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Optimal int64 permutation p (CPU tensor), p[i] the column of row i, for the square matrix `score`."""
        cost = _as_matrix(score)
        if self.maximize:
            np.negative(cost, out=cost)
        n = cost.shape[0]
        tol = self._tol(cost)
        if self.perm is not None and self._v is not None and len(self.perm) == n and n > 0:
            ok = self._solve_warm(cost, tol)
            self._success = (1 - SUCCESS_RATE) * self._success + SUCCESS_RATE * ok
            if ok:
                return torch.from_numpy(self.perm.copy())
            self.stats["fallback"] += 1
        self._solve_cold(cost, tol)
        assert self.perm is not None
        return torch.from_numpy(self.perm.copy())

    # ------------------------------------------------------------------------------------ internals

    def _tol(self, cost: np.ndarray) -> float:
        scale = max(-float(cost.min()), float(cost.max())) if cost.size else 0.0
        return self.rtol * max(scale, np.finfo(np.float64).tiny)

    def _solve_cold(self, cost: np.ndarray, tol: float) -> None:
        n = cost.shape[0]
        perm = _scipy_perm(cost) if n else np.zeros(0, dtype=np.int64)
        moved = int((perm != self.perm).sum()) if self.perm is not None and len(self.perm) == n else n
        previous_v = self._v if self._v is not None and len(self._v) == n else None
        self.perm, self._u, self._v, self._cost = perm, None, None, cost
        self.stats["cold"] += 1
        if moved <= self.max_free_fraction * n and self._success >= MIN_SUCCESS:
            self._recover(cost, tol, previous_v)
        else:  # drift back, so that warm starts are probed again
            self._success = (1 - SUCCESS_RATE) * self._success + SUCCESS_RATE

    def _recover(self, cost: np.ndarray, tol: float, start: np.ndarray | None = None) -> None:
        """Potentials for the stored (optimal) permutation of `cost`: Bellman–Ford, then centring."""
        assert self.perm is not None
        n = cost.shape[0]
        v = center_potentials(cost, self.perm, column_potentials(cost, self.perm, tol, start=start), self.center_sweeps)
        self._set(self.perm, cost[np.arange(n), self.perm] - v[self.perm], v)
        self.stats["potentials"] += 1

    def _set(self, perm: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
        shift = float(v.mean()) if len(v) else 0.0  # (u + c, v − c) is the same dual: keep v centred
        self.perm, self._u, self._v, self._cost = perm, u + shift, v - shift, None

    def _solve_warm(self, cost: np.ndarray, tol: float) -> bool:
        """Warm solve from the stored (perm, v); False when it should be solved cold instead."""
        assert self.perm is not None and self._v is not None
        n = cost.shape[0]
        rows = np.arange(n)
        v = self._v.copy()
        u = (cost - v).min(axis=1)  # dual-feasible row potentials
        slack = cost[rows, self.perm] - u - v[self.perm]
        free = np.flatnonzero(slack > tol)
        n_free = len(free)
        if n_free > self.max_free_fraction * n:
            return False
        col4row = self.perm.copy()
        col4row[free] = -1
        row4col = np.full(n, -1, dtype=np.int64)
        kept = col4row >= 0
        row4col[col4row[kept]] = rows[kept]
        free = _assign_row_minima(cost, u, v, col4row, row4col, free)
        touched = np.zeros(n, dtype=bool)
        for r in free:
            touched |= _augment(cost, u, v, col4row, row4col, int(r))
        if np.abs(cost[rows, col4row] - u - v[col4row]).max(initial=0.0) > max(n, 1) * tol:
            return False  # rounding spoiled tightness: solve cold
        if self.center_sweeps > 0 and touched.any():
            v = center_potentials(cost, col4row, v, self.center_sweeps, np.flatnonzero(touched))
            u = cost[rows, col4row] - v[col4row]
        self._set(col4row, u, v)
        self.stats["warm"] += 1
        self.stats["rows_freed"] += n_free
        self.stats["scanned"] += int(touched.sum())
        return True


def _assign_row_minima(
    cost: np.ndarray, u: np.ndarray, v: np.ndarray, col4row: np.ndarray, row4col: np.ndarray, free: np.ndarray
) -> np.ndarray:
    """Assign each free row whose row minimum of reduced cost lies in a free column claimed by no other
    free row straight to it (the entry is tight since u_i is that minimum; no potential changes: the
    cheap first phase of Jonker–Volgenant). Updates col4row, row4col; returns the rows still free."""
    if free.size == 0:
        return free
    best = (cost[free] - v).argmin(axis=1)
    claims = np.bincount(best, minlength=len(v))
    direct = (row4col[best] < 0) & (claims[best] == 1)
    rows, cols = free[direct], best[direct]
    col4row[rows] = cols
    row4col[cols] = rows
    return free[~direct]


def _augment(
    cost: np.ndarray, u: np.ndarray, v: np.ndarray, col4row: np.ndarray, row4col: np.ndarray, start: int
) -> np.ndarray:
    """Assign free row `start` by one shortest augmenting path; updates u, v, col4row, row4col in place.

    Dijkstra over columns with distances d_j = min over scanned rows i of (d to i) + C_ij − u_i − v_j
    (≥ 0 for feasible duals), stopping at the first free column reached (ties prefer a free column).
    Duals afterwards (Crouse 2016): v_j −= (d* − d_j) for scanned columns, u_i += d* − d_{p(i)} for
    the scanned rows reached through column p(i), u_start += d*; this keeps C̄ ≥ 0 and makes the
    alternating path tight. Returns the mask of scanned columns (the potentials that changed).
    """
    n = cost.shape[0]
    open_d = np.full(n, np.inf)  # tentative distances; +inf once scanned
    pred = np.full(n, -1, dtype=np.int64)
    free_cols = np.flatnonzero(row4col < 0)
    cols: list[int] = []
    dists: list[float] = []
    i, d_min = start, 0.0
    while True:
        through = cost[i] - v
        through += d_min - u[i]
        better = through < open_d
        better[cols] = False
        np.copyto(open_d, through, where=better)
        pred[better] = i
        j = int(open_d.argmin())
        d_min = float(open_d[j])
        if row4col[j] >= 0:  # a free column at the same distance ends the path
            k = int(open_d[free_cols].argmin())
            if open_d[free_cols[k]] == d_min:
                j = int(free_cols[k])
        cols.append(j)
        dists.append(d_min)
        open_d[j] = np.inf
        if row4col[j] < 0:
            break
        i = int(row4col[j])
    sink = j
    scanned_cols = np.array(cols, dtype=np.int64)
    shift = d_min - np.array(dists)
    u[row4col[scanned_cols[:-1]]] += shift[:-1]
    u[start] += d_min
    v[scanned_cols] -= shift
    j = sink
    while True:  # flip the alternating path
        i = int(pred[j])
        row4col[j] = i
        col4row[i], j = j, int(col4row[i])
        if i == start:
            break
    scanned = np.zeros(n, dtype=bool)
    scanned[scanned_cols] = True
    return scanned
