"""Alignment: assignment solver, weight matching, activation matching, align() dispatch."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping

import pytest
import torch
from torch import nn

import lmclab.permutation as lp
from lmclab.align import (
    METHODS,
    MatchResult,
    activation_matching,
    align,
    solve_assignment,
    weight_matching,
)
from lmclab.align.weight_matching import _WeightMatcher
from lmclab.models import build_model
from lmclab.permutation import AxisRef, PermGroup, Permutation, PermutationSpec
from lmclab.points import distance

# ----------------------------------------------------------------------------------------- helpers


def mlp(hidden: tuple[int, ...], in_dim: int = 6, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_shape=(1, 1, in_dim), num_classes=classes, hidden=hidden)


def live_mlp(hidden: tuple[int, ...], seed: int = 0) -> nn.Module:
    """An MLP with positive biases, so that no ReLU unit is dead on random inputs (dead units tie)."""
    m = mlp(hidden, seed=seed)
    with torch.no_grad():
        for layer in m.layers:
            layer.linear.bias.uniform_(0.2, 0.5)
    return m


def mlp_spec(hidden: tuple[int, ...]) -> PermutationSpec:
    """Hand-built spec of lmclab's MLP; activations named by module (see `hook_capture`)."""
    groups = []
    for i, h in enumerate(hidden):
        nxt = f"layers.{i + 1}.linear.weight" if i + 1 < len(hidden) else "head.weight"
        groups.append(
            PermGroup(
                f"P_{i}",
                h,
                (AxisRef(f"layers.{i}.linear.weight", 0), AxisRef(f"layers.{i}.linear.bias", 0), AxisRef(nxt, 1)),
                (f"layers.{i}.act",),
            )
        )
    return PermutationSpec(tuple(groups))


class TinyConvNet(nn.Module):
    """conv → BN → ReLU → conv(+bias) → ReLU → flatten (block 4) → linear → ReLU → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(5 * 2 * 2, 6)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.bn(self.conv1(x)))))
        return self.fc2(self.act3(self.fc1(self.flatten(x))))


TINY_SPEC = PermutationSpec(
    (
        PermGroup(
            "c1",
            4,
            (
                AxisRef("conv1.weight", 0),
                AxisRef("bn.weight", 0),
                AxisRef("bn.bias", 0),
                AxisRef("bn.running_mean", 0),
                AxisRef("bn.running_var", 0),
                AxisRef("conv2.weight", 1),
            ),
            ("act1",),
        ),
        PermGroup(
            "c2", 5, (AxisRef("conv2.weight", 0), AxisRef("conv2.bias", 0), AxisRef("fc1.weight", 1, 4)), ("act2",)
        ),
        PermGroup("f1", 6, (AxisRef("fc1.weight", 0), AxisRef("fc1.bias", 0), AxisRef("fc2.weight", 1)), ("act3",)),
    )
)


def tiny_convnet(seed: int) -> nn.Module:
    """TinyConvNet with random BN affine parameters and running statistics (so they carry information)."""
    torch.manual_seed(seed)
    m = TinyConvNet()
    with torch.no_grad():
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.normal_()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
    return m


def hook_capture(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named submodules (stand-in for fx-based capture with module-named nodes)."""
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())
    handles = [mods[n].register_forward_hook(lambda _m, _i, o, n=n: out.__setitem__(n, o)) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_params_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def spec_objective(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], spec: PermutationSpec) -> float:
    """Σ_t ⟨a[t], b[t]⟩ over the spec's tensors, float64 (independent of the matcher's caches)."""
    return float(sum((a[t].double() * b[t].double()).sum() for t in spec.axes_by_tensor()))


def load(model: nn.Module, params: Mapping[str, torch.Tensor]) -> nn.Module:
    m = copy.deepcopy(model)
    m.load_state_dict(params)
    return m


# ------------------------------------------------------------------------------------- assignment


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("maximize", [True, False])
def test_solve_assignment_matches_brute_force(n: int, maximize: bool) -> None:
    gen = torch.Generator().manual_seed(n)
    for _ in range(5):
        s = torch.randn(n, n, generator=gen)
        p = solve_assignment(s, maximize=maximize)
        assert p.dtype == torch.int64 and sorted(p.tolist()) == list(range(n))
        val = float(s[torch.arange(n), p].sum())
        values = [float(s[torch.arange(n), torch.tensor(q)].sum()) for q in itertools.permutations(range(n))]
        best = max(values) if maximize else min(values)
        assert val == pytest.approx(best, abs=1e-5)


def test_solve_assignment_warm_start() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(5, 5, generator=gen)
    perm = torch.randperm(5, generator=gen)
    dominant = s.clone()
    dominant[torch.arange(5), perm] += 100.0  # warm start is row-wise maximal: returned as is
    assert torch.equal(solve_assignment(dominant, warm_start=perm), perm)
    best = solve_assignment(s)
    worst = solve_assignment(s, maximize=False)  # a non-optimal warm start does not stick
    assert torch.equal(solve_assignment(s, warm_start=worst), best)
    with pytest.raises(ValueError):
        solve_assignment(s, warm_start=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError):
        solve_assignment(torch.randn(2, 3))


# --------------------------------------------------------------------------------- weight matching


def _check_recovers(params_a: dict[str, torch.Tensor], spec: PermutationSpec, seed: int = 0) -> MatchResult:
    pi = Permutation.random(spec, torch.Generator().manual_seed(100 + seed))
    params_b = pi.apply(params_a, spec)
    assert distance(params_a, params_b) > 0
    res = weight_matching(params_a, params_b, spec, seed=seed)
    assert res.converged
    assert res.perm == pi.inverse()
    assert_params_equal(res.perm.apply(params_b, spec), params_a)
    assert res.distance_after == 0.0
    assert res.distance_before > 0.0
    return res


def test_weight_matching_recovers_known_permutation_mlp() -> None:
    hidden = (16, 12, 8)
    res = _check_recovers(params_of(mlp(hidden)), mlp_spec(hidden))
    assert res.method == "weight"


def test_weight_matching_recovers_known_permutation_conv_bn_block() -> None:
    _check_recovers(params_of(tiny_convnet(0)), TINY_SPEC)


def test_weight_matching_does_not_increase_distance_and_is_deterministic() -> None:
    hidden = (32, 24, 16)
    spec = mlp_spec(hidden)
    a, b = params_of(mlp(hidden, seed=0)), params_of(mlp(hidden, seed=1))
    res = weight_matching(a, b, spec, seed=0)
    assert res.converged and res.sweeps == len(res.objective) >= 2
    assert res.distance_after <= res.distance_before
    assert res.distance_after < res.distance_before  # random inits: matching helps
    obj = [res.info["objective_init"], *res.objective]
    assert all(y >= x - 1e-6 * abs(x) for x, y in zip(obj, obj[1:]))
    assert res.objective[-1] == res.objective[-2]  # the last sweep changed nothing
    # The objective is Σ_t ⟨θ_A[t], π(θ_B)[t]⟩ and ties to the distance: ‖A−πB‖² = ‖A‖²+‖B‖²−2J.
    pb = res.perm.apply(b, spec)
    assert res.objective[-1] == pytest.approx(spec_objective(a, pb, spec), rel=1e-6)
    d2 = spec_objective(a, a, spec) + spec_objective(b, b, spec) - 2 * res.objective[-1]
    assert res.distance_after**2 == pytest.approx(d2, rel=1e-5)
    # Deterministic for a seed; the result is a local optimum: restarting from it changes nothing.
    assert weight_matching(a, b, spec, seed=0).perm == res.perm
    again = weight_matching(a, b, spec, seed=5, init=res.perm)
    assert again.perm == res.perm and again.sweeps == 1
    other = weight_matching(a, b, spec, seed=1)  # may differ; must still be no worse than naive
    assert other.distance_after <= other.distance_before
    js = res.to_json()
    assert js["method"] == "weight" and js["objective"] == res.objective and "perm" not in js


def test_weight_matching_conv_two_random_inits() -> None:
    a, b = params_of(tiny_convnet(0)), params_of(tiny_convnet(1))
    res = weight_matching(a, b, TINY_SPEC, seed=3)
    assert res.distance_after < res.distance_before
    obj = [res.info["objective_init"], *res.objective]
    assert all(y >= x - 1e-6 * abs(x) for x, y in zip(obj, obj[1:]))


def test_cost_matrix_and_coordinate_step_against_brute_force() -> None:
    """Tiny MLP (hidden 4, 3): ⟨S_P, P⟩ + const == J for every P of one group, others fixed; step = argmax."""
    hidden = (4, 3)
    spec = mlp_spec(hidden)
    a, b = params_of(mlp(hidden, seed=0)), params_of(mlp(hidden, seed=1))
    gen = torch.Generator().manual_seed(7)
    for target in ("P_0", "P_1"):
        fixed = Permutation.random(spec, gen)
        size = spec.group(target).size
        matcher = _WeightMatcher(a, b, spec, dict(fixed.perms), lambda _n: 1.0, torch.device("cpu"))
        s = matcher.cost(target).double()
        brute: dict[tuple[int, ...], float] = {}
        for q in itertools.permutations(range(size)):
            trial = Permutation({**fixed.perms, target: torch.tensor(q)})
            brute[q] = spec_objective(a, trial.apply(b, spec), spec)
        # J(P) − ⟨S_P, P⟩ is the same constant for every P (the tensors not touching the group).
        consts = [brute[q] - float(s[torch.arange(size), torch.tensor(q)].sum()) for q in brute]
        assert max(consts) - min(consts) < 1e-5
        best = max(brute, key=brute.__getitem__)
        assert tuple(solve_assignment(matcher.cost(target)).tolist()) == best
        # Same through the public API: a one-group spec with the other groups pre-applied to B.
        others = PermutationSpec(tuple(g for g in spec.groups if g.name != target))
        b_fixed = Permutation({k: v for k, v in fixed.perms.items() if k != target}).apply(b, others)
        one = PermutationSpec((spec.group(target),))
        res = weight_matching(a, b_fixed, one, seed=0)
        assert tuple(res.perm[target].tolist()) == best
        assert res.objective[-1] == pytest.approx(spec_objective(a, res.perm.apply(b_fixed, one), one), rel=1e-6)


def test_permuted_model_computes_same_function() -> None:
    for model_a, model_b, spec, x in [
        (mlp((16, 12)), mlp((16, 12), seed=1), mlp_spec((16, 12)), torch.randn(20, 1, 1, 6)),
        (tiny_convnet(0), tiny_convnet(1), TINY_SPEC, torch.randn(20, 2, 4, 4)),
    ]:
        res = weight_matching(params_of(model_a), params_of(model_b), spec)
        assert not res.perm.is_identity()
        aligned = load(model_b, res.perm.apply(params_of(model_b), spec))
        for train in (False, True):
            model_b.train(train)
            aligned.train(train)
            with torch.no_grad():
                torch.testing.assert_close(aligned(x), model_b(x), atol=1e-5, rtol=1e-5)


def test_weight_matching_weights_and_init_validation() -> None:
    spec = TINY_SPEC
    a, b = params_of(tiny_convnet(0)), params_of(tiny_convnet(1))
    no_buffers = weight_matching(a, b, spec, weights=lambda n: 0.0 if "running" in n else 1.0)
    assert no_buffers.distance_after <= no_buffers.distance_before
    with pytest.raises(lp.SpecError):
        weight_matching(a, b, spec, init=Permutation({"c1": torch.arange(4)}))
    with pytest.raises(lp.SpecError):
        weight_matching({k: v for k, v in a.items() if k != "fc1.bias"}, b, spec)


# ----------------------------------------------------------------------------- activation matching


def _functional_copy(model: nn.Module, spec: PermutationSpec, seed: int) -> tuple[nn.Module, Permutation]:
    pi = Permutation.random(spec, torch.Generator().manual_seed(seed))
    return load(model, pi.apply(params_of(model), spec)), pi


def test_activation_matching_recovers_functional_copy_mlp() -> None:
    hidden = (16, 12, 8)
    spec = mlp_spec(hidden)
    model_a = live_mlp(hidden)
    model_b, pi = _functional_copy(model_a, spec, 1)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 1, 1, 6, generator=gen) for _ in range(4)]
    for statistic in ("correlation", "inner"):
        res = activation_matching(model_a, model_b, spec, batches, statistic=statistic, capture=hook_capture)
        assert res.perm == pi.inverse(), statistic
        assert_params_equal(res.perm.apply(params_of(model_b), spec), params_of(model_a))
        assert res.distance_after == 0.0 and res.sweeps == 1 and res.method == "activation"
    res = activation_matching(model_a, model_b, spec, batches, capture=hook_capture, max_batches=2)
    assert res.info["batches"] == 2
    assert res.objective[0] == pytest.approx(sum(hidden), rel=1e-6)  # every matched correlation is 1


def test_activation_matching_recovers_functional_copy_conv() -> None:
    model_a = tiny_convnet(0)
    model_b, pi = _functional_copy(model_a, TINY_SPEC, 2)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 2, 4, 4, generator=gen), torch.zeros(32)) for _ in range(3)]
    model_a.train()
    model_b.eval()
    res = activation_matching(model_a, model_b, TINY_SPEC, batches, capture=hook_capture)
    assert model_a.training and not model_b.training  # modes restored
    assert res.perm == pi.inverse()
    assert res.info["rows"]["c1"] == 3 * 32 * 16  # N·H·W rows per group
    with pytest.raises(ValueError, match="statistic"):
        activation_matching(model_a, model_b, TINY_SPEC, batches, statistic="cosine", capture=hook_capture)


def test_align_dispatch() -> None:
    hidden = (8, 6)
    spec = mlp_spec(hidden)
    model_a = live_mlp(hidden)
    model_b, pi = _functional_copy(model_a, spec, 3)
    assert align(params_of(model_a), params_of(model_b), spec).perm == pi.inverse()
    assert align(model_a, model_b, spec, method="weight").perm == pi.inverse()
    batches = [torch.randn(64, 1, 1, 6)]
    res = align(
        params_of(model_a),
        params_of(model_b),
        spec,
        method="activation",
        model=mlp(hidden, seed=9),
        batches=batches,
        capture=hook_capture,
    )
    assert res.perm == pi.inverse()
    with pytest.raises(ValueError, match="valid methods: weight, activation, ste, sinkhorn"):
        align(model_a, model_b, spec, method="no_such_method")
    with pytest.raises(ValueError, match="STE needs model="):
        align(model_a, model_b, spec, method="ste")
    assert METHODS == ("weight", "activation", "ste", "sinkhorn")


# ------------------------------------------------------------------------ derived specs (torch.fx)

ZOO = [
    ("resnet20", {"width": 1, "norm": "layernorm"}, (3, 32, 32)),
    ("resnet20", {"width": 1, "norm": "batchnorm"}, (3, 32, 32)),
    ("vgg11", {"width": 1, "norm": "layernorm"}, (3, 32, 32)),
]


def _zoo_model(name: str, opts: dict, shape: tuple[int, int, int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = build_model(name, input_shape=shape, num_classes=10, **opts)
    with torch.no_grad():  # random BN statistics / affine so every tensor carries information
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_()
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.mark.parametrize("name,opts,shape", ZOO, ids=[f"{n}-{o['norm']}" for n, o, _ in ZOO])
def test_weight_matching_recovers_known_permutation_zoo(name: str, opts: dict, shape: tuple[int, int, int]) -> None:
    model = _zoo_model(name, opts, shape, 0)
    spec = lp.derive_spec(model, torch.randn(2, *shape))
    _check_recovers(params_of(model), spec)


def test_weight_matching_resnet20_function_and_distance() -> None:
    shape = (3, 16, 16)
    model_a = _zoo_model("resnet20", {"width": 1, "norm": "batchnorm"}, shape, 0)
    model_b = _zoo_model("resnet20", {"width": 1, "norm": "batchnorm"}, shape, 1)
    spec = lp.derive_spec(model_a, torch.randn(2, *shape))
    res = weight_matching(params_of(model_a), params_of(model_b), spec, seed=0)
    assert res.distance_after < res.distance_before
    obj = [res.info["objective_init"], *res.objective]
    assert all(y >= x - 1e-6 * abs(x) for x, y in zip(obj, obj[1:]))
    aligned = load(model_b, res.perm.apply(params_of(model_b), spec))
    x = torch.randn(4, *shape)
    for train in (False, True):
        model_b.train(train)
        aligned.train(train)
        with torch.no_grad():
            torch.testing.assert_close(aligned(x), model_b(x), atol=1e-4, rtol=1e-4)


def test_activation_matching_recovers_functional_copy_resnet20() -> None:
    shape = (3, 16, 16)  # enough rows (N·H·W) that no channel is dead on all of them: dead units tie
    model_a = _zoo_model("resnet20", {"width": 1, "norm": "layernorm"}, shape, 0)
    spec = lp.derive_spec(model_a, torch.randn(2, *shape))
    model_b, pi = _functional_copy(model_a, spec, 4)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, *shape, generator=gen) for _ in range(2)]
    res = activation_matching(model_a, model_b, spec, batches)
    assert res.perm == pi.inverse()
    assert_params_equal(res.perm.apply(params_of(model_b), spec), params_of(model_a))


def test_weight_matching_group_on_two_axes_of_one_tensor() -> None:
    """h = W0 x; h = h + W1 h; y = W2 h: W1 carries the group on both axes (S_P depends on P itself)."""
    torch.manual_seed(0)
    w = {"w0": torch.randn(8, 5), "b0": torch.randn(8), "w1": torch.randn(8, 8), "w2": torch.randn(3, 8)}
    spec = PermutationSpec(
        (PermGroup("H", 8, (AxisRef("w0", 0), AxisRef("b0", 0), AxisRef("w1", 0), AxisRef("w1", 1), AxisRef("w2", 1))),)
    )

    def f(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x @ p["w0"].T + p["b0"]
        return (h + h @ p["w1"].T) @ p["w2"].T

    _check_recovers(w, spec)  # exact here; in general only a local optimum is guaranteed
    torch.manual_seed(1)
    other = {k: torch.randn_like(v) for k, v in w.items()}
    res = weight_matching(w, other, spec)
    assert res.converged and res.distance_after <= res.distance_before
    obj = [res.info["objective_init"], *res.objective]
    assert all(y >= x - 1e-6 * abs(x) for x, y in zip(obj, obj[1:]))
    x = torch.randn(4, 5)
    torch.testing.assert_close(f(res.perm.apply(other, spec), x), f(other, x))


# Concatenation: h1 = relu(W0 x + b0) (G1), h2 = relu(W1 x + b1) (G2), h3 = relu(W3 [h1; h2] + b3) (G3),
# y = W4 [h3 ⊗ 1₂; h1]: W3's input axis holds G1 at offset 0 and G2 at offset 4; W4's holds G3 in
# blocks of 2 at offset 0 and G1 at offset 12.
CAT_SPEC = PermutationSpec(
    (
        PermGroup("G1", 4, (AxisRef("w0", 0), AxisRef("b0", 0), AxisRef("w3", 1, 1, 0), AxisRef("w4", 1, 1, 12))),
        PermGroup("G2", 3, (AxisRef("w1", 0), AxisRef("b1", 0), AxisRef("w3", 1, 1, 4))),
        PermGroup("G3", 6, (AxisRef("w3", 0), AxisRef("b3", 0), AxisRef("w4", 1, 2, 0))),
    )
)


def cat_params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w0": (4, 5), "b0": (4,), "w1": (3, 5), "b1": (3,), "w3": (6, 7), "b3": (6,), "w4": (2, 16)}
    return {k: torch.randn(*v, generator=gen) for k, v in shapes.items()}


def cat_forward(p: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h1 = torch.relu(x @ p["w0"].T + p["b0"])
    h2 = torch.relu(x @ p["w1"].T + p["b1"])
    h3 = torch.relu(torch.cat([h1, h2], 1) @ p["w3"].T + p["b3"])
    return torch.cat([h3.repeat_interleave(2, 1), h1], 1) @ p["w4"].T


def test_weight_matching_concatenated_axes() -> None:
    CAT_SPEC.check(cat_params(0))
    _check_recovers(cat_params(0), CAT_SPEC)
    a, b = cat_params(0), cat_params(1)
    res = weight_matching(a, b, CAT_SPEC, seed=2)
    assert res.distance_after < res.distance_before
    obj = [res.info["objective_init"], *res.objective]
    assert all(y >= x - 1e-6 * abs(x) for x, y in zip(obj, obj[1:]))
    assert res.objective[-1] == pytest.approx(spec_objective(a, res.perm.apply(b, CAT_SPEC), CAT_SPEC), rel=1e-6)
    x = torch.randn(8, 5)
    torch.testing.assert_close(cat_forward(res.perm.apply(b, CAT_SPEC), x), cat_forward(b, x))
    # The cost matrix is the objective's linear part in each group, offsets and blocks included.
    gen = torch.Generator().manual_seed(5)
    for g in CAT_SPEC.groups:
        fixed = Permutation.random(CAT_SPEC, gen)
        matcher = _WeightMatcher(a, b, CAT_SPEC, dict(fixed.perms), lambda _n: 1.0, torch.device("cpu"))
        s = matcher.cost(g.name).double()
        brute = {
            q: spec_objective(a, Permutation({**fixed.perms, g.name: torch.tensor(q)}).apply(b, CAT_SPEC), CAT_SPEC)
            for q in itertools.permutations(range(g.size))
        }
        consts = [v - float(s[torch.arange(g.size), torch.tensor(q)].sum()) for q, v in brute.items()]
        assert max(consts) - min(consts) < 1e-4
        assert tuple(solve_assignment(s).tolist()) == max(brute, key=brute.__getitem__)


@pytest.mark.parametrize("case", ["tiny", "cat"])
def test_incremental_caches_match_full_permutation(case: str) -> None:
    """After any sequence of group changes, every cached B̃ and J equal those of a fresh full apply."""
    spec = TINY_SPEC if case == "tiny" else CAT_SPEC
    a, b = (
        (params_of(tiny_convnet(0)), params_of(tiny_convnet(1))) if case == "tiny" else (cat_params(0), cat_params(1))
    )
    gen = torch.Generator().manual_seed(0)
    matcher = _WeightMatcher(a, b, spec, dict(Permutation.identity(spec).perms), lambda _n: 1.0, torch.device("cpu"))
    for step in range(12):
        g = spec.groups[step % len(spec.groups)]
        matcher.set_perm(g.name, torch.randperm(g.size, generator=gen))
        current = Permutation(matcher.perm)
        fresh = _WeightMatcher(a, b, spec, dict(current.perms), lambda _n: 1.0, torch.device("cpu"))
        for key, cached in matcher.b_cache.items():
            assert torch.equal(cached, fresh.b_cache[key]), key
        assert matcher.objective() == pytest.approx(spec_objective(a, current.apply(b, spec), spec), rel=1e-6)
