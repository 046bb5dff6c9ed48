"""CIFAR-style VGG (vgg11, vgg16) that also accepts small inputs such as 28×28."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import ConvNormAct

__all__ = ["VGG_CONFIGS", "VGG"]

#: Layer configurations: an int is a conv3×3 with that many channels (× width),
#: ``"M"`` a 2×2 max-pool.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        "M",
    ),
}


class VGG(nn.Module):
    """``features`` (ConvNormAct / MaxPool2d) → avg ``pool`` to 1×1 → ``flatten`` → ``head``.

    A max-pool is kept only while both spatial sides are ≥ 2 (computed from the
    input shape at construction); a skipped pool becomes ``nn.Identity`` so that
    module indices (``features.<i>.conv``) do not depend on the input size.
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        *,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int,
        norm: str,
    ) -> None:
        super().__init__()
        in_channels, h, w = input_shape
        layers: list[nn.Module] = []
        prev = in_channels
        for item in cfg:
            if item == "M":
                if h >= 2 and w >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                else:
                    layers.append(nn.Identity())
            else:
                channels = int(item) * width
                layers.append(ConvNormAct(prev, channels, norm=norm))
                prev = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.features(x))))
