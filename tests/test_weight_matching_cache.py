"""The incremental cost-term cache of weight matching: same steps as recomputing every S_P from scratch."""

from __future__ import annotations

import importlib

import pytest
import torch

from lmclab.models import build_model
from lmclab.permutation import Permutation, PermutationSpec, derive_spec

wm = importlib.import_module("lmclab.align.weight_matching")  # the module (the package exports the function)


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
) -> tuple[list[tuple[str, list[int]]], object]:
    """(the sequence of (group, new permutation) steps taken, the result), checking every S_P on the way."""
    steps: list[tuple[str, list[int]]] = []
    init, set_perm, cost = wm._WeightMatcher.__init__, wm._WeightMatcher.set_perm, wm._WeightMatcher.cost

    def patched_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        init(self, *args, **kwargs)
        self.cache_terms = cache

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
    res = wm.weight_matching(a, b, spec, seed=3)
    monkeypatch.undo()
    return steps, res


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_cached_terms_give_the_same_steps_as_recomputing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    a, b, spec = _pair(name)
    cached_steps, cached = _trace(monkeypatch, a, b, spec, cache=True)
    fresh_steps, fresh = _trace(monkeypatch, a, b, spec, cache=False)
    assert len(cached_steps) >= 2  # the descent moved more than once: the cache had something to go stale
    assert cached_steps == fresh_steps
    assert cached.perm == fresh.perm and cached.objective == fresh.objective  # type: ignore[attr-defined]
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
