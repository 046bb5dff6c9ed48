"""Model zoo of lmclab, built by name: ``build_model("resnet20", input_shape=..., num_classes=...)``.

Models: ``mlp``, ``resnet20`` (Git Re-Basin), ``vgg11``, ``vgg16`` and ``resnet18``
(CIFAR-style). CNNs take a ``norm`` option (``layernorm``, ``batchnorm`` or
``none``; with ``none`` the convs carry a bias) and all take a ``width``
multiplier. Transformers: ``vit`` and ``seq_transformer`` (an image's rows as a
sequence), with ``dim``, ``depth``, ``heads``, ``mlp_ratio`` (and the ViT's
``patch``). Every model is a plain ``nn.Module`` traceable by ``torch.fx``.
"""

from __future__ import annotations

from .errors import ModelError
from .layers import BasicBlock, ConvNorm, ConvNormAct
from .mlp import MLP
from .norms import NORMS, LayerNorm2d, make_norm
from .registry import MODELS, build_model, count_parameters, model_defaults
from .resnet import ResNet
from .transformer import SeqTransformer
from .vgg import VGG, VGG_CONFIGS
from .vit import ViT

#: Every registered model, also those registered by their own module (vit, seq_transformer) after registry's
#: snapshot.
MODEL_NAMES = tuple(MODELS)

__all__ = [
    "MODEL_NAMES",
    "NORMS",
    "ModelError",
    "model_defaults",
    "build_model",
    "count_parameters",
    "LayerNorm2d",
    "make_norm",
    "MLP",
    "ResNet",
    "VGG",
    "VGG_CONFIGS",
    "ViT",
    "SeqTransformer",
    "BasicBlock",
    "ConvNorm",
    "ConvNormAct",
]
