"""Warm-started linear assignment (WarmAssignment) against scipy, brute force and LP duality; its use in
weight matching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lmclab.align import WarmAssignment, WeightMatchingState, weight_matching
from lmclab.align.assignment import center_potentials, column_potentials
from lmclab.models import build_model
from lmclab.permutation import Permutation, derive_spec

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def scipy_perm(s: np.ndarray, maximize: bool = True) -> np.ndarray:
    rows, cols = linear_sum_assignment(s, maximize=maximize)
    p = np.empty(len(rows), dtype=np.int64)
    p[rows] = cols
    return p


def value(s: np.ndarray, p: np.ndarray | torch.Tensor) -> float:
    p = np.asarray(p)
    return float(s[np.arange(len(p)), p].sum())


def assert_certificate(solver: WarmAssignment, s: np.ndarray, p: np.ndarray) -> None:
    """The returned duals prove optimality: feasible (u_i + v_j ≥ S_ij when maximising), tight on the
    assignment, and Σu + Σv equals the assignment's value (strong duality)."""
    u, v = solver.duals()
    n = len(p)
    scale = max(np.abs(s).max(), 1e-300)
    tol = 1e-9 * scale * max(n, 1)
    slack = (u[:, None] + v[None, :] - s) if solver.maximize else (s - u[:, None] - v[None, :])
    assert slack.min() >= -tol
    assert np.abs(slack[np.arange(n), p]).max(initial=0.0) <= tol
    assert u.sum() + v.sum() == pytest.approx(value(s, p), abs=tol)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("maximize", [True, False])
def test_warm_sequence_matches_brute_force(n: int, maximize: bool) -> None:
    """Every solve of a sequence (cold first, then warm on perturbed matrices) reaches the brute-force optimum."""
    rng = np.random.default_rng(n)
    solver = WarmAssignment(maximize=maximize, max_free_fraction=1.0)
    s = rng.standard_normal((n, n))
    perms = [np.array(q) for q in itertools.permutations(range(n))]
    for _step in range(6):
        p = solver.solve(torch.from_numpy(s)).numpy()
        assert sorted(p.tolist()) == list(range(n))
        values = [value(s, q) for q in perms]
        best = max(values) if maximize else min(values)
        assert value(s, p) == pytest.approx(best, abs=1e-12)
        assert_certificate(solver, s, p)
        s = s + 0.3 * rng.standard_normal((n, n))
    assert solver.stats["cold"] == 1 and solver.stats["warm"] == 5


@pytest.mark.parametrize("eps", [1e-8, 1e-4, 1e-2, 0.3])
def test_warm_matches_cold_on_perturbed_sequences(eps: float) -> None:
    """Small perturbations of the previous matrix: the same permutation as a cold scipy solve (the optimum of a
    continuous random matrix is unique), the same value, feasible and tight duals, and most solves warm."""
    rng = np.random.default_rng(1)
    n = 60
    s = rng.standard_normal((n, n))
    solver = WarmAssignment(max_free_fraction=1.0)
    for _ in range(8):
        p = solver.solve(torch.from_numpy(s)).numpy()
        assert np.array_equal(p, scipy_perm(s))
        assert_certificate(solver, s, p)
        s = s + eps * rng.standard_normal((n, n))
    assert solver.stats["warm"] == 7 and solver.stats["fallback"] == 0


def test_unchanged_matrix_is_proved_optimal_without_augmenting() -> None:
    """Re-solving the same matrix keeps every row (the O(n²) dual check proves the old permutation optimal).
    The first solve skips recovering potentials (nothing to compare with); asking for the duals recovers them."""
    rng = np.random.default_rng(2)
    s = rng.standard_normal((40, 40))
    solver = WarmAssignment()
    p = solver.solve(s).numpy()
    assert solver.stats["potentials"] == 0
    assert_certificate(solver, s, p)
    for _ in range(3):
        assert np.array_equal(solver.solve(s).numpy(), p)
    assert solver.stats == {"cold": 1, "warm": 3, "fallback": 0, "potentials": 1, "rows_freed": 0, "scanned": 0}


def test_cold_solves_skip_potentials_while_the_optimum_moves_a_lot() -> None:
    """Unrelated matrices: scipy every time, no potential recovery and no wasted warm attempt."""
    rng = np.random.default_rng(8)
    solver = WarmAssignment()
    for _ in range(4):
        s = rng.standard_normal((50, 50))
        assert np.array_equal(solver.solve(s).numpy(), scipy_perm(s))
    assert solver.stats["cold"] == 4 and solver.stats["potentials"] == 0 and solver.stats["fallback"] == 0


def test_many_rows_change() -> None:
    """Unrelated matrices: with every row free the warm path is a full shortest-augmenting-path solve; with the
    default threshold it falls back to scipy (potentials exist here because the certificate asks for the duals).
    Both give scipy's permutation."""
    rng = np.random.default_rng(3)
    all_free = WarmAssignment(max_free_fraction=1.0)
    default = WarmAssignment()
    for _ in range(5):
        s = rng.standard_normal((50, 50))
        ref = scipy_perm(s)
        for solver in (all_free, default):
            p = solver.solve(s).numpy()
            assert np.array_equal(p, ref)
            assert_certificate(solver, s, p)
    assert all_free.stats["warm"] == 4 and all_free.stats["rows_freed"] > 4 * 25
    assert default.stats["fallback"] == 4 and default.stats["cold"] == 5


def test_row_permuted_matrix_needs_many_augmentations() -> None:
    """A previous optimum that is far from the new one (rows shuffled): still the new optimum."""
    rng = np.random.default_rng(4)
    s = rng.standard_normal((30, 30))
    solver = WarmAssignment(max_free_fraction=1.0)
    solver.solve(s)
    shuffled = s[rng.permutation(30)]
    p = solver.solve(shuffled).numpy()
    assert np.array_equal(p, scipy_perm(shuffled))
    assert solver.stats["warm"] == 1


@pytest.mark.parametrize("maximize", [True, False])
def test_ties_give_the_optimal_value(maximize: bool) -> None:
    """Integer matrices with many ties (and a constant one): the optimal value of a cold solve, valid duals."""
    rng = np.random.default_rng(5)
    solver = WarmAssignment(maximize=maximize, max_free_fraction=1.0)
    s = rng.integers(0, 3, size=(25, 25)).astype(float)
    for _step in range(8):
        p = solver.solve(s).numpy()
        assert sorted(p.tolist()) == list(range(25))
        assert value(s, p) == value(s, scipy_perm(s, maximize))
        assert_certificate(solver, s, p)
        flip = rng.random(s.shape) < 0.05
        s = np.where(flip, rng.integers(0, 3, size=s.shape), s).astype(float)
    const = np.ones((25, 25))
    p = solver.solve(const).numpy()
    assert value(const, p) == 25.0
    assert_certificate(solver, const, p)


def test_potential_recovery_and_centring_are_feasible_and_tight() -> None:
    """column_potentials (Bellman–Ford on the difference constraints) gives duals that certify scipy's optimum;
    centring keeps them feasible and tight and leaves a positive margin on non-assigned entries."""
    rng = np.random.default_rng(6)
    n = 40
    c = rng.standard_normal((n, n))
    p = scipy_perm(c, maximize=False)
    rows = np.arange(n)
    v = column_potentials(c, p, tol=1e-14)
    for vv in (v, center_potentials(c, p, v, sweeps=5)):
        u = c[rows, p] - vv[p]
        reduced = c - u[:, None] - vv[None, :]
        assert reduced.min() >= -1e-12
        assert np.abs(reduced[rows, p]).max() <= 1e-12
    off = np.ones((n, n), dtype=bool)
    off[rows, p] = False
    u_c = c[rows, p] - center_potentials(c, p, v, sweeps=5)[p]
    margin_centred = (c - u_c[:, None] - center_potentials(c, p, v, sweeps=5)[None, :])[off].min()
    margin_sp = (c - (c[rows, p] - v[p])[:, None] - v[None, :])[off].min()
    assert margin_sp == pytest.approx(0.0, abs=1e-12)  # shortest-path duals: some entry tight in each column
    assert margin_centred > 1e-6


def test_size_change_and_reset_solve_cold() -> None:
    rng = np.random.default_rng(7)
    solver = WarmAssignment()
    solver.solve(rng.standard_normal((5, 5)))
    s = rng.standard_normal((7, 7))
    assert np.array_equal(solver.solve(s).numpy(), scipy_perm(s))
    solver.reset()
    solver.solve(s)
    assert solver.stats["cold"] == 3 and solver.stats["warm"] == 0
    assert solver.solve(np.zeros((0, 0))).numel() == 0


def test_bad_input_is_rejected() -> None:
    solver = WarmAssignment()
    with pytest.raises(ValueError, match="square"):
        solver.solve(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        solver.solve(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="max_free_fraction"):
        WarmAssignment(max_free_fraction=1.5)
    with pytest.raises(ValueError, match="no solve yet"):
        WarmAssignment().duals()


def test_solve_does_not_modify_its_input() -> None:
    s = torch.randn(6, 6, dtype=torch.float64)
    before = s.clone()
    WarmAssignment().solve(s)
    assert torch.equal(s, before)


# ------------------------------------------------------------------------------ in weight matching


def _mlp_params(seed: int, hidden: list[int]) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = build_model("mlp", input_shape=(1, 1, 20), num_classes=5, hidden=hidden)
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_weight_matching_with_warm_state_matches_cold_calls() -> None:
    """A sequence of re-matches of B to a drifting target (as STE does): warm calls (previous permutation and LAP
    duals) give the same permutation and objective as cold calls started from the same permutation."""
    hidden = [24, 16]
    torch.manual_seed(0)
    spec = derive_spec(build_model("mlp", input_shape=(1, 1, 20), num_classes=5, hidden=hidden), torch.zeros(2, 20))
    target, b = _mlp_params(0, hidden), _mlp_params(1, hidden)
    gen = torch.Generator().manual_seed(0)
    state = WeightMatchingState()
    last = None
    for _step in range(6):
        warm = weight_matching(target, b, spec, warm=state)
        cold = weight_matching(target, b, spec, init=last)
        assert warm.perm == cold.perm
        assert warm.objective[-1] == pytest.approx(cold.objective[-1], rel=1e-9)
        assert state.perm == warm.perm
        last = warm.perm
        target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in target.items()}
    stats = state.stats()
    assert stats["warm"] > 0 and stats["cold"] >= len(spec.groups)


def test_warm_state_recovers_known_permutation_and_checks_spec() -> None:
    hidden = [12, 10]
    torch.manual_seed(0)
    spec = derive_spec(build_model("mlp", input_shape=(1, 1, 20), num_classes=5, hidden=hidden), torch.zeros(2, 20))
    a = _mlp_params(3, hidden)
    pi = Permutation.random(spec, torch.Generator().manual_seed(1))
    state = WeightMatchingState()
    res = weight_matching(a, pi.apply(a, spec), spec, warm=state)
    assert res.perm == pi.inverse() and res.distance_after == 0.0 and res.info["warm"]
    other_spec = derive_spec(
        build_model("mlp", input_shape=(1, 1, 20), num_classes=5, hidden=[8, 8]), torch.zeros(2, 20)
    )
    b8 = {k: v for k, v in _mlp_params(4, [8, 8]).items()}
    with pytest.raises(ValueError, match="units"):
        weight_matching(b8, b8, other_spec, warm=state)
