"""How to run a training, not what: `RunOptions`."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmclab.training.schedules import CheckpointSchedule


@dataclass(frozen=True)
class RunOptions:
    """How to run, not what: none of these fields changes the trained weights or the run hash.

    `checkpoints`: the kept checkpoints; the final state is always kept. A forked child also keeps its
    fork step, and its default (empty) schedule means every epoch from the fork on.
    """

    runs_dir: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    checkpoints: CheckpointSchedule = field(default_factory=CheckpointSchedule)
    progress: bool = True
    download: bool = True
    eval_every: int = 1  # epochs between test evaluations (0: only at the end)
    eval_batch_size: int = 1000
    preset: str | None = None
