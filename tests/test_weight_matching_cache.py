"""The incremental cost-term cache of weight matching: same steps as recomputing every S_P from scratch."""

from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest
import torch

from lmclab.align.assignment import assignment_value, reduced_assignment
from lmclab.models import build_model
from lmclab.permutation import Permutation, PermutationSpec, derive_spec
from lmclab.permutation.spec import AxisRef, PermGroup

wm = importlib.import_module("lmclab.align.weight_matching")
assignment_module = importlib.import_module("lmclab.align.assignment")  # the module (the package exports the function)


def _pair(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], PermutationSpec]:
    shape, opts = ((1, 4, 4), {"hidden": [12, 10, 12]}) if name == "mlp" else ((3, 8, 8), {"width": 1})
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(name, input_shape=shape, num_classes=5, **opts))
    spec = derive_spec(models[0], torch.randn(2, *shape))
    return dict(models[0].state_dict()), dict(models[1].state_dict()), spec


def _scratch_cost(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], spec: PermutationSpec, perm: dict[str, torch.Tensor], g: str
) -> torch.Tensor:
    """S_g = Σ_{(t, axis) ∈ g} A_t^(axis) (B̃_t^(axis))ᵀ from a fresh full apply of π (g's own entry the identity)."""
    group = spec.group(g)
    others = Permutation({**{k: v.cpu() for k, v in perm.items()}, g: torch.arange(group.size)})
    pb = others.apply(b, spec)
    n = group.size
    s = torch.zeros(n, n)
    for ax in group.axes:
        if ax.tensor in a and a[ax.tensor].is_floating_point():
            rows = slice(ax.offset, ax.offset + n * ax.block)
            s += (
                a[ax.tensor].movedim(ax.axis, 0)[rows].reshape(n, -1)
                @ pb[ax.tensor].movedim(ax.axis, 0)[rows].reshape(n, -1).T
            )
    return s


def _trace(
    monkeypatch: pytest.MonkeyPatch,
    a: dict[str, torch.Tensor],
    b: dict[str, torch.Tensor],
    spec: PermutationSpec,
    cache: bool,
    update: bool = True,
    seed: int = 3,
) -> tuple[list[tuple[str, list[int]]], object]:
    """(the sequence of (group, new permutation) steps taken, the result), checking every S_P on the way."""
    steps: list[tuple[str, list[int]]] = []
    init, set_perm, cost = wm._WeightMatcher.__init__, wm._WeightMatcher.set_perm, wm._WeightMatcher.cost

    def patched_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        self.cache_terms = cache
        self.update_terms = update

    def patched_set_perm(self, group, new):  # type: ignore[no-untyped-def]
        steps.append((group, new.tolist()))
        set_perm(self, group, new)

    def patched_cost(self, group):  # type: ignore[no-untyped-def]
        s = cost(self, group)
        torch.testing.assert_close(s, _scratch_cost(a, b, spec, self.perm, group), rtol=1e-5, atol=1e-5)
        return s

    monkeypatch.setattr(wm._WeightMatcher, "__init__", patched_init)
    monkeypatch.setattr(wm._WeightMatcher, "set_perm", patched_set_perm)
    monkeypatch.setattr(wm._WeightMatcher, "cost", patched_cost)
    res = wm.weight_matching(a, b, spec, seed=seed)
    monkeypatch.undo()
    return steps, res


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_cached_terms_give_the_same_steps_as_recomputing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    a, b, spec = _pair(name)
    cached_steps, cached = _trace(monkeypatch, a, b, spec, cache=True)
    fresh_steps, fresh = _trace(monkeypatch, a, b, spec, cache=False)
    assert len(cached_steps) >= 2  # the descent moved more than once: the cache had something to go stale
    assert cached_steps == fresh_steps
    assert cached.perm == fresh.perm
    # The per-sweep objective comes from up-to-date cached terms (float32 products summed in float64)
    # instead of a pass over the tensors: equal to float32 rounding.
    assert cached.objective == pytest.approx(fresh.objective, rel=1e-6)  # type: ignore[attr-defined]
    assert cached.info["cost_terms_reused"] > 0 and fresh.info["cost_terms_reused"] == 0  # type: ignore[attr-defined]
    assert cached.info["cost_terms_computed"] < fresh.info["cost_terms_computed"]  # type: ignore[attr-defined]


def test_stale_terms_are_rebuilt_after_a_neighbour_changes() -> None:
    """Changing a neighbour's permutation by hand invalidates exactly the terms that read it."""
    a, b, spec = _pair("mlp")
    perm = dict(Permutation.identity(spec).perms)
    matcher = wm._WeightMatcher(a, b, spec, perm, lambda _n: 1.0, torch.device("cpu"))
    names = [g.name for g in spec.groups]
    for g in names:
        matcher.cost(g)
    gen = torch.Generator().manual_seed(0)
    for step in range(6):
        q = spec.groups[step % len(names)]
        matcher.set_perm(q.name, torch.randperm(q.size, generator=gen))
        for g in names:
            torch.testing.assert_close(
                matcher.cost(g), _scratch_cost(a, b, spec, matcher.perm, g), rtol=1e-5, atol=1e-5
            )
    assert matcher.term_stats["reused"] > 0


def _spec(groups: dict[str, tuple[int, list[tuple[str, int]]]]) -> PermutationSpec:
    return PermutationSpec(
        tuple(PermGroup(g, n, tuple(AxisRef(t, ax) for t, ax in refs)) for g, (n, refs) in groups.items())
    )


def _swap(p: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    q = p.clone()
    for i, j in pairs:
        q[[i, j]] = q[[j, i]]
    return q


def test_rank_k_corrections_equal_full_products() -> None:
    """A stale term whose neighbour moved in few entries is corrected (rank-k), not rebuilt, and equals the
    full product to float32 rounding (rtol 1e-5); many corrections in a row exhaust the budget and rebuild it."""
    torch.manual_seed(0)
    a = {"w1": torch.randn(40, 6), "w2": torch.randn(30, 40), "w3": torch.randn(5, 30)}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    spec = _spec({"P1": (40, [("w1", 0), ("w2", 1)]), "P2": (30, [("w2", 0), ("w3", 1)])})
    perm = dict(Permutation.identity(spec).perms)
    matcher = wm._WeightMatcher(a, b, spec, perm, lambda _n: 1.0, torch.device("cpu"))
    plain = wm._WeightMatcher(a, b, spec, dict(perm), lambda _n: 1.0, torch.device("cpu"))
    plain.update_terms = False
    matcher.cost("P2")
    plain.cost("P2")
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        pairs = [tuple(torch.randperm(40, generator=gen)[:2].tolist()) for _ in range(2)]  # ≤ 4 of 40 entries move
        new = _swap(matcher.perm["P1"], pairs)  # type: ignore[arg-type]
        matcher.set_perm("P1", new)
        plain.set_perm("P1", new)
        scratch = _scratch_cost(a, b, spec, matcher.perm, "P2")
        torch.testing.assert_close(matcher.cost("P2"), scratch, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain.cost("P2"), scratch, rtol=1e-5, atol=1e-5)
        fresh = wm._WeightMatcher(a, b, spec, dict(matcher.perm), lambda _n: 1.0, torch.device("cpu"))
        assert torch.equal(plain.cost("P2"), fresh.cost("P2"))  # rebuilding is bit-identical to a fresh build
    # w2's term (which reads P1) was built once and then corrected at every step (12 × ≤ 4 moved entries stay
    # within the budget 2 × 40); w3's term reads no other group: built once, reused.
    assert matcher.term_stats["updated"] == 12 and matcher.term_stats["computed"] == 2
    assert plain.term_stats["updated"] == 0 and plain.term_stats["computed"] == 2 + 12
    old = wm.UPDATE_BUDGET
    try:
        wm.UPDATE_BUDGET = 0.1  # at most 4 moved entries of 40 between full products
        tight = wm._WeightMatcher(a, b, spec, dict(perm), lambda _n: 1.0, torch.device("cpu"))
        tight.cost("P2")
        for step in range(6):
            tight.set_perm("P1", _swap(tight.perm["P1"], [(2 * step, 2 * step + 1)]))  # 2 entries move
            scratch = _scratch_cost(a, b, spec, tight.perm, "P2")
            torch.testing.assert_close(tight.cost("P2"), scratch, rtol=1e-5, atol=1e-5)
    finally:
        wm.UPDATE_BUDGET = old
    # built, corrected (2 moved), corrected (4), rebuilt (6 > 4), corrected, corrected, rebuilt
    assert tight.term_stats["updated"] == 4 and tight.term_stats["computed"] == 2 + 2


def test_a_large_move_rebuilds_the_term() -> None:
    """More than UPDATE_FRACTION of the neighbour's entries moved: a full product, not a correction."""
    torch.manual_seed(0)
    a = {"w1": torch.randn(20, 6), "w2": torch.randn(16, 20)}
    b = {k: torch.randn_like(v) for k, v in a.items()}
    spec = _spec({"P1": (20, [("w1", 0), ("w2", 1)]), "P2": (16, [("w2", 0)])})
    matcher = wm._WeightMatcher(a, b, spec, dict(Permutation.identity(spec).perms), lambda _n: 1.0, torch.device("cpu"))
    matcher.cost("P2")
    matcher.set_perm("P1", torch.roll(torch.arange(20), 1))  # all 20 entries move
    torch.testing.assert_close(matcher.cost("P2"), _scratch_cost(a, b, spec, matcher.perm, "P2"), rtol=1e-5, atol=1e-5)
    assert matcher.term_stats == {"computed": 2, "reused": 0, "updated": 0}  # built at identity, rebuilt


def test_descent_with_corrections_takes_the_same_steps() -> None:
    """A pair whose descent ends with small moves (B a noisy permuted copy of A): the corrected terms take the
    same steps, to the same permutation, as rebuilding every stale term."""
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 4, 4), num_classes=5, hidden=[48, 48, 48])
    spec = derive_spec(model, torch.randn(2, 1, 4, 4))
    a = dict(model.state_dict())
    scramble = Permutation({g.name: torch.randperm(g.size) for g in spec.groups})
    b = {k: v + 0.6 * torch.randn_like(v) for k, v in scramble.apply(a, spec).items()}
    for seed in (0, 1, 2):
        steps_upd, upd = _trace(pytest.MonkeyPatch(), a, b, spec, cache=True, update=True, seed=seed)
        steps_full, full = _trace(pytest.MonkeyPatch(), a, b, spec, cache=True, update=False, seed=seed)
        assert steps_upd == steps_full and upd.perm == full.perm  # type: ignore[attr-defined]
        assert full.info["cost_terms_updated"] == 0  # type: ignore[attr-defined]
    assert upd.info["cost_terms_updated"] > 0  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_objective_from_terms_matches_a_pass_over_the_tensors(name: str) -> None:
    a, b, spec = _pair(name)
    gen = torch.Generator().manual_seed(0)
    perm = {g.name: torch.randperm(g.size, generator=gen) for g in spec.groups}
    matcher = wm._WeightMatcher(a, b, spec, perm, lambda _n: 1.0, torch.device("cpu"))
    for g in spec.groups:
        matcher.cost(g.name)
    from_terms = {t: matcher.term_value(t) for t in matcher.refs}
    assert all(v is not None for v in from_terms.values())  # every term was just built
    for t, v in from_terms.items():
        if v is not None:
            assert float(v) == pytest.approx(float(matcher._tensor_value(t, dtype=torch.float64)), rel=1e-5, abs=1e-5)
    assert matcher.objective(from_terms=True) == pytest.approx(matcher.objective(), rel=1e-6)


def test_objective_from_terms_skips_stale_terms() -> None:
    a, b, spec = _pair("mlp")
    perm = dict(Permutation.identity(spec).perms)
    matcher = wm._WeightMatcher(a, b, spec, perm, lambda _n: 1.0, torch.device("cpu"))
    for g in spec.groups:
        matcher.cost(g.name)
    g0, g1 = spec.groups[0], spec.groups[1]
    t = next(t for t, refs in matcher.refs.items() if {r[0] for r in refs} == {g0.name, g1.name})
    gen = torch.Generator().manual_seed(0)
    matcher.set_perm(g0.name, torch.randperm(g0.size, generator=gen))  # g1's term of t goes stale, g0's stays valid
    value = matcher.term_value(t)
    assert value is not None
    assert float(value) == pytest.approx(float(matcher._tensor_value(t, dtype=torch.float64)), rel=1e-5, abs=1e-5)
    matcher.set_perm(g1.name, torch.randperm(g1.size, generator=gen))  # now both are stale
    assert matcher.term_value(t) is None


def _brute_best(s: torch.Tensor) -> float:
    return max(
        float(s[torch.arange(len(p)), torch.tensor(p)].double().sum()) for p in itertools.permutations(range(len(s)))
    )


def test_reduced_assignment_is_optimal_with_any_potentials() -> None:
    """Against brute force over all permutations, for a chain of similar matrices whose potentials are passed on."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 6):
        s = torch.randn(n, n, generator=gen)
        w = None
        for _ in range(6):
            s = s + 0.1 * torch.randn(n, n, generator=gen)
            p, w = reduced_assignment(s, torch.arange(n), w)
            assert sorted(p.tolist()) == list(range(n)) and w.shape == (n,)
            assert assignment_value(s, p) == pytest.approx(_brute_best(s), rel=1e-12, abs=1e-12)
        _, w_bad = reduced_assignment(s, None, 1e3 * torch.randn(n, generator=gen).double().numpy())  # any w is valid
        assert assignment_value(s, reduced_assignment(s, None, w_bad)[0]) == pytest.approx(_brute_best(s), abs=1e-9)
    with pytest.raises(ValueError, match="square"):
        reduced_assignment(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="potentials"):
        reduced_assignment(torch.zeros(3, 3), None, np.zeros(2))


def test_reduced_assignment_returns_an_optimal_current_permutation_without_solving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = torch.eye(5) * 3 + 0.01 * torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    current = torch.tensor([4, 3, 2, 1, 0])
    s = s[:, current.argsort()]  # the optimum is now `current`, each row on its maximum
    monkeypatch.setattr(assignment_module, "_scipy_perm", lambda c: (_ for _ in ()).throw(AssertionError("solved")))
    p, _ = reduced_assignment(s, current)
    assert torch.equal(p, current)
    with pytest.raises(AssertionError, match="solved"):  # not optimal: it solves
        reduced_assignment(s, torch.arange(5))
