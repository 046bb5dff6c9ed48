"""Run store: atomic writes, safetensors checkpoints, architecture checks, no pickle."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lmclab.config import ModelConfig, RunConfig
from lmclab.models import build_model
from lmclab.store import (
    CheckpointError,
    RunNotFound,
    RunStore,
    atomic_write,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from lmclab.store.checkpoint import optimizer_from_flat, optimizer_to_flat


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")

    def failing(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    tensors = {"model.w": torch.randn(3, 4), "rng.x": torch.arange(5, dtype=torch.uint8)}
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"step": 7})
    back, header = load_checkpoint(tmp_path / "c.safetensors")
    assert header["step"] == 7 and header["format"] == 1
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_truncated_checkpoint_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"model.w": torch.randn(100, 100)}, {"step": 1})
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="c.safetensors"):
        load_checkpoint(path)


def test_pickle_is_never_loaded(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple:
            return (Path.touch, (tmp_path / "pwned",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"model.w": Boom()}))
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_wrong_architecture_names_the_tensors() -> None:
    small = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(32, 16))
    other = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=(32, 8, 8))
    with pytest.raises(CheckpointError) as err:
        load_model_state(small, other.state_dict(), "other.safetensors")
    message = str(err.value)
    assert "other.safetensors" in message
    assert "layers.1.linear.weight: model (16, 32) vs checkpoint (8, 32)" in message
    assert "not in model" in message and "layers.2.linear.weight" in message


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_optimizer_state_roundtrip(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if name == "sgd" else (lambda p: torch.optim.Adam(p))
    opt = make(model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()
        opt.step()
    tensors, header = optimizer_to_flat(opt)
    fresh = make(model.parameters())
    optimizer_from_flat(fresh, tensors, header)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][pid][key]))


def test_store_open_find_get(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    cfg = RunConfig(model=ModelConfig("mlp", hidden=(8,)))
    assert store.find(cfg) is None
    run = store.open(cfg, preset="x")
    assert run.path.name == f"train_{cfg.run_hash()}"
    assert store.find(cfg) == run and run.config == cfg.normalised()
    assert store.get(cfg.run_hash()[:6]) == run and store.get(run.path) == run
    with pytest.raises(RunNotFound, match="no run"):
        store.get("ffffffffffff")


def test_runs_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCLAB_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert RunStore().root == tmp_path / "elsewhere"
