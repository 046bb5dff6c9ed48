"""Build models of the zoo by name, with validated keyword options."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .errors import ModelError
from .mlp import MLP
from .norms import check_norm
from .resnet import resnet18, resnet20
from .vgg import VGG, VGG_CONFIGS

__all__ = ["MODEL_NAMES", "model_defaults", "build_model", "count_parameters"]

#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = ("mlp", "resnet20", "vgg11", "vgg16", "resnet18")

_DEFAULTS: dict[str, dict[str, object]] = {
    "mlp": {"hidden": (512, 512, 512), "width": 1},
    "resnet20": {"width": 1, "norm": "layernorm"},
    "vgg11": {"width": 1, "norm": "layernorm"},
    "vgg16": {"width": 1, "norm": "layernorm"},
    "resnet18": {"width": 1, "norm": "batchnorm"},
}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or name not in MODEL_NAMES:
        raise ModelError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
    return name


def _positive_int(value: object, what: str) -> int:
    # bool is an int subclass; reject it explicitly.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _check_input_shape(input_shape: object) -> tuple[int, int, int]:
    try:
        dims = tuple(input_shape)  # type: ignore[arg-type]
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
        sizes = tuple(hidden)  # type: ignore[arg-type]
    except TypeError as err:
        raise ModelError(
            f"hidden must be a sequence of positive ints, got {hidden!r}"
        ) from err
    return tuple(_positive_int(h, "every hidden size") for h in sizes)


def model_defaults(name: str) -> dict[str, object]:
    """The full default keyword options of model ``name`` (a fresh dict)."""
    return dict(_DEFAULTS[_check_name(name)])


def _resolve_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    defaults = _DEFAULTS[name]
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


def _build_mlp(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
    c, h, w = shape
    hidden = tuple(size * opts["width"] for size in opts["hidden"])
    return MLP(c * h * w, hidden, num_classes)


def _build_resnet20(
    shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]
) -> nn.Module:
    return resnet20(
        in_channels=shape[0], num_classes=num_classes, width=opts["width"], norm=opts["norm"]
    )


def _build_resnet18(
    shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]
) -> nn.Module:
    return resnet18(
        in_channels=shape[0], num_classes=num_classes, width=opts["width"], norm=opts["norm"]
    )


def _vgg_builder(
    cfg_name: str,
) -> Callable[[tuple[int, int, int], int, dict[str, Any]], nn.Module]:
    def build(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
        return VGG(
            VGG_CONFIGS[cfg_name],
            input_shape=shape,
            num_classes=num_classes,
            width=opts["width"],
            norm=opts["norm"],
        )

    return build


_BUILDERS: dict[str, Callable[[tuple[int, int, int], int, dict[str, Any]], nn.Module]] = {
    "mlp": _build_mlp,
    "resnet20": _build_resnet20,
    "vgg11": _vgg_builder("vgg11"),
    "vgg16": _vgg_builder("vgg16"),
    "resnet18": _build_resnet18,
}


def build_model(
    name: str, *, input_shape: tuple[int, int, int], num_classes: int, **options: Any
) -> nn.Module:
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
    return _BUILDERS[name](shape, classes, opts)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


