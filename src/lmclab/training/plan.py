"""What `train` has to do for a config, decided from the store alone: a typed plan.

  Reuse(run)           a complete run holding every kept checkpoint: return it as it is
  FillParent(parent)   a forked child whose parent lacks the fork-step state: train the parent up to it first
  StartChild(parent)   a forked child without its first checkpoint: take it from the parent
  Train(...)           train the run from its latest usable stored state (or the start) up to `stop`

A run is what its files say: one whose final checkpoint is stored but whose final evaluation is not
(killed during it) gets a Train from that checkpoint to itself (`Train.only_evaluates`): no step is
trained, the final state is evaluated and the run marked complete. A damaged run directory
(`Run.damage`) is refused (RunDamaged naming it), never trained over.

`plan_training` looks at the store only (it writes nothing); `train` carries the plan out and asks
again after filling a parent or starting a child, until the answer is Reuse or Train.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from lmclab.config import RunConfig
from lmclab.store import CheckpointError, ForkRecord, Run, RunStore, load_checkpoint
from lmclab.training.forks import fork_record, fork_step, usable_parent
from lmclab.training.schedules import CheckpointSchedule


@dataclass(frozen=True)
class Schedule:
    """A run's length and kept checkpoints for a training set of a given size."""

    steps_per_epoch: int
    total_steps: int
    fork_step: int | None  # the step a forked child starts at (None: not a fork)
    checkpoints: tuple[int, ...]  # the kept steps (the final one included)

    @staticmethod
    def of(config: RunConfig, checkpoints: CheckpointSchedule, train_size: int) -> Schedule:
        spe = math.ceil(train_size / config.train.batch_size)
        total = config.train.steps if config.train.steps is not None else config.train.epochs * spe
        start = fork_step(config, spe, total)
        return Schedule(spe, total, start, tuple(kept_steps(checkpoints, spe, total, start)))


def kept_steps(
    schedule: CheckpointSchedule, steps_per_epoch: int, total_steps: int, fork_step: int | None
) -> list[int]:
    """The kept steps; a child keeps its fork step and, by default (empty schedule), every epoch after it."""
    if fork_step is None:
        return schedule.steps_to_save(steps_per_epoch, total_steps)
    if schedule == CheckpointSchedule():
        schedule = CheckpointSchedule(every=1)
    return sorted({s for s in schedule.steps_to_save(steps_per_epoch, total_steps) if s >= fork_step} | {fork_step})


@dataclass(frozen=True)
class Reuse:
    run: Run


@dataclass(frozen=True)
class FillParent:
    """Train `parent` (its own config) keeping a checkpoint at `step`, the child's fork step."""

    parent: Run
    step: int


@dataclass(frozen=True)
class StartChild:
    """Write the child's first checkpoint from `parent`'s state at `fork.step`."""

    parent: Run
    fork: ForkRecord


@dataclass(frozen=True)
class Train:
    """Train `run` from `source` (None: the initialisation) up to step `stop`.

    `filling`: the run is complete and only lacks checkpoints; it is trained up to the last missing
    one and no further, and its meta.json (final state, history) is left as it is."""

    run: Run
    schedule: Schedule
    source: Path | None
    stop: int
    filling: bool
    fork: ForkRecord | None  # a child's start, kept in its meta.json

    @property
    def only_evaluates(self) -> bool:
        """The run's final state is stored and only its final evaluation is missing: nothing is trained."""
        return not self.filling and self.source == self.run.checkpoint_path(self.stop) == self.run.checkpoint_path(
            self.schedule.total_steps
        )


Plan = Reuse | FillParent | StartChild | Train


def has_checkpoints(run: Run, steps: tuple[int, ...]) -> bool:
    return all(run.checkpoint_path(s).is_file() for s in steps)


def stored_complete(store: RunStore, config: RunConfig, checkpoints: CheckpointSchedule) -> Run | None:
    """The stored complete run of `config` if it holds every kept checkpoint, decided from its meta.json
    alone (no data is loaded); None when that needs the training set (or the run is not complete)."""
    found = store.find(config)
    if found is None or not found.complete:
        return None
    info = found.meta.data_info
    if info is None or info.train_size is None:
        return None
    schedule = Schedule.of(config, checkpoints, int(info.train_size))
    return found if has_checkpoints(found, schedule.checkpoints) else None


def plan_training(store: RunStore, config: RunConfig, schedule: Schedule) -> Plan:
    """The next thing to do to have the run of `config` (normalised) hold every checkpoint of `schedule`;
    RunDamaged if the run's directory is damaged."""
    run = store.find(config) or store.run(config.run_hash())  # (find refuses a damaged run)
    if run.complete and has_checkpoints(run, schedule.checkpoints):
        return Reuse(run)
    fork = None
    if schedule.fork_step is not None:
        fork = fork_record(store, config, schedule.fork_step, schedule.steps_per_epoch)
        if not run.checkpoint_path(schedule.fork_step).is_file():
            parent = usable_parent(store, config, schedule.fork_step, schedule.steps_per_epoch, schedule.total_steps)
            if not parent.checkpoint_path(schedule.fork_step).is_file():
                return FillParent(parent, schedule.fork_step)
            return StartChild(parent, fork)
    missing = [s for s in schedule.checkpoints if not run.checkpoint_path(s).is_file()]
    final = run.checkpoint_path(schedule.total_steps)
    if not missing and not run.complete and final.is_file():
        # trained to the end, then stopped before its final evaluation was stored: only evaluate
        return Train(run, schedule, final, schedule.total_steps, False, fork)
    filling = run.complete
    # (every kept checkpoint stored but the run not marked complete: resume from the last and finish it)
    source = resume_source(run, min(missing, default=schedule.total_steps))
    stop = max(missing) if filling else schedule.total_steps
    return Train(run, schedule, source, stop, filling, fork)


def resume_source(run: Run, first_missing: int) -> Path | None:
    """The stored full state with the largest step ≤ first_missing (resume file or checkpoint)."""
    candidates: list[tuple[int, Path]] = [
        (s, run.checkpoint_path(s)) for s in run.checkpoint_steps() if s <= first_missing
    ]
    if run.resume_path.is_file():
        try:
            _, header = load_checkpoint(run.resume_path)
            if header["step"] <= first_missing:
                candidates.append((header["step"], run.resume_path))
        except CheckpointError as exc:  # a damaged resume file is not used; an earlier checkpoint (or the start) is
            warnings.warn(f"not resuming from {run.resume_path}: {exc}; using an earlier state", stacklevel=2)
    return max(candidates, key=lambda c: c[0])[1] if candidates else None
