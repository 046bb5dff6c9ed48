"""Vision Transformer (Dosovitskiy et al. 2021) from standard layers, sized for 28×28 and 32×32 images.

patch embedding (a Conv2d with kernel = stride = patch) → class token + learned position embeddings →
``depth`` pre-norm blocks  x ← x + MHA(LN(x)),  x ← x + MLP(LN(x))  (MLP: Linear → GELU → Linear,
hidden = mlp_ratio · D) → LayerNorm → Linear head on the class token. D = dim · width; attention is
``nn.MultiheadAttention`` with ``heads`` heads (no dropout, so train mode computes the same function as
eval mode). Traceable by ``torch.fx``; its permutation spec (residual stream, heads, within-head units,
MLP hidden units) is derived by :mod:`lmclab.permutation.derive`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import ModelError
from .registry import register_model

__all__ = ["ViT", "ViTBlock", "auto_patch", "positive_option"]


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Modules: ``patch_embed`` (Conv2d), ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + T, D),
    ``blocks.<i>`` (:class:`ViTBlock`), ``norm``, ``head``."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        patch: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ModelError(f"patch {patch} does not divide the image size {h}×{w}")
        if dim % heads:
            raise ModelError(f"{heads} heads do not divide the embedding dimension {dim}")
        if int(dim * mlp_ratio) < 1:
            raise ModelError(f"mlp_ratio {mlp_ratio} leaves the MLP of dimension {dim} without a hidden unit")
        tokens = (h // patch) * (w // patch)
        self.patch_embed = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, int(dim * mlp_ratio)) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # N × T × D
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def auto_patch(h: int, w: int) -> int:
    """patch = 0 ("auto"): 7 for 28×28 images (16 tokens), 4 for 32×32 (64 tokens, the ViT-on-CIFAR
    choice); other sizes need an explicit patch."""
    if (h, w) == (28, 28):
        return 7
    if (h, w) == (32, 32):
        return 4
    raise ModelError(f"no automatic patch size for {h}×{w} images; pass patch=")


def positive_option(model: str, opts: dict[str, Any], key: str, kind: type = int) -> Any:
    """``opts[key]``, a positive int (or, with ``kind=float``, a positive number); ModelError naming ``model``."""
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or v <= 0:
        raise ModelError(f"{model} option {key} must be a positive {kind.__name__}, got {v!r}")
    return v


@register_model(
    "vit",
    {"patch": 0, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "width": 1},
    "Vision Transformer: patch (0 = 7 on 28×28, 4 on 32×32), dim × width, depth, heads, mlp_ratio",
)
def _build_vit(shape: tuple[int, int, int], num_classes: int, opts: dict[str, Any]) -> nn.Module:
    patch = opts["patch"]
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 0:
        raise ModelError(f"vit option patch must be a positive int (0 = automatic), got {patch!r}")
    patch = patch or auto_patch(shape[1], shape[2])
    return ViT(
        shape,
        num_classes,
        patch=patch,
        dim=positive_option("vit", opts, "dim") * opts["width"],
        depth=positive_option("vit", opts, "depth"),
        heads=positive_option("vit", opts, "heads"),
        mlp_ratio=float(positive_option("vit", opts, "mlp_ratio", float)),
    )
