"""The Permutation object: apply by hand, inverse, composition, save/load, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmclab.models import build_model
from lmclab.permutation import AxisRef, PermGroup, Permutation, PermutationSpec, SpecError, derive_spec
from lmclab.store import CheckpointError, save_checkpoint

SPEC = PermutationSpec((PermGroup("h", 3, (AxisRef("w1", 0), AxisRef("b1", 0), AxisRef("w2", 1, block=2))),))


def test_apply_by_hand_with_blocks() -> None:
    params = {
        "w1": torch.arange(6.0).reshape(3, 2),
        "b1": torch.tensor([10.0, 11.0, 12.0]),
        "w2": torch.arange(12.0).reshape(2, 6),
    }
    out = Permutation({"h": torch.tensor([2, 0, 1])}).apply(params, SPEC)
    assert out["w1"].tolist() == [[4, 5], [0, 1], [2, 3]]  # unit i of the new net is unit p[i] of the old
    assert out["b1"].tolist() == [12, 10, 11]
    assert out["w2"].tolist() == [[4, 5, 0, 1, 2, 3], [10, 11, 6, 7, 8, 9]]  # whole blocks of 2 move


def zoo_point() -> tuple[dict[str, torch.Tensor], PermutationSpec]:
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 8, 8), num_classes=5, norm="batchnorm")
    return model.state_dict(), derive_spec(model, torch.randn(2, 3, 8, 8))


def test_inverse_and_composition() -> None:
    theta, spec = zoo_point()
    g = torch.Generator().manual_seed(1)
    p, q = Permutation.random(spec, g), Permutation.random(spec, g)
    back = p.inverse().apply(p.apply(theta, spec), spec)
    assert all(torch.equal(back[k], theta[k]) for k in theta)
    both = p.compose(q).apply(theta, spec)
    stepwise = p.apply(q.apply(theta, spec), spec)
    assert all(torch.equal(both[k], stepwise[k]) for k in theta)
    assert p.compose(p.inverse()).is_identity() and p.inverse().compose(p).is_identity()
    assert not p.is_identity() and Permutation.identity(spec).is_identity()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    theta, spec = zoo_point()
    p = Permutation.random(spec, torch.Generator().manual_seed(2))
    p.save(tmp_path / "p.safetensors", spec, method="weight", runs=["a", "b"])
    loaded, loaded_spec, meta = Permutation.load(tmp_path / "p.safetensors")
    assert loaded == p and loaded_spec == spec and meta == {"method": "weight", "runs": ["a", "b"]}
    save_checkpoint(tmp_path / "other.safetensors", {"model.w": torch.zeros(2)}, {"step": 0})
    with pytest.raises(CheckpointError, match="not a permutation file"):
        Permutation.load(tmp_path / "other.safetensors")


def test_validation() -> None:
    with pytest.raises(SpecError, match="not a permutation"):
        Permutation({"h": torch.tensor([0, 0, 1])})
    with pytest.raises(SpecError, match="lacks groups"):
        Permutation({}).apply({}, SPEC)
    with pytest.raises(SpecError, match="not 3 units"):
        SPEC.check({"w1": torch.zeros(4, 2), "b1": torch.zeros(3), "w2": torch.zeros(2, 6)})
