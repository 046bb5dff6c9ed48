"""Sinkhorn re-basin (lmclab.align.sinkhorn): the Sinkhorn projection against its definition and against the
linear assignment, soft permutations against hard ones, the trained method's output as an exact symmetry."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lmclab.align import PAIR_METHODS, align, solve_assignment
from lmclab.align.sinkhorn import (
    harden,
    permutation_matrices,
    sinkhorn,
    sinkhorn_matching,
    soft_apply,
    temperature,
)
from lmclab.cli import build_parser
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.models import build_model
from lmclab.permutation import AxisRef, PermGroup, Permutation, PermutationSpec, derive_spec, verify_permutation

SHAPE = (1, 4, 4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def toy_data(n: int = 64, seed: int = 0) -> DeviceDataset:
    gen = torch.Generator().manual_seed(seed)
    info = DatasetInfo("toy", 3, SHAPE, (0.5,), (0.25,), False, ("a", "b", "c"), "test")
    images = torch.randint(0, 256, (n, *SHAPE), generator=gen, dtype=torch.uint8)
    return DeviceDataset(images, torch.randint(0, 3, (n,), generator=gen), info)


def mlp(seed: int, hidden: tuple[int, ...] = (8, 6)) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", input_shape=SHAPE, num_classes=3, hidden=hidden)


class TinyBNNet(nn.Module):
    """conv(1→4) → BatchNorm → ReLU → flatten (16 entries per channel) → linear: BN buffers and a block axis."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def bn_net(seed: int) -> TinyBNNet:
    torch.manual_seed(seed)
    net = TinyBNNet()
    with torch.no_grad():  # non-trivial running statistics, so that permuting them matters
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    return net


def spec_of(model: nn.Module) -> PermutationSpec:
    return derive_spec(model, torch.zeros(2, *SHAPE))


# ------------------------------------------------------------------------------------ the projection


@pytest.mark.parametrize("tau", [2.0, 1.0, 0.5])
def test_sinkhorn_is_doubly_stochastic(tau: float) -> None:
    scores = torch.randn(7, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = sinkhorn(scores, tau, iters=2000).exp()
    assert torch.allclose(p.sum(0), torch.ones(7, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(p.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-8)
    assert (p > 0).all()
    # the projection is diag(u)·exp(M/τ)·diag(v): log P − M/τ is a sum of a row and a column term
    resid = sinkhorn(scores, tau, iters=2000) - scores / tau
    assert torch.allclose(resid - resid[:, :1] - resid[:1, :] + resid[0, 0], torch.zeros_like(resid), atol=1e-9)


def test_sinkhorn_tends_to_the_linear_assignment_as_tau_goes_to_zero() -> None:
    """With δ the margin between the best and the second-best assignment value (brute force over all 720
    permutations), the projection at τ = δ, δ/5, δ/40 approaches the best permutation matrix, which is
    also what :func:`harden` and scipy's linear assignment return."""
    gen = torch.Generator().manual_seed(1)
    spec = PermutationSpec((PermGroup("g", 6, (AxisRef("w", 0),)),))
    for _ in range(5):
        scores = torch.randn(6, 6, generator=gen, dtype=torch.float64)
        ranked = sorted(itertools.permutations(range(6)), key=lambda p: -float(scores[range(6), list(p)].sum()))
        margin = float(scores[range(6), list(ranked[0])].sum() - scores[range(6), list(ranked[1])].sum())
        hard = nn.functional.one_hot(torch.tensor(ranked[0]), 6).double()
        gaps = [
            float((sinkhorn(scores, tau, iters=5000).exp() - hard).abs().max())
            for tau in (margin, margin / 5, margin / 40)
        ]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3, gaps
        assert harden({"g": scores}, spec)["g"].tolist() == list(ranked[0]) == solve_assignment(scores).tolist()


def test_sinkhorn_and_schedule_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tau"):
        sinkhorn(torch.zeros(2, 2), 0.0)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn(torch.zeros(2, 2), 1.0, 0)
    taus = [temperature(t, 5, 1.0, 0.01) for t in range(5)]
    assert taus[0] == 1.0 and abs(taus[-1] - 0.01) < 1e-12
    assert all(abs(b / a - 0.01**0.25) < 1e-12 for a, b in zip(taus, taus[1:]))


# ------------------------------------------------------------------------------- soft permutations


def _sliced_spec() -> PermutationSpec:
    """Two groups on shared axes: g (3 units) on w's rows and on entries [4, 10) of v's columns (2 each);
    h (2 units) on w's columns and on entries [0, 4) of v's columns (2 each)."""
    return PermutationSpec(
        (
            PermGroup("g", 3, (AxisRef("w", 0), AxisRef("v", 1, block=2, offset=4))),
            PermGroup("h", 2, (AxisRef("w", 1), AxisRef("v", 1, block=2, offset=0))),
        )
    )


def test_a_hard_soft_permutation_reproduces_the_permuted_point_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    spec = _sliced_spec()
    theta = {"w": torch.randn(3, 2, generator=gen), "v": torch.randn(5, 11, generator=gen), "n": torch.arange(4)}
    for _ in range(6):
        perm = Permutation.random(spec, gen)
        soft = soft_apply(theta, spec, permutation_matrices(perm, spec))
        hard = perm.apply(theta, spec)
        assert all(torch.equal(soft[k], hard[k]) for k in theta)
    mlp_a = mlp(0)
    mspec = spec_of(mlp_a)
    perm = Permutation.random(mspec, gen)
    theta = mlp_a.state_dict()
    soft = soft_apply(theta, mspec, permutation_matrices(perm, mspec))
    assert all(torch.equal(soft[k], v) for k, v in perm.apply(theta, mspec).items())


def test_soft_apply_is_linear_in_the_matrices() -> None:
    """π_{αP+(1−α)Q}(θ) = α π_P(θ) + (1 − α) π_Q(θ) for permutation matrices P, Q (one group at a time)."""
    gen = torch.Generator().manual_seed(2)
    spec = _sliced_spec()
    theta = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64), "v": torch.randn(5, 11, generator=gen)}
    theta["v"] = theta["v"].double()
    p, q = Permutation.random(spec, gen), Permutation.random(spec, gen)
    mp, mq = permutation_matrices(p, spec), permutation_matrices(q, spec)
    mixed = {"g": 0.3 * mp["g"] + 0.7 * mq["g"], "h": mp["h"]}
    q_g = Permutation({"g": q["g"], "h": p["h"]})
    expected = {k: 0.3 * p.apply(theta, spec)[k] + 0.7 * q_g.apply(theta, spec)[k] for k in theta}
    got = soft_apply(theta, spec, mixed)
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in theta)
    with pytest.raises(ValueError, match="lacks groups"):
        soft_apply(theta, spec, {"g": mp["g"]})
    with pytest.raises(ValueError, match="wrong shape"):
        soft_apply(theta, spec, {"g": mp["h"], "h": mp["h"]})


# ------------------------------------------------------------------------------------- the method


def test_registered_with_its_needs_and_offered_by_the_cli() -> None:
    entry = PAIR_METHODS["sinkhorn"]
    assert entry.fn is sinkhorn_matching and entry.needs == ("model", "data")
    assert set(entry.accepts) == {"seed", "val_data", "device", "progress"}  # its own epochs (the CLI's are STE's)
    parser = build_parser()
    assert parser.parse_args(["align", "A", "B", "--method", "sinkhorn"]).method == "sinkhorn"
    assert parser.parse_args(["interpolate", "A", "B", "--align", "sinkhorn"]).align == "sinkhorn"
    a, b = mlp(0), mlp(1)
    with pytest.raises(ValueError, match="Sinkhorn matching needs model=.*; missing: data$"):
        align(a, b, spec_of(a), "sinkhorn")


@pytest.mark.parametrize("make", [mlp, bn_net], ids=["mlp", "batchnorm"])
def test_the_hardened_output_is_an_exact_symmetry(make) -> None:
    a, b = make(0), make(1)
    spec = spec_of(a)
    data = toy_data()
    for init in ("weight", "identity"):
        res = align(
            a, b, spec, "sinkhorn", data=data, val_data=data, epochs=2, batch_size=16, init=init, progress=False
        )
        assert res.method == "sinkhorn" and set(res.perm.perms) == set(spec.names)
        verify_permutation(b, res.perm, spec, example_input=torch.randn(8, *SHAPE))  # f(π(θ_B)) = f(θ_B)
        epochs = res.info["epochs"]
        assert [e["epoch"] for e in epochs] == [0, 1, 2] and res.info["selected_by"] == "val_loss"
        assert res.info["best_epoch"] == min(epochs, key=lambda e: e["val_loss"])["epoch"]


def test_the_trained_soft_loss_decreases() -> None:
    """Full batch, fixed τ, λ = ½: the epoch losses are the soft midpoint loss before each Adam step."""
    a, b = mlp(0, (16, 16)), mlp(1, (16, 16))
    res = sinkhorn_matching(
        a.state_dict(),
        b.state_dict(),
        spec_of(a),
        model=a,
        data=toy_data(128),
        epochs=30,
        batch_size=128,
        lr=0.1,
        tau_start=0.5,
        tau_end=0.5,
        init="identity",
        init_scale=1.0,
        progress=False,
    )
    losses = [e["train_loss"] for e in res.info["epochs"]]
    assert losses[-1] < losses[0] - 0.01, losses
    assert sum(y < x for x, y in zip(losses, losses[1:])) >= 0.8 * (len(losses) - 1), losses


def test_deterministic_with_a_seed() -> None:
    a, b = mlp(0), mlp(1)
    spec, data = spec_of(a), toy_data()

    def run(seed: int):
        return align(
            a, b, spec, "sinkhorn", data=data, epochs=2, batch_size=16, seed=seed, init="identity", progress=False
        )

    first, again = run(3), run(3)
    assert first.perm == again.perm
    assert [e["train_loss"] for e in first.info["epochs"]] == [e["train_loss"] for e in again.info["epochs"]]
    assert first.info["selected_by"] == "last" and first.info["best_epoch"] == 2


def test_bad_options_are_refused() -> None:
    a, b = mlp(0), mlp(1)
    spec, data = spec_of(a), toy_data()
    for kw, match in (
        ({"init": "random"}, "unknown init"),
        ({"tau_start": 0.1, "tau_end": 1.0}, "tau_start >= tau_end"),
        ({"iters": 0}, "iters"),
        ({"lam": "third"}, "unknown lam"),
        ({"epochs": 0}, "epochs"),
        ({"noise": -1.0}, "noise"),
    ):
        with pytest.raises(ValueError, match=match):
            align(a, b, spec, "sinkhorn", data=data, progress=False, **kw)
    g = spec.groups[0]
    blocked = PermutationSpec((PermGroup(g.name, g.size, g.axes, blocks=2, block_perm="heads"), *spec.groups[1:]))
    with pytest.raises(ValueError, match="block-structured"):
        align(a, b, blocked, "sinkhorn", data=data, progress=False)
