"""Learning-rate schedules against hand-computed values; checkpoint schedules."""

from __future__ import annotations

import math

import pytest

from lmclab.config import TrainConfig
from lmclab.training import CheckpointSchedule, learning_rate


def test_constant_with_warmup() -> None:
    cfg = TrainConfig(lr=0.4, schedule="constant", warmup_epochs=1.0)
    assert [learning_rate(cfg, s, 100, 4) for s in range(6)] == [0.1, 0.2, 0.30000000000000004, 0.4, 0.4, 0.4]


def test_step_schedule() -> None:
    cfg = TrainConfig(lr=0.1, schedule="step", milestones=(2, 3), gamma=0.1)
    lrs = [learning_rate(cfg, s, 40, 10) for s in (0, 19, 20, 29, 30, 39)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_cosine_after_warmup() -> None:
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_epochs=1.0)
    total, spe = 110, 10
    assert learning_rate(cfg, 9, total, spe) == 1.0
    assert learning_rate(cfg, 10, total, spe) == 1.0
    assert learning_rate(cfg, 60, total, spe) == pytest.approx(0.5)
    assert learning_rate(cfg, 35, total, spe) == pytest.approx(0.5 * (1 + math.cos(math.pi * 25 / 100)))


def test_linear_decay() -> None:
    cfg = TrainConfig(lr=2.0, schedule="linear")
    assert learning_rate(cfg, 0, 100, 10) == 2.0
    assert learning_rate(cfg, 75, 100, 10) == pytest.approx(0.5)


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="constant, step, cosine, linear"):
        learning_rate(TrainConfig(schedule="exp"), 0, 10, 1)


def test_checkpoint_schedules() -> None:
    sched = CheckpointSchedule.parse("epochs:0,1,15+every:10+steps:7")
    assert sched.steps_to_save(steps_per_epoch=5, total_steps=100) == [0, 5, 7, 50, 75, 100]
    log = CheckpointSchedule.parse("log:5").steps_to_save(10, 10_000)
    assert log == [1, 10, 100, 1000, 10_000]
    assert CheckpointSchedule().steps_to_save(10, 30) == [30]
    with pytest.raises(ValueError, match="epochs:0,1,2"):
        CheckpointSchedule.parse("sometimes:3")
