"""Fully connected ReLU network (Git Re-Basin's MNIST MLP by default)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["LinearAct", "MLP"]


class LinearAct(nn.Module):
    """``linear`` → ``act`` (ReLU)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class MLP(nn.Module):
    """flatten → (Linear → ReLU) per hidden size → Linear ``head``.

    Modules: ``flatten``, ``layers.<i>.linear``, ``layers.<i>.act``, ``head``.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        blocks = []
        prev = in_features
        for h in hidden:
            blocks.append(LinearAct(prev, h))
            prev = h
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.flatten(x)))
