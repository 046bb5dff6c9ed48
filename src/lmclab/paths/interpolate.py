"""Grids and layer sets for straight paths in parameter space, whole-model and layer-wise.

The points themselves are :func:`lmclab.points.lerp`: θ_λ = (1−λ)θ_A + λθ_B for every floating-point
tensor (parameters and BN statistics); integer buffers (BN's num_batches_tracked) are taken from θ_A.
Layer-wise (Adilova et al.): only the tensors of chosen layers are interpolated (``only=``), all others
come from a base endpoint (``base=``); :func:`layer_groups` names the layers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def layer_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """One group per module that owns parameters: module name -> its own tensor names (params + buffers)."""
    groups: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own:
            own += [n for n, _ in module.named_buffers(recurse=False)]
            groups[name] = [f"{name}.{n}" if name else n for n in own]
    return groups


def cumulative_layer_sets(groups: Sequence[str], order: str = "shallow", seed: int = 0) -> list[list[str]]:
    """Nested sets of layer groups: the first k of `groups` in `order` (shallow → deep, deep → shallow,
    or a seeded random order), for k = 1 … len(groups)."""
    names = list(groups)
    if order == "deep":
        names.reverse()
    elif order == "random":
        random.Random(seed).shuffle(names)
    elif order != "shallow":
        raise ValueError(f"order must be shallow, deep or random, got {order!r}")
    return [names[:k] for k in range(1, len(names) + 1)]


def default_lambdas(points: int = 25) -> list[float]:
    """`points` evenly spaced λ in [0, 1], both ends included."""
    if points < 2:
        raise ValueError(f"a path needs at least 2 points, got {points}")
    return [i / (points - 1) for i in range(points)]
