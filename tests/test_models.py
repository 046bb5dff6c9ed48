"""Tests of lmclab.models: the model zoo by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

from lmclab.models import (
    MODEL_NAMES,
    NORMS,
    LayerNorm2d,
    ModelError,
    build_model,
    count_parameters,
    model_defaults,
)

CNNS = ("resnet20", "vgg11", "vgg16", "resnet18")
SHAPES = ((1, 28, 28), (3, 32, 32))
COMBOS = [("mlp", None)] + [(name, norm) for name in CNNS for norm in NORMS]


def _build(name: str, norm: str | None, shape, num_classes: int = 10, **kw) -> nn.Module:
    if norm is not None:
        kw["norm"] = norm
    return build_model(name, input_shape=shape, num_classes=num_classes, **kw)


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


# --------------------------------------------------------------------------- API


def test_names_and_defaults() -> None:
    assert MODEL_NAMES == ("mlp", "resnet20", "vgg11", "vgg16", "resnet18", "vit", "seq_transformer")
    assert NORMS == ("layernorm", "batchnorm", "none")
    assert issubclass(ModelError, ValueError)
    assert model_defaults("mlp") == {"hidden": (512, 512, 512), "width": 1}
    assert model_defaults("resnet20") == {"width": 1, "norm": "layernorm"}
    assert model_defaults("vgg11") == {"width": 1, "norm": "layernorm"}
    assert model_defaults("vgg16") == {"width": 1, "norm": "layernorm"}
    assert model_defaults("resnet18") == {"width": 1, "norm": "batchnorm"}
    assert model_defaults("vit") == {"patch": 0, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "width": 1}
    assert model_defaults("seq_transformer") == {"dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "width": 1}
    # a fresh dict each call
    d = model_defaults("resnet20")
    d["width"] = 7
    assert model_defaults("resnet20")["width"] == 1


# ------------------------------------------------------------ forward and fx


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,norm", COMBOS, ids=lambda v: str(v))
def test_forward_and_fx_trace(name: str, norm: str | None, shape) -> None:
    torch.manual_seed(0)
    model = _build(name, norm, shape, num_classes=7)
    x = torch.randn(2, *shape)
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    for train in (True, False):
        model.train(train)
        traced.train(train)
        with torch.no_grad():
            y = model(x)
            y_traced = traced(x)
        assert y.shape == (2, 7)
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y_traced, y, rtol=0, atol=0)


@pytest.mark.parametrize("name,norm", [c for c in COMBOS if c[0] != "mlp"], ids=str)
def test_channels_last(name: str, norm: str) -> None:
    torch.manual_seed(1)
    model = _build(name, norm, (3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = cl_model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_backward_resnet20_gives_gradients() -> None:
    torch.manual_seed(0)
    model = _build("resnet20", "layernorm", (3, 32, 32))
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------ parameter counts


def _mlp_count(in_features: int, hidden: tuple[int, ...], classes: int) -> int:
    sizes = (in_features, *hidden, classes)
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def test_mlp_parameter_count() -> None:
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10)
    expected = 784 * 512 + 512 + 2 * (512 * 512 + 512) + 512 * 10 + 10
    assert expected == 932_362
    assert count_parameters(model) == expected
    model = build_model("mlp", input_shape=(3, 8, 8), num_classes=5, hidden=[16, 8], width=3)
    assert count_parameters(model) == _mlp_count(3 * 64, (48, 24), 5)


def _resnet20_ln_count(w: int, cin: int, classes: int) -> int:
    """Closed-form parameter count of ResNet-20 (LayerNorm: 2C params per norm)."""
    a, b, c = 16 * w, 32 * w, 64 * w
    stem = _conv(cin, a, 3) + 2 * a
    # stage 1: 3 identity-shortcut blocks of two a→a convs and two norms
    stage1 = 3 * (2 * _conv(a, a, 3) + 2 * 2 * a)
    # stage 2: first block a→b (stride 2) with 1×1 conv + norm shortcut, then 2 plain blocks
    stage2 = _conv(a, b, 3) + _conv(b, b, 3) + 2 * 2 * b + _conv(a, b, 1) + 2 * b + 2 * (2 * _conv(b, b, 3) + 2 * 2 * b)
    stage3 = _conv(b, c, 3) + _conv(c, c, 3) + 2 * 2 * c + _conv(b, c, 1) + 2 * c + 2 * (2 * _conv(c, c, 3) + 2 * 2 * c)
    head = c * classes + classes
    return stem + stage1 + stage2 + stage3 + head


@pytest.mark.parametrize("width", [1, 2])
def test_resnet20_parameter_count(width: int) -> None:
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, width=width)
    n = count_parameters(model)
    assert n == _resnet20_ln_count(width, 3, 10)
    if width == 1:
        assert 272_000 <= n <= 280_000


def test_resnet20_norm_variants_parameter_count() -> None:
    ln = count_parameters(_build("resnet20", "layernorm", (3, 32, 32)))
    bn = count_parameters(_build("resnet20", "batchnorm", (3, 32, 32)))
    assert bn == ln  # both have a C-sized weight and bias
    # norm="none": norms vanish and every conv gains a bias of its out channels
    norm_params = 2 * (16 + 6 * 16 + 6 * 32 + 32 + 6 * 64 + 64)
    conv_biases = 16 + 6 * 16 + 6 * 32 + 32 + 6 * 64 + 64
    none = count_parameters(_build("resnet20", "none", (3, 32, 32)))
    assert none == ln - norm_params + conv_biases


def test_vgg11_parameter_count() -> None:
    chans = [64, 128, 256, 256, 512, 512, 512, 512]
    convs = sum(_conv(i, o, 3) for i, o in zip([3, *chans[:-1]], chans))
    expected = convs + 2 * sum(chans) + 512 * 10 + 10
    assert count_parameters(_build("vgg11", "layernorm", (3, 32, 32))) == expected


def test_resnet18_parameter_count() -> None:
    expected = _conv(3, 64, 3) + 2 * 64
    prev = 64
    for c in (64, 128, 256, 512):
        for _block in range(2):
            expected += _conv(prev, c, 3) + _conv(c, c, 3) + 4 * c
            if prev != c:
                expected += _conv(prev, c, 1) + 2 * c
            prev = c
    expected += 512 * 10 + 10
    assert count_parameters(_build("resnet18", "batchnorm", (3, 32, 32))) == expected


def test_count_parameters_skips_frozen() -> None:
    model = build_model("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=(5,))
    total = count_parameters(model)
    model.head.weight.requires_grad_(False)
    assert count_parameters(model) == total - 15


# ------------------------------------------------------------ structure, width


def test_width_multiplies_channels() -> None:
    m = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, width=3)
    assert m.stem.conv.weight.shape == (48, 3, 3, 3)
    assert m.layers[0][0].conv1.weight.shape == (48, 48, 3, 3)
    assert m.layers[1][0].shortcut.conv.weight.shape == (96, 48, 1, 1)
    assert m.layers[2][2].conv2.weight.shape == (192, 192, 3, 3)
    assert m.layers[2][2].norm2.weight.shape == (192,)
    assert m.head.in_features == 192
    v = build_model("vgg11", input_shape=(1, 28, 28), num_classes=10, width=2)
    assert v.features[0].conv.weight.shape == (128, 1, 3, 3)
    assert v.head.in_features == 1024
    mlp = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, width=2)
    assert [blk.linear.out_features for blk in mlp.layers] == [1024, 1024, 1024]
    assert mlp.head.in_features == 1024


def test_readable_parameter_names() -> None:
    names = set(dict(_build("resnet20", "layernorm", (3, 32, 32)).named_parameters()))
    for key in (
        "stem.conv.weight",
        "stem.norm.weight",
        "layers.0.0.conv1.weight",
        "layers.1.0.shortcut.conv.weight",
        "layers.1.0.shortcut.norm.bias",
        "head.weight",
        "head.bias",
    ):
        assert key in names
    r18 = dict(_build("resnet18", "batchnorm", (3, 32, 32)).state_dict())
    assert "layers.3.1.norm2.running_mean" in r18
    assert "layers.0.0.shortcut.conv.weight" not in r18  # stage 1 keeps its shape
    mlp = set(dict(build_model("mlp", input_shape=(1, 28, 28), num_classes=10).named_parameters()))
    assert {"layers.0.linear.weight", "layers.2.linear.bias", "head.weight"} <= mlp


def test_norm_choice_and_conv_bias() -> None:
    for name in CNNS:
        for norm, norm_type in (("layernorm", LayerNorm2d), ("batchnorm", nn.BatchNorm2d), ("none", None)):
            model = _build(name, norm, (1, 28, 28))
            convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
            assert convs
            assert all((c.bias is not None) == (norm == "none") for c in convs)
            kinds = {type(m) for m in model.modules()}
            for other in (LayerNorm2d, nn.BatchNorm2d):
                assert (other in kinds) == (other is norm_type)


def test_vgg_pools_skipped_on_small_inputs() -> None:
    small = _build("vgg11", "layernorm", (1, 28, 28))
    big = _build("vgg11", "layernorm", (3, 32, 32))
    assert sum(isinstance(m, nn.MaxPool2d) for m in small.features) == 4
    assert sum(isinstance(m, nn.MaxPool2d) for m in big.features) == 5
    assert list(small.state_dict()) == list(big.state_dict())
    tiny = _build("vgg16", "batchnorm", (3, 5, 7))
    assert tiny(torch.randn(2, 3, 5, 7)).shape == (2, 10)


# ------------------------------------------------------------ determinism


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seed_determinism(name: str) -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return build_model(name, input_shape=(1, 28, 28), num_classes=10).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------ LayerNorm2d


def _reference_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    nhwc = x.permute(0, 2, 3, 1).to(torch.float64)
    mean = nhwc.mean(dim=-1, keepdim=True)
    var = ((nhwc - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (nhwc - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()
    return y.permute(0, 3, 1, 2).to(x.dtype)


def test_layernorm2d_matches_reference() -> None:
    torch.manual_seed(0)
    ln = LayerNorm2d(6)
    assert ln.weight.shape == (6,) and ln.bias.shape == (6,)
    assert list(dict(ln.named_parameters())) == ["weight", "bias"]
    with torch.no_grad():
        ln.weight.copy_(torch.randn(6))
        ln.bias.copy_(torch.randn(6))
    x = torch.randn(3, 6, 5, 4) * 3 + 1
    torch.testing.assert_close(ln(x), _reference_layernorm(x, ln.weight, ln.bias, ln.eps), rtol=0, atol=1e-5)
    torch.fx.symbolic_trace(ln)


@pytest.mark.parametrize(
    "channels,h,w,seed",
    [(1, 1, 1, 0), (2, 3, 1, 1), (5, 4, 4, 2), (7, 1, 6, 3), (12, 5, 3, 4), (16, 2, 2, 5)],
)
def test_layernorm2d_reference_and_permutation(channels: int, h: int, w: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ln = LayerNorm2d(channels)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(channels, generator=gen))
        ln.bias.copy_(torch.randn(channels, generator=gen))
    x = torch.randn(2, channels, h, w, generator=gen)
    with torch.no_grad():
        y = ln(x)
    torch.testing.assert_close(y, _reference_layernorm(x, ln.weight, ln.bias, ln.eps), rtol=0, atol=1e-5)
    perm = torch.randperm(channels, generator=gen)
    permuted = LayerNorm2d(channels)
    with torch.no_grad():
        permuted.weight.copy_(ln.weight[perm])
        permuted.bias.copy_(ln.bias[perm])
        y_perm = permuted(x[:, perm])
    torch.testing.assert_close(y_perm, y[:, perm], rtol=0, atol=1e-5)


# ------------------------------------------------------------ errors


def test_unknown_model_name_lists_valid_names() -> None:
    for call in (
        lambda: build_model("resnet50", input_shape=(3, 32, 32), num_classes=10),
        lambda: model_defaults("resnet50"),
    ):
        with pytest.raises(ModelError) as info:
            call()
        assert "resnet50" in str(info.value)
        assert all(name in str(info.value) for name in MODEL_NAMES)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ModelError) as info:
        build_model("mlp", input_shape=(1, 28, 28), num_classes=10, norm="batchnorm")
    msg = str(info.value)
    assert "norm" in msg and "hidden" in msg and "width" in msg
    with pytest.raises(ModelError) as info:
        build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, depth=56)
    msg = str(info.value)
    assert "depth" in msg and "width" in msg and "norm" in msg


def test_bad_norm_lists_norms() -> None:
    for norm in ("groupnorm", None, "LayerNorm"):
        with pytest.raises(ModelError) as info:
            build_model("vgg11", input_shape=(3, 32, 32), num_classes=10, norm=norm)
        assert all(n in str(info.value) for n in NORMS)


@pytest.mark.parametrize("width", [0, -1, 1.5, True, "2", None])
def test_width_must_be_positive_int(width: object) -> None:
    for name in ("mlp", "resnet20"):
        with pytest.raises(ModelError, match="width"):
            build_model(name, input_shape=(3, 32, 32), num_classes=10, width=width)


def test_bad_shapes_hidden_and_classes() -> None:
    with pytest.raises(ModelError):
        build_model("resnet20", input_shape=(32, 32), num_classes=10)
    with pytest.raises(ModelError):
        build_model("resnet20", input_shape=(3, 0, 32), num_classes=10)
    with pytest.raises(ModelError):
        build_model("resnet20", input_shape=(3, 32, 32), num_classes=0)
    for hidden in ((512, 0), "512", 512, (2.5,)):
        with pytest.raises(ModelError, match="hidden"):
            build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=hidden)
    # an empty hidden tuple is a linear model
    lin = build_model("mlp", input_shape=(1, 2, 2), num_classes=3, hidden=())
    assert count_parameters(lin) == 4 * 3 + 3
