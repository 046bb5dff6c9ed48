"""Parameter helpers shared by the permutation tests."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random non-trivial values for every per-unit vector (norm affine, BN running stats, biases), so
    that a spec missing one of them breaks invariance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.ndim != 1:
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model
