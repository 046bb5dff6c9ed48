"""Permutation specs derived from fx graphs; invariance f(π(θ)) == f(θ); activation capture; offsets."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lmclab.models import NORMS, build_model
from lmclab.permutation import (
    AxisRef,
    PermGroup,
    Permutation,
    PermutationSpec,
    SpecError,
    capture_activations,
    check_invariance,
    derive_spec,
    permute_axis,
    spec_for,
    verify_permutation,
)
from params import randomize_

CNNS = ("resnet20", "vgg11", "vgg16", "resnet18")
SHAPE = (3, 8, 8)
FAST = settings(deadline=None, derandomize=True, database=None)


def _line_of(marker: str) -> int:
    """Line number in this file of the (unique) line containing `marker` as a comment."""
    lines = Path(__file__).read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if line.rstrip().endswith(f"# {marker}")]
    assert len(hits) == 1, marker
    return hits[0]


def assert_symmetry(model: nn.Module, spec: PermutationSpec, x: torch.Tensor, seed: int = 0) -> None:
    """A random permutation of `spec` leaves the function unchanged (eval and train) and moves weights."""
    theta = model.state_dict()
    perm = Permutation.random(spec, torch.Generator().manual_seed(seed))
    diffs = check_invariance(model, spec, perm, x)
    assert diffs.eval is not None and diffs.train is not None, diffs
    assert diffs.eval < 1e-9 and diffs.train < 1e-9, diffs
    moved = perm.apply(theta, spec)
    for g in spec.groups:
        if not torch.equal(perm[g.name], torch.arange(g.size)):
            assert any(not torch.equal(moved[a.tensor], theta[a.tensor]) for a in g.axes), g.name
    assert perm.is_identity() or any(not torch.equal(moved[k], v) for k, v in theta.items())


# ------------------------------------------------------------------------ hand-written specs


def _norm_axes(prefix: str, norm: str) -> list[AxisRef]:
    names = {
        "layernorm": ("weight", "bias"),
        "batchnorm": ("weight", "bias", "running_mean", "running_var"),
        "none": (),
    }[norm]
    return [AxisRef(f"{prefix}.{n}", 0) for n in names]


def _conv_out(conv: str, norm_prefix: str, norm: str) -> list[AxisRef]:
    """Output axis of a conv followed by a norm (a conv carries a bias only without a norm)."""
    axes = [AxisRef(f"{conv}.weight", 0)] + ([AxisRef(f"{conv}.bias", 0)] if norm == "none" else [])
    return axes + _norm_axes(norm_prefix, norm)


def hand_mlp(hidden: tuple[int, ...]) -> PermutationSpec:
    groups = []
    for i, h in enumerate(hidden):
        nxt = f"layers.{i + 1}.linear.weight" if i + 1 < len(hidden) else "head.weight"
        groups.append(
            PermGroup(
                f"P_layers.{i}.linear",
                h,
                (AxisRef(f"layers.{i}.linear.weight", 0), AxisRef(f"layers.{i}.linear.bias", 0), AxisRef(nxt, 1)),
                (f"layers_{i}_act",),
            )
        )
    return PermutationSpec(tuple(groups))


def hand_resnet(
    stem: int, widths: tuple[int, ...], depths: tuple[int, ...], strides: tuple[int, ...], norm: str
) -> PermutationSpec:
    """One group per block's inner channels; one per residual stream: stem (or a projection block's
    conv2) + every block's conv2 output + the shortcut conv, read by the next convs / the head."""
    groups: list[PermGroup] = []
    stream = {"name": "P_stem.conv", "size": stem, "axes": _conv_out("stem.conv", "stem.norm", norm), "acts": []}
    reads, prev = "stem_act", stem

    def close() -> None:
        groups.append(PermGroup(stream["name"], stream["size"], tuple(stream["axes"]), tuple(stream["acts"])))

    for s, (w, d, st_) in enumerate(zip(widths, depths, strides)):
        for b in range(d):
            p, n = f"layers.{s}.{b}", f"layers_{s}_{b}"
            groups.append(
                PermGroup(
                    f"P_{p}.conv1",
                    w,
                    tuple(_conv_out(f"{p}.conv1", f"{p}.norm1", norm) + [AxisRef(f"{p}.conv2.weight", 1)]),
                    (f"{n}_act1",),
                )
            )
            stream["axes"].append(AxisRef(f"{p}.conv1.weight", 1))
            stream["acts"].append(reads)
            if (st_ if b == 0 else 1) != 1 or prev != w:
                stream["axes"].append(AxisRef(f"{p}.shortcut.conv.weight", 1))
                close()
                stream = {
                    "name": f"P_{p}.conv2",
                    "size": w,
                    "acts": [],
                    "axes": _conv_out(f"{p}.conv2", f"{p}.norm2", norm)
                    + _conv_out(f"{p}.shortcut.conv", f"{p}.shortcut.norm", norm),
                }
            else:
                stream["axes"] += _conv_out(f"{p}.conv2", f"{p}.norm2", norm)
            reads, prev = f"{n}_act2", w
    stream["axes"].append(AxisRef("head.weight", 1))
    stream["acts"].append("pool")
    close()
    return PermutationSpec(tuple(groups))


def hand_resnet20(width: int, norm: str) -> PermutationSpec:
    return hand_resnet(16 * width, (16 * width, 32 * width, 64 * width), (3, 3, 3), (1, 2, 2), norm)


def hand_resnet18(width: int, norm: str) -> PermutationSpec:
    w = 64 * width
    return hand_resnet(w, (w, 2 * w, 4 * w, 8 * w), (2, 2, 2, 2), (1, 2, 2, 2), norm)


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def hand_vgg(cfg: tuple[int | str, ...], width: int, norm: str) -> PermutationSpec:
    """Each conv's output group is read by the next conv (or the head through pool → flatten)."""
    convs = [i for i, c in enumerate(cfg) if c != "M"]
    groups = []
    for k, i in enumerate(convs):
        if k + 1 < len(convs):
            j = convs[k + 1]
            reader = f"features.{j}.conv.weight"
            act = f"features_{j - 1}" if cfg[j - 1] == "M" else f"features_{j - 1}_act"
        else:
            reader, act = "head.weight", "pool"
        axes = _conv_out(f"features.{i}.conv", f"features.{i}.norm", norm) + [AxisRef(reader, 1)]
        groups.append(PermGroup(f"P_features.{i}.conv", int(cfg[i]) * width, tuple(axes), (act,)))
    return PermutationSpec(tuple(groups))


def build(name: str, norm: str | None = None, shape: tuple[int, int, int] = SHAPE, **kw: object) -> nn.Module:
    if norm is not None:
        kw["norm"] = norm
    return build_model(name, input_shape=shape, num_classes=10, **kw)


@pytest.mark.parametrize("hidden", [None, (7,), (5, 9, 3)])
def test_derived_equals_hand_written_mlp(hidden: tuple[int, ...] | None) -> None:
    kw = {} if hidden is None else {"hidden": hidden}
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, **kw)
    spec = derive_spec(model, torch.randn(2, 1, 28, 28))
    assert spec.canonical() == hand_mlp(hidden or (512, 512, 512)).canonical()
    # the default example input (a feature vector for a first Linear) gives the same spec
    assert derive_spec(model).canonical() == spec.canonical()


@pytest.mark.parametrize("norm", NORMS)
def test_derived_equals_hand_written_resnet20(norm: str) -> None:
    spec = derive_spec(build("resnet20", norm), torch.randn(2, *SHAPE))
    assert spec.canonical() == hand_resnet20(1, norm).canonical()
    assert spec.names[:3] == ["P_stem.conv", "P_layers.0.0.conv1", "P_layers.0.1.conv1"]
    stream = spec.group("P_stem.conv")  # stage-1 residual stream: stem + every block's conv2 + shortcuts
    assert AxisRef("layers.0.2.conv2.weight", 0) in stream.axes
    assert AxisRef("layers.1.0.shortcut.conv.weight", 1) in stream.axes
    assert AxisRef("layers.1.0.shortcut.conv.weight", 0) in spec.group("P_layers.1.0.conv2").axes


@pytest.mark.parametrize("norm", NORMS)
def test_derived_equals_hand_written_vgg11(norm: str) -> None:
    spec = derive_spec(build("vgg11", norm), torch.randn(2, *SHAPE))
    assert spec.canonical() == hand_vgg(VGG11, 1, norm).canonical()


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm"])
def test_derived_equals_hand_written_resnet18(norm: str) -> None:
    spec = derive_spec(build("resnet18", norm), torch.randn(2, *SHAPE))
    assert spec.canonical() == hand_resnet18(1, norm).canonical()


def test_derived_resnet20_width2_default_input() -> None:
    model = build("resnet20", "batchnorm", shape=(3, 32, 32), width=2)
    assert derive_spec(model).canonical() == hand_resnet20(2, "batchnorm").canonical()  # guessed 32×32 input


# ---------------------------------------------------------------- invariance (property tests)


@settings(FAST, max_examples=12)
@given(hidden=st.lists(st.integers(1, 12), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_mlp_random_permutation_is_symmetry(hidden: list[int], seed: int) -> None:
    torch.manual_seed(seed)
    model = randomize_(build_model("mlp", input_shape=(1, 3, 4), num_classes=5, hidden=tuple(hidden)), seed)
    spec = derive_spec(model, torch.randn(2, 1, 3, 4))
    assert spec.canonical() == hand_mlp(tuple(hidden)).canonical()
    assert_symmetry(model, spec, torch.randn(6, 1, 3, 4), seed)


def _zoo_symmetry(name: str, norm: str, seed: int, width: int) -> None:
    torch.manual_seed(seed)
    model = randomize_(build(name, norm, width=width), seed)
    spec = derive_spec(model, torch.randn(2, *SHAPE))
    model.train()  # BN running statistics must not be touched by derive / verify
    before = copy.deepcopy(model.state_dict())
    assert_symmetry(model, spec, torch.randn(4, *SHAPE), seed)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@settings(FAST, max_examples=3)
@pytest.mark.parametrize("name,norm", [(n, norm) for n in ("resnet20", "vgg11") for norm in NORMS])
@given(seed=st.integers(0, 2**31 - 1), width=st.integers(1, 2))
def test_zoo_random_permutation_is_symmetry(name: str, norm: str, seed: int, width: int) -> None:
    _zoo_symmetry(name, norm, seed, width if name == "resnet20" else 1)


@settings(FAST, max_examples=1)
@pytest.mark.parametrize("name,norm", [(n, norm) for n in ("vgg16", "resnet18") for norm in NORMS])
@given(seed=st.integers(0, 2**31 - 1))
def test_big_zoo_random_permutation_is_symmetry(name: str, norm: str, seed: int) -> None:
    """Width 1 is the smallest: 15M (vgg16) and 11M (resnet18) parameters, so one example each."""
    _zoo_symmetry(name, norm, seed, 1)


# ------------------------------------------------------------------------- custom models


class ConvFlat(nn.Module):
    """conv → relu → maxpool → flatten (C·H·W) → linear → relu → linear."""

    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.view = view
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        h = h.view(h.size(0), -1) if self.view else torch.flatten(h, 1)
        return self.out(F.relu(self.fc(h)))


@pytest.mark.parametrize("view", [False, True])
def test_flatten_conv_to_linear_has_block_hw(view: bool) -> None:
    torch.manual_seed(0)
    model = ConvFlat(view)
    spec = derive_spec(model, torch.randn(2, 3, 8, 8))
    expected = PermutationSpec(
        (
            PermGroup(
                "P_conv",
                4,
                (AxisRef("conv.weight", 0), AxisRef("conv.bias", 0), AxisRef("fc.weight", 1, 16)),
                ("max_pool2d",),
            ),
            PermGroup(
                "P_fc", 5, (AxisRef("fc.weight", 0), AxisRef("fc.bias", 0), AxisRef("out.weight", 1)), ("relu_1",)
            ),
        )
    )
    assert spec.canonical() == expected.canonical()
    assert_symmetry(model, spec, torch.randn(3, 3, 8, 8))


class CatNet(nn.Module):
    """Two conv branches → cat → BN → conv; then cat(conv out, branches) → pool → flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.bn = nn.BatchNorm2d(9)
        self.c = nn.Conv2d(9, 6, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(15 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        h = F.relu(self.bn(h))
        z = torch.cat((self.c(h), h), 1)
        return self.fc(self.pool(z).flatten(1))


def test_concatenation_along_channels() -> None:
    torch.manual_seed(0)
    model = randomize_(CatNet(), 1)
    spec = derive_spec(model, torch.randn(2, 3, 8, 8))
    bn = [f"bn.{t}" for t in ("weight", "bias", "running_mean", "running_var")]
    expected = PermutationSpec(
        (
            PermGroup(
                "P_a",
                4,
                (
                    AxisRef("a.weight", 0),
                    AxisRef("a.bias", 0),
                    *(AxisRef(t, 0, 1, 0) for t in bn),
                    AxisRef("c.weight", 1, 1, 0),
                    AxisRef("fc.weight", 1, 4, 24),
                ),
                ("relu",),
            ),
            PermGroup(
                "P_b",
                5,
                (
                    AxisRef("b.weight", 0),
                    AxisRef("b.bias", 0),
                    *(AxisRef(t, 0, 1, 4) for t in bn),
                    AxisRef("c.weight", 1, 1, 4),
                    AxisRef("fc.weight", 1, 4, 40),
                ),
                ("relu_1",),
            ),
            PermGroup("P_c", 6, (AxisRef("c.weight", 0), AxisRef("fc.weight", 1, 4, 0)), ("c",)),
        )
    )
    assert spec.canonical() == expected.canonical()
    model.train()
    assert_symmetry(model, spec, torch.randn(4, 3, 8, 8), seed=3)
    # offsets survive the JSON form
    assert PermutationSpec.from_dict(spec.to_dict()).canonical() == spec.canonical()


class CatWithInput(nn.Module):
    def __init__(self, hidden_first: bool) -> None:
        super().__init__()
        self.hidden_first = hidden_first
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.out = nn.Conv2d(7, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        return self.out(torch.cat([h, x] if self.hidden_first else [x, h], 1))


def test_concatenation_with_the_input() -> None:
    model = CatWithInput(hidden_first=False)
    spec = derive_spec(model, torch.randn(2, 3, 8, 8))
    assert spec.group("P_conv").axes[-1] == AxisRef("out.weight", 1, 1, 3)
    assert_symmetry(model, spec, torch.randn(2, 3, 8, 8))
    # a lone permuted part at offset 0 of a longer axis is not expressible: a lone ref means the whole axis
    with pytest.raises(SpecError, match="offset 0"):
        derive_spec(CatWithInput(hidden_first=True), torch.randn(2, 3, 8, 8))


class ResidualBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(1, c)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.act(self.norm(self.conv(x))))


def outside_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(1, 8),
        nn.GELU(),
        ResidualBlock(8),
        nn.AvgPool2d(2),
        ResidualBlock(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 12),
        nn.LayerNorm(12),
        nn.SiLU(),
        nn.Dropout(0.2),
        nn.Linear(12, 10),
    )


def test_outside_model_from_standard_layers() -> None:
    torch.manual_seed(0)
    model = randomize_(outside_model(), 0)
    spec = derive_spec(model, torch.randn(2, 3, 8, 8))
    assert spec.names == ["P_0", "P_8"]
    stream = spec.group("P_0")
    assert {a.tensor for a in stream.axes} == {
        "0.weight",
        "0.bias",
        "1.weight",
        "1.bias",
        "3.conv.weight",
        "3.conv.bias",
        "3.norm.weight",
        "3.norm.bias",
        "5.conv.weight",
        "5.conv.bias",
        "5.norm.weight",
        "5.norm.bias",
        "8.weight",
    }
    assert AxisRef("3.conv.weight", 0) in stream.axes and AxisRef("3.conv.weight", 1) in stream.axes
    assert set(spec.group("P_8").axes) == {
        AxisRef("8.weight", 0),
        AxisRef("8.bias", 0),
        AxisRef("9.weight", 0),
        AxisRef("9.bias", 0),
        AxisRef("12.weight", 1),
    }
    model.train()
    assert_symmetry(model, spec, torch.randn(4, 3, 8, 8))


class ConvNeXtish(nn.Module):
    """Depthwise conv → channels-last LayerNorm → Linear → GELU → Linear → layer scale → residual;
    softmax over the hidden units, an SE-style gate and a PReLU per channel."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, 2 * c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(2 * c)
        self.pw1 = nn.Linear(2 * c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.scale = nn.Parameter(torch.rand(c) + 0.5)
        self.se = nn.Linear(c, c)
        self.prelu = nn.PReLU(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.pw2(torch.softmax(F.gelu(self.pw1(self.norm(h))), dim=-1))
        x = x + (self.gamma * h).permute(0, 3, 1, 2)
        x = x * torch.sigmoid(self.se(x.mean((2, 3))))[:, :, None, None]
        x = self.prelu(x) * self.scale.view(1, -1, 1, 1)
        return self.head(x.mean(dim=[-1, -2]))


def test_convnext_style_model() -> None:
    torch.manual_seed(0)
    model = randomize_(ConvNeXtish(), 2)
    spec = derive_spec(model, torch.randn(2, 3, 8, 8))
    assert spec.names == ["P_stem", "P_pw1"]  # the SE gate multiplies the stream: se's units are its units
    stream = set(spec.group("P_stem").axes)
    assert {
        AxisRef("dw.weight", 0, 2),
        AxisRef("dw.bias", 0, 2),
        AxisRef("norm.weight", 0, 2),
        AxisRef("pw1.weight", 1, 2),
        AxisRef("gamma", 0),
        AxisRef("scale", 0),
        AxisRef("prelu.weight", 0),
        AxisRef("se.weight", 0),
        AxisRef("se.weight", 1),
        AxisRef("head.weight", 1),
    } <= stream
    assert_symmetry(model, spec, torch.randn(3, 3, 8, 8))


class TokenMLP(nn.Module):
    """(N, T, F) tokens: Linear over features, token mixing over T through transposes, a class token."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.ln = nn.LayerNorm(8)
        self.tok = nn.Linear(4, 4)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.tok(self.ln(h).transpose(1, 2)).transpose(1, 2)
        h = h + self.fc2(F.gelu(self.fc1(self.ln(h))))
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        return self.head(h.mean(1))


def test_token_mlp_units_on_the_last_axis() -> None:
    torch.manual_seed(0)
    model = randomize_(TokenMLP(), 0)
    spec = derive_spec(model, torch.randn(2, 4, 5))
    assert spec.names == ["P_emb", "P_fc1"]  # tok's outputs (tokens) are not tracked: left unpermuted
    assert AxisRef("cls", 2) in spec.group("P_emb").axes and AxisRef("ln.weight", 0) in spec.group("P_emb").axes
    assert_symmetry(model, spec, torch.randn(3, 4, 5))


class Functional(nn.Module):
    """Layers written with torch.nn.functional on bare parameters and buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.b1 = nn.Parameter(torch.randn(4))
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.w2 = nn.Parameter(torch.randn(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.w1, self.b1, padding=1)
        h = F.batch_norm(h, self.mean, self.var, self.gamma, self.beta, training=False)
        return F.linear(F.relu(h).mean((2, 3)), self.w2)


def test_functional_layers_on_parameters() -> None:
    torch.manual_seed(0)
    model = Functional()
    spec = derive_spec(model, torch.randn(2, 3, 5, 5))
    expected = PermGroup(
        "P_w1",
        4,
        tuple(AxisRef(t, 0) for t in ("w1", "b1", "mean", "var", "gamma", "beta")) + (AxisRef("w2", 1),),
        ("mean_1",),
    )
    assert spec.canonical() == PermutationSpec((expected,)).canonical()
    assert_symmetry(model, spec, torch.randn(3, 3, 5, 5))


def test_shared_layer_and_residual_on_input_are_fixed() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.conv = nn.Conv2d(3, 3, 1)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x + self.conv(x)  # residual onto the raw input: conv's units are the input's, never permuted
            return self.out(torch.relu(self.fc(torch.relu(self.fc(y.mean((1, 2)))))))

    spec = derive_spec(Shared(), torch.randn(2, 3, 5, 4))
    assert spec.groups == ()  # the twice-used fc ties its output to its (fixed) input


# --------------------------------------------------------------------------- errors


class MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(6, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x))
        h = h @ self.w  # UNSUPPORTED-MATMUL
        return self.out(h)


class TransposeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).transpose(1, 2)  # channels moved to dim 2 ...
        return self.conv2(h.transpose(1, 2).transpose(1, 3))  # UNSUPPORTED-TRANSPOSE


def test_unsupported_ops_name_node_and_line() -> None:
    with pytest.raises(SpecError) as err:
        derive_spec(MatmulNet(), torch.randn(2, 4))
    msg = str(err.value)
    assert "'matmul'" in msg and f"test_permutation.py:{_line_of('UNSUPPORTED-MATMUL')}" in msg
    with pytest.raises(SpecError) as err:
        derive_spec(TransposeNet(), torch.randn(2, 3, 4, 4))
    msg = str(err.value)
    assert "'conv2'" in msg and f"test_permutation.py:{_line_of('UNSUPPORTED-TRANSPOSE')}" in msg
    assert "channel axis" in msg


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w.flip(0)


@pytest.mark.parametrize(
    "layer,pattern",
    [
        (nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2), "grouped convolution"),
        (nn.ChannelShuffle(2), "ChannelShuffle"),
        (nn.PixelShuffle(2), "PixelShuffle"),
    ],
)
def test_unsupported_layers(layer: nn.Module, pattern: str) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        layer,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 if not isinstance(layer, nn.PixelShuffle) else 1, 2),
    )
    with pytest.raises(SpecError, match=pattern) as err:
        derive_spec(model, torch.randn(2, 3, 4, 4))
    assert "(call_module 1)" in str(err.value)


def test_group_norm_with_groups_is_block_structured() -> None:
    """GroupNorm(G, C) with 1 < G < C: whole groups and channels within each group move, nothing else."""
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.GroupNorm(3, 6),
        nn.GELU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 2),
    ).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    spec = derive_spec(model, x)
    g = spec.group("P_0")
    assert (g.size, g.blocks, g.block_size) == (6, 3, 2)
    axes = {(a.tensor, a.axis) for a in g.axes}
    assert axes == {("0.weight", 0), ("0.bias", 0), ("1.weight", 0), ("1.bias", 0), ("3.weight", 1)}
    assert spec.group("P_3").blocks == 1
    randomize_(model, 0)
    for seed in range(3):
        assert_symmetry(model, spec, x, seed)
    # a flat permutation crossing the groups is not a symmetry: structure is needed
    flat = Permutation({"P_0": torch.tensor([1, 2, 0, 3, 4, 5]), "P_3": torch.arange(6)})
    moved = copy.deepcopy(model)
    moved.load_state_dict({**model.state_dict(), **_flat_apply(model.state_dict(), spec, flat)})
    with torch.no_grad():
        assert float((moved(x) - model(x)).abs().max()) > 1e-3


class CatGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


def test_group_norm_over_a_concatenation_is_refused() -> None:
    with pytest.raises(SpecError, match="GroupNorm with 2 groups of 8 channels on a concatenation"):
        derive_spec(CatGroupNorm(), torch.randn(2, 3, 4, 4))


def _flat_apply(theta: dict, spec: PermutationSpec, perm: Permutation) -> dict:
    """θ with each group's index vector applied to all its axes, without the structure check."""
    out = dict(theta)
    for g in spec.groups:
        for a in g.axes:
            out[a.tensor] = out[a.tensor].index_select(a.axis, perm[g.name])
    return out


def test_unknown_leaf_module_and_opaque_parameter_use() -> None:
    model = nn.Sequential(nn.Linear(3, 4), Opaque(), nn.Linear(4, 2))
    with pytest.raises(SpecError, match="flip"):
        derive_spec(model, torch.randn(2, 3))
    with pytest.raises(SpecError, match="module Opaque is not known"):
        derive_spec(model, torch.randn(2, 3), leaf_modules=(Opaque,))


def test_softmax_over_units_is_equivariant() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.Softmax(dim=1), nn.Linear(5, 2))
    spec = derive_spec(model, torch.randn(2, 3))
    assert spec.names == ["P_0"]
    assert_symmetry(randomize_(model, 0), spec, torch.randn(4, 3))


# --------------------------------------------------------------------------- verify


def test_verify_rejects_wrong_permutations() -> None:
    torch.manual_seed(0)
    model = randomize_(build("resnet20", "batchnorm"), 0)
    x = torch.randn(4, *SHAPE)
    spec = derive_spec(model, x)
    perm = Permutation.random(spec, torch.Generator().manual_seed(0))
    verify_permutation(model, perm.apply(model.state_dict(), spec), None, example_input=x)
    # permute one tensor of a group by hand: the function changes
    bad = dict(model.state_dict())
    p = perm["P_layers.0.0.conv1"]
    bad["layers.0.0.conv1.weight"] = permute_axis(bad["layers.0.0.conv1.weight"], AxisRef("x", 0), p)
    with pytest.raises(SpecError, match=r"eval mode: max \|f\(π\(θ\)\) − f\(θ\)\| = "):
        verify_permutation(model, bad, None, example_input=x)
    # a spec that forgets the BN running statistics of one layer fails in eval mode only
    g = spec.group("P_layers.0.0.conv1")
    axes = tuple(a for a in g.axes if a.tensor != "layers.0.0.norm1.running_mean")
    broken = PermutationSpec(
        tuple(PermGroup(h.name, h.size, axes, h.activations) if h.name == g.name else h for h in spec.groups)
    )
    diffs = check_invariance(model, broken, perm, x)
    assert diffs.eval is not None and diffs.train is not None, diffs
    assert diffs.eval > 1e-3 and diffs.train < 1e-9
    assert diffs.worst == diffs.eval and diffs.to_json() == {"eval": diffs.eval, "train": diffs.train}
    train_only = check_invariance(model, broken, perm, x, modes=("train",))
    assert train_only.eval is None and train_only.to_json() == {"train": diffs.train} and train_only.worst < 1e-9
    with pytest.raises(SpecError, match="eval mode"):
        verify_permutation(model, perm, broken, example_input=x, modes=("train", "eval"))
    verify_permutation(model, perm, broken, example_input=x, modes=("train",))


def test_derive_and_verify_do_not_touch_the_model() -> None:
    model = randomize_(build("vgg11", "batchnorm"), 0).train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, *SHAPE)
    spec = derive_spec(model, x)
    verify_permutation(model, Permutation.random(spec), spec, example_input=x)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_spec_for_checks_an_explicit_spec() -> None:
    model = build_model("mlp", input_shape=(1, 2, 2), num_classes=3, hidden=(5, 6))
    explicit = hand_mlp((5, 6))
    assert spec_for(model, explicit) is explicit
    assert spec_for(model).canonical() == explicit.canonical()
    with pytest.raises(SpecError, match="not 7 units"):
        spec_for(model, hand_mlp((7, 6)))


# --------------------------------------------------------------------------- activations


def test_capture_activations_matches_forward_hooks() -> None:
    torch.manual_seed(0)
    model = randomize_(build("resnet20", "batchnorm"), 0).eval()
    x = torch.randn(3, *SHAPE)
    spec = derive_spec(model, x)
    names = sorted({n for g in spec.groups for n in g.activations})
    got = capture_activations(model, x, names)
    assert set(got) == set(names)
    hooked: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, n=n: hooked.__setitem__(n, out.detach()))
        for n, m in model.named_modules()
        if n.replace(".", "_") in names
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert set(hooked) == {n.replace("_", ".") for n in names}
    for n in names:
        torch.testing.assert_close(got[n], hooked[n.replace("_", ".")], rtol=0, atol=0)
    for g in spec.groups:  # every activation carries its group on dim 1
        assert all(got[n].shape[1] == g.size for n in g.activations)
    with pytest.raises(SpecError, match="no nodes"):
        capture_activations(model, x, ["nope"])


def test_capture_activations_of_concatenation_parts() -> None:
    model = CatNet().eval()
    x = torch.randn(2, 3, 8, 8)
    spec = derive_spec(model, x)
    acts = capture_activations(model, x, ["relu", "relu_1"])
    torch.testing.assert_close(acts["relu"], F.relu(model.a(x)))
    assert [acts[spec.group(n).activations[0]].shape[1] for n in ("P_a", "P_b")] == [4, 5]


# ------------------------------------------------------------------------ spec offsets


def test_axis_offsets_in_spec() -> None:
    params = {"w": torch.arange(2 * 9.0).reshape(2, 9)}
    spec = PermutationSpec((PermGroup("A", 2, (AxisRef("w", 1, 2, 0),)), PermGroup("B", 3, (AxisRef("w", 1, 1, 5),))))
    spec.check(params)
    out = Permutation({"A": torch.tensor([1, 0]), "B": torch.tensor([2, 0, 1])}).apply(params, spec)
    assert out["w"][0].tolist() == [2, 3, 0, 1, 4, 7, 5, 6, 8]
    d = spec.to_dict()
    assert d["groups"][0]["axes"] == [["w", 1, 2]] and d["groups"][1]["axes"] == [["w", 1, 1, 5]]
    assert PermutationSpec.from_dict(d) == spec
    # overlapping or out-of-range slices are rejected; a lone ref at offset 0 must cover the axis
    with pytest.raises(SpecError, match="claimed by both"):
        PermutationSpec(
            (PermGroup("A", 3, (AxisRef("w", 1, 1, 0),)), PermGroup("B", 3, (AxisRef("w", 1, 1, 2),)))
        ).check(params)
    with pytest.raises(SpecError, match="no entries"):
        PermutationSpec((PermGroup("B", 3, (AxisRef("w", 1, 1, 7),)),)).check(params)
    with pytest.raises(SpecError, match="not 4 units"):
        PermutationSpec((PermGroup("A", 4, (AxisRef("w", 1, 2, 0),)),)).check(params)


def test_torchvision_resnet18() -> None:
    tv = pytest.importorskip("torchvision")
    model = randomize_(tv.models.resnet18(num_classes=10), 0)
    x = torch.randn(2, 3, 32, 32)
    spec = derive_spec(model, x)
    assert "P_conv1" in spec.names
    assert_symmetry(model, spec, x)


def test_group_names_are_deterministic() -> None:
    a = derive_spec(build("resnet20", "layernorm"), torch.randn(2, *SHAPE))
    b = derive_spec(build("resnet20", "layernorm"), torch.randn(2, *SHAPE))
    assert a == b and re.fullmatch(r"P_[\w.]+", a.names[-1])
