"""The trainer: on-device data, three seed streams, scheduled checkpoints, bit-identical resume.

`train` is three parts: the plan (`lmclab.training.plan`: reuse a stored run, fill a fork's parent,
start a child, or train from the latest usable stored state), the state (`lmclab.training.state`:
model, optimizer, generators, data order, running sums, step — what a checkpoint holds) and the loop
(`lmclab.training.loop`: epochs, evaluation, checkpoints). A checkpoint holds the full state, so a
run resumes from any checkpoint and ends bit-identical (on CPU) to one that was never interrupted.

A forked child (`config.fork` set, see `lmclab.training.forks`) starts from its parent's full state
at the fork step, written as the child's own first checkpoint; from there it is resumed like any run.
`fork` trains a parent and its children.

Training holds the run's lock (`lmclab.store.locks`), so two identical commands train a run once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from lmclab.config import RunConfig
from lmclab.data import DataError, DeviceDataset, short_fingerprint
from lmclab.models import build_model
from lmclab.store import (
    ArtifactLock,
    DataInfo,
    ResumedFrom,
    Run,
    RunStore,
    artifact_lock,
    environment_record,
    load_model_state,
    runs_root,
)
from lmclab.training.forks import child_config, start_child
from lmclab.training.loop import TrainState, finish, run_loop
from lmclab.training.options import RunOptions
from lmclab.training.plan import FillParent, Reuse, Schedule, StartChild, Train, plan_training, stored_complete
from lmclab.training.schedules import CheckpointSchedule
from lmclab.training.state import OPTIMIZERS, TrainingState


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_datasets(config: RunConfig, options: RunOptions, device: torch.device) -> tuple[DeviceDataset, DeviceDataset]:
    d = config.data
    train = DeviceDataset.load(
        d.dataset,
        "train",
        subset=d.train_subset,
        per_class=d.train_per_class,
        augment=d.augment,
        data_dir=options.data_dir,
        device=device,
        download=options.download,
        progress=options.progress,
        classes=d.classes,
    )
    test = DeviceDataset.load(
        d.dataset,
        "test",
        data_dir=options.data_dir,
        device=device,
        download=options.download,
        progress=options.progress,
        classes=d.classes,
    )
    expected = d.data_fingerprint  # image folders: the content the run's config (and hash) names
    if expected is not None and train.info.folder_fingerprint != expected:
        raise DataError(
            f"image folder {train.info.source} has changed since run {config.run_hash()} was configured: its "
            f"content fingerprint is now {short_fingerprint(train.info.folder_fingerprint)}, the run's config "
            f"names {short_fingerprint(expected)}; give the dataset again for a run on the folder as it is now"
        )
    return train, test


DEFAULT_OPTIONS = RunOptions()


def train(
    config: RunConfig,
    options: RunOptions = DEFAULT_OPTIONS,
    callback: Callable[[TrainState], None] | None = None,
) -> Run:
    """Train `config` into the run store, or reuse/resume the stored run. Returns the run.

    A complete run with every requested checkpoint is returned as it is. Otherwise training
    restarts from the latest stored state that precedes the first missing checkpoint; a complete run
    that only lacks checkpoints is trained up to the last missing one and no further (its final state
    and meta.json stay as they are). A forked child (`config.fork`) first takes its parent's state at
    the fork step, resuming the parent to write that checkpoint if it lacks it.

    One process at a time trains a run: the run's lock (`lmclab.store.locks`) is held from planning to
    the end of training. A second call for the same config waits (saying so on stderr), then plans
    again from the store: it reuses the run the first finished, or resumes it if the first died (a lock
    left by a dead process is taken over). $LMCLAB_LOCK_TIMEOUT bounds the wait (`LockTimeout`).
    """
    config.validate()  # UsageError naming the flag, the value and what is allowed; before the store is touched
    if config.train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {config.train.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    config = config.normalised()
    store = RunStore(options.runs_dir)
    device = resolve_device(options.device)

    stored = stored_complete(store, config, options.checkpoints)
    if stored is not None:  # a stored complete run: decided without loading any data
        return stored
    run = store.run(config.run_hash())
    with artifact_lock(run.path, root=store.root, what=f"run {run.path.name}") as lock:
        # Another process may have trained (or half-trained, then died) this run while we waited: plan again.
        return _train_locked(config, options, store, device, callback, lock)


def _train_locked(
    config: RunConfig,
    options: RunOptions,
    store: RunStore,
    device: torch.device,
    callback: Callable[[TrainState], None] | None,
    lock: ArtifactLock,
) -> Run:
    """`train` while holding the run's lock: plan from the store as it is now, then carry the plan out."""
    stored = stored_complete(store, config, options.checkpoints)
    if stored is not None:
        _say_reused(stored, lock)
        return stored
    train_ds, test_ds = load_datasets(config, options, device)
    schedule = Schedule.of(config, options.checkpoints, len(train_ds))
    plan = settle_plan(store, config, schedule, options, device)
    if isinstance(plan, Reuse):
        _say_reused(plan.run, lock)
        return plan.run
    if (lock.waited or lock.took_over is not None) and plan.source is not None:
        lock.say(f"resuming run {plan.run.path.name} from {plan.source.name}, where its previous holder stopped")
    return _carry_out(plan, config, options, device, train_ds, test_ds, callback)


def settle_plan(
    store: RunStore, config: RunConfig, schedule: Schedule, options: RunOptions, device: torch.device
) -> Reuse | Train:
    """The run's plan once a fork child's parent state and first checkpoint exist.

    FillParent: train the parent up to the fork step; StartChild: write the child's first checkpoint
    from the parent's state (`start_child`); after each, plan again from the store.
    """
    plan = plan_training(store, config, schedule)
    if isinstance(plan, FillParent):
        parent = plan.parent
        train(
            parent.config,
            dataclasses.replace(options, checkpoints=CheckpointSchedule(steps=(plan.step,)), preset=parent.meta.preset),
        )
        plan = plan_training(store, config, schedule)
    if isinstance(plan, StartChild):
        start_child(
            store,
            config,
            plan.parent,
            plan.fork,
            steps_per_epoch=schedule.steps_per_epoch,
            device=device,
            preset=options.preset,
        )
        plan = plan_training(store, config, schedule)
    if isinstance(plan, (Reuse, Train)):
        return plan
    raise RuntimeError(
        f"run {plan.parent.path} did not store the state at step "
        f"{plan.step if isinstance(plan, FillParent) else plan.fork.step} that fork "
        f"{config.run_hash()} starts from"
    )


def _say_reused(run: Run, lock: ArtifactLock) -> None:
    """One line when the run this process waited for was finished by the lock's previous holder."""
    if lock.waited:
        by = f"pid {lock.waited_for.pid}" if lock.waited_for is not None else "another process"
        lock.say(f"reusing run {run.path.name}: {by} trained it while this process waited")


def _carry_out(
    plan: Train,
    config: RunConfig,
    options: RunOptions,
    device: torch.device,
    train_ds: DeviceDataset,
    test_ds: DeviceDataset,
    callback: Callable[[TrainState], None] | None,
) -> Run:
    """Train the planned run: its state from the plan's source, its metadata, the loop, the final metrics."""
    if plan.source is None:  # built before the run's directory exists: a model that cannot be built leaves none
        state, history = TrainingState.initial(config, train_ds.info, device), []
    run = RunStore(options.runs_dir).open(config, preset=options.preset)
    if plan.source is not None:
        state = TrainingState.from_checkpoint(config, train_ds.info, device, plan.source)
        history = run.meta.history_until(state.step)

    start_run(run, config, plan, state, options, device, train_ds, test_ds)
    run_loop(state, plan, config, options, train_ds, test_ds, history, callback)
    if not plan.filling:
        finish(state, plan, options, train_ds, test_ds, history)
    return run


def start_run(
    run: Run,
    config: RunConfig,
    plan: Train,
    state: TrainingState,
    options: RunOptions,
    device: torch.device,
    train_ds: DeviceDataset,
    test_ds: DeviceDataset,
) -> None:
    """The run's meta.json set to "running" (unless the plan only fills a fork's parent), and the starting
    state written as a checkpoint where the schedule has one at its step and none is stored."""
    schedule = plan.schedule
    if not plan.filling:
        started_at_fork = plan.fork is not None and state.step == schedule.fork_step and run.meta.status == "created"
        run.update_meta(
            status="running",
            preset=options.preset,
            hash=config.run_hash(),
            environment=environment_record(device),
            device=str(device),
            precision="bf16-autocast" if device.type == "cuda" else "fp32",
            steps_per_epoch=schedule.steps_per_epoch,
            total_steps=schedule.total_steps,
            data_info=DataInfo.of(train_ds, test_ds),
            parameters=sum(p.numel() for p in state.model.parameters()),
            resumed_from=(
                None if plan.source is None or started_at_fork else ResumedFrom(path=str(plan.source), step=state.step)
            ),
            **({"fork": plan.fork} if plan.fork is not None else {}),
        )
    if state.step in schedule.checkpoints and not run.checkpoint_path(state.step).is_file():
        state.save(run.checkpoint_path(state.step), schedule.steps_per_epoch, run.path.name)


def load_run_model(run: Run, step: int | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The run's model with its weights at `step` (default final), in eval mode."""
    config, info = run.config, run.data_info
    channels, height, width = info.input_shape
    model = build_model(
        config.model.model,
        input_shape=(channels, height, width),
        num_classes=info.num_classes,
        **config.model_options(),
    )
    load_model_state(model, run.load_state(step), str(run.path))
    return model.to(device).eval()


def load_run_split(
    run: Run,
    split: str,
    *,
    subset: int | None = None,
    classes: tuple[int, ...] | None = None,
    data_dir: str | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
    progress: bool = True,
) -> DeviceDataset:
    """Split `split` of the run's dataset for evaluation: no augmentation, the run's own classes
    (`run.config.data.classes`; all unless it was trained on some) unless `classes` names others, and a
    stratified subset of `subset` examples (None: all)."""
    return DeviceDataset.load(
        run.config.data.dataset,
        split,
        data_dir=data_dir,
        device=device,
        subset=subset,
        augment=False,
        download=download,
        progress=progress,
        classes=run.config.data.classes if classes is None else classes,
    )


def fork(
    parent: RunConfig | Run,
    at_epochs: Sequence[int],
    children: int,
    options: RunOptions,
    *,
    vary_augment: bool = False,
    child_checkpoints: CheckpointSchedule | None = None,
) -> dict[int, list[Run]]:
    """Train `parent` (if needed) with checkpoints at `at_epochs`, then `children` children forked at each.

    A stored `Run` as parent keeps its children in its own store. Children are cached like any run, so a
    repeated call trains nothing. `child_checkpoints`: the children's kept checkpoints (default every
    epoch, plus the fork step). Epoch 0 gives independent-data siblings from a shared initialisation.
    """
    epochs = sorted(set(at_epochs))
    if not epochs or any(not isinstance(e, int) or e < 0 for e in epochs):
        raise ValueError(f"fork epochs must be a non-empty list of integers >= 0; got {list(at_epochs)}")
    if not isinstance(children, int) or children < 1:
        raise ValueError(f"children per fork must be an integer >= 1; got {children!r}")
    preset = options.preset
    if isinstance(parent, Run):
        if runs_root(options.runs_dir).resolve() != parent.path.parent.resolve():
            options = dataclasses.replace(options, runs_dir=str(parent.path.parent))
        preset = preset or parent.meta.preset
        parent = parent.config
    parent = parent.normalised()
    schedule = dataclasses.replace(
        options.checkpoints, epochs=tuple(sorted(set(options.checkpoints.epochs) | set(epochs)))
    )
    train(parent, dataclasses.replace(options, checkpoints=schedule, preset=preset))
    child_options = dataclasses.replace(options, checkpoints=child_checkpoints or CheckpointSchedule(), preset=preset)
    return {
        e: [
            train(child_config(parent, epoch=e, child=i, vary_augment=vary_augment), child_options)
            for i in range(children)
        ]
        for e in epochs
    }
