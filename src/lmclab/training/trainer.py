"""The trainer: on-device data, three seed streams, scheduled checkpoints, bit-identical resume.

Randomness: the initialisation is drawn under `seed_init` (torch's global RNG, forked), the data
order from a CPU generator seeded with `seed_data` (one `randperm` per epoch), augmentation from a
generator on the training device seeded with `seed_augment`. A checkpoint holds the model, the
optimizer state, the step, both generators' states and the current epoch's order, so a run resumes
from any checkpoint and ends bit-identical (on CPU) to one that was never interrupted.

A forked child (`config.fork` set, see `lmclab.training.forks`) starts from its parent's full state
at the fork step, written as the child's own first checkpoint; from there it is resumed like any run.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lmclab.config import RunConfig
from lmclab.data import DatasetInfo, DeviceDataset
from lmclab.models import build_model
from lmclab.store import (
    CheckpointError,
    Run,
    RunStore,
    environment_record,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from lmclab.store.checkpoint import MODEL_PREFIX, optimizer_from_flat, optimizer_to_flat, split_prefix, with_prefix
from lmclab.training.evaluate import autocast_for, evaluate
from lmclab.training.forks import check_parent, child_start_state, find_parent, parent_run
from lmclab.training.schedules import CheckpointSchedule, learning_rate

OPTIMIZERS = ("sgd", "adam", "adamw")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept and named in the message."""


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


@dataclass
class TrainState:
    """What a step callback sees."""

    step: int
    epoch: int
    loss: float | None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def init_model(config: RunConfig, info: DatasetInfo) -> torch.nn.Module:
    """The model at initialisation, drawn on CPU in fp32 under `seed_init` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seeds.seed_init)
        return build_model(
            config.model.model, input_shape=info.input_shape, num_classes=info.num_classes, **config.model_options()
        )


def make_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = config.train
    params = list(model.parameters())
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    raise ValueError(f"unknown optimizer {t.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def load_datasets(config: RunConfig, options: RunOptions, device: torch.device) -> tuple[DeviceDataset, DeviceDataset]:
    d = config.data
    common = dict(data_dir=options.data_dir, device=device, download=options.download, progress=options.progress)
    train = DeviceDataset.load(d.dataset, "train", subset=d.train_subset, per_class=d.train_per_class, augment=d.augment, **common)
    test = DeviceDataset.load(d.dataset, "test", **common)
    return train, test


def is_cnn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in model.modules())


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


def train(
    config: RunConfig,
    options: RunOptions = RunOptions(),
    callback: Callable[[TrainState], None] | None = None,
) -> Run:
    """Train `config` into the run store, or reuse/resume the stored run. Returns the run.

    A complete run with every requested checkpoint is returned as it is. Otherwise training
    restarts from the latest stored state that precedes the first missing checkpoint; a complete run
    that only lacks checkpoints is trained up to the last missing one and no further (its final state
    and meta.json stay as they are). A forked child (`config.fork`) first takes its parent's state at
    the fork step, resuming the parent to write that checkpoint if it lacks it.
    """
    if config.train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.train.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    config = config.normalised()
    store = RunStore(options.runs_dir)
    device = resolve_device(options.device)

    def schedule(n: int) -> tuple[int, int, int | None, list[int]]:
        """(steps per epoch, total steps, fork step, checkpoint steps to keep) for n training examples."""
        spe = math.ceil(n / config.train.batch_size)
        total = config.train.steps if config.train.steps is not None else config.train.epochs * spe
        fork = _fork_step(config, spe, total)
        return spe, total, fork, _checkpoint_steps(options.checkpoints, spe, total, fork)

    found = store.find(config)
    stored_n = found.meta.get("data_info", {}).get("train_size") if found is not None and found.complete else None
    if found is not None and stored_n is not None:  # a stored complete run: decided without loading any data
        if all(found.checkpoint_path(s).is_file() for s in schedule(int(stored_n))[3]):
            return found
    train_ds, test_ds = load_datasets(config, options, device)
    n, bs = len(train_ds), config.train.batch_size
    steps_per_epoch, total_steps, fork_step, wanted = schedule(n)
    if found is not None and found.complete and all(found.checkpoint_path(s).is_file() for s in wanted):
        return found
    fork_record: dict[str, Any] | None = None
    if fork_step is not None:
        fork_record = _start_child(config, fork_step, steps_per_epoch, total_steps, store, options, device)

    run = store.open(config, preset=options.preset)
    missing = [s for s in wanted if not run.checkpoint_path(s).is_file()]
    # a complete run that only lacks checkpoints is not retrained to the end: it stops at the last one missing
    filling = run.complete

    model = init_model(config, train_ds.info).to(device)
    if device.type == "cuda" and is_cnn(model):
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    data_gen = torch.Generator().manual_seed(config.seeds.seed_data)
    aug_gen = torch.Generator(device=device).manual_seed(config.seeds.seed_augment)
    order: torch.Tensor | None = None
    # running sums of the current epoch's training loss / correct / seen, saved so a resumed epoch reports the same
    epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)
    history: list[dict[str, Any]] = []
    step = 0

    source = _resume_source(run, min(missing))
    if source is not None:
        tensors, header = load_checkpoint(source)
        load_model_state(model, split_prefix(tensors, MODEL_PREFIX), str(source))
        optimizer_from_flat(optimizer, tensors, header["optimizer"])
        data_gen.set_state(tensors["rng.data"])
        aug_gen.set_state(tensors["rng.augment"])
        order = tensors["data.order"].to(device) if "data.order" in tensors else None
        epoch_sums = tensors["train.epoch_sums"].to(device)
        step = header["step"]
        history = [h for h in run.meta.get("history", []) if h["step"] <= step]

    def state_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt_tensors, opt_header = optimizer_to_flat(optimizer)
        tensors = {**with_prefix(model.state_dict(), MODEL_PREFIX), **opt_tensors,
                   "rng.data": data_gen.get_state(), "rng.augment": aug_gen.get_state(),
                   "train.epoch_sums": epoch_sums}
        if order is not None:
            tensors["data.order"] = order
        header = {"step": step, "epoch": step / steps_per_epoch, "run": run.path.name, "optimizer": opt_header}
        return tensors, header

    def save(path: Any) -> None:
        tensors, header = state_tensors()
        save_checkpoint(path, tensors, header)

    if not filling:
        started_at_fork = fork_record is not None and step == fork_step and run.meta.get("status") == "created"
        run.update_meta(
            status="running",
            preset=options.preset,
            hash=config.run_hash(),
            environment=environment_record(),
            device=str(device),
            precision="bf16-autocast" if device.type == "cuda" else "fp32",
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            data_info=_info_record(train_ds, test_ds),
            parameters=sum(p.numel() for p in model.parameters()),
            resumed_from=None if source is None or started_at_fork else {"path": str(source), "step": step},
            **({"fork": fork_record} if fork_record is not None else {}),
        )
    if step in wanted and not run.checkpoint_path(step).is_file():
        save(run.checkpoint_path(step))
    stop = max(missing) if filling else total_steps

    check_every = 1 if device.type == "cpu" else 25
    epoch_start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc=run.path.name, unit="step", disable=not options.progress,
               dynamic_ncols=True, leave=True)
    status = "interrupted"
    try:
        model.train()
        while step < stop:
            pos = step % steps_per_epoch
            if pos == 0 or order is None:
                order = torch.randperm(n, generator=data_gen).to(device)
            x, y = train_ds.batch(order[pos * bs:(pos + 1) * bs], aug_gen)
            lr = learning_rate(config.train, step, total_steps, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, logits = train_step(model, optimizer, x, y)
            step += 1
            epoch_sums += torch.stack([loss.double() * y.numel(),
                                       (logits.argmax(1) == y).sum().double(),
                                       torch.tensor(float(y.numel()), dtype=torch.float64, device=device)])
            bar.update(1)

            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if step % check_every == 0 or epoch_end:
                value = epoch_sums[0].item()
                if not math.isfinite(value):
                    raise TrainingDiverged(_diverged_message(run, step, steps_per_epoch, value))
            if callback is not None:
                callback(TrainState(step=step, epoch=math.ceil(step / steps_per_epoch), loss=loss.item()))
            if epoch_end and not filling:  # (filling a complete run leaves its history and meta as they are)
                epoch = math.ceil(step / steps_per_epoch)
                entry: dict[str, Any] = {
                    "epoch": epoch, "step": step, "lr": lr,
                    "train_loss": (epoch_sums[0] / epoch_sums[2]).item(),
                    "train_accuracy": (epoch_sums[1] / epoch_sums[2]).item(),
                    "time": time.perf_counter() - epoch_start,
                }
                if (options.eval_every and epoch % options.eval_every == 0) or step == total_steps:
                    test = evaluate(model, test_ds, options.eval_batch_size)
                    _require_finite(test, run, step, steps_per_epoch)
                    entry.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
                history.append(entry)
                bar.set_postfix({k: round(v, 4) for k, v in entry.items() if k in ("train_loss", "test_accuracy")})
                run.update_meta(history=history)
            if epoch_end:
                epoch_sums.zero_()
                epoch_start = time.perf_counter()
                if step < total_steps and not filling:
                    save(run.resume_path)
            if step in wanted:
                save(run.checkpoint_path(step))
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
    if filling:
        return run

    final = {f"train_{k}": v for k, v in evaluate(model, train_ds, options.eval_batch_size).items()}
    final.update({f"test_{k}": v for k, v in evaluate(model, test_ds, options.eval_batch_size).items()})
    _require_finite(final, run, step, steps_per_epoch)
    run.update_meta(status="complete", final_metrics=final, history=history)
    run.resume_path.unlink(missing_ok=True)
    return run


def _resume_source(run: Run, first_missing: int) -> Any:
    """The stored full state with the largest step ≤ first_missing (resume file or checkpoint)."""
    candidates: list[tuple[int, Any]] = [(s, run.checkpoint_path(s)) for s in run.checkpoint_steps() if s <= first_missing]
    if run.resume_path.is_file():
        try:
            _, header = load_checkpoint(run.resume_path)
            if header["step"] <= first_missing:
                candidates.append((header["step"], run.resume_path))
        except CheckpointError:
            pass  # a damaged resume file is ignored; an earlier checkpoint (or the start) is used
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def _info_record(train_ds: DeviceDataset, test_ds: DeviceDataset) -> dict[str, Any]:
    info = train_ds.info
    return {"name": info.name, "input_shape": list(info.input_shape), "num_classes": info.num_classes,
            "classes": list(info.classes), "source": info.source, "train_size": len(train_ds),
            "test_size": len(test_ds), "augment": train_ds.augment}


def _diverged_message(run: Run, step: int, steps_per_epoch: int, value: float) -> str:
    good = [s for s in run.checkpoint_steps() if s < step]
    kept = run.resume_path if run.resume_path.is_file() else (run.checkpoint_path(good[-1]) if good else None)
    return (f"training loss became {value} at step {step} (epoch {math.ceil(step / steps_per_epoch)}) of run "
            f"{run.path}; the last good state is {kept or 'none (diverged in the first epoch)'}. "
            "Lower the learning rate or add warm-up (a changed config is a new run).")


def _require_finite(metrics: dict[str, float], run: Run, step: int, steps_per_epoch: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise TrainingDiverged(_diverged_message(run, step, steps_per_epoch, float("nan")) + f" Metrics: {bad}")


def load_run_model(run: Run, step: int | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The run's model with its weights at `step` (default final), in eval mode."""
    config, meta = run.config, run.meta
    if "data_info" not in meta:
        raise CheckpointError(f"run {run.path} has not started training (no data_info in meta.json)")
    info = meta["data_info"]
    model = build_model(config.model.model, input_shape=tuple(info["input_shape"]),
                        num_classes=info["num_classes"], **config.model_options())
    load_model_state(model, run.load_state(step), str(run.path))
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------- forks


def _fork_step(config: RunConfig, steps_per_epoch: int, total_steps: int) -> int | None:
    """The parent step a forked child starts from (epoch·steps_per_epoch, or the step); None if not a fork."""
    fork = config.fork
    if not fork.is_set:
        return None
    step = fork.step if fork.step is not None else fork.epoch * steps_per_epoch  # type: ignore[operator]
    if step >= total_steps:
        raise ValueError(f"fork point epoch={fork.epoch}, step={fork.step} is step {step}, not before the end of "
                         f"training (step {total_steps} = {total_steps / steps_per_epoch:g} epochs of "
                         f"{steps_per_epoch} steps); fork at a step in [0, {total_steps})")
    return step


def _checkpoint_steps(schedule: CheckpointSchedule, steps_per_epoch: int, total_steps: int,
                      fork_step: int | None) -> list[int]:
    """The kept steps; a child keeps its fork step and, by default (empty schedule), every epoch after it."""
    if fork_step is None:
        return schedule.steps_to_save(steps_per_epoch, total_steps)
    if schedule == CheckpointSchedule():
        schedule = CheckpointSchedule(every=1)
    return sorted({s for s in schedule.steps_to_save(steps_per_epoch, total_steps) if s >= fork_step} | {fork_step})


def _start_child(config: RunConfig, fork_step: int, steps_per_epoch: int, total_steps: int, store: RunStore,
                 options: RunOptions, device: torch.device) -> dict[str, Any]:
    """Make sure the child's run holds its first checkpoint: the parent's state at `fork_step` with the
    child's generators (`child_start_state`), and its history up to the fork. The parent is
    resumed to write that checkpoint if it lacks it. Returns the fork record kept in meta.json."""
    parent_path = parent_run(store, config).path
    record = {"parent": config.fork.parent, "parent_run": parent_path.name, "parent_path": str(parent_path),
              "step": fork_step, "epoch": fork_step / steps_per_epoch}
    found = store.find(config)
    if found is not None and found.checkpoint_path(fork_step).is_file():
        return record
    parent = find_parent(store, config)
    check_parent(parent.config, config)
    parent_fork = _fork_step(parent.config, steps_per_epoch, total_steps)
    if parent_fork is not None and fork_step < parent_fork:
        raise ValueError(f"cannot fork {parent.path.name} at step {fork_step}: it is itself a child forked at step "
                         f"{parent_fork} and holds no state before that; fork its parent {parent.config.fork.parent}")
    source = parent.checkpoint_path(fork_step)
    if not source.is_file():
        train(parent.config, dataclasses.replace(options, checkpoints=CheckpointSchedule(steps=(fork_step,)),
                                                 preset=parent.meta.get("preset")))
    tensors, header = load_checkpoint(source)
    tensors = child_start_state(tensors, parent.config, config, fork_step=fork_step, steps_per_epoch=steps_per_epoch,
                                device=device)
    run = store.open(config, preset=options.preset)
    run.update_meta(history=[h for h in parent.meta.get("history", []) if h["step"] <= fork_step], fork=record)
    save_checkpoint(run.checkpoint_path(fork_step), tensors, {**header, "run": run.path.name, "fork": record})
    return record
