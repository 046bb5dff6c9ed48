"""Forked training (Singh et al., "Landscaping linear mode connectivity"; Frankle et al.'s spawning).

A parent run is trained with full-state checkpoints at the fork epochs; each child starts from the
parent's state θ_k at fork step k — weights, buffers, optimizer state, step, the epoch's running
sums — and trains to the parent's end on the parent's schedule (lr(step) is a pure function of the
step). Children differ from each other (and from the parent) only in their data-order seed and,
optionally, their augmentation seed. A child is an ordinary run: its config carries a `fork`
section (parent hash + fork point), so it is cached in the run store and resumed like any run.

This module holds the rules (the child's config, its parent, its start state, its first checkpoint);
`lmclab.training.trainer` trains parents and children (`train`, `fork`).

Generator rule at the fork, per stream (data order, augmentation):
  child seed == parent seed → the parent's generator state (and the current epoch's order), so the
                              child reproduces the parent's remaining trajectory exactly;
  child seed != parent seed → a fresh generator seeded with the child's seed; for a mid-epoch fork
                              the examples the parent has not yet seen this epoch are re-shuffled by
                              it (each example is still seen once per epoch).
"""

from __future__ import annotations

import dataclasses

import torch

from lmclab.config import ForkConfig, RunConfig, derive_seed
from lmclab.store import ForkRecord, Run, RunNotFound, RunStore, load_checkpoint, save_checkpoint


def child_config(
    parent: RunConfig, *, epoch: int | None = None, step: int | None = None, child: int, vary_augment: bool = False
) -> RunConfig:
    """Child number `child` of `parent` forked at `epoch` (or `step`).

    seed_data = derive_seed(parent seed_data, "fork/<point>/child<i>/data"), distinct for every
    (parent seed, fork point, child); seed_augment likewise if `vary_augment`, else the parent's;
    seed_init the parent's (the weights come from the parent).
    """
    if (epoch is None) == (step is None):
        raise ValueError(f"give exactly one of epoch or step for the fork point; got epoch={epoch}, step={step}")
    point = epoch if epoch is not None else step
    if not isinstance(point, int) or point < 0:
        raise ValueError(f"fork point must be an integer >= 0; got epoch={epoch!r}, step={step!r}")
    if not isinstance(child, int) or child < 0:
        raise ValueError(f"child index must be an integer >= 0; got {child!r}")
    parent = parent.normalised()
    stream = f"fork/{'epoch' if epoch is not None else 'step'}{point}/child{child}"
    seeds = dataclasses.replace(
        parent.seeds,
        seed_data=derive_seed(parent.seeds.seed_data, f"{stream}/data"),
        seed_augment=derive_seed(parent.seeds.seed_augment, f"{stream}/augment")
        if vary_augment
        else parent.seeds.seed_augment,
    )
    return dataclasses.replace(parent, seeds=seeds, fork=ForkConfig(parent=parent.run_hash(), epoch=epoch, step=step))


def parent_run(store: RunStore, child: RunConfig) -> Run:
    """The handle of the child's parent in `store` (`<root>/train_<parent hash>`), stored or not."""
    assert child.fork.parent is not None
    return store.run(child.fork.parent)


def find_parent(store: RunStore, child: RunConfig) -> Run:
    """The stored run whose hash is `child.fork.parent`; RunNotFound naming the hash and the store if absent."""
    parent = parent_run(store, child)
    if not parent.stored:
        raise RunNotFound(
            f"parent run {child.fork.parent} of the fork (epoch={child.fork.epoch}, step={child.fork.step}) is not in "
            f"{store.root.resolve()} (no {parent.path.name}/config.json); train the parent there first, or fork "
            "with `lmclab fork` / lmclab.training.fork, which trains it"
        )
    return parent


def check_parent(parent: RunConfig, child: RunConfig) -> None:
    """ValueError unless the child continues the parent's training: same data, model, optimiser and
    schedule, same seed_init; only seed_data and seed_augment may differ."""
    parent, child = parent.normalised(), child.normalised()
    different = [name for name in ("data", "model", "train") if getattr(parent, name) != getattr(child, name)]
    if parent.seeds.seed_init != child.seeds.seed_init:
        different.append("seeds.seed_init")
    if different:
        raise ValueError(
            f"run {child.run_hash()} cannot be a fork of {child.fork.parent}: its {', '.join(different)} differ(s) "
            "from the parent's; a child continues its parent's training, only seed_data and seed_augment may differ"
        )


def child_start_state(
    tensors: dict[str, torch.Tensor],
    parent: RunConfig,
    child: RunConfig,
    *,
    fork_step: int,
    steps_per_epoch: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The parent's full state at `fork_step` with the child's generators (the rule in the module docstring)."""
    out = dict(tensors)
    if child.seeds.seed_data != parent.seeds.seed_data:
        data_gen = torch.Generator().manual_seed(child.seeds.seed_data)
        seen = (fork_step % steps_per_epoch) * child.train.batch_size
        if seen and "data.order" in out:
            order = out["data.order"]
            rest = order[seen:]
            shuffled = rest[torch.randperm(len(rest), generator=data_gen).to(rest.device)]
            out["data.order"] = torch.cat([order[:seen], shuffled])
        else:
            out.pop("data.order", None)  # at an epoch boundary the trainer draws the next order from data_gen
        out["rng.data"] = data_gen.get_state()
    if child.seeds.seed_augment != parent.seeds.seed_augment:
        out["rng.augment"] = torch.Generator(device=device).manual_seed(child.seeds.seed_augment).get_state()
    return out


def fork_step(config: RunConfig, steps_per_epoch: int, total_steps: int) -> int | None:
    """The parent step a forked child starts from (epoch·steps_per_epoch, or the step); None if not a fork."""
    fork = config.fork
    if not fork.is_set:
        return None
    step = fork.step if fork.step is not None else fork.epoch * steps_per_epoch  # type: ignore[operator]
    if step >= total_steps:
        raise ValueError(
            f"fork point epoch={fork.epoch}, step={fork.step} is step {step}, not before the end of "
            f"training (step {total_steps} = {total_steps / steps_per_epoch:g} epochs of "
            f"{steps_per_epoch} steps); fork at a step in [0, {total_steps})"
        )
    return step


def fork_record(store: RunStore, child: RunConfig, step: int, steps_per_epoch: int) -> ForkRecord:
    """What the child's meta.json keeps about its start: the parent (hash, directory, path) and the fork point."""
    parent_hash, parent_path = child.fork.parent, parent_run(store, child).path
    assert parent_hash is not None  # (a fork config names its parent: ForkConfig.validate)
    return ForkRecord(
        parent=parent_hash,
        parent_run=parent_path.name,
        parent_path=str(parent_path),
        step=step,
        epoch=step / steps_per_epoch,
    )


def usable_parent(store: RunStore, child: RunConfig, step: int, steps_per_epoch: int, total_steps: int) -> Run:
    """The stored parent of `child`, checked to be one it can start from at `step` (RunNotFound, ValueError)."""
    parent = find_parent(store, child)
    check_parent(parent.config, child)
    parent_fork = fork_step(parent.config, steps_per_epoch, total_steps)
    if parent_fork is not None and step < parent_fork:
        raise ValueError(
            f"cannot fork {parent.path.name} at step {step}: it is itself a child forked at step "
            f"{parent_fork} and holds no state before that; fork its parent {parent.config.fork.parent}"
        )
    return parent


def start_child(
    store: RunStore,
    child: RunConfig,
    parent: Run,
    record: ForkRecord,
    *,
    steps_per_epoch: int,
    device: torch.device,
    preset: str | None,
) -> Run:
    """Write the child's first checkpoint: the parent's full state at the fork step (which the parent must
    hold) with the child's generators (`child_start_state`), and its history up to the fork."""
    tensors, header = load_checkpoint(parent.checkpoint_path(record.step))
    tensors = child_start_state(
        tensors, parent.config, child, fork_step=record.step, steps_per_epoch=steps_per_epoch, device=device
    )
    run = store.open(child, preset=preset)
    run.update_meta(history=parent.meta.history_until(record.step), fork=record)
    save_checkpoint(
        run.checkpoint_path(record.step), tensors, {**header, "run": run.path.name, "fork": record.to_json()}
    )
    return run
