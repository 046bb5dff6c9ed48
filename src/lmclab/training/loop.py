"""The training loop: steps, epochs, evaluation, checkpoints, history and divergence checks.

`run_loop` carries a `TrainingState` forward to the plan's stop step, writing the run's history and
resume file at every epoch end and the kept checkpoints at their steps; `finish` evaluates the final
state and marks the run complete. A plan that only fills checkpoints of a complete run leaves its
history and meta.json as they are.

Divergence, whatever the optimiser: the run stops with `TrainingDiverged` (status "diverged", the last
good state named in the message) when

  - the training loss is NaN or infinite at any step (checked every step on CPU, every 25 on CUDA), or
  - the mean training loss of the current epoch so far, once W = min(50, steps per epoch) of its steps
    have run (and at its end), exceeds max(10 × L0, L0 + 10), where L0 = max(ln C, the run's initial
    loss): the loss of its first step, kept in meta.json as `initial_loss` (a fork child uses its
    parent's), and ln C (C classes) the cross-entropy of a uniform prediction. For C = 10 and a usual
    initialisation (L0 ≈ 2.3) the limit is 23.

The epoch's running sums are part of the saved state, so a resumed run makes the same decisions at the
same steps as one never interrupted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmclab.config import RunConfig
from lmclab.data import DeviceDataset
from lmclab.store import Run
from lmclab.training.evaluate import autocast_for, evaluate
from lmclab.training.options import RunOptions
from lmclab.training.plan import Train
from lmclab.training.schedules import learning_rate
from lmclab.training.state import TrainingState


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or exploded (see the module docstring); the last good checkpoint
    is kept and named in the message."""


DIVERGENCE_FACTOR = 10.0  # the limit is max(FACTOR × L0, L0 + MARGIN) …
DIVERGENCE_MARGIN = 10.0
DIVERGENCE_WINDOW = 50  # … on the epoch's mean loss once min(WINDOW, steps per epoch) of its steps ran


def reference_loss(run: Run, num_classes: int, initial: float | None = None) -> float:
    """L0 = max(ln C, the initial loss): `initial` if given, else meta.json's `initial_loss` of the run
    or of its nearest fork ancestor that has one; ln C alone when none is recorded."""
    uniform = math.log(max(num_classes, 2))
    found: Run | None = run
    for _ in range(64):  # a fork chain is short; the bound only guards a damaged store against a cycle
        if initial is not None or found is None:
            break
        recorded = found.meta.initial_loss
        if isinstance(recorded, (int, float)):
            initial = float(recorded)
        found = found.parent
    return max(uniform, initial) if initial is not None and math.isfinite(initial) else uniform


def divergence_limit(reference: float) -> float:
    return max(DIVERGENCE_FACTOR * reference, reference + DIVERGENCE_MARGIN)


@dataclass
class TrainState:
    """What a step callback sees."""

    step: int
    epoch: int
    loss: float | None


def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the mean cross-entropy (bf16 autocast + channels_last on CUDA)."""
    if x.is_cuda and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast_for(x.device):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def run_loop(
    state: TrainingState,
    plan: Train,
    config: RunConfig,
    options: RunOptions,
    train_ds: DeviceDataset,
    test_ds: DeviceDataset,
    history: list[dict[str, Any]],
    callback: Callable[[TrainState], None] | None = None,
) -> None:
    """Train `state` up to `plan.stop`: epoch ends append to `history` (and meta.json), write the resume
    file and evaluate on the test split every `options.eval_every` epochs; kept steps are checkpointed.
    The run's status becomes "interrupted" or "diverged" if the loop stops early."""
    run, schedule, filling = plan.run, plan.schedule, plan.filling
    spe, total, wanted = schedule.steps_per_epoch, schedule.total_steps, schedule.checkpoints
    n, bs = len(train_ds), config.train.batch_size
    device = state.epoch_sums.device
    check_every = 1 if device.type == "cpu" else 25
    num_classes, window = train_ds.info.num_classes, min(DIVERGENCE_WINDOW, spe)
    reference = None if state.step == 0 else reference_loss(run, num_classes)
    epoch_start = time.perf_counter()
    bar = tqdm(
        total=total,
        initial=state.step,
        desc=run.path.name,
        unit="step",
        disable=not options.progress,
        dynamic_ncols=True,
        leave=True,
    )
    status = "interrupted"
    try:
        state.model.train()
        while state.step < plan.stop:
            pos = state.step % spe
            if pos == 0 or state.order is None:
                state.order = torch.randperm(n, generator=state.data_gen).to(device)
            x, y = train_ds.batch(state.order[pos * bs : (pos + 1) * bs], state.aug_gen)
            lr = learning_rate(config.train, state.step, total, spe)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(state.model, state.optimizer, x, y)
            state.step += 1
            step = state.step
            state.epoch_sums += torch.stack(
                [
                    loss.double() * y.numel(),
                    (logits.argmax(1) == y).sum().double(),
                    torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
                ]
            )
            bar.update(1)
            if reference is None:  # the run's first step: its loss is the run's initial loss
                initial = loss.item()
                if not filling and math.isfinite(initial):
                    run.update_meta(initial_loss=initial)
                reference = reference_loss(run, num_classes, initial)

            epoch_end = step % spe == 0 or step == total
            if step % check_every == 0 or epoch_end:
                value, count = state.epoch_sums[0::2].tolist()
                if not math.isfinite(value):
                    raise TrainingDiverged(diverged_message(run, step, spe, value))
                in_epoch, limit = (step - 1) % spe + 1, divergence_limit(reference)
                if (in_epoch >= window or epoch_end) and value / count > limit:
                    detail = (
                        f" (the mean of this epoch's {in_epoch} steps so far, above the divergence limit "
                        f"max({DIVERGENCE_FACTOR:g} × L0, L0 + {DIVERGENCE_MARGIN:g}) = {limit:.4g} with L0 = "
                        f"{reference:.4g} from the initial loss)"
                    )
                    raise TrainingDiverged(diverged_message(run, step, spe, value / count, detail))
            if callback is not None:
                callback(TrainState(step=step, epoch=math.ceil(step / spe), loss=loss.item()))
            if epoch_end and not filling:  # (filling a complete run leaves its history and meta as they are)
                epoch = math.ceil(step / spe)
                sums = state.epoch_sums
                entry: dict[str, Any] = {
                    "epoch": epoch,
                    "step": step,
                    "lr": lr,
                    "train_loss": (sums[0] / sums[2]).item(),
                    "train_accuracy": (sums[1] / sums[2]).item(),
                    "time": time.perf_counter() - epoch_start,
                }
                if (options.eval_every and epoch % options.eval_every == 0) or step == total:
                    test = evaluate(state.model, test_ds, options.eval_batch_size)
                    require_finite(test, run, step, spe)
                    entry.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
                history.append(entry)
                bar.set_postfix({k: round(v, 4) for k, v in entry.items() if k in ("train_loss", "test_accuracy")})
                run.update_meta(history=history)
            if epoch_end:
                state.epoch_sums.zero_()
                epoch_start = time.perf_counter()
                if step < total and not filling:
                    state.save(run.resume_path, spe, run.path.name)
            if step in wanted:
                state.save(run.checkpoint_path(step), spe, run.path.name)
        status = "complete"
    except TrainingDiverged as exc:
        status = "diverged"
        if not filling:
            run.update_meta(status=status, error=str(exc))
        raise
    finally:
        bar.close()
        if status == "interrupted" and not filling:
            run.update_meta(status=status)


def finish(
    state: TrainingState,
    plan: Train,
    options: RunOptions,
    train_ds: DeviceDataset,
    test_ds: DeviceDataset,
    history: list[dict[str, Any]],
) -> None:
    """Evaluate the final state on both splits, mark the run complete and drop its resume file."""
    run, spe = plan.run, plan.schedule.steps_per_epoch
    final = {f"train_{k}": v for k, v in evaluate(state.model, train_ds, options.eval_batch_size).items()}
    final.update({f"test_{k}": v for k, v in evaluate(state.model, test_ds, options.eval_batch_size).items()})
    require_finite(final, run, state.step, spe)
    run.update_meta(status="complete", final_metrics=final, history=history)
    run.resume_path.unlink(missing_ok=True)


def diverged_message(run: Run, step: int, steps_per_epoch: int, value: float, detail: str = "") -> str:
    good = [s for s in run.checkpoint_steps() if s < step]
    kept = run.resume_path if run.resume_path.is_file() else (run.checkpoint_path(good[-1]) if good else None)
    return (
        f"training loss became {value:.4g}{detail} at step {step} (epoch {math.ceil(step / steps_per_epoch)}) of run "
        f"{run.path}; the last good state is {kept or 'none (diverged in the first epoch)'}. "
        "Lower the learning rate or add warm-up (a changed config is a new run)."
    )


def require_finite(metrics: dict[str, float], run: Run, step: int, steps_per_epoch: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(diverged_message(run, step, steps_per_epoch, float("nan")) + f" Metrics: {bad}")
