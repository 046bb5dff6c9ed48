"""Weight matching's start (lmclab.align.weight_matching: `start`, `anchored_tensors`, `resolve_start`).

The anchored start solves every group from the tensors permuted on one axis only; on those the objective
decouples, so the descent restricted to them must give, for every flat group, the assignment scipy finds on
the cost built here by hand, and for every head class the best structured permutation (no random one beats
it). "auto" is anchored for specs with attention heads and the identity otherwise (MLP/CNN results
unchanged). A planted permutation of a ViT is still recovered exactly, and stored results of the revised
methods are keyed by the revision."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lmclab.align import align_population, get_pair_method, get_population_method, weight_matching
from lmclab.align.weight_matching import anchored_tensors, resolve_start
from lmclab.experiments.graph import Step
from lmclab.experiments.steps import align_step
from lmclab.models import build_model
from lmclab.permutation import Permutation, derive_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def vit_state(
    seed: int, dim: int = 16, heads: int = 2, depth: int = 2
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build_model("vit", input_shape=(1, 28, 28), num_classes=10, dim=dim, depth=depth, heads=heads).double()
    with torch.no_grad():  # not the init's ones and zeros, so that norms and biases carry information
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def mlp_state(seed: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(12, 10)).double()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def spec_of(model: torch.nn.Module):
    return derive_spec(model, torch.randn(2, 1, 28, 28, dtype=torch.float64))


def test_anchored_tensors_of_a_vit_are_the_one_axis_tensors() -> None:
    model, theta = vit_state(0)
    spec = spec_of(model)
    got = set(anchored_tensors(spec, theta))
    two_axes = {
        f"blocks.{b}.{n}"
        for b in range(2)
        for n in ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.0.weight", "mlp.2.weight")
    }
    permuted = set(spec.axes_by_tensor())
    assert got == permuted - two_axes
    assert {"patch_embed.weight", "pos_embed", "cls_token", "head.weight", "norm.weight"} <= got
    assert "head.bias" not in permuted  # classes are not permuted


def test_anchored_tensors_of_an_mlp_are_its_first_and_last_layers_and_biases() -> None:
    model, theta = mlp_state(0)
    spec = spec_of(model)
    got = set(anchored_tensors(spec, theta))
    biases = {t for t in spec.axes_by_tensor() if t.endswith("bias")}
    assert "layers.1.linear.weight" in spec.axes_by_tensor()  # hidden → hidden: two permuted axes
    assert got == biases | {"layers.0.linear.weight", "head.weight"}  # pixels → hidden, hidden → classes


def test_on_anchored_tensors_the_descent_solves_each_group_exactly() -> None:
    """Restricted to the anchored tensors the groups decouple: one sweep gives each flat group scipy's
    optimum of S = Σ_t A_t Bᵀ_t (built here from the tensors with the group's axis moved first), and no
    random structured permutation beats the head classes' assignment."""
    model, ta = vit_state(0)
    _, tb = vit_state(1)
    spec = spec_of(model)
    anchored = set(anchored_tensors(spec, ta))
    res = weight_matching(ta, tb, spec, weights=lambda t: 1.0 if t in anchored else 0.0, start="identity")
    assert res.converged and res.sweeps == 2  # one sweep that changes groups, one that confirms
    for g in spec.groups:
        if g.structured:
            continue
        cost = torch.zeros(g.size, g.size, dtype=torch.float64)
        for ax in g.axes:
            if ax.tensor not in anchored:
                continue
            a = ta[ax.tensor].movedim(ax.axis, 0).narrow(0, ax.offset, g.size * ax.block).reshape(g.size, -1)
            b = tb[ax.tensor].movedim(ax.axis, 0).narrow(0, ax.offset, g.size * ax.block).reshape(g.size, -1)
            cost += a @ b.T
        rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        best = float(cost[rows, cols].sum())
        got = float(cost[torch.arange(g.size), res.perm.perms[g.name]].sum())
        assert got == pytest.approx(best, rel=1e-12), g.name

    def anchored_objective(perm: Permutation) -> float:
        pb = perm.apply(tb, spec)
        return sum(float((ta[t] * pb[t]).sum()) for t in anchored)

    found = anchored_objective(res.perm)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):  # random structured permutations of the heads, the flat groups as found
        rand = Permutation.random(spec, generator=gen)
        trial = Permutation({g.name: (rand if g.structured else res.perm).perms[g.name] for g in spec.groups})
        assert anchored_objective(trial) <= found + 1e-9 * abs(found)


def test_auto_start_is_anchored_for_heads_and_the_identity_otherwise() -> None:
    vit, _ = vit_state(0)
    mlp, _ = mlp_state(0)
    assert resolve_start("auto", spec_of(vit)) == "anchored"
    assert resolve_start("auto", spec_of(mlp)) == "identity"
    assert resolve_start("identity", spec_of(vit)) == "identity"
    with pytest.raises(ValueError, match="valid: auto, identity, anchored"):
        resolve_start("random", spec_of(vit))


def test_mlp_results_are_those_of_the_identity_start() -> None:
    model, ta = mlp_state(0)
    _, tb = mlp_state(1)
    spec = spec_of(model)
    auto = weight_matching(ta, tb, spec, seed=3)
    ident = weight_matching(ta, tb, spec, seed=3, start="identity")
    assert auto.info["start"] == "identity"
    assert auto.perm == ident.perm and auto.objective == ident.objective


@pytest.mark.parametrize("seed", [0, 1])
def test_a_planted_permutation_of_a_vit_is_recovered_from_the_anchored_start(seed: int) -> None:
    model, ta = vit_state(seed)
    spec = spec_of(model)
    planted = Permutation.random(spec, generator=torch.Generator().manual_seed(seed + 10))
    tb = planted.apply(ta, spec)
    res = weight_matching(ta, tb, spec, seed=seed)
    assert res.info["start"] == "anchored"
    back = res.perm.apply(tb, spec)
    assert all(torch.equal(back[t], ta[t]) for t in ta)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    model.load_state_dict(back)
    out = model(x)
    model.load_state_dict(ta)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)


def test_an_init_or_a_warm_state_overrides_the_start() -> None:
    model, ta = vit_state(0)
    _, tb = vit_state(1)
    spec = spec_of(model)
    res = weight_matching(ta, tb, spec, init=Permutation.identity(spec))
    assert res.info["start"] == "init"
    assert res.objective[-1] >= res.info["objective_init"]


def test_revised_methods_key_their_stored_results_by_revision() -> None:
    assert get_pair_method("weight").identity() == {"method": "weight", "revision": 2}
    assert get_pair_method("activation").identity() == {"method": "activation"}  # unrevised: keys unchanged
    assert get_population_method("pairwise").identity()["revision"] == 2
    a, b = Step("train", {"seed": 0}), Step("train", {"seed": 1})
    weight, activation = align_step(a, b, "weight"), align_step(a, b, "activation")
    assert weight.config == {"method": "weight", "revision": 2, "seed": 0}
    assert activation.config == {"method": "activation", "seed": 0}
    assert weight.key != Step("align", {"method": "weight", "seed": 0}, {"a": a, "b": b}).key


def test_merge_many_recovers_planted_vit_permutations_from_the_anchored_start() -> None:
    """K = 3 copies of one ViT under random permutations σ_k: MergeMany maps them onto each other exactly."""
    model, theta = vit_state(0)
    spec = spec_of(model)
    gen = torch.Generator().manual_seed(7)
    sigmas = [Permutation.identity(spec)] + [Permutation.random(spec, generator=gen) for _ in range(2)]
    points = [s.apply(theta, spec) for s in sigmas]
    joint = align_population(points, spec, "merge_many")
    for aligned in joint.aligned(points):
        assert all(torch.equal(aligned[t], theta[t]) for t in theta)
    assert get_population_method("merge_many").identity() == {"method": "merge_many", "revision": 2}
