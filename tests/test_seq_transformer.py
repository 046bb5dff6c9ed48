"""The zoo's sequence transformer (an image read as a sequence of rows) and the transformer options of
ModelConfig (patch, dim, depth, heads, mlp_ratio): CLI flags, validation, and hashes that leave every earlier
run's identity alone."""

from __future__ import annotations

import argparse
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from lmclab.config import ModelConfig, RunConfig, TrainConfig, UsageError, add_config_flags, config_from_args
from lmclab.models import ModelError, build_model
from lmclab.models.transformer import SeqTransformer
from lmclab.permutation import Permutation, check_invariance, derive_spec
from lmclab.training import PRESETS, RunOptions, train

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = ((1, 28, 28), (3, 32, 32))


def _tiny(shape: tuple[int, int, int], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("seq_transformer", input_shape=shape, num_classes=10, dim=8, depth=2, heads=2)


# ------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rows_are_the_tokens(shape: tuple[int, int, int]) -> None:
    """The embedding sees H tokens of C·W features, token r = row r of every channel, channel-major; the
    head sees the mean over tokens of the final LayerNorm's output."""
    model = _tiny(shape)
    c, h, w = shape
    x = torch.randn(2, *shape)
    seen: dict[str, torch.Tensor] = {}
    model.embed.register_forward_hook(lambda m, i, o: seen.__setitem__("embed", i[0]))
    model.head.register_forward_hook(lambda m, i, o: seen.__setitem__("head", i[0]))
    model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))
    out = model(x)
    rows = torch.stack([torch.cat([x[:, k, r, :] for k in range(c)], dim=1) for r in range(h)], dim=1)
    assert seen["embed"].shape == (2, h, c * w)
    assert torch.equal(seen["embed"], rows)
    torch.testing.assert_close(seen["head"], seen["norm"].mean(1))
    assert out.shape == (2, 10)


def test_layers_and_options() -> None:
    model = build_model("seq_transformer", input_shape=(3, 32, 32), num_classes=10, dim=8, width=2, heads=4)
    assert isinstance(model, SeqTransformer)
    assert model.embed.in_features == 96 and model.embed.out_features == 16  # dim × width
    assert model.pos_embed.shape == (1, 32, 16) and len(model.layers) == 4  # the default depth
    layer = model.layers[0]
    assert isinstance(layer, nn.TransformerEncoderLayer) and layer.norm_first and layer.self_attn.batch_first
    assert layer.self_attn.num_heads == 4 and layer.linear1.out_features == 32  # mlp_ratio 2
    assert layer.activation is torch.nn.functional.gelu
    x = torch.randn(3, 3, 32, 32)
    model.train()
    y_train = model(x)
    model.eval()
    torch.testing.assert_close(model(x), y_train)  # no dropout: train mode computes the same function
    with pytest.raises(ModelError, match="heads"):
        build_model("seq_transformer", input_shape=(1, 28, 28), num_classes=10, dim=10, heads=4)
    with pytest.raises(ModelError, match="hidden unit"):
        build_model("seq_transformer", input_shape=(1, 28, 28), num_classes=10, dim=8, mlp_ratio=0.1)
    with pytest.raises(ModelError, match="seq_transformer option depth"):
        build_model("seq_transformer", input_shape=(1, 28, 28), num_classes=10, depth=0)
    with pytest.raises(ModelError, match="patch"):  # not an option of this model
        build_model("seq_transformer", input_shape=(1, 28, 28), num_classes=10, patch=7)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_spec_coverage_and_float64_invariance(shape: tuple[int, int, int]) -> None:
    """Derived spec: one residual stream (embedding, position embeddings, every LayerNorm, the head's input),
    per layer a head permutation shared by the qk and vo groups, the feed-forward units; only the head's bias
    stays fixed. f(π(θ)) = f(θ) on the float64 logits, eval and train mode, to 1e-5 relative."""
    model = _tiny(shape)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    spec = derive_spec(model, x)
    names = {g.name: g for g in spec.groups}
    stream = names["P_embed"]
    tensors = {a.tensor for a in stream.axes}
    assert {"embed.weight", "pos_embed", "norm.weight", "head.weight", "layers.1.norm2.bias"} <= tensors
    for i in range(2):
        qk, vo = names[f"P_layers.{i}.self_attn.qk"], names[f"P_layers.{i}.self_attn.vo"]
        assert (qk.blocks, qk.block_size, vo.blocks, vo.block_size) == (2, 4, 2, 4)
        assert qk.block_perm == vo.block_perm
        assert names[f"P_layers.{i}.linear1"].size == 16
    params = dict(model.named_parameters())
    expected = 1 - params["head.bias"].numel() / sum(p.numel() for p in params.values())
    assert spec.meta["coverage"] == pytest.approx(expected) and spec.meta["coverage"] >= 0.9
    assert spec.meta["left_fixed"] == []
    for seed in range(2):
        perm = Permutation.random(spec, torch.Generator().manual_seed(seed))
        assert not perm.is_identity()
        diffs = check_invariance(model, spec, perm, x)
        reference = model.double()
        with torch.no_grad():
            scale = float(reference(x.double()).abs().max())
        assert diffs.worst / scale <= 1e-5, diffs
    # the check can fail: permuting the residual stream's units in one tensor only changes the logits
    broken = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        broken.embed.weight.copy_(broken.embed.weight.flip(0))
        assert not torch.allclose(broken(x.double()), model.double().eval()(x.double()))


def test_trains_from_a_config(tmp_path: Path, shared_data: Path) -> None:
    config = RunConfig(
        model=ModelConfig("seq_transformer", dim=8, depth=1, heads=2, mlp_ratio=1.0),
        train=TrainConfig(optimizer="adam", lr=1e-3, batch_size=50, epochs=1),
    )
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, train_per_class=5))
    run = train(config, RunOptions(runs_dir=str(tmp_path), data_dir=str(shared_data), device="cpu", progress=False))
    assert run.complete and run.hash == config.run_hash()
    assert run.config.model_options() == {"width": 1, "dim": 8, "depth": 1, "heads": 2, "mlp_ratio": 1.0}
    state = run.load_state()
    model = build_model("seq_transformer", input_shape=(1, 28, 28), num_classes=10, **run.config.model_options())
    model.load_state_dict(state)  # strict: the stored weights are this model's
    assert state["embed.weight"].shape == (8, 28)


# ------------------------------------------------------------------------- ModelConfig options


def test_unset_options_leave_earlier_hashes_and_json_alone() -> None:
    vit = PRESETS["vit_mnist"].config
    assert vit.to_dict()["model"] == {"model": "vit", "width": None, "hidden": None, "norm": None}
    assert vit.normalised().to_dict()["model"] == {"model": "vit", "width": 1, "hidden": None, "norm": None}
    # an option spelled out at the model's default names the same run (and is left out on normalise)
    spelled = dataclasses.replace(vit, model=ModelConfig("vit", patch=0, dim=64, depth=4, heads=4, mlp_ratio=2))
    assert spelled.run_hash() == vit.run_hash() and spelled.normalised() == vit.normalised()
    # every option changes the hash; an integer ratio hashes as its float
    variants = [
        ModelConfig("vit", patch=4),
        ModelConfig("vit", dim=32),
        ModelConfig("vit", depth=2),
        ModelConfig("vit", heads=8),
        ModelConfig("vit", mlp_ratio=1.0),
    ]
    hashes = {dataclasses.replace(vit, model=m).run_hash() for m in variants}
    assert len(hashes | {vit.run_hash()}) == len(variants) + 1
    as_int = dataclasses.replace(vit, model=ModelConfig("vit", mlp_ratio=1))
    assert as_int.run_hash() == dataclasses.replace(vit, model=variants[-1]).run_hash()
    normalised = dataclasses.replace(vit, model=ModelConfig("vit", dim=32, mlp_ratio=1)).normalised()
    assert normalised.to_dict()["model"] == {
        "model": "vit",
        "width": 1,
        "hidden": None,
        "norm": None,
        "dim": 32,
        "mlp_ratio": 1.0,
    }
    assert RunConfig.from_dict(normalised.to_dict()) == normalised
    assert normalised.model_options() == {"width": 1, "dim": 32, "mlp_ratio": 1.0}


def test_options_reach_the_model() -> None:
    config = PRESETS["vit_cifar10"].config
    model = build_model("vit", input_shape=(3, 32, 32), num_classes=10, **config.model_options())
    assert model.patch_embed.kernel_size == (4, 4) and model.pos_embed.shape == (1, 65, 384)
    assert len(model.blocks) == 7 and model.blocks[0].attn.num_heads == 12
    assert model.blocks[0].mlp[0].out_features == 384
    assert 6.2e6 < sum(p.numel() for p in model.parameters()) < 6.4e6  # the recipe's 6.3M


@pytest.mark.parametrize(
    ("model", "words"),
    [
        (ModelConfig("mlp", dim=8), "--dim 8: model mlp takes no dim; its options: --hidden, --width"),
        (ModelConfig("resnet20", heads=2), "--heads 2: model resnet20 takes no heads"),
        (ModelConfig("seq_transformer", patch=7), "--patch 7: model seq_transformer takes no patch"),
        (ModelConfig("vit", dim=0), "--dim: 0 is not allowed; allowed: an integer >= 1"),
        (ModelConfig("vit", mlp_ratio=float("nan")), "--mlp-ratio: nan is not allowed"),
        (ModelConfig("vit", heads=3), "--heads 3: allowed: a divisor of the embedding dimension dim × width = 64"),
        (ModelConfig("vit", dim=6, width=2, heads=8), "dim × width = 12 (--dim 6, --width 2"),
        (ModelConfig("seq_transformer", mlp_ratio=0.01), "--mlp-ratio 0.01: allowed: a ratio giving the MLP"),
        (ModelConfig("vit", patch=5), "--patch 5: allowed: 0 (automatic) or a divisor of the image size 28×28"),
    ],
)
def test_bad_options_are_one_line_usage_errors(model: ModelConfig, words: str) -> None:
    with pytest.raises(UsageError) as err:
        dataclasses.replace(PRESETS["vit_mnist"].config, model=model).validate()
    assert words in str(err.value) and "\n" not in str(err.value)


def test_flags_override_a_preset_and_have_help() -> None:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--patch", "4", "--dim", "32", "--depth", "2", "--heads", "8", "--mlp-ratio", "1"])
    config = config_from_args(PRESETS["vit_mnist"].config, args)
    assert config.model == ModelConfig("vit", patch=4, dim=32, depth=2, heads=8, mlp_ratio=1.0)
    assert config_from_args(PRESETS["vit_mnist"].config, parser.parse_args([])) == PRESETS["vit_mnist"].config
    text = parser.format_help()
    for flag in ("--patch INT", "--dim INT", "--depth INT", "--heads INT", "--mlp-ratio FLOAT"):
        assert flag in text
    assert "attention heads (a divisor of dim × width)" in " ".join(text.split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--mlp-ratio", "0"])
