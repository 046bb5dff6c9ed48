"""Run store: atomic writes, safetensors checkpoints, architecture checks, no pickle; a run is what its
files say (a kill during the final evaluation, damaged run directories)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

import lmclab.training.loop as loop
import lmclab.training.state as state
from lmclab.cli import main
from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.experiments.lmc import check_same_architecture
from lmclab.models import build_model
from lmclab.store import (
    CheckpointError,
    DataInfo,
    ForkRecord,
    ResumedFrom,
    Run,
    RunDamaged,
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
from lmclab.training import RunOptions, train
from lmclab.training.plan import Schedule, Train, plan_training
from lmclab.training.schedules import CheckpointSchedule


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


# ---------------------------------------------------------------- a run is what its files say

TINY = RunConfig(
    data=DataConfig("mnist", train_per_class=10),
    model=ModelConfig("mlp", hidden=(16,)),
    train=TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, batch_size=50, epochs=2),
    seeds=SeedConfig(4, 5, 6),
)


def test_a_kill_during_the_final_evaluation_is_finished_by_a_rerun_without_training(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    options = RunOptions(
        runs_dir=str(tmp_path), data_dir=str(shared_data), device="cpu", progress=False, download=False
    )
    evaluate = loop.evaluate

    def killed_in_final_evaluation(model, dataset, batch_size=1000):  # type: ignore[no-untyped-def]
        if len(dataset) == 100:  # the training split: only `finish` evaluates it
            raise KeyboardInterrupt
        return evaluate(model, dataset, batch_size)

    monkeypatch.setattr(loop, "evaluate", killed_in_final_evaluation)
    steps: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        train(TINY, options, callback=lambda s: steps.append(s.step))
    assert steps == [1, 2, 3, 4]
    run = RunStore(tmp_path).find(TINY)
    assert run is not None and run.final_checkpoint() is not None
    assert run.meta.status == "running" and run.meta.final_metrics is None  # what meta.json was left saying
    assert run.status == "unevaluated" and not run.complete  # what the files say
    assert run.trained  # its final state is there: commands that use it take the run
    check_same_architecture(run, run)
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert f"{run.path.name}  unevaluated" in listed and "(unevaluated: trained to the end" in listed
    plan = plan_training(RunStore(tmp_path), TINY.normalised(), Schedule.of(TINY, CheckpointSchedule(), 100))
    assert isinstance(plan, Train) and plan.only_evaluates and plan.source == run.final_checkpoint()

    monkeypatch.setattr(loop, "evaluate", evaluate)
    steps.clear()
    again = train(TINY, options, callback=lambda s: steps.append(s.step))
    assert again == run and steps == []  # evaluated, not trained again
    meta = run.meta
    assert run.status == meta.status == "complete" and run.complete
    assert meta.final_metrics is not None and set(meta.final_metrics) == {
        "train_loss",
        "train_accuracy",
        "test_loss",
        "test_accuracy",
    }
    assert [h["epoch"] for h in meta.history] == [1, 2] and not run.resume_path.exists()
    straight = train(TINY, dataclasses.replace(options, runs_dir=str(tmp_path / "straight")))
    assert straight.meta.final_metrics == meta.final_metrics


def _three_runs(root: Path) -> list[Run]:
    store = RunStore(root)
    return [store.open(RunConfig(model=ModelConfig("mlp", hidden=(h,))), preset=None) for h in (8, 16, 32)]


def test_damaged_run_directories_are_listed_apart_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated, edited, healthy = _three_runs(tmp_path)
    text = (truncated.path / "config.json").read_text()
    (truncated.path / "config.json").write_text(text[: len(text) // 2])
    config = json.loads((edited.path / "config.json").read_text())
    config["train"]["lr"] = 0.5
    (edited.path / "config.json").write_text(json.dumps(config))
    (tmp_path / ".locks").mkdir()  # (other entries of a store are not runs)
    (tmp_path / "align_0123").mkdir()

    store = RunStore(tmp_path)
    scan = store.scan()
    assert scan.healthy == store.runs() == [healthy]
    assert sorted(r.path.name for r in scan.damaged) == sorted([truncated.path.name, edited.path.name])
    assert "config.json is not valid JSON" in (truncated.damage or "")
    assert f"hashes to {RunConfig.from_dict(config).run_hash()}, not to {edited.hash}" in (edited.damage or "")
    assert healthy.damage is None and truncated.status == edited.status == "damaged" and healthy.status == "created"

    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert healthy.path.name in out
    for run in (truncated, edited):
        line = next(line for line in out.splitlines() if line.startswith(run.path.name))
        assert "damaged" in line and (run.damage or "?") in line
    rows = {r["run"]: r for r in json.loads(_json_output(tmp_path, capsys))}
    assert rows[edited.path.name]["status"] == "damaged" and "hashes to" in rows[edited.path.name]["damage"]
    assert rows[healthy.path.name]["status"] == "created"


def _json_output(root: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["runs", "--runs-dir", str(root), "--json"]) == 0
    return capsys.readouterr().out


def test_commands_that_need_a_damaged_run_refuse_it_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truncated, edited, healthy = _three_runs(tmp_path)
    (truncated.path / "config.json").write_text('{"data": {"dataset": "mni')
    meta = edited.path / "meta.json"
    meta.write_text(meta.read_text()[:-5])
    store = RunStore(tmp_path)
    assert store.get(healthy.hash[:8]) == healthy
    for run, reason in ((truncated, "config.json is not valid JSON"), (edited, "meta.json is not valid JSON")):
        for ref in (run.hash[:8], run.path.name, str(run.path)):
            with pytest.raises(RunDamaged, match=f"run {run.path} is damaged: {reason}"):
                store.get(ref)
        assert main(["eval", run.hash[:8], "--runs-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(run.path) in err and reason in err
    damaged_meta = meta.read_text()
    with pytest.raises(RunDamaged, match="meta.json is not valid JSON"):
        edited.update_meta(status="running")
    assert meta.read_text() == damaged_meta  # never written over
    config = RunConfig(model=ModelConfig("mlp", hidden=(8,)))
    with pytest.raises(RunDamaged, match=truncated.path.name):
        store.find(config)
    with pytest.raises(RunDamaged, match=truncated.path.name):
        store.open(config)
    with pytest.raises(RunDamaged, match=truncated.path.name):  # refused before any data is loaded
        train(config, RunOptions(runs_dir=str(tmp_path), device="cpu", progress=False, download=False))
    assert (truncated.path / "config.json").read_text() == '{"data": {"dataset": "mni'


def test_a_run_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "train_0123456789abcdef").mkdir()  # creation cut short: empty, not listed
    (tmp_path / "train_fedcba9876543210" / "checkpoints").mkdir(parents=True)
    scan = RunStore(tmp_path).scan()
    assert scan.healthy == [] and [r.path.name for r in scan.damaged] == ["train_fedcba9876543210"]
    assert scan.damaged[0].damage == "config.json is missing"


def test_a_model_that_cannot_be_built_leaves_no_run_directory(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(e.g. `--width 10**26`: torch refuses the tensor sizes; that error keeps its traceback, but no half-made
    run is left to be listed)"""

    def cannot_allocate(config: RunConfig, info: object) -> torch.nn.Module:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(state, "init_model", cannot_allocate)
    options = RunOptions(runs_dir=str(tmp_path), data_dir=str(shared_data), device="cpu", progress=False)
    with pytest.raises(RuntimeError, match="can't allocate"):
        train(TINY, options)
    assert RunStore(tmp_path).scan().all() == [] and not RunStore(tmp_path).path_for(TINY.normalised()).exists()


def test_an_empty_run_reference_names_no_run(tmp_path: Path) -> None:
    run = RunStore(tmp_path).open(TINY.normalised(), preset=None)
    assert RunStore(tmp_path).get(run.hash[:6]) == RunStore(tmp_path).get(run.path.name[:10]) == run
    for ref in ("", " "):
        with pytest.raises(RunNotFound, match="names no run"):
            RunStore(tmp_path).get(ref)
