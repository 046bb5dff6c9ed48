"""Grouped and depthwise(-separable) convolutions in the derived permutation spec: f(π(θ)) == f(θ) for
random permutations (float64, eval and train), the exact block structure, and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmclab.permutation import Permutation, SpecError, check_invariance, derive_spec, verify_permutation
from lmclab.permutation.spec import coverage
from params import randomize_


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)  # module initialisation: deterministic tests


class GroupedNet(nn.Module):
    """conv → BN → ReLU → grouped conv (G groups, 8 → 12 channels) → BN → ReLU → conv → pool → linear."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 12, 3, padding=1, groups=groups)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.gconv(h)))
        return self.head(self.conv3(h).mean((2, 3)))


class SeparableNet(nn.Module):
    """MobileNet-style depthwise-separable block (depthwise 3×3 → BN → ReLU → pointwise 1×1 → BN → ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn1 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.dw(h)))
        h = torch.relu(self.bn2(self.pw(h)))
        return self.head(h.mean((2, 3)))


X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _check(model: nn.Module, seeds: range = range(3)) -> dict[str, float]:
    """derive_spec + random permutations: relative error ≤ 1e-10 in eval and train; returns the worst."""
    spec = derive_spec(model, X)
    with torch.no_grad():
        scale = float(model.double()(X.double()).abs().max())
    model.float()
    worst = {"eval": 0.0, "train": 0.0}
    for seed in seeds:
        perm = Permutation.random(spec, torch.Generator().manual_seed(seed))
        assert not perm.is_identity()
        verify_permutation(model, perm, spec, example_input=X, atol=0.0, rtol=1e-10)
        diffs = check_invariance(model, spec, perm, X)
        for mode, d in diffs.to_json().items():
            worst[mode] = max(worst[mode], d / scale)
    assert worst["eval"] <= 1e-10 and worst["train"] <= 1e-10, worst
    print(f"{type(model).__name__}: coverage {spec.meta['coverage']:.4f}, worst relative |Δf| {worst}")
    return worst


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_spec_and_symmetry(groups: int) -> None:
    model = randomize_(GroupedNet(groups), groups)
    spec = derive_spec(model, X)
    by_name = {g.name: g for g in spec.groups}
    inp, out = by_name["P_conv1"], by_name["P_gconv"]
    # the grouped conv's input: only its G blocks of 8/G channels move (a group of G whole blocks)
    assert (inp.size, inp.blocks) == (groups, groups)
    assert {(a.tensor, a.axis, a.block) for a in inp.axes} >= {
        ("conv1.weight", 0, 8 // groups),
        ("bn1.weight", 0, 8 // groups),
    }
    # its output: G blocks of 12/G channels, σ shared with the input's blocks, free within each block
    assert (out.size, out.blocks) == (12, groups) and out.block_perm == inp.block_perm
    assert ("gconv.weight", 0) in {(a.tensor, a.axis) for a in out.axes}
    assert all(not (a.tensor == "gconv.weight" and a.axis == 1) for g in spec.groups for a in g.axes)
    total = sum(p.numel() for p in model.parameters())
    assert spec.meta["coverage"] == pytest.approx(1 - 3 / total)  # only head.bias (network output) stays
    assert spec.meta["coverage"] == pytest.approx(coverage(spec, dict(model.named_parameters())))
    _check(model)


def test_grouped_conv_breaking_blocks_changes_the_function() -> None:
    """The structure is needed: moving one input channel to another group changes f (the test can fail)."""
    model = randomize_(GroupedNet(2), 0).double()
    theta = model.state_dict()
    p = torch.arange(8)
    p[[0, 4]] = p[[4, 0]]  # swap a channel of group 0 with one of group 1
    moved = dict(theta)
    for t in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        moved[t] = theta[t].index_select(0, p)
    moved["gconv.weight"] = theta["gconv.weight"]
    with pytest.raises(SpecError, match="changes the function"):
        verify_permutation(model, moved, None, example_input=X.double())


def test_depthwise_separable_block() -> None:
    model = randomize_(SeparableNet(), 1)
    spec = derive_spec(model, X)
    by_name = {g.name: g for g in spec.groups}
    # depthwise (G = C_in = C_out): the channels keep one flat set through the depthwise conv
    stem = by_name["P_stem"]
    assert stem.blocks == 1 and stem.size == 8
    assert {("dw.weight", 0), ("dw.bias", 0), ("bn1.weight", 0), ("pw.weight", 1)} <= {
        (a.tensor, a.axis) for a in stem.axes
    }
    assert by_name["P_pw"].size == 16
    assert spec.meta["coverage"] > 0.9
    _check(model)


class ConcatGrouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.g(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


class MismatchedGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.g(self.gn(self.a(x))).mean((2, 3)))


@pytest.mark.parametrize(
    "model,pattern",
    [
        (ConcatGrouped(), "grouped convolution .*concatenation"),
        (MismatchedGroups(), "already split into 2 blocks, not 4"),
        (
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(144, 2)),
            "grouped convolution",
        ),
    ],
)
def test_refused(model: nn.Module, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        derive_spec(model, X)


def test_grouped_conv_on_the_input() -> None:
    """A grouped first layer: its blocks cannot move (the input is fixed), the set stays unpermuted."""
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.Flatten(), nn.Linear(5 * 16, 2)
    )
    x = torch.randn(2, 4, 6, 6)
    spec = derive_spec(model, x)
    assert all(not a.tensor.startswith("0.") for g in spec.groups for a in g.axes)
    perm = Permutation.random(spec, torch.Generator().manual_seed(0))
    verify_permutation(model, perm, spec, example_input=x, atol=0.0, rtol=1e-10)


class ResidualGrouped(nn.Module):
    """A residual stream through a grouped conv (G = 4) and GroupNorm(4), then a grouped 1×1 conv 8 → 12."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 8)
        self.g2 = nn.Conv2d(8, 12, 1, groups=4)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = h + torch.relu(self.gn(self.g1(h)))
        return self.head(self.bn(self.g2(h)).mean((2, 3)))


def test_residual_through_grouped_convs() -> None:
    """The residual ties g1's output to its input: the whole stream moves by whole blocks only, and
    g2's output shares the same σ."""
    model = randomize_(ResidualGrouped(), 3)
    spec = derive_spec(model, X)
    by_name = {g.name: g for g in spec.groups}
    assert set(by_name) == {"P_a", "P_g2"}
    assert (by_name["P_a"].size, by_name["P_a"].blocks) == (4, 4)
    assert (by_name["P_g2"].size, by_name["P_g2"].blocks) == (12, 4)
    assert by_name["P_a"].block_perm == by_name["P_g2"].block_perm
    _check(model)
