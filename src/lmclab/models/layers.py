"""Small composite layers shared by the CNNs (conv → norm → ReLU, BasicBlock)."""

from __future__ import annotations

import torch
from torch import nn

from .norms import conv_bias, make_norm

__all__ = ["ConvNorm", "ConvNormAct", "BasicBlock"]


class ConvNorm(nn.Module):
    """``conv`` → ``norm`` (used as the projection shortcut of a BasicBlock)."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=conv_bias(norm),
        )
        self.norm = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class ConvNormAct(ConvNorm):
    """``conv`` (3×3 by default, 'same' padding) → ``norm`` → ``act`` (ReLU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        norm: str,
        kernel_size: int = 3,
        stride: int = 1,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size=kernel_size, stride=stride, norm=norm)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class BasicBlock(nn.Module):
    """ResNet BasicBlock: conv3×3 → norm → ReLU → conv3×3 → norm, + shortcut, ReLU.

    The shortcut is :class:`torch.nn.Identity` when the shape is unchanged and a
    1×1 strided conv + norm (:class:`ConvNorm`) otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int, norm: str) -> None:
        super().__init__()
        bias = conv_bias(norm)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm(norm, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ConvNorm(in_channels, out_channels, kernel_size=1, stride=stride, norm=norm)
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))
