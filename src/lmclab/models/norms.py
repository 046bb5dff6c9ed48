"""Normalisation layers and the norm factory shared by all CNNs of the zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

__all__ = ["NORMS", "LayerNorm2d", "check_norm", "make_norm", "conv_bias"]

#: Valid values of the ``norm`` option of the CNNs.
NORMS: tuple[str, ...] = ("layernorm", "batchnorm", "none")


class LayerNorm2d(nn.Module):
    """Per-position LayerNorm over the channel axis of an NCHW tensor.

    Equivalent to Flax's ``nn.LayerNorm`` applied to the NHWC layout (as in Git
    Re-Basin's ResNet-20): every spatial position is normalised over its ``C``
    channels, then scaled and shifted by per-channel ``weight`` and ``bias`` of
    shape ``(C,)``. ``eps`` defaults to Flax's 1e-6.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.num_channels))
        self.bias = nn.Parameter(torch.zeros(self.num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape (N, C, H, W) over C; returns the same shape."""
        y = x.permute(0, 2, 3, 1)
        y = F.layer_norm(y, (self.num_channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


def check_norm(norm: object) -> str:
    """Return ``norm`` if it is one of :data:`NORMS`, else raise :class:`ModelError`."""
    if not isinstance(norm, str) or norm not in NORMS:
        raise ModelError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return norm


def make_norm(norm: str, num_channels: int) -> nn.Module:
    """Build the 2-d normalisation layer named ``norm`` for ``num_channels`` channels.

    ``"none"`` gives :class:`torch.nn.Identity` (no parameters).
    """
    norm = check_norm(norm)
    if norm == "layernorm":
        return LayerNorm2d(num_channels)
    if norm == "batchnorm":
        return nn.BatchNorm2d(num_channels)
    return nn.Identity()


def conv_bias(norm: str) -> bool:
    """Whether a conv followed by ``norm`` carries a bias.

    A norm layer has its own shift, so convs are bias-free before one; with
    ``norm="none"`` the convs get a bias so the network stays as expressive.
    """
    return check_norm(norm) == "none"
