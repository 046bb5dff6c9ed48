"""C2M3 (cycle-consistent merging through a universe) and the cycle error of pairwise maps.

Checks: the cycle error of hand-made maps against the exact expected fractions; joint alignments
(C2M3, MergeMany, pairwise to a reference) exactly consistent, direct pairwise weight matching not;
C2M3's permutations exact symmetries (f(π(θ)) = f(θ)); the Frank–Wolfe pieces against independent
computations (gradient vs central differences of F, the line polynomial vs F evaluated on the line,
the step vs a brute-force grid), monotone iterations, and K = 2 against weight matching.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import numpy.polynomial.polynomial as P
import pytest
import torch

from lmclab.align import POPULATION_METHODS, align_population, weight_matching
from lmclab.align.c2m3 import C2M3Problem, best_step, c2m3, merged_in_basis
from lmclab.align.cycle import (
    CycleConsistency,
    alignment_cycle_consistency,
    cycle_consistency,
    direct_pairwise_maps,
    map_between,
    pairwise_maps,
)
from lmclab.models import build_model
from lmclab.permutation import Permutation, derive_spec, verify_permutation
from lmclab.points import distance

SHAPE = (1, 6, 6)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mlp(seed: int, hidden=(12, 10, 8)) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_shape=SHAPE, num_classes=5, hidden=hidden)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def random_mlps():
    models = [mlp(s) for s in range(4)]
    spec = derive_spec(models[0], torch.randn(2, *SHAPE))
    return models, spec, [state(m) for m in models]


# ------------------------------------------------------------------------------------------ cycle error


def perm(*idx: int) -> torch.Tensor:
    return torch.tensor(idx)


def test_hand_made_triple_gives_exact_fraction():
    # group a (4 units): π_01 = id, π_12 = id, π_02 = swap(0, 1) → the cycle moves units 0, 1: 2/4.
    # group b (8 units): π_01 = 3-cycle on (0, 1, 2), others id → 3/8 moved. Overall (2 + 3)/12.
    ident_a, ident_b = torch.arange(4), torch.arange(8)
    three = perm(1, 2, 0, 3, 4, 5, 6, 7)
    maps = {
        (0, 1): Permutation({"a": ident_a, "b": three}),
        (1, 2): Permutation({"a": ident_a, "b": ident_b}),
        (0, 2): Permutation({"a": perm(1, 0, 2, 3), "b": ident_b}),
    }
    cc = cycle_consistency(maps, 3)
    assert cc.per_group() == {"a": 0.5, "b": 3 / 8}
    assert cc.overall == pytest.approx(5 / 12, abs=0)
    assert cc.summary() == {"k": 3, "triples": 1, "overall": 5 / 12, "groups": {"a": 0.5, "b": 3 / 8}}
    again = CycleConsistency.from_json(json.loads(json.dumps(cc.to_json())))
    assert again == cc and again.summary() == cc.summary()


def test_mean_over_triples_and_restriction():
    # 4 models, one group of 4: only the map between 2 and 3 breaks consistency (a swap), so the
    # triples (0, 2, 3) and (1, 2, 3) have error 2/4, the two others 0: mean 1/4; first 3: 0.
    ident = torch.arange(4)
    maps = {(i, j): Permutation({"g": ident}) for i in range(4) for j in range(i + 1, 4)}
    maps[(2, 3)] = Permutation({"g": perm(1, 0, 2, 3)})
    cc = cycle_consistency(maps, 4)
    assert [t.triple for t in cc.triples] == [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
    assert [t.overall for t in cc.triples] == [0.0, 0.0, 0.5, 0.5]
    assert cc.overall == 0.25
    assert cc.first(3).overall == 0.0 and len(cc.first(3).triples) == 1
    assert cycle_consistency(maps, 2).overall is None  # K < 3: no triples, said so
    assert map_between(maps, 3, 2) == maps[(2, 3)].inverse()
    with pytest.raises(ValueError, match="itself"):
        map_between(maps, 1, 1)


def test_pairwise_maps_align_j_to_i_for_exact_copies(random_mlps):
    """Members θ_i = σ_i(θ): every method's map π_ij takes θ_j exactly onto θ_i."""
    models, spec, _ = random_mlps
    base = state(models[0])
    gen = torch.Generator().manual_seed(3)
    sigmas = [Permutation.random(spec, gen) for _ in range(4)]
    points = [s.apply(base, spec) for s in sigmas]
    for method in ("c2m3", "merge_many", "pairwise"):
        maps = pairwise_maps(align_population(points, spec, method))
        for (i, j), p in maps.items():
            assert distance(p.apply(points[j], spec), points[i]) == 0.0, (method, i, j)
    direct = direct_pairwise_maps(points, spec)  # weight matching finds exact copies: consistent too
    for (i, j), p in direct.items():
        assert distance(p.apply(points[j], spec), points[i]) == 0.0, ("direct", i, j)
    assert cycle_consistency(direct, 4).overall == 0.0


def test_joint_methods_consistent_direct_maps_not(random_mlps):
    _, spec, points = random_mlps
    for method in ("c2m3", "merge_many", "pairwise"):
        cc = alignment_cycle_consistency(align_population(points, spec, method))
        assert cc.overall == 0.0 and set(cc.per_group().values()) == {0.0}, method
    direct = cycle_consistency(direct_pairwise_maps(points, spec), 4)
    assert direct.overall is not None and direct.overall > 0.1
    assert len(direct.triples) == 4


# --------------------------------------------------------------------------------------------- C2M3


def test_c2m3_registered():
    entry = POPULATION_METHODS["c2m3"]
    assert entry.title == "C2M3" and entry.needs == () and "seed" in entry.accepts


@pytest.mark.parametrize("init", ["pairwise", "identity"])
def test_c2m3_permutations_are_symmetries_and_cycle_consistent(random_mlps, init):
    models, spec, points = random_mlps
    result = c2m3(points, spec, init=init)
    assert result.perms[0].is_identity() and result.k == 4
    x = torch.randn(8, *SHAPE)
    for model, p in zip(models, result.perms):
        verify_permutation(model, p, spec, example_input=x)
    assert alignment_cycle_consistency(result).overall == 0.0
    # the projected objective is F at the returned permutations, recomputed independently
    problem = C2M3Problem(points, spec, device=torch.device("cpu"), dtype=torch.float64)
    aligned = result.aligned(points)
    names = list(problem.refs)
    pairs = sum(
        float(torch.sum(aligned[i][t].double() * aligned[j][t].double()))
        for i in range(4)
        for j in range(i + 1, 4)
        for t in names
    )
    assert result.info["objective_projected"] == pytest.approx(pairs, rel=1e-12)


def test_c2m3_on_conv_net_with_blocks():
    """VGG-style conv net: conv weights with two permuted axes, a flatten with blocks; still exact symmetries."""
    models = []
    for s in range(3):
        torch.manual_seed(s)
        models.append(build_model("resnet20", input_shape=(3, 8, 8), num_classes=4, width=1, norm="layernorm"))
    x = torch.randn(2, 3, 8, 8)
    spec = derive_spec(models[0], x)
    points = [state(m) for m in models]
    result = c2m3(points, spec, max_iter=5)
    for model, p in zip(models, result.perms):
        verify_permutation(model, p, spec, example_input=x)
    objective = result.info["objective"]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(objective, objective[1:]))
    assert alignment_cycle_consistency(result).overall == 0.0


def test_frank_wolfe_objective_non_decreasing(random_mlps):
    _, spec, points = random_mlps
    result = c2m3(points, spec, init="identity", max_iter=50)
    objective, steps = result.info["objective"], result.info["step"]
    assert len(objective) >= 3  # several iterations ran
    assert all(b >= a - 1e-12 * abs(a) for a, b in zip(objective, objective[1:]))
    assert objective[-1] > objective[0]
    assert all(0.0 < g <= 1.0 for g in steps)
    assert all(g >= -1e-9 for g in result.info["gap"])


def test_k2_equals_weight_matching(random_mlps):
    _, spec, points = random_mlps
    for seed in (0, 1):
        wm = weight_matching(points[0], points[1], spec, seed=seed)
        result = c2m3(points[:2], spec, seed=seed)
        assert result.perms[1] == wm.perm
        assert result.info["objective_projected"] == pytest.approx(wm.objective[-1], rel=1e-6)  # WM sums in float32
        # from the identity: at least as good as weight matching, up to a small tolerance
        ident = c2m3(points[:2], spec, init="identity")
        assert ident.info["objective_projected"] >= wm.objective[-1] - 0.05 * abs(wm.objective[-1])


def random_doubly_stochastic(n: int, gen: torch.Generator) -> torch.Tensor:
    """A convex combination of 3 random permutation matrices."""
    w = torch.rand(3, generator=gen, dtype=torch.float64)
    w /= w.sum()
    return sum(wi * torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)] for wi in w)


@pytest.fixture(scope="module")
def relaxed(random_mlps):
    """A C2M3 problem on 3 random MLPs at random doubly-stochastic P (P_0 = I) and random vertices Q."""
    _, spec, points = random_mlps
    problem = C2M3Problem(points[:3], spec, device=torch.device("cpu"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(7)
    mats = [problem.identity()] + [
        {g.name: random_doubly_stochastic(g.size, gen) for g in spec.groups} for _ in range(2)
    ]
    targets = {i: {g.name: torch.randperm(g.size, generator=gen) for g in spec.groups} for i in (1, 2)}
    return problem, mats, targets


def along(mats, targets, gamma):
    out = []
    for i, m in enumerate(mats):
        if i not in targets:
            out.append(m)
            continue
        out.append({g: (1 - gamma) * p + gamma * torch.eye(len(p), dtype=p.dtype)[targets[i][g]] for g, p in m.items()})
    return out


def test_gradient_matches_central_differences(relaxed):
    problem, mats, _ = relaxed
    grads = problem.gradients(mats, [1, 2])
    gen = torch.Generator().manual_seed(1)
    for i in (1, 2):
        for g, grad in grads[i].items():
            e = torch.randn(grad.shape, generator=gen, dtype=torch.float64)
            h = 1e-3
            plus = [dict(m) for m in mats]
            minus = [dict(m) for m in mats]
            plus[i][g] = mats[i][g] + h * e
            minus[i][g] = mats[i][g] - h * e
            fd = (problem.objective(plus) - problem.objective(minus)) / (2 * h)
            assert float((grad * e).sum()) == pytest.approx(fd, rel=1e-7, abs=1e-9)


def test_line_polynomial_and_step_match_brute_force(relaxed):
    problem, mats, targets = relaxed
    expansion = problem.expand(mats, targets)
    coeffs = problem.line(expansion)
    for gamma in (0.0, 0.3, 0.77, 1.0):
        direct = problem.objective(along(mats, targets, gamma))
        assert np.polynomial.polynomial.polyval(gamma, coeffs) == pytest.approx(direct, rel=1e-10)
        mapped = problem.at(expansion, gamma)
        again = [problem.mapped(i, m) for i, m in enumerate(along(mats, targets, gamma))]
        assert all(torch.allclose(mapped[i][t], again[i][t], rtol=0, atol=1e-10) for i in range(3) for t in mapped[i])
    gamma, value = best_step(coeffs)
    grid = np.linspace(0, 1, 4001)
    values = [problem.objective(along(mats, targets, g)) for g in grid[::40]]  # F itself, 101 points
    fine = np.polynomial.polynomial.polyval(grid, coeffs)
    assert value >= max(values) - 1e-9 * abs(max(values))
    assert value >= fine.max() - 1e-12 * abs(fine.max())
    assert abs(gamma - grid[fine.argmax()]) <= 1e-3
    assert value == pytest.approx(problem.objective(along(mats, targets, gamma)), rel=1e-10)


@pytest.mark.parametrize(
    ("coeffs", "gamma"),
    [
        ([0.0, 0.6, -1.0], 0.3),  # −(γ − 0.3)² + const: interior maximum
        ([0.0, 1.0], 1.0),
        ([0.0, -1.0], 0.0),
        ([0.0, 0.0, 1.0], 1.0),  # convex: an endpoint
        ([1.0], 0.0),  # constant: ties keep γ = 0
        # f = −(γ−0.2)²(γ−0.9)² + 0.01γ: maxima near 0.2 and 0.9, the right one higher
        (list(P.polyadd(-P.polypow([0.18, -1.1, 1.0], 2), [0, 0.01])), None),
    ],
)
def test_best_step_exact(coeffs, gamma):
    got, value = best_step(coeffs)
    grid = np.linspace(0, 1, 100001)
    vals = np.polynomial.polynomial.polyval(grid, coeffs)
    assert value >= vals.max() - 1e-12
    if gamma is None:
        assert abs(got - grid[vals.argmax()]) < 1e-4 and got > 0.8
    else:
        assert got == pytest.approx(gamma, abs=1e-12)


def test_merged_in_basis(random_mlps):
    models, spec, _ = random_mlps
    base = state(models[0])
    gen = torch.Generator().manual_seed(5)
    sigmas = [Permutation.random(spec, gen) for _ in range(3)]
    points = [s.apply(base, spec) for s in sigmas]
    result = c2m3(points, spec)
    for b in range(3):  # exact copies: the merged model in member b's basis is member b
        assert distance(merged_in_basis(points, result, b), points[b]) < 1e-6
    with pytest.raises(ValueError, match="basis 3"):
        merged_in_basis(points, result, 3)


def test_c2m3_input_checks(random_mlps):
    _, spec, points = random_mlps
    with pytest.raises(ValueError, match="at least 2"):
        c2m3(points[:1], spec)
    with pytest.raises(ValueError, match="init 'random'"):
        c2m3(points, spec, init="random")
    with pytest.raises(ValueError, match="max_iter"):
        c2m3(points, spec, max_iter=-1)
    zero = c2m3(points, spec, max_iter=0)  # no iteration: the start, projected (pairwise weight matching)
    assert zero.info["iterations"] == 0 and not zero.info["converged"]
    assert [p for p in zero.perms] == align_population(points, spec, "pairwise").perms


def test_c2m3_deterministic(random_mlps):
    _, spec, points = random_mlps
    a, b = c2m3(points, spec, init="identity"), c2m3(points, spec, init="identity")
    assert a.perms == b.perms and a.info["objective"] == b.info["objective"]
    assert copy.deepcopy(a.perms) == a.perms


# ------------------------------------------------------------------------------ ito study and `merge`

TINY_ITO = {
    "description": "C2M3 test: a small MLP on 300 MNIST images, K = 3",
    "methods": ["pairwise", "c2m3"],
    "points": 3,
    "k_values": [3],
    "splits": ["test"],
    "c2m3": {"max_iter": 20},
    "trace": {"split": "train", "examples": 50, "probes": 2, "batch_size": 50},
    "settings": [
        {
            "name": "mlp_c2m3",
            "label": "MLP 784-16-16-10",
            "preset": "mlp_mnist",
            "models": 3,
            "eval_examples": 200,
            "overrides": {
                "model": {"hidden": [16, 16]},
                "data": {"train_per_class": 30},
                "train": {"epochs": 1, "batch_size": 50},
            },
        }
    ],
}


def read_csv(path):
    import csv

    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny_ito(tmp_path_factory, quiet_run):
    from lmclab.experiments.context import ExperimentContext
    from lmclab.experiments.ito import EXPERIMENT, ItoOptions
    from lmclab.experiments.settings import parse_preset

    root = tmp_path_factory.mktemp("c2m3")
    options = parse_preset(ItoOptions, TINY_ITO, name="c2m3_test")
    return root, EXPERIMENT.run(options, ExperimentContext(**quiet_run(root)))


def test_ito_study_reports_cycle_errors(tiny_ito):
    _, summary = tiny_ito
    rows = read_csv(summary["files"]["cycle_table"])
    by = {(r["method"], r["maps"], r["group"]): r for r in rows}
    groups = {r["group"] for r in rows} - {"all"}
    assert len(groups) == 2  # the two hidden layers
    for method in ("pairwise", "c2m3"):
        for g in ["all", *groups]:
            row = by[(method, "joint", g)]
            assert float(row["cycle_error"]) == 0.0 and row["triples"] == "1" and row["k"] == "3"
    direct = by[("direct_pairwise", "direct", "all")]
    assert direct["triples"] == "1" and float(direct["cycle_error"]) > 0.0  # 1-epoch MLPs: inconsistent
    alignment = [r for r in read_csv(summary["files"]["alignment_table"]) if r["method"] == "c2m3"]
    assert len(alignment) == 3 and all(float(r["invariance_max_abs_diff"]) < 1e-6 for r in alignment)


def test_cli_merge_reports_cycle_error(tiny_ito, shared_data, capsys):
    from lmclab.cli import main
    from lmclab.store import RunStore

    root, _ = tiny_ito
    runs = RunStore(root / "runs").runs()
    assert len(runs) == 3
    io = ["--runs-dir", str(root / "runs"), "--data-dir", str(shared_data), "--offline", "--device", "cpu"]
    args = ["merge", *(r.hash[:8] for r in runs), "--method", "merge_many", "c2m3", "--points", "3"]
    args += ["--subset", "100", "--out", str(root / "merge"), "--no-progress", *io]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for method in ("merge_many", "c2m3"):
        assert out["cycle_error"][method]["overall"] == 0.0 and out["cycle_error"][method]["triples"] == 1
        assert set(out["merged"][method]["test"]) >= {"loss", "accuracy"}
    assert out["direct_pairwise_cycle_error"]["overall"] > 0.0
    cycle = read_csv(out["files"]["cycle_table"])
    assert {r["method"] for r in cycle} == {"merge_many", "c2m3", "direct_pairwise"}
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "c2m3: merged" in printed and "direct pairwise weight matching" in printed
    with pytest.raises(SystemExit) as exit_info:  # a bad method: exit 2, one line naming it
        main(["merge", runs[0].hash[:8], runs[1].hash[:8], "--method", "c2m4", *io])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "c2m4" in err and "c2m3" in err and err.count("\n") == 1


def test_merge_help_lists_c2m3(capsys):
    from lmclab.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--help"])
    assert exit_info.value.code == 0
    assert "c2m3" in capsys.readouterr().out
