"""Models as functions of their parameters: f(θ, x) = logits, with buffers held fixed.

Curvature is taken in eval mode on fixed data in fp32: a point θ (a state dict) splits into the
trainable parameters (the coordinates that directions and Hessians live in) and the buffers (BN
running statistics), which stay at the point's own values (:func:`lmclab.points.split_point`).
Directions d = θ_B − θ_A are over the parameters only:
``lmclab.points.direction(θ_A, θ_B, keys=parameter_names(model))``.

Attention runs on scaled-dot-product attention's math backend here (:func:`exact_attention`): torch's
fused kernels have neither forward-mode derivatives nor a double backward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lmclab.data import DeviceDataset
from lmclab.models.attention import exact_attention
from lmclab.paths import layer_groups
from lmclab.points import Point, PointLike, parameter_names, split_point

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> summed loss over the batch


def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_i CE(z_i, y_i): batches add up to N · mean loss, so uneven last batches are weighted exactly."""
    return F.cross_entropy(logits, targets, reduction="sum")


@dataclass
class FunctionalModel:
    """f(params, x) over a private eval-mode copy of the architecture, buffers fixed."""

    module: nn.Module
    params: Point  # trainable parameters of the point (detached, in the point's dtype, model order)
    buffers: Point  # buffers of the point (BN statistics), held fixed

    def logits(self, params: PointLike, x: torch.Tensor) -> torch.Tensor:
        """f(params, x); attention on the math backend (:func:`exact_attention`) so every derivative exists."""
        with exact_attention():
            return functional_call(self.module, {**self.buffers, **params}, (x,))

    def zeros_like_params(self) -> Point:
        return {k: torch.zeros_like(v) for k, v in self.params.items()}


def functional_model(model: nn.Module, theta: PointLike | None = None) -> FunctionalModel:
    """Split θ (default: the model's state dict) into parameters and buffers; the copy is in eval mode."""
    module = copy.deepcopy(model).eval()
    params, buffers = split_point(theta if theta is not None else module.state_dict(), module)
    return FunctionalModel(module, params, buffers)


def parameter_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Layer groups (:func:`lmclab.paths.layer_groups`) restricted to parameters: the blocks of Prop. 2 / eq. 20."""
    params = set(parameter_names(model))
    return {name: [t for t in tensors if t in params] for name, tensors in layer_groups(model).items()}


def iterate_batches(
    data: DeviceDataset | Iterable[Batch], batch_size: int = 50, max_examples: int | None = None
) -> Iterator[Batch]:
    """(x, y) batches in a fixed order (un-augmented); at most `max_examples` examples in all."""
    source = data.batches(batch_size) if isinstance(data, DeviceDataset) else iter(data)
    seen = 0
    for x, y in source:
        if max_examples is not None:
            if seen >= max_examples:
                return
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        seen += len(y)
        yield x, y
