"""Paper recipes as named presets. Any field can be overridden (`lmclab train PRESET --lr 0.05`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    source: str  # where the recipe comes from
    config: RunConfig


def _cifar_sgd(epochs: int, batch_size: int, lr: float = 0.1, weight_decay: float = 1e-4, **kw: Any) -> TrainConfig:
    return TrainConfig(
        optimizer="sgd", lr=lr, momentum=0.9, weight_decay=weight_decay, batch_size=batch_size, epochs=epochs, **kw
    )


_GIT_REBASIN_RESNET = _cifar_sgd(250, 100, schedule="cosine", warmup_epochs=5.0)
_SINGH_B1 = _cifar_sgd(160, 128, schedule="step", milestones=(80, 120), gamma=0.1)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "mlp_mnist",
            "Git Re-Basin (Ainsworth et al. 2023): MLP 784-512-512-512-10, Adam 1e-3, batch 500",
            RunConfig(
                DataConfig("mnist"),
                ModelConfig("mlp"),
                TrainConfig(optimizer="adam", lr=1e-3, batch_size=500, epochs=25),
                SeedConfig(),
            ),
        ),
        Preset(
            "mlp_fashion_mnist",
            "mlp_mnist's recipe on Fashion-MNIST (Ito et al. 2025 use both)",
            RunConfig(
                DataConfig("fashion_mnist"),
                ModelConfig("mlp"),
                TrainConfig(optimizer="adam", lr=1e-3, batch_size=500, epochs=25),
                SeedConfig(),
            ),
        ),
        Preset(
            "resnet20_cifar10",
            "Git Re-Basin / Benkő: ResNet-20 + LayerNorm, SGD 0.1 m0.9 wd1e-4, "
            "250 epochs, 5 warm-up + cosine, batch 100",
            RunConfig(DataConfig("cifar10"), ModelConfig("resnet20", norm="layernorm"), _GIT_REBASIN_RESNET),
        ),
        Preset(
            "resnet20_cifar100",
            "Benkő Fig. 5: resnet20_cifar10's recipe on CIFAR-100",
            RunConfig(DataConfig("cifar100"), ModelConfig("resnet20", norm="layernorm"), _GIT_REBASIN_RESNET),
        ),
        Preset(
            "resnet20_bn_cifar10",
            "Singh et al. appendix B.1 (after Frankle et al.): ResNet-20 + BN, SGD 0.1 "
            "m0.9 wd1e-4, batch 128, 160 epochs, ÷10 at 80 and 120",
            RunConfig(DataConfig("cifar10"), ModelConfig("resnet20", norm="batchnorm"), _SINGH_B1),
        ),
        Preset(
            "vgg11_cifar10",
            "VGG-11 (Ito et al. use ×4) + LayerNorm; lmclab's choice of recipe: SGD 0.05 m0.9 "
            "wd5e-4, batch 128, 100 epochs, 1 warm-up + cosine",
            RunConfig(
                DataConfig("cifar10"),
                ModelConfig("vgg11", norm="layernorm"),
                _cifar_sgd(100, 128, lr=0.05, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0),
            ),
        ),
        Preset(
            "vgg16_cifar10",
            "VGG-16 + LayerNorm (Git Re-Basin's VGG), vgg11_cifar10's recipe",
            RunConfig(
                DataConfig("cifar10"),
                ModelConfig("vgg16", norm="layernorm"),
                _cifar_sgd(100, 128, lr=0.05, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0),
            ),
        ),
        Preset(
            "resnet18_cifar10",
            "Singh et al. B.4.2: ResNet-18 + BN with the B.1 recipe",
            RunConfig(DataConfig("cifar10"), ModelConfig("resnet18", norm="batchnorm"), _SINGH_B1),
        ),
        Preset(
            "resnet18_nobn_cifar10",
            "Singh et al. B.4.1: ResNet-18 without BN, lr 0.05, batch 64 (other settings from B.1)",
            RunConfig(
                DataConfig("cifar10"),
                ModelConfig("resnet18", norm="none"),
                _cifar_sgd(160, 64, lr=0.05, schedule="step", milestones=(80, 120)),
            ),
        ),
        Preset(
            "vit_mnist",
            "lmclab's CPU smoke recipe: tiny ViT (patch 7, dim 64, depth 4, 4 heads, MLP ×2) on MNIST, "
            "Adam 1e-3, batch 128, 5 epochs",
            RunConfig(
                DataConfig("mnist"),
                ModelConfig("vit"),
                TrainConfig(optimizer="adam", lr=1e-3, batch_size=128, epochs=5),
                SeedConfig(),
            ),
        ),
        Preset(
            "vit_cifar10",
            "ViT-CIFAR (omihub777/ViT-CIFAR, 91.0% on CIFAR-10 with 6.3M parameters; ViT of Dosovitskiy et al. "
            "2021): patch 4 (64 tokens), dim 384, depth 7, 12 heads, MLP ×1 (384), no dropout; Adam 1e-3 "
            "(wd 5e-5 as L2), batch 128, 200 epochs, 5 warm-up + cosine. Not in lmclab's trainer: label smoothing "
            "0.1, AutoAugment (lmclab's CIFAR augmentation, pad-4 crop + flip, instead) and the cosine's floor "
            "1e-5 (lmclab's cosine ends at 0)",
            RunConfig(
                DataConfig("cifar10"),
                ModelConfig("vit", dim=384, depth=7, heads=12, mlp_ratio=1.0),  # patch: automatic, 4 on 32×32
                TrainConfig(
                    optimizer="adam",
                    lr=1e-3,
                    weight_decay=5e-5,
                    schedule="cosine",
                    warmup_epochs=5.0,
                    batch_size=128,
                    epochs=200,
                ),
                SeedConfig(),
            ),
        ),
    ]
}


class UnknownPreset(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownPreset(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
