"""Forked training (Singh et al., "Landscaping linear mode connectivity"; Frankle et al.'s spawning).

A parent run is trained with full-state checkpoints at the fork epochs; each child starts from the
parent's state θ_k at fork step k — weights, buffers, optimizer state, step, the epoch's running
sums — and trains to the parent's end on the parent's schedule (lr(step) is a pure function of the
step). Children differ from each other (and from the parent) only in their data-order seed and,
optionally, their augmentation seed. A child is an ordinary run: its config carries a `fork`
section (parent hash + fork point), so it is cached in the run store and resumed like any run.

Generator rule at the fork, per stream (data order, augmentation):
  child seed == parent seed → the parent's generator state (and the current epoch's order), so the
                              child reproduces the parent's remaining trajectory exactly;
  child seed != parent seed → a fresh generator seeded with the child's seed; for a mid-epoch fork
                              the examples the parent has not yet seen this epoch are re-shuffled by
                              it (each example is still seen once per epoch).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lmclab.config import ForkConfig, RunConfig, derive_seed
from lmclab.store import Run, RunNotFound, RunStore, runs_root
from lmclab.training.schedules import CheckpointSchedule

if TYPE_CHECKING:
    from lmclab.training.trainer import RunOptions


def child_config(parent: RunConfig, *, epoch: int | None = None, step: int | None = None, child: int,
                 vary_augment: bool = False) -> RunConfig:
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
        seed_augment=derive_seed(parent.seeds.seed_augment, f"{stream}/augment") if vary_augment
        else parent.seeds.seed_augment,
    )
    return dataclasses.replace(parent, seeds=seeds, fork=ForkConfig(parent=parent.run_hash(), epoch=epoch, step=step))


def parent_run(store: RunStore, child: RunConfig) -> Run:
    """The handle of the child's parent in `store` (`<root>/train_<parent hash>`), stored or not."""
    return Run(store.root / f"{store.kind}_{child.fork.parent}")


def find_parent(store: RunStore, child: RunConfig) -> Run:
    """The stored run whose hash is `child.fork.parent`; RunNotFound naming the hash and the store if absent."""
    parent = parent_run(store, child)
    if not (parent.path / "config.json").is_file():
        raise RunNotFound(
            f"parent run {child.fork.parent} of the fork (epoch={child.fork.epoch}, step={child.fork.step}) is not in "
            f"{store.root.resolve()} (no {parent.path.name}/config.json); train the parent there first, or fork "
            "with `lmclab fork` / lmclab.training.forks.fork, which trains it")
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
            "from the parent's; a child continues its parent's training, only seed_data and seed_augment may differ")


def child_start_state(tensors: dict[str, torch.Tensor], parent: RunConfig, child: RunConfig, *, fork_step: int,
                      steps_per_epoch: int, device: torch.device) -> dict[str, torch.Tensor]:
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


def fork(parent: RunConfig | Run, at_epochs: Sequence[int], children: int, options: RunOptions, *,
         vary_augment: bool = False, child_checkpoints: CheckpointSchedule | None = None) -> dict[int, list[Run]]:
    """Train `parent` (if needed) with checkpoints at `at_epochs`, then `children` children forked at each.

    A stored `Run` as parent keeps its children in its own store. Children are cached like any run, so a
    repeated call trains nothing. `child_checkpoints`: the children's kept checkpoints (default every
    epoch, plus the fork step). Epoch 0 gives independent-data siblings from a shared initialisation.
    """
    from lmclab.training.trainer import train

    epochs = sorted(set(at_epochs))
    if not epochs or any(not isinstance(e, int) or e < 0 for e in epochs):
        raise ValueError(f"fork epochs must be a non-empty list of integers >= 0; got {list(at_epochs)}")
    if not isinstance(children, int) or children < 1:
        raise ValueError(f"children per fork must be an integer >= 1; got {children!r}")
    preset = options.preset
    if isinstance(parent, Run):
        if runs_root(options.runs_dir).resolve() != parent.path.parent.resolve():
            options = dataclasses.replace(options, runs_dir=str(parent.path.parent))
        preset = preset or parent.meta.get("preset")
        parent = parent.config
    parent = parent.normalised()
    schedule = dataclasses.replace(options.checkpoints,
                                   epochs=tuple(sorted(set(options.checkpoints.epochs) | set(epochs))))
    train(parent, dataclasses.replace(options, checkpoints=schedule, preset=preset))
    child_options = dataclasses.replace(options, checkpoints=child_checkpoints or CheckpointSchedule(), preset=preset)
    return {e: [train(child_config(parent, epoch=e, child=i, vary_augment=vary_augment), child_options)
                for i in range(children)]
            for e in epochs}
