"""The trainer on real MNIST subsets: determinism, seed independence, resume bit-identity, reuse, NaN."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from lmclab.config import DataConfig, ModelConfig, RunConfig, SeedConfig, TrainConfig
from lmclab.data import DeviceDataset
from lmclab.store import RunStore, load_checkpoint
from lmclab.training import (
    CheckpointSchedule,
    RunOptions,
    TrainingDiverged,
    TrainingState,
    child_config,
    load_run_model,
    train,
)
from lmclab.training.plan import FillParent, Reuse, Schedule, StartChild, Train, plan_training, stored_complete

# 50 images per class (500), batch 50 -> 10 steps per epoch, 3 epochs.
SMALL = RunConfig(
    data=DataConfig("mnist", train_per_class=50),
    model=ModelConfig("mlp", hidden=(32, 32)),
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


def options(tmp: Path, shared: Path, **kw: object) -> RunOptions:
    return RunOptions(runs_dir=str(tmp), data_dir=str(shared), device="cpu", progress=False, download=False, **kw)  # type: ignore[arg-type]


def final_state(run) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return run.load_state()


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def strip_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "time"} for h in history]


def test_same_config_same_weights_and_a_real_improvement(tmp_path: Path, shared_data: Path) -> None:
    run_a = train(SMALL, options(tmp_path / "a", shared_data))
    run_b = train(SMALL, options(tmp_path / "b", shared_data))
    assert_identical(final_state(run_a), final_state(run_b))
    meta = run_a.meta
    history = meta.history
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert meta.final_metrics is not None and meta.final_metrics["test_accuracy"] > 0.6  # 500 MNIST images, 3 epochs
    assert meta.status == "complete" and meta.environment is not None and meta.environment["torch"] == torch.__version__
    assert meta.steps_per_epoch == 10 and meta.total_steps == 30 and meta.hash == SMALL.run_hash() == run_a.hash
    assert meta.data_info is not None and meta.data_info.train_size == 500 and meta.data_info.input_shape == [1, 28, 28]
    assert meta.fork is None and meta.resumed_from is None and meta.precision == "fp32"


def test_seed_streams_are_independent(tmp_path: Path, shared_data: Path) -> None:
    opts = options(tmp_path, shared_data, checkpoints=CheckpointSchedule(epochs=(0,)))
    base = train(SMALL, opts)
    other_order = train(dataclasses.replace(SMALL, seeds=SeedConfig(1, 99, 3)), opts)
    other_init = train(dataclasses.replace(SMALL, seeds=SeedConfig(98, 2, 3)), opts)
    assert_identical(base.load_state(0), other_order.load_state(0))  # data order does not touch the init
    assert not torch.equal(final_state(base)["head.weight"], final_state(other_order)["head.weight"])
    assert not torch.equal(base.load_state(0)["head.weight"], other_init.load_state(0)["head.weight"])


class Interrupt(Exception):
    pass


def interrupt_at(step: int):  # type: ignore[no-untyped-def]
    def callback(state) -> None:  # type: ignore[no-untyped-def]
        if state.step == step:
            raise Interrupt

    return callback


@pytest.mark.parametrize("schedule", ["", "steps:15"])
def test_resume_is_bit_identical(tmp_path: Path, shared_data: Path, schedule: str) -> None:
    """Interrupted mid-epoch 2, resumed from the epoch-1 resume file (or a mid-epoch checkpoint)."""
    opts = options(tmp_path / "r", shared_data, checkpoints=CheckpointSchedule.parse(schedule))
    with pytest.raises(Interrupt):
        train(SMALL, opts, callback=interrupt_at(17))
    run = RunStore(opts.runs_dir).find(SMALL)
    assert run is not None and run.meta.status == "interrupted" and not run.complete
    resumed = train(SMALL, opts)
    expected_step = 15 if schedule else 10
    assert resumed.meta.resumed_from is not None and resumed.meta.resumed_from.step == expected_step
    straight = train(SMALL, options(tmp_path / "s", shared_data))
    assert_identical(final_state(resumed), final_state(straight))
    assert strip_time(resumed.meta.history) == strip_time(straight.meta.history)
    assert not resumed.resume_path.exists()


def test_complete_run_is_reused_and_missing_checkpoints_are_filled(tmp_path: Path, shared_data: Path) -> None:
    opts = options(tmp_path, shared_data)
    run = train(SMALL, opts)
    final = final_state(run)
    steps: list[int] = []
    again = train(SMALL, opts, callback=lambda s: steps.append(s.step))
    assert again == run and steps == []
    with_epochs = train(
        SMALL,
        dataclasses.replace(opts, checkpoints=CheckpointSchedule(epochs=(1, 2))),
        callback=lambda s: steps.append(s.step),
    )
    assert steps[0] == 1  # retrained from the start to produce the missing epoch-1 checkpoint
    assert run.checkpoint_steps() == [10, 20, 30]
    assert_identical(final, final_state(with_epochs))
    tensors, header = load_checkpoint(run.checkpoint_path(10))
    assert header["step"] == 10 and "rng.data" in tensors and any(k.startswith("optim.") for k in tensors)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path: Path, shared_data: Path) -> None:
    # a calm first epoch, then lr ×1e8 from epoch 2 on (a step schedule with gamma > 1)
    calm_then_explode = dataclasses.replace(SMALL.train, schedule="step", milestones=(1,), gamma=1e8, warmup_epochs=0)
    exploding = dataclasses.replace(SMALL, train=calm_then_explode)
    opts = options(tmp_path, shared_data)
    with pytest.raises(TrainingDiverged) as err:
        train(exploding, opts)
    run = RunStore(opts.runs_dir).find(exploding)
    assert run is not None and run.meta.status == "diverged" and str(err.value) == run.meta.error
    assert str(run.resume_path) in str(err.value) and "epoch 2" in str(err.value)
    tensors, header = load_checkpoint(run.resume_path)
    assert header["step"] == 10
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))


def test_an_exploding_loss_ends_diverged_whatever_the_optimiser(tmp_path: Path, shared_data: Path) -> None:
    # Adam at lr 1000: the loss stays finite (≈1e12) but far above the initial ≈ ln 10; SGD would give NaN
    adam = dataclasses.replace(SMALL, train=TrainConfig(optimizer="adam", lr=1000.0, batch_size=50, epochs=3))
    opts = options(tmp_path, shared_data)
    with pytest.raises(TrainingDiverged) as err:
        train(adam, opts)
    run = RunStore(opts.runs_dir).find(adam)
    assert run is not None and run.meta.status == "diverged" and str(err.value) == run.meta.error
    message = str(err.value)
    assert message.startswith("training loss became ") and "at step 10 (epoch 1)" in message
    assert "divergence limit max(10 × L0, L0 + 10) = 23.0" in message and "Lower the learning rate" in message
    assert math.isclose(run.meta["initial_loss"], math.log(10), rel_tol=0.05)
    # the same recipe at a sane learning rate is not caught
    sane = train(dataclasses.replace(adam, train=dataclasses.replace(adam.train, lr=1e-3)), opts)
    assert sane.meta.status == "complete" and sane.meta.error is None


def test_meta_records_what_the_bits_depend_on(tmp_path: Path, shared_data: Path) -> None:
    tiny = dataclasses.replace(
        SMALL, data=DataConfig("mnist", train_per_class=10), train=dataclasses.replace(SMALL.train, epochs=1)
    )
    env = train(tiny, options(tmp_path, shared_data)).meta.environment
    assert env is not None
    record = env["determinism"]
    assert record["torch"] == torch.__version__ and record["device_type"] == "cpu"
    assert record["threads"] == torch.get_num_threads() and record["cpu_capability"]
    assert record["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert record["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert {"cudnn_deterministic", "cudnn_benchmark", "cublas_workspace_config"} <= record.keys()


def test_load_run_model_reproduces_final_metrics(tmp_path: Path, shared_data: Path) -> None:
    from lmclab.data import DeviceDataset
    from lmclab.training import evaluate

    run = train(SMALL, options(tmp_path, shared_data))
    model = load_run_model(run)
    test = DeviceDataset.load("mnist", "test", data_dir=shared_data, download=False, progress=False)
    metrics = evaluate(model, test)
    final = run.meta.final_metrics
    assert final is not None and metrics["accuracy"] == final["test_accuracy"]
    assert metrics["loss"] == pytest.approx(final["test_loss"], rel=1e-6)


def test_evaluate_reports_nan_for_non_finite_logits(shared_data: Path) -> None:
    from lmclab.models import build_model
    from lmclab.training import evaluate

    data = DeviceDataset.load("mnist", "test", data_dir=shared_data, subset=100, progress=False)
    model = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, hidden=[8])
    ok = evaluate(model, data)
    assert math.isfinite(ok["loss"]) and 0 <= ok["accuracy"] <= 1
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    bad = evaluate(model, data)
    assert math.isnan(bad["loss"]) and math.isnan(bad["accuracy"])  # not an argmax over NaN logits


def test_a_stored_complete_run_is_returned_without_loading_data(
    tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmclab.training.trainer as trainer

    opts = options(tmp_path, shared_data)
    run = train(SMALL, opts)

    def no_data(*args: object, **kwargs: object) -> None:
        raise AssertionError("datasets loaded for a stored complete run")

    monkeypatch.setattr(trainer, "load_datasets", no_data)
    assert train(SMALL, opts) == run
    with pytest.raises(AssertionError, match="datasets loaded"):  # a missing checkpoint still needs the data
        train(SMALL, dataclasses.replace(opts, checkpoints=CheckpointSchedule(epochs=(1,))))


def test_the_plan_reuses_fills_forks_and_resumes(tmp_path: Path, shared_data: Path) -> None:
    """`plan_training` decides from the store alone; `train` carries each plan out."""
    config, store = SMALL.normalised(), RunStore(tmp_path)
    every_epoch = CheckpointSchedule(epochs=(1,))
    schedule = Schedule.of(config, CheckpointSchedule(), 500)
    assert schedule == Schedule(steps_per_epoch=10, total_steps=30, fork_step=None, checkpoints=(30,))
    fresh = plan_training(store, config, schedule)
    assert isinstance(fresh, Train) and (fresh.source, fresh.stop, fresh.filling, fresh.fork) == (None, 30, False, None)
    assert list(tmp_path.iterdir()) == []  # planning writes nothing

    run = train(SMALL, options(tmp_path, shared_data))
    assert plan_training(store, config, schedule) == Reuse(run)
    assert stored_complete(store, config, CheckpointSchedule()) == run
    assert stored_complete(store, config, every_epoch) is None  # the epoch-1 checkpoint is missing
    fill = plan_training(store, config, Schedule.of(config, every_epoch, 500))
    assert isinstance(fill, Train) and (fill.source, fill.stop, fill.filling) == (None, 10, True)

    child = child_config(SMALL, epoch=1, child=0).normalised()
    child_schedule = Schedule.of(child, CheckpointSchedule(), 500)
    assert child_schedule.fork_step == 10 and child_schedule.checkpoints == (10, 20, 30)
    assert plan_training(store, child, child_schedule) == FillParent(run, 10)
    train(SMALL, options(tmp_path, shared_data, checkpoints=every_epoch))
    start = plan_training(store, child, child_schedule)
    assert isinstance(start, StartChild) and start.parent == run and start.fork.step == 10
    assert start.fork.parent_run == run.path.name and start.fork.epoch == 1.0


def test_training_state_round_trips_through_a_checkpoint(tmp_path: Path, shared_data: Path) -> None:
    run = train(SMALL, options(tmp_path, shared_data, checkpoints=CheckpointSchedule(steps=(15,))))
    info = DeviceDataset.load("mnist", "train", data_dir=shared_data, per_class=50, download=False, progress=False).info
    path = run.checkpoint_path(15)
    state = TrainingState.from_checkpoint(SMALL.normalised(), info, torch.device("cpu"), path)
    assert state.step == 15 and state.order is not None  # mid-epoch: the epoch's order is kept
    tensors, header = state.to_checkpoint(10, run.path.name)
    stored, stored_header = load_checkpoint(path)
    assert_identical(tensors, stored)
    assert {**header, "format": 1} == stored_header
    initial = TrainingState.initial(SMALL.normalised(), info, torch.device("cpu"))
    assert initial.step == 0 and initial.order is None and not initial.epoch_sums.any()
