"""K-model alignment (pairwise, MergeMany, STE-MM) and two-model STE on synthetic populations, the
straight-through gradient, the mixing-weight draws, determinism and input checks.

A synthetic population is K random permutations σ_i of one model plus tiny noise: the joint alignment
into model 0's frame is known, π_i = σ_0 ∘ σ_i⁻¹, and the aligned members are all ≈ σ_0(θ).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmclab.align import (
    MIXINGS,
    PopulationAlignment,
    align_population,
    merge_many,
    ste_matching,
    ste_mm,
    straight_through,
)
from lmclab.align.ste import STELoop, mixture_loss
from lmclab.align.ste_mm import mixing_draw
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.models import build_model
from lmclab.paths import all_pairs_barriers
from lmclab.permutation import Permutation, derive_spec
from lmclab.points import distance

K = 4
NOISE = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def population(base: dict[str, torch.Tensor], spec, k: int, seed: int) -> tuple[list[dict], list[Permutation]]:
    """θ_i = σ_i(θ) + N(0, NOISE²) on floating tensors; returns the points and the σ_i."""
    gen = torch.Generator().manual_seed(seed)
    sigmas = [Permutation.random(spec, gen) for _ in range(k)]
    points = []
    for s in sigmas:
        p = s.apply(base, spec)
        points.append(
            {
                n: v + NOISE * torch.randn(v.shape, generator=gen, dtype=v.dtype)
                if v.is_floating_point()
                else v.clone()
                for n, v in p.items()
            }
        )
    return points, sigmas


def expected_perms(sigmas: list[Permutation]) -> list[Permutation]:
    """π_i = σ_0 ∘ σ_i⁻¹ (so π_i(θ_i) ≈ σ_0(θ) and π_0 = identity)."""
    return [sigmas[0].compose(s.inverse()) for s in sigmas]


def max_pair_distance(points: list[dict[str, torch.Tensor]]) -> float:
    return max(distance(points[i], points[j]) for i in range(len(points)) for j in range(i + 1, len(points)))


def noise_scale(base: dict[str, torch.Tensor]) -> float:
    """Expected ‖ε_i − ε_j‖ for two members' noises."""
    n = sum(v.numel() for v in base.values() if v.is_floating_point())
    return NOISE * math.sqrt(2 * n)


def toy_data(n: int, shape: tuple[int, int, int], seed: int) -> DeviceDataset:
    gen = torch.Generator().manual_seed(seed)
    info = DatasetInfo("toy", 10, shape, (0.5,) * shape[0], (0.25,) * shape[0], False, tuple("abcdefghij"), "test")
    return DeviceDataset(
        torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8),
        torch.randint(0, 10, (n,), generator=gen),
        info,
    )


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def mnist(shared_data) -> tuple[DeviceDataset, DeviceDataset]:
    train = DeviceDataset.load("mnist", "train", data_dir=shared_data, subset=256, progress=False, download=False)
    val = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=256, progress=False, download=False)
    return train, val


@pytest.fixture(scope="module")
def mlp_setup(mnist):
    """A briefly trained MLP 784-32-24-10 (so that unaligned averages have a real loss barrier), its spec,
    and a K-member synthetic population with the known alignment."""
    train, _ = mnist
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=[32, 24])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        x, y = train.batch(torch.randint(0, len(train), (64,), generator=gen))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    spec = derive_spec(model, torch.zeros(2, 1, 28, 28))
    base = state_of(model)
    points, sigmas = population(base, spec, K, seed=1)
    return model, spec, base, points, sigmas


def check_joint_alignment(result: PopulationAlignment, points, sigmas, base) -> None:
    assert result.k == len(points)
    assert result.perms[0].is_identity()
    assert result.perms == expected_perms(sigmas)
    aligned = result.aligned(points)
    assert max_pair_distance(aligned) < 4 * noise_scale(base)
    assert max_pair_distance(points) > 100 * noise_scale(base)  # the members really were scattered


# ---------------------------------------------------------------------------------- joint alignment


@pytest.mark.parametrize("method", ["pairwise", "merge_many", "ste_mm"])
def test_methods_recover_joint_alignment_mlp(method: str, mlp_setup, mnist) -> None:
    model, spec, base, points, sigmas = mlp_setup
    train, val = mnist
    kw = (
        dict(model=model, data=train, epochs=2, batch_size=64, progress=False, val_data=val)
        if method == "ste_mm"
        else {}
    )
    result = align_population(points, spec, method, **kw)
    assert result.method == method
    check_joint_alignment(result, points, sigmas, base)
    aligned = result.aligned(points)
    report = all_pairs_barriers(
        model,
        aligned,
        {"val": val},
        lambdas=np.linspace(0, 1, 9).tolist(),
        to_merged=True,
        metrics=("loss",),
        progress=False,
    )
    barriers = [r["barrier"] for r in report.pairs + report.to_merged]
    assert len(report.pairs) == K * (K - 1) // 2 and max(barriers) < 1e-3
    naive = all_pairs_barriers(
        model,
        points[:2],
        {"val": val},
        lambdas=np.linspace(0, 1, 9).tolist(),
        to_merged=False,
        metrics=("loss",),
        progress=False,
    )
    assert naive.pairs[0]["barrier"] > 0.1  # the check above can fail


def test_merge_many_info_frame_and_determinism(mlp_setup) -> None:
    _, spec, base, points, sigmas = mlp_setup
    a = merge_many(points, spec, seed=3)
    b = merge_many(points, spec, seed=3)
    assert a.perms == b.perms and a.info["objective"] == b.info["objective"]
    assert a.info["converged"] and a.info["rounds"] == len(a.info["objective"]) >= 2
    assert a.info["changes_per_round"][-1] == 0
    # the reported objective is the spread Σ_i ‖π_i(θ_i) − θ̄‖², here only noise (≈ (K−1)·σ²·n)
    aligned = a.aligned(points)
    merged = a.merged(points)
    spread = sum(distance(p, merged, keys=spec.axes_by_tensor()) ** 2 for p in aligned)
    assert a.info["objective"][-1] == pytest.approx(spread, rel=1e-6)
    one = merge_many(points, spec, seed=3, max_rounds=1)
    assert one.info["rounds"] == 1 and not one.info["converged"]


def test_ste_matching_two_models(mlp_setup, mnist) -> None:
    model, spec, base, points, sigmas = mlp_setup
    train, val = mnist
    for lam in ("half", "random"):
        res = ste_matching(
            points[0],
            points[1],
            spec,
            model=model,
            data=train,
            epochs=1,
            batch_size=64,
            lam=lam,
            progress=False,
            val_data=val,
        )
        assert res.method == "ste" and res.perm == expected_perms(sigmas)[1]
        assert res.distance_after < 4 * noise_scale(base) < res.distance_before
        assert res.info["lam"] == lam and "val_loss" in res.info["epochs"][0]
        permuted = res.perm.apply(points[1], spec)
        objective = sum(float((points[0][t].double() * permuted[t].double()).sum()) for t in spec.axes_by_tensor())
        assert res.objective == [pytest.approx(objective, rel=1e-9)]


def test_ste_mm_is_deterministic_and_records_info(mlp_setup, mnist) -> None:
    model, spec, _, points, _ = mlp_setup
    train, val = mnist
    runs = [
        ste_mm(
            points[:3],
            spec,
            model=model,
            data=train,
            epochs=2,
            batch_size=128,
            mixing=mixing,
            seed=5,
            progress=False,
            val_data=val,
        )
        for mixing in ("dirichlet", "dirichlet", "uniform")
    ]
    a, b, c = runs
    assert a.perms == b.perms
    assert [e["train_loss"] for e in a.info["epochs"]] == [e["train_loss"] for e in b.info["epochs"]]
    assert [e["val_loss"] for e in a.info["epochs"]] == [e["val_loss"] for e in b.info["epochs"]]
    assert [e["train_loss"] for e in a.info["epochs"]] != [e["train_loss"] for e in c.info["epochs"]]
    info = a.info
    assert len(info["epochs"]) == 2 and info["steps_per_epoch"] == 2 and info["selected_by"] == "val_loss"
    assert info["best_epoch"] == min(info["epochs"], key=lambda e: e["val_loss"])["epoch"]
    assert all(e["seconds"] >= e["match_seconds"] >= 0 for e in info["epochs"])
    assert info["solver"]["warm"] > 0 and info["mixing"] == "dirichlet"
    last = ste_mm(points[:3], spec, model=model, data=train, epochs=1, batch_size=128, progress=False)
    assert last.info["selected_by"] == "last" and "val_loss" not in last.info["epochs"][0]


def test_ste_mm_does_not_modify_its_inputs(mlp_setup, mnist) -> None:
    model, spec, _, points, _ = mlp_setup
    before = [state_of_dict(p) for p in points[:3]]
    model_before = state_of(model)
    ste_mm(points[:3], spec, model=model, data=mnist[0], epochs=1, batch_size=128, progress=False)
    for p, q in zip(points[:3], before):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert all(torch.equal(v, model_before[k]) for k, v in model.state_dict().items())


def state_of_dict(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in p.items()}


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_methods_recover_joint_alignment_resnet20(norm: str) -> None:
    """A tiny ResNet-20 (8×8 inputs, random weights; with BN the running statistics are permuted too and the
    mixture runs on batch statistics, the held-out check resets them)."""
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 8, 8), num_classes=10, width=1, norm=norm)
    spec = derive_spec(model, torch.zeros(2, 3, 8, 8))
    base = state_of(model)
    points, sigmas = population(base, spec, 3, seed=2)
    before = [state_of_dict(p) for p in points]
    data, val = toy_data(64, (3, 8, 8), 0), toy_data(32, (3, 8, 8), 1)
    for method, kw in (
        ("pairwise", {}),
        ("merge_many", {}),
        ("ste_mm", dict(model=model, data=data, epochs=1, batch_size=32, progress=False, val_data=val)),
    ):
        check_joint_alignment(align_population(points, spec, method, **kw), points, sigmas, base)
    for p, q in zip(points, before):  # BN buffers untouched by the train-mode forward
        assert all(torch.equal(p[k], q[k]) for k in p)


# ------------------------------------------------------------------------------ straight-through gradient


def _tiny_mlp_forward(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """lmclab's MLP written out by hand: flatten → (linear → ReLU) × 2 → head."""
    h = x.flatten(1)
    for i in range(2):
        h = torch.relu(h @ theta[f"layers.{i}.linear.weight"].T + theta[f"layers.{i}.linear.bias"])
    return h @ theta["head.weight"].T + theta["head.bias"]


def test_straight_through_gradient_reaches_the_proxies() -> None:
    """∂L/∂θ̃_i from the STE mixture equals w_i ∇L(θ_mix) = ∂L/∂P_i (autograd on P_i through an independent,
    hand-written forward) and the central finite difference of L along P_i; the loss value is L at the
    mixture of the projected weights, whatever the proxies hold."""
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(1, 1, 6), num_classes=3, hidden=[5, 4]).double()
    names = [n for n, _ in model.named_parameters()]
    rand = lambda: {n: torch.randn_like(p, dtype=torch.float64) for n, p in model.named_parameters()}  # noqa: E731
    a, p1, p2 = rand(), rand(), rand()
    proxies = [{n: t.clone().requires_grad_(True) for n, t in rand().items()} for _ in range(2)]
    w = [0.2, 0.5, 0.3]
    x = torch.randn(16, 1, 1, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    loss = mixture_loss(model, [a, straight_through(p1, proxies[0]), straight_through(p2, proxies[1])], w, x, y)
    loss.backward()

    def hand_loss(q1: dict[str, torch.Tensor], q2: dict[str, torch.Tensor]) -> torch.Tensor:
        mix = {n: w[0] * a[n] + w[1] * q1[n] + w[2] * q2[n] for n in names}
        return F.cross_entropy(_tiny_mlp_forward(mix, x), y)

    leaves = [{n: t.clone().requires_grad_(True) for n, t in p.items()} for p in (p1, p2)]
    direct = hand_loss(*leaves)
    direct.backward()
    assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
    mix_leaf = {n: (w[0] * a[n] + w[1] * p1[n] + w[2] * p2[n]).requires_grad_(True) for n in names}
    F.cross_entropy(_tiny_mlp_forward(mix_leaf, x), y).backward()
    for i, (proxy, leaf) in enumerate(zip(proxies, leaves)):
        for n in names:
            torch.testing.assert_close(proxy[n].grad, leaf[n].grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(proxy[n].grad, w[i + 1] * mix_leaf[n].grad, rtol=1e-10, atol=1e-12)
    d = rand()
    h = 1e-6
    with torch.no_grad():
        fd = (
            hand_loss({n: p1[n] + h * d[n] for n in names}, p2) - hand_loss({n: p1[n] - h * d[n] for n in names}, p2)
        ) / (2 * h)
    directional = sum(float((proxies[0][n].grad * d[n]).sum()) for n in names)
    assert directional == pytest.approx(float(fd), rel=1e-6)


def test_ste_loop_step_moves_every_proxy(mlp_setup, mnist) -> None:
    model, spec, _, points, _ = mlp_setup
    loop = STELoop(
        points[0], points[1:3], spec, model, draw=mixing_draw(3), lr=1e-3, seed=0, device=torch.device("cpu")
    )
    x, y = mnist[0].batch(torch.arange(32))
    loss = loop.step(x, y)
    assert math.isfinite(loss)
    for proxy in loop.proxies:
        for n, t in proxy.items():
            assert t.grad is not None and bool((t.grad != 0).any())
            assert bool(((t.detach() - points[0][n]).abs() > 1e-4).any())  # Adam moved it by ≈ lr


# --------------------------------------------------------------------------------------- mixing draws


def test_mixing_draws_follow_their_distributions() -> None:
    rng = np.random.default_rng(0)
    for mixing in MIXINGS:
        draw = mixing_draw(4, mixing)
        w = np.stack([draw(rng) for _ in range(4000)])
        assert w.shape == (4000, 4) and (w >= 0).all() and np.allclose(w.sum(1), 1.0)
        assert np.allclose(w.mean(0), 0.25, atol=0.01)  # exchangeable: mean 1/K
    # Dirichlet(α·1), K = 3: Var w_k = (1/K)(1 − 1/K)/(Kα + 1)
    alpha = 0.5
    w = np.stack([mixing_draw(3, "dirichlet", alpha)(rng) for _ in range(20000)])
    assert w[:, 0].var() == pytest.approx((1 / 3) * (2 / 3) / (3 * alpha + 1), rel=0.05)
    # rescaled uniform, K = 2: P(w_1 ≤ t) = t / (2(1 − t)) for t ≤ ½ (not λ ~ U(0, 1))
    w = np.stack([mixing_draw(2, "uniform")(rng) for _ in range(20000)])
    assert (w[:, 1] <= 0.25).mean() == pytest.approx(0.25 / 1.5, abs=0.01)


# -------------------------------------------------------------------------------------------- errors


def test_bad_arguments_are_rejected(mlp_setup, mnist) -> None:
    model, spec, _, points, _ = mlp_setup
    train = mnist[0]
    with pytest.raises(ValueError, match="at least 2"):
        ste_mm(points[:1], spec, model=model, data=train, progress=False)
    with pytest.raises(ValueError, match="unknown mixing"):
        ste_mm(points[:2], spec, model=model, data=train, mixing="softmax", progress=False)
    with pytest.raises(ValueError, match="dirichlet_alpha"):
        ste_mm(points[:2], spec, model=model, data=train, mixing="dirichlet", dirichlet_alpha=0.0, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        ste_mm(points[:2], spec, model=model, data=train, epochs=0, progress=False)
    with pytest.raises(ValueError, match="DeviceDataset"):
        ste_mm(points[:2], spec, model=model, data=[(torch.zeros(1), torch.zeros(1))], progress=False)
    with pytest.raises(ValueError, match="unknown lam"):
        ste_matching(points[0], points[1], spec, model=model, data=train, lam="third", progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        merge_many(points[:1], spec)
    with pytest.raises(ValueError, match="init"):
        merge_many(points, spec, init=None)
    other = copy.deepcopy(points[1])
    other["head.weight"] = other["head.weight"][:, :5]
    with pytest.raises(ValueError, match="shapes"):
        ste_mm([points[0], other], spec, model=model, data=train, progress=False)
