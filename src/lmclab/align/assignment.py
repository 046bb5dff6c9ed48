"""Linear assignment: the permutation p maximising (or minimising) Σ_i S[i, p[i]]."""
from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["solve_assignment", "assignment_value"]


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


def solve_assignment(score: torch.Tensor, maximize: bool = True,
                     warm_start: torch.Tensor | None = None) -> torch.Tensor:
    """int64 permutation p (on CPU) with p[i] the column assigned to row i, optimising Σ_i S[i, p[i]].

    Solved by scipy's ``linear_sum_assignment`` on a float64 NumPy copy of the square matrix `score`.
    `warm_start` (a permutation) is not used to seed the solver (scipy has no warm start); it is
    returned unchanged when a cheap sufficient check proves it optimal: every row's assigned entry
    is that row's maximum (minimum when ``maximize=False``). Otherwise the solver runs.
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
    s = score.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(s).all():
        raise ValueError("score matrix has non-finite entries")
    rows, cols = linear_sum_assignment(s, maximize=maximize)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)
