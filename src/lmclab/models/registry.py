"""The model zoo's registry: one entry per model (builder, default options, description); build by name.

A model registers itself with :func:`register_model` on its builder ``build(input_shape, num_classes,
options) -> nn.Module`` (options resolved: the defaults updated by the caller's, validated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from torch import nn

from .errors import ModelError
from .mlp import MLP
from .norms import check_norm
from .resnet import resnet18, resnet20
from .vgg import VGG, VGG_CONFIGS

__all__ = ["MODELS", "MODEL_NAMES", "ModelEntry", "build_model", "count_parameters", "model_defaults", "register_model"]

#: build(input_shape (C, H, W), num_classes, resolved options) -> the model.
Builder = Callable[[tuple[int, int, int], int, dict[str, Any]], nn.Module]
B = TypeVar("B", bound=Builder)


@dataclass(frozen=True)
class ModelEntry:
    """A model of the zoo: its builder, its full default options and a one-line description."""

    name: str
    build: Builder
    defaults: Mapping[str, object]
    description: str


#: The zoo by name, in registration order.
MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, defaults: Mapping[str, object], description: str) -> Callable[[B], B]:
    """Decorator: register `build` as model `name` with these default options (``width`` at least)."""

    def register(build: B) -> B:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        if "width" not in defaults:
            raise ValueError(f"model {name!r} must take a width option")
        MODELS[name] = ModelEntry(name, build, dict(defaults), description)
        return build

    return register


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in MODELS:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    return name


def _positive_int(value: object, what: str) -> int:
    # bool is an int subclass; reject it explicitly.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    try:
        # Any iterable will do; anything else raises the TypeError handled here.
        dims: tuple[object, ...] = tuple(cast(Iterable[object], input_shape))
    except TypeError:
        dims = ()
    if len(dims) != 3:
        raise ModelError(f"input_shape must be (C, H, W), got {input_shape!r}")
    c, h, w = (_positive_int(d, "every input_shape entry") for d in dims)
    return c, h, w


def _check_hidden(hidden: object) -> tuple[int, ...]:
    if isinstance(hidden, (str, bytes)):
        raise ModelError(f"hidden must be a sequence of positive ints, got {hidden!r}")
    try:
        sizes = tuple(cast(Iterable[object], hidden))
    except TypeError as err:
        raise ModelError(f"hidden must be a sequence of positive ints, got {hidden!r}") from err
    return tuple(_positive_int(h, "every hidden size") for h in sizes)


def model_defaults(name: str) -> dict[str, object]:
    """The full default keyword options of model ``name`` (a fresh dict)."""
    return dict(MODELS[_check_name(name)].defaults)


def _resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    defaults = MODELS[name].defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ModelError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"valid options: {', '.join(defaults)}"
        )
    resolved = {**defaults, **options}
    resolved["width"] = _positive_int(resolved["width"], "width")
    if "norm" in resolved:
        resolved["norm"] = check_norm(resolved["norm"])
    if "hidden" in resolved:
        resolved["hidden"] = _check_hidden(resolved["hidden"])
    return resolved


@register_model(
    "mlp",
    {"hidden": (512, 512, 512), "width": 1},
    "multilayer perceptron: hidden sizes × width, ReLU (Git Re-Basin's MNIST model)",
)
def _build_mlp(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
    c, h, w = shape
    hidden = tuple(size * opts["width"] for size in opts["hidden"])
    return MLP(c * h * w, hidden, num_classes)


@register_model(
    "resnet20",
    {"width": 1, "norm": "layernorm"},
    "CIFAR-style ResNet-20 (Git Re-Basin), any width, LayerNorm / BatchNorm / no norm",
)
def _build_resnet20(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
    return resnet20(in_channels=shape[0], num_classes=num_classes, width=opts["width"], norm=opts["norm"])


def _vgg_builder(
    cfg_name: str,
) -> Builder:
    def build(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
        return VGG(
            VGG_CONFIGS[cfg_name],
            input_shape=shape,
            num_classes=num_classes,
            width=opts["width"],
            norm=opts["norm"],
        )

    return build


register_model("vgg11", {"width": 1, "norm": "layernorm"}, "VGG-11, any width and norm")(_vgg_builder("vgg11"))
register_model("vgg16", {"width": 1, "norm": "layernorm"}, "VGG-16, any width and norm")(_vgg_builder("vgg16"))


@register_model("resnet18", {"width": 1, "norm": "batchnorm"}, "CIFAR-style ResNet-18, any width and norm")
def _build_resnet18(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
    return resnet18(in_channels=shape[0], num_classes=num_classes, width=opts["width"], norm=opts["norm"])


def build_model(name: str, *, input_shape: tuple[int, int, int], num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` (fp32, CPU) for inputs of shape ``(C, H, W)``.

    ``options`` override :func:`model_defaults` (``width``, and ``hidden`` for
    ``mlp`` or ``norm`` — one of :data:`NORMS` — for the CNNs). Weights are
    drawn from torch's global RNG, so seeding it makes the build reproducible.
    Raises :class:`ModelError` for an unknown name, option, or bad value.
    """
    name = _check_name(name)
    shape = _check_input_shape(input_shape)
    classes = _positive_int(num_classes, "num_classes")
    opts = _resolve_options(name, options)
    return MODELS[name].build(shape, classes, opts)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#: The built-in models' names (a snapshot taken at import; :data:`MODELS` is the live registry).
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
