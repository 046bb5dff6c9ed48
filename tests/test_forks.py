"""Forked training on real MNIST subsets: children start at the parent's exact state, reproduce it with
the parent's seeds, diverge with their own, are cached and resumed like any run; the fork config keeps
every earlier run hash."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import lmclab.training.loop as loop_module
from lmclab.cli import main
from lmclab.config import (
    DataConfig,
    ForkConfig,
    ModelConfig,
    RunConfig,
    SeedConfig,
    TrainConfig,
    add_config_flags,
    config_from_args,
)
from lmclab.data import DeviceDataset
from lmclab.store import ForkRecord, Run, RunNotFound, RunStore, load_checkpoint
from lmclab.training import CheckpointSchedule, RunOptions, child_config, fork, init_model, train

# 30 images per class (300), batch 50 -> 6 steps per epoch, 3 epochs; crop+flip augmentation so that the
# augmentation generator matters; SGD with momentum so that the optimizer has state to carry over.
PARENT = RunConfig(
    data=DataConfig("mnist", train_per_class=30, augment=True),
    model=ModelConfig("mlp", hidden=(32,)),
    train=TrainConfig(
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=0.5,
        batch_size=50,
        epochs=3,
    ),
    seeds=SeedConfig(1, 2, 3),
)
STEPS_PER_EPOCH, TOTAL = 6, 18
MID = 8  # a mid-epoch fork step (epoch 2, position 2)


def options(runs: Path, shared: Path, **kw: object) -> RunOptions:
    return RunOptions(runs_dir=str(runs), data_dir=str(shared), device="cpu", progress=False, download=False, **kw)  # type: ignore[arg-type]


def state(run: Run, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of the full training state at `step` (model, optimizer, generators, order, sums)."""
    return load_checkpoint(run.checkpoint_path(step))[0]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("",)) -> None:
    keys = sorted(k for k in a if k.startswith(prefixes))
    assert keys and keys == sorted(k for k in b if k.startswith(prefixes))
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "time"} for h in history]


def same_seeds_child(*, epoch: int | None = None, step: int | None = None) -> RunConfig:
    return dataclasses.replace(child_config(PARENT, epoch=epoch, step=step, child=0), seeds=PARENT.seeds)


def test_child_with_the_parents_seeds_reproduces_the_parent(tmp_path: Path, shared_data: Path) -> None:
    """Forked at an epoch end and mid-epoch, steps the stored parent lacks (they are filled by resuming it),
    every checkpoint of the child equals that of an uninterrupted run keeping every step, bit for bit,
    generators, epoch order and running sums included."""
    parent = train(PARENT, options(tmp_path, shared_data))
    assert parent.checkpoint_steps() == [TOTAL]
    final_before, meta_before = state(parent, TOTAL), parent.meta
    written_at = parent.checkpoint_path(TOTAL).stat().st_mtime_ns
    reference = train(
        PARENT, options(tmp_path / "reference", shared_data, checkpoints=CheckpointSchedule(every=1, steps=(MID,)))
    )
    for config, fork_step in ((same_seeds_child(epoch=1), 6), (same_seeds_child(step=MID), MID)):
        child = train(config, options(tmp_path, shared_data))
        assert child.checkpoint_steps() == sorted({fork_step, 12, 18})  # fork step + every epoch by default
        for s in child.checkpoint_steps():
            assert_identical(state(child, s), state(reference, s))
        assert strip_time(child.meta.history) == strip_time(reference.meta.history)
        assert child.meta.fork == ForkRecord(
            parent=PARENT.run_hash(),
            parent_run=parent.path.name,
            parent_path=str(parent.path),
            step=fork_step,
            epoch=fork_step / STEPS_PER_EPOCH,
        )
        assert child.parent == parent
        assert child.meta.resumed_from is None and child.meta.status == "complete"
    # filling the parent's checkpoints stopped at the fork steps: its final state and metadata are untouched
    assert parent.checkpoint_steps() == [6, MID, TOTAL]
    for s in (6, MID):
        assert_identical(state(parent, s), state(reference, s))
    assert_identical(state(parent, TOTAL), final_before)
    assert parent.checkpoint_path(TOTAL).stat().st_mtime_ns == written_at  # not retrained to the end
    assert parent.meta == meta_before and not parent.resume_path.exists()


def test_children_with_their_own_seeds_start_at_the_fork_and_diverge(tmp_path: Path, shared_data: Path) -> None:
    opts = options(tmp_path, shared_data)
    parent = train(PARENT, dataclasses.replace(opts, checkpoints=CheckpointSchedule(steps=(MID,))))
    configs = [child_config(PARENT, step=MID, child=i, vary_augment=True) for i in range(2)]
    seeds = {(c.seeds.seed_data, c.seeds.seed_augment) for c in configs}
    assert len(seeds | {(PARENT.seeds.seed_data, PARENT.seeds.seed_augment)}) == 3
    assert all(c.seeds.seed_init == PARENT.seeds.seed_init for c in configs)
    assert child_config(PARENT, step=MID, child=0).seeds.seed_augment == PARENT.seeds.seed_augment
    children = [train(c, opts) for c in configs]
    at_fork = state(parent, MID)
    for child in children:
        start = state(child, MID)
        # weights, buffers, optimizer state and the epoch's running sums are the parent's at the fork
        assert_identical(start, at_fork, prefixes=("model.", "optim.", "train.epoch_sums"))
        assert not torch.equal(start["rng.data"], at_fork["rng.data"])
        assert not torch.equal(start["rng.augment"], at_fork["rng.augment"])
        # mid-epoch: the examples seen so far keep their place, the unseen rest is re-shuffled (one epoch still
        # shows each example once)
        seen = (MID % STEPS_PER_EPOCH) * PARENT.train.batch_size
        assert torch.equal(start["data.order"][:seen], at_fork["data.order"][:seen])
        assert not torch.equal(start["data.order"][seen:], at_fork["data.order"][seen:])
        assert torch.equal(start["data.order"].sort().values, torch.arange(len(at_fork["data.order"])))
        assert child.meta.history[:1] == parent.meta.history[:1]  # the parent's history up to the fork
    finals = [c.load_state() for c in (parent, *children)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert all(not torch.equal(finals[i][k], finals[j][k]) for k in finals[i])  # every layer moved apart


def test_fork_at_epoch_0_shares_the_initialisation_and_is_cached(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opts = options(tmp_path, shared_data)
    forks = fork(PARENT, [1, 0], 2, opts)
    assert sorted(forks) == [0, 1] and all(len(runs) == 2 for runs in forks.values())
    assert len({r.path for runs in forks.values() for r in runs}) == 4
    parent = RunStore(tmp_path).find(PARENT)
    assert parent is not None and {0, 6, 18} <= set(parent.checkpoint_steps())
    info = DeviceDataset.load("mnist", "train", data_dir=shared_data, per_class=30, download=False, progress=False).info
    init = init_model(PARENT, info).state_dict()
    for child in forks[0]:
        assert_identical(child.load_state(0), init)  # the initialisation, drawn independently here
        assert child.checkpoint_steps() == [0, 6, 12, 18]
    a, b = (c.load_state() for c in forks[0])
    assert not torch.equal(a["head.weight"], b["head.weight"])

    calls: list[int] = []
    real_step = loop_module.train_step
    monkeypatch.setattr(loop_module, "train_step", lambda *a: (calls.append(1), real_step(*a))[1])
    again = fork(RunStore(tmp_path).get(parent.hash), [0, 1], 2, opts)  # a stored Run as parent this time
    assert calls == [] and {e: [r.path for r in rs] for e, rs in again.items()} == {
        e: [r.path for r in rs] for e, rs in forks.items()
    }


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("interrupt", [8, 15])  # before the child's first epoch end, and after it
def test_interrupted_child_resumes_bit_identically(tmp_path: Path, shared_data: Path, interrupt: int) -> None:
    config = child_config(PARENT, epoch=1, child=0, vary_augment=True)

    def stop(s: loop_module.TrainState) -> None:
        if s.step == interrupt:
            raise Interrupt

    resumed_opts = options(tmp_path / "resumed", shared_data)
    train(PARENT, resumed_opts)
    with pytest.raises(Interrupt):
        train(config, resumed_opts, callback=stop)
    child = RunStore(resumed_opts.runs_dir).find(config)
    assert child is not None and child.meta.status == "interrupted"
    resumed = train(config, resumed_opts)
    assert resumed.meta.resumed_from is not None and resumed.meta.resumed_from.step == (6 if interrupt < 12 else 12)

    straight_opts = options(tmp_path / "straight", shared_data)
    train(PARENT, straight_opts)
    straight = train(config, straight_opts)
    assert resumed.checkpoint_steps() == straight.checkpoint_steps() == [6, 12, 18]
    for s in straight.checkpoint_steps():
        assert_identical(state(resumed, s), state(straight, s))
    assert strip_time(resumed.meta.history) == strip_time(straight.meta.history)


def test_bad_forks_are_clear_errors(tmp_path: Path, shared_data: Path) -> None:
    opts = options(tmp_path, shared_data)
    orphan = dataclasses.replace(PARENT, fork=ForkConfig(parent="0123456789abcdef", epoch=1))
    with pytest.raises(RunNotFound, match="0123456789abcdef") as err:
        train(orphan, opts)
    assert str(tmp_path.resolve()) in str(err.value)
    assert not tmp_path.exists() or RunStore(tmp_path).runs() == []  # no half-made child left behind

    train(PARENT, opts)
    other_lr = dataclasses.replace(
        child_config(PARENT, epoch=1, child=0), train=dataclasses.replace(PARENT.train, lr=0.1)
    )
    with pytest.raises(ValueError, match="train"):
        train(other_lr, opts)
    with pytest.raises(ValueError, match="not before the end of training"):
        train(child_config(PARENT, epoch=3, child=0), opts)
    late = train(child_config(PARENT, epoch=2, child=0), opts)
    with pytest.raises(ValueError, match="itself a child forked at step 12"):
        train(child_config(late.config, epoch=1, child=0), opts)
    with pytest.raises(ValueError, match="exactly one of epoch or step"):
        child_config(PARENT, epoch=1, step=6, child=0)
    with pytest.raises(ValueError, match="exactly one of epoch or step"):
        dataclasses.replace(PARENT, fork=ForkConfig(parent="ab", epoch=1, step=6)).run_hash()
    with pytest.raises(ValueError, match="names no parent"):
        dataclasses.replace(PARENT, fork=ForkConfig(epoch=1)).run_hash()


def test_fork_section_keeps_earlier_hashes_and_round_trips() -> None:
    assert RunConfig().run_hash() == "c9e4c824a4fc242d"  # pinned in test_config.py as well
    assert dataclasses.replace(PARENT, fork=ForkConfig()).run_hash() == PARENT.run_hash()
    assert "fork" not in PARENT.normalised().to_dict()
    child = child_config(PARENT, epoch=1, child=0)
    assert child.to_dict()["fork"] == {"parent": PARENT.run_hash(), "epoch": 1, "step": None}
    assert RunConfig.from_dict(child.to_dict()) == child
    ids = {child_config(PARENT, epoch=e, child=i).run_hash() for e in (0, 1) for i in (0, 1)}
    assert len(ids) == 4 and PARENT.run_hash() not in ids
    assert child_config(PARENT, epoch=1, child=0) == child  # deterministic seeds
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    flagged = config_from_args(
        PARENT,
        parser.parse_args(
            ["--fork-parent", PARENT.run_hash(), "--fork-epoch", "1", "--seed-data", str(child.seeds.seed_data)]
        ),
    )
    assert flagged.normalised() == child


def test_cli_fork(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    io = ["--runs-dir", str(tmp_path), "--data-dir", str(shared_data), "--device", "cpu", "--offline", "--no-progress"]
    tiny = ["--train-per-class", "20", "--hidden", "16", "--epochs", "2", "--batch-size", "50"]
    assert main(["fork", "mlp_mnist", *tiny, "--at", "0,1", "--children", "2", *io, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(out["forks"]) == ["0", "1"] and all(len(rows) == 2 for rows in out["forks"].values())
    parent = Run(Path(out["parent"]["path"]))
    assert parent.config.data.train_per_class == 20 and parent.meta.status == "complete"
    for epoch, rows in out["forks"].items():
        for row in rows:
            child = Run(Path(row["path"]))
            assert child.config.fork == ForkConfig(parent=parent.hash, epoch=int(epoch))
            assert child.meta.final_metrics == row["final_metrics"]
            assert 0 < row["final_metrics"]["test_accuracy"] <= 1

    # the stored parent by hash prefix: the same children, nothing retrained; text output names them
    assert main(["fork", parent.hash[:8], "--at", "1", "--children", "2", *io]) == 0
    text = capsys.readouterr().out
    assert "fork at epoch 1" in text and all(row["run"] in text for row in out["forks"]["1"])
    # `lmclab train … --fork-parent PREFIX` names the same child (reused, not retrained); `runs` marks children
    child0 = out["forks"]["1"][0]
    assert (
        main(
            [
                "train",
                "mlp_mnist",
                *tiny,
                "--fork-parent",
                parent.hash[:8],
                "--fork-epoch",
                "1",
                "--seed-data",
                str(child0["seed_data"]),
                *io,
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["path"] == child0["path"]
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert f"fork of {parent.path.name} at epoch 1" in capsys.readouterr().out
    code = main(["fork", parent.hash[:8], "--at", "1", "--lr", "0.1", *io])
    assert code == 2 and "config flags apply only" in capsys.readouterr().err
    code = main(["fork", "no_such_parent", "--at", "1", *io])
    assert code == 2 and "nor is 'no_such_parent' a training preset" in capsys.readouterr().err


def test_fork_step_trains_the_parent_first(tmp_path: Path, shared_data: Path) -> None:
    from lmclab.experiments.graph import LocalExecutor, Step, topological_order
    from lmclab.experiments.steps import fork_step, train_step

    parent = train_step("p", PARENT, checkpoints="epochs:1")
    assert (
        train_step("p", PARENT).key
        == Step("train", {"run": PARENT.normalised().to_dict(), "preset": None, "label": "p"}).key
    )  # no spec: the old step key
    children = [fork_step(parent, PARENT, epoch=1, child=i, checkpoints="every:2") for i in range(2)]
    assert topological_order(children)[0] == parent and children[0].inputs == {"parent": parent}
    assert children[0].config["run"] == child_config(PARENT, epoch=1, child=0).normalised().to_dict()
    with pytest.raises(ValueError, match="does not train parent_config"):
        fork_step(parent, dataclasses.replace(PARENT, seeds=SeedConfig(7, 8, 9)), epoch=1, child=0)
    with pytest.raises(ValueError, match="bad checkpoint schedule"):
        train_step("p", PARENT, checkpoints="weekly:2")

    executor = LocalExecutor(
        tmp_path,
        {"runs_dir": str(tmp_path), "data_dir": str(shared_data), "device": "cpu", "progress": False},
        progress=False,
    )
    results = executor.run(children)
    parent_run = Run(Path(results[parent.key]["run"]))
    assert parent_run.checkpoint_steps() == [6, TOTAL]
    for step in children:
        child = Run(Path(results[step.key]["run"]))
        assert child.config.fork == ForkConfig(parent=parent_run.hash, epoch=1)
        assert child.checkpoint_steps() == [6, 12, TOTAL]  # the fork step, every 2nd epoch, the end
        assert_identical(state(child, 6), state(parent_run, 6), prefixes=("model.", "optim."))
