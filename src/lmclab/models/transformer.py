"""A transformer encoder over sequences, from standard layers: an image read as a sequence of its rows.

An image (C, H, W) is H tokens of C·W features (MNIST: 28 tokens of 28; CIFAR-10: 32 tokens of 96):
Linear embedding to D = dim · width → + learned position embeddings (1, H, D) → ``depth``
``nn.TransformerEncoderLayer`` (pre-norm, GELU, ``heads`` heads, feed-forward mlp_ratio · D, no dropout, so
train mode computes the same function as eval mode) → LayerNorm → mean over the tokens → Linear head.
Traceable by ``torch.fx``; its permutation spec (residual stream, heads, within-head units, feed-forward
units) is derived by :mod:`lmclab.permutation.derive`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .registry import register_model
from .vit import positive_option

__all__ = ["SeqTransformer"]


class SeqTransformer(nn.Module):
    """Modules: ``embed`` (Linear C·W → D), ``pos_embed`` (1, H, D), ``layers.<i>``
    (``nn.TransformerEncoderLayer``: ``self_attn``, ``linear1``, ``linear2``, ``norm1``, ``norm2``), ``norm``,
    ``head``."""

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, *, dim: int, depth: int, heads: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if dim % heads:
            raise ModelError(f"{heads} heads do not divide the embedding dimension {dim}")
        hidden = int(dim * mlp_ratio)
        if hidden < 1:
            raise ModelError(f"mlp_ratio {mlp_ratio} leaves the MLP of dimension {dim} without a hidden unit")
        self.embed = nn.Linear(c * w, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, h, dim) * 0.02)
        self.layers = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    dim, heads, hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
                )
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 1, 3).flatten(2)  # N × H × (C·W): one token per image row
        x = self.layers(self.embed(x) + self.pos_embed)
        return self.head(self.norm(x).mean(1))


@register_model(
    "seq_transformer",
    {"dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "width": 1},
    "transformer encoder over an image's rows (H tokens of C·W features): nn.TransformerEncoderLayer, "
    "dim × width, depth, heads, mlp_ratio, mean pool",
)
def _build_seq_transformer(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
    return SeqTransformer(
        shape,
        num_classes,
        dim=positive_option("seq_transformer", opts, "dim") * opts["width"],
        depth=positive_option("seq_transformer", opts, "depth"),
        heads=positive_option("seq_transformer", opts, "heads"),
        mlp_ratio=float(positive_option("seq_transformer", opts, "mlp_ratio", float)),
    )
