"""One ResNet class (BasicBlocks) parameterised by stage widths/depths/strides."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import BasicBlock, ConvNormAct

__all__ = ["ResNet", "resnet20", "resnet18"]


class ResNet(nn.Module):
    """CIFAR-style ResNet of BasicBlocks.

    stem (conv3×3 → norm → ReLU, stride 1, no max-pool) → ``layers`` (one
    ``nn.Sequential`` of BasicBlocks per stage; the first block of a stage takes
    the stage's stride) → global average ``pool`` → ``flatten`` → Linear ``head``.
    Modules are named e.g. ``stem.conv``, ``layers.0.0.conv1``,
    ``layers.1.0.shortcut.conv``, ``head``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        stem_width: int,
        stage_widths: Sequence[int],
        stage_depths: Sequence[int],
        stage_strides: Sequence[int],
        norm: str,
    ) -> None:
        super().__init__()
        if not (len(stage_widths) == len(stage_depths) == len(stage_strides)):
            raise ValueError("stage_widths, stage_depths and stage_strides differ in length")
        self.stem = ConvNormAct(in_channels, stem_width, norm=norm)
        stages = []
        prev = stem_width
        for width, depth, stride in zip(stage_widths, stage_depths, stage_strides):
            blocks = []
            for i in range(depth):
                blocks.append(BasicBlock(prev, width, stride=stride if i == 0 else 1, norm=norm))
                prev = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(self.flatten(self.pool(x)))


def resnet20(*, in_channels: int, num_classes: int, width: int, norm: str) -> ResNet:
    """Git Re-Basin's ResNet-20: 3 stages × 3 blocks, 16w/32w/64w channels."""
    return ResNet(
        in_channels=in_channels,
        num_classes=num_classes,
        stem_width=16 * width,
        stage_widths=(16 * width, 32 * width, 64 * width),
        stage_depths=(3, 3, 3),
        stage_strides=(1, 2, 2),
        norm=norm,
    )


def resnet18(*, in_channels: int, num_classes: int, width: int, norm: str) -> ResNet:
    """CIFAR-style ResNet-18: 4 stages × 2 blocks, 64w/128w/256w/512w channels."""
    return ResNet(
        in_channels=in_channels,
        num_classes=num_classes,
        stem_width=64 * width,
        stage_widths=(64 * width, 128 * width, 256 * width, 512 * width),
        stage_depths=(2, 2, 2, 2),
        stage_strides=(1, 2, 2, 2),
        norm=norm,
    )
