"""Learning-rate schedules as pure functions of the step, and checkpoint schedules.

A schedule has no state of its own: lr(step) is recomputed every step, so resuming needs only the
step counter (which every checkpoint holds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmclab.config import SCHEDULES, TrainConfig


def learning_rate(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """lr at optimiser step `step` (0-based).

    warm-up: lr·(step+1)/W for step < W = round(warmup_epochs·steps_per_epoch); then
    constant: lr;  step: lr·γ^#{m ∈ milestones : m ≤ epoch};
    cosine: lr·½(1 + cos(π·s/S));  linear: lr·(1 − s/S), with s = step − W, S = total − W.
    """
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    s, span = step - warmup, max(total_steps - warmup, 1)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if m <= epoch)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * s / span))
    return cfg.lr * (1.0 - s / span)


@dataclass(frozen=True)
class CheckpointSchedule:
    """Which optimiser steps get a kept checkpoint. The final state is always kept.

    Spelled on the command line as `epochs:0,1,2,15`, `every:5` (epochs), `log:20` (steps,
    log-spaced from 1 to the end), `steps:100,250`; several joined with `+`.
    """

    epochs: tuple[int, ...] = ()
    every: int = 0
    log_steps: int = 0
    steps: tuple[int, ...] = ()

    def steps_to_save(self, steps_per_epoch: int, total_steps: int) -> list[int]:
        wanted = {e * steps_per_epoch for e in self.epochs}
        if self.every > 0:
            wanted |= {e * steps_per_epoch for e in range(self.every, total_steps // steps_per_epoch + 1, self.every)}
        if self.log_steps > 0:
            wanted |= {round(v) for v in _logspace(1, total_steps, self.log_steps)}
        wanted |= set(self.steps)
        wanted.add(total_steps)
        return sorted(s for s in wanted if 0 <= s <= total_steps)

    @staticmethod
    def parse(text: str) -> CheckpointSchedule:
        fields: dict[str, object] = {}
        for part in filter(None, text.split("+")):
            kind, _, value = part.partition(":")
            numbers = tuple(int(v) for v in value.split(",") if v.strip())
            if kind == "epochs":
                fields["epochs"] = numbers
            elif kind == "steps":
                fields["steps"] = numbers
            elif kind == "every" and len(numbers) == 1:
                fields["every"] = numbers[0]
            elif kind == "log" and len(numbers) == 1:
                fields["log_steps"] = numbers[0]
            else:
                raise ValueError(
                    f"bad checkpoint schedule {part!r}; use epochs:0,1,2 | every:N | log:K | steps:S,T joined by '+'"
                )
        return CheckpointSchedule(**fields)  # type: ignore[arg-type]


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    if n == 1:
        return [hi]
    return [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (n - 1)) for i in range(n)]
