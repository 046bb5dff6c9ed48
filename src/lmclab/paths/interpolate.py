"""Points on straight paths in parameter space, whole-model and layer-wise.

θ_λ = (1−λ)θ_A + λθ_B for every floating-point tensor (parameters and BN statistics); integer
buffers (BN's num_batches_tracked) are taken from θ_A. Layer-wise (Adilova et al.): only the
tensors of chosen layers are interpolated, all others come from a base endpoint.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence

import torch

from lmclab.permutation import Params


def lerp(theta_a: Mapping[str, torch.Tensor], theta_b: Mapping[str, torch.Tensor], lam: float,
         only: Iterable[str] | None = None, base: str = "a") -> Params:
    """(1−λ)θ_A + λθ_B on the tensors in `only` (default: all); the rest from θ_A (base "a") or θ_B ("b")."""
    if theta_a.keys() != theta_b.keys():
        raise KeyError(f"endpoints differ in tensors: {sorted(set(theta_a) ^ set(theta_b))}")
    if base not in ("a", "b"):
        raise ValueError(f"base must be 'a' or 'b', got {base!r}")
    chosen = set(theta_a) if only is None else set(only)
    unknown = chosen - set(theta_a)
    if unknown:
        raise KeyError(f"no such tensors to interpolate: {sorted(unknown)}")
    out: Params = {}
    for k, a in theta_a.items():
        if not a.is_floating_point():
            out[k] = a
        elif k in chosen:
            out[k] = torch.lerp(a, theta_b[k].to(a.device, a.dtype), lam)  # exact at λ = 0 and λ = 1
        else:
            out[k] = a if base == "a" else theta_b[k]
    return out


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
