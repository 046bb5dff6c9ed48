"""Run store: atomic writes, safetensors checkpoints, architecture checks, no pickle."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from lmclab.config import ModelConfig, RunConfig
from lmclab.models import build_model
from lmclab.store import (
    CheckpointError,
    DataInfo,
    ForkRecord,
    ResumedFrom,
    Run,
    RunMeta,
    RunNotFound,
    RunStore,
    Store,
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


def test_run_meta_round_trips_meta_json_exactly(tmp_path: Path) -> None:
    """Known keys become typed fields, unknown ones are kept, absent keys stay absent, nulls stay null."""
    stored = {
        "status": "running",
        "hash": "abc",
        "preset": None,
        "resumed_from": None,
        "history": [{"epoch": 1, "step": 6}],
        "data_info": {
            "name": "mnist",
            "input_shape": [1, 28, 28],
            "num_classes": 10,
            "classes": list("0123456789"),
            "source": "x",
            "train_size": 300,
            "test_size": 10000,
            "augment": True,
            "later": 1,
        },
        "fork": {"parent": "p", "parent_run": "train_p", "parent_path": "/r/train_p", "step": 6, "epoch": 1.0},
        "written_by_a_later_lmclab": {"a": [1, 2]},
    }
    meta = RunMeta.from_json(stored)
    assert meta.to_json() == stored
    assert meta.status == "running" and meta.preset is None and meta.final_metrics is None and meta.total_steps is None
    assert isinstance(meta.data_info, DataInfo) and meta.data_info.input_shape == [1, 28, 28]
    assert meta.data_info.extra == {"later": 1} and meta.extra == {"written_by_a_later_lmclab": {"a": [1, 2]}}
    assert meta.fork == ForkRecord(parent="p", parent_run="train_p", parent_path="/r/train_p", step=6, epoch=1.0)
    assert meta["fork"]["step"] == 6 and "final_metrics" not in meta  # the JSON view, for scripts
    assert meta.history_until(5) == [] and meta.history_until(6) == stored["history"]

    changed = meta.updated(
        status="complete", final_metrics={"test_loss": 0.5}, error=None, resumed_from=ResumedFrom(path="/r/x", step=3)
    )
    assert changed.to_json() == {
        **stored,
        "status": "complete",
        "final_metrics": {"test_loss": 0.5},
        "error": None,
        "resumed_from": {"path": "/r/x", "step": 3},
    }
    assert meta.to_json() == stored  # records are immutable
    with pytest.raises(ValueError, match="needs key"):
        RunMeta.from_json({"fork": {"parent": "p"}})

    store = RunStore(tmp_path)
    run = store.open(RunConfig(model=ModelConfig("mlp", hidden=(8,))), preset=None)
    assert json.loads((run.path / "meta.json").read_text()) == {"status": "created", "hash": run.hash, "preset": None}
    run.update_meta(history=[], fork=meta.fork)
    on_disk = json.loads((run.path / "meta.json").read_text())
    assert on_disk == {"status": "created", "hash": run.hash, "preset": None, "history": [], "fork": stored["fork"]}
    assert run.meta.fork == meta.fork and run.parent == Run(tmp_path / "train_p") and not run.complete
    with pytest.raises(CheckpointError, match="has not started training"):
        run.data_info  # noqa: B018
    assert Run(tmp_path / "nowhere").meta == RunMeta.from_json({})


def test_the_store_names_every_artifact_directory(tmp_path: Path) -> None:
    store = Store(tmp_path)
    cfg = RunConfig(model=ModelConfig("mlp", hidden=(8,)))
    assert store.runs.root == tmp_path and store.runs.path_for(cfg) == store.run(cfg.run_hash()).path
    assert store.run(cfg.run_hash()).path == tmp_path / f"train_{cfg.run_hash()}"
    identity = {"a": "train_x", "b": "train_y", "method": "weight", "seed": 0, "spec_source": "derived"}
    # the names alignments and LMC results have had since they were first stored (json.dumps' spacing)
    spaced = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    assert store.alignment_dir(identity) == tmp_path / f"align_{spaced}" == tmp_path / "align_af18d3a5e91f094b"
    assert store.result_dir("lmc", identity) == tmp_path / f"lmc_{spaced}"
    assert store.step_dir("path", "0123456789abcdef") == tmp_path / "steps" / "path_0123456789abcdef"
    for bad in ("train", "steps", "", "a/b"):
        with pytest.raises(ValueError, match="cannot name a result directory"):
            store.result_dir(bad, identity)
    assert not any(tmp_path.iterdir())  # naming creates nothing
