"""Packed training: K runs that differ only in their seeds, trained together in one process, one step.

`train_pack(configs, options)` gives the same store as `train(config, options)` for each config, one
after another: each member is a normal run (its own hash, config.json, meta.json, checkpoints in the
solo format, history, final metrics; its lock held while it trains), drawn from its own three seed
streams exactly as the solo trainer draws them (`TrainingState.initial`: init under seed_init, data
order from seed_data, augmentation from seed_augment). Members already complete are reused.

The step. The members' parameters are stacked along a leading member axis (θ ∈ R^{K×…},
`torch.func.stack_module_state`); one `vmap(grad_and_value(ℓ))` over the members, ℓ_k =
CE(f(θ_k, x_k), y_k) on member k's own batch (`torch.func.functional_call`), gives every member's
gradient; then ONE torch.optim optimizer steps the stacked leaves. SGD (momentum, Nesterov, weight
decay), Adam and AdamW are elementwise, so member k's slice of the update is its solo update; their
state (momentum buffer, exp_avg, exp_avg_sq) is stacked the same way and the shared `step` count is
the same for all. One optimizer over P stacked tensors launches as many kernels as one solo run,
whatever K (per-member optimizers would launch K times as many); member k's solo state is sliced out
(`Pack.write_back`) only when its checkpoint, resume file or evaluation needs it.

Bits. A packed member equals its solo run up to float summation order (batched matmuls under vmap
block their sums differently); tests/test_packed.py bounds the difference (see its TOLERANCE; for a
BatchNorm ResNet, tests/test_packed_bn.py's TOLERANCES). The pack is therefore not part of the run's
hash; meta.json records it under `pack` (one entry per packed segment: start step, size, members'
hashes), so what a member's bits depend on is on record. On CPU a member's bits do not depend on the
other members (a pack of one gives the same bits), and a pack resumed from its own resume files is
bit-identical to one never interrupted. (A run later resumed by
the solo trainer keeps its `pack` segments; the solo part is the steps after the last one.)

Divergence: the solo rule (`lmclab.training.loop`) per member. A member that diverges is marked
"diverged" (its meta.json's error says where, as solo) and leaves the pack; the others go on. When
all are done, `PackDiverged` (a TrainingDiverged) names the diverged members and carries every run.

BatchNorm. Each member's running_mean, running_var and num_batches_tracked are stacked buffers [K, …]
passed through the vmap (in_dims 0), so BatchNorm's in-place update of its running statistics writes
member k's slice from member k's own batch statistics (torch's batching rule for batch_norm keeps the
members' channels apart): r ← (1 − m)·r + m·μ_B for the mean, with the unbiased batch variance for
running_var, and num_batches_tracked += 1, as solo. With momentum None (a cumulative average) the factor
m = 1/num_batches_tracked is a Python number in torch's BatchNorm, which vmap cannot read from a batched
buffer; members at one step share that count, so the pack keeps it on the host (`Pack.cumulative`) and
sets the skeleton layer's momentum to 1/(count + 1) for the step: the same float torch computes solo.
Evaluation (eval_every, final metrics) runs on each member's solo model after `Pack.write_back`, i.e. on
its own running statistics, and its checkpoints hold its own buffers in the solo layout.

Not packed (refused with a UsageError): dropout (solo, its masks come from the global generator; vmap
cannot draw each member's solo masks). Members at different stored steps (e.g. one resumed alone) are
trained as separate packs, one per start step, one after another.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, stack_module_state, vmap
from tqdm.auto import tqdm

from lmclab.config import SECTIONS, RunConfig, UsageError
from lmclab.data import DeviceDataset
from lmclab.models.attention import exact_attention
from lmclab.store import Run, RunStore, artifact_lock
from lmclab.training.evaluate import autocast_for, evaluate
from lmclab.training.loop import (
    DIVERGENCE_FACTOR,
    DIVERGENCE_MARGIN,
    DIVERGENCE_WINDOW,
    TrainingDiverged,
    TrainState,
    diverged_message,
    divergence_limit,
    finish,
    reference_loss,
)
from lmclab.training.options import RunOptions
from lmclab.training.plan import Reuse, Schedule, Train, stored_complete
from lmclab.training.schedules import learning_rate
from lmclab.training.state import OPTIMIZERS, TrainingState, init_model, optimizer_over
from lmclab.training.trainer import DEFAULT_OPTIONS, load_datasets, resolve_device, settle_plan, start_run

#: optimizers whose update is elementwise in (parameter, gradient, state): one over stacked leaves is exact
ELEMENTWISE_OPTIMIZERS = ("sgd", "adam", "adamw")
#: optimizer-state keys shared by all members (the step count), not stacked
SHARED_STATE_KEYS = frozenset({"step"})


class PackDiverged(TrainingDiverged):
    """Some members of a pack diverged (each marked "diverged" with its message); the others finished.
    `runs`: every member's run, in the order given; `diverged`: the diverged members' hashes."""

    def __init__(self, message: str, runs: list[Run], diverged: list[str]) -> None:
        super().__init__(message)
        self.runs = runs
        self.diverged = diverged


def differing_fields(configs: Sequence[RunConfig]) -> list[str]:
    """The config fields (section.name) other than the seeds in which the configs differ."""
    dicts = [c.normalised().to_dict() for c in configs]
    out = []
    for section in SECTIONS:
        if section == "seeds":
            continue
        names = sorted({k for d in dicts for k in d.get(section, {})})
        for name in names:
            if len({repr(d.get(section, {}).get(name)) for d in dicts}) > 1:
                out.append(f"{section}.{name}")
    return out


def check_packable(configs: Sequence[RunConfig]) -> list[RunConfig]:
    """The configs, validated and normalised, if they can be trained as one pack; UsageError otherwise."""
    if not configs:
        raise UsageError("train_pack: no configs given; allowed: one or more run configs differing only in seeds")
    for c in configs:
        c.validate()
    normalised = [c.normalised() for c in configs]
    differ = differing_fields(normalised)
    if differ:
        raise UsageError(
            f"train_pack: the members differ in {', '.join(differ)}; allowed: configs equal except their seeds "
            "(train the others in packs of their own, or one at a time with lmclab.training.train)"
        )
    optimizer = normalised[0].train.optimizer
    if optimizer not in ELEMENTWISE_OPTIMIZERS:
        known = optimizer in OPTIMIZERS
        raise UsageError(
            f"train_pack: --optimizer {optimizer}: allowed: {', '.join(ELEMENTWISE_OPTIMIZERS)}"
            + ("" if known else f" (valid optimizers: {', '.join(OPTIMIZERS)})")
        )
    hashes = [c.run_hash() for c in normalised]
    repeated = sorted({h for h in hashes if hashes.count(h) > 1})
    if repeated:
        raise UsageError(f"train_pack: run {', '.join(repeated)} is given more than once; allowed: distinct seeds")
    return normalised


def check_model_packable(model: torch.nn.Module, config: RunConfig) -> None:
    """UsageError (one line) for layers a pack does not train exactly: dropout. (BatchNorm packs: see the
    module docstring.)"""
    name = f"model {config.model.model}" + (f" (norm {config.model.norm})" if config.model.norm else "")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            raise UsageError(f"train_pack: {name} has dropout; allowed: models without dropout")


@dataclass
class Pack:
    """Members' parameters, buffers and optimizer state stacked along a leading member axis."""

    base: torch.nn.Module  # the architecture, on the meta device (functional_call's skeleton)
    params: dict[str, torch.Tensor]  # leaves [K, ...]
    buffers: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    sums: torch.Tensor  # [K, 3] float64: each member's epoch loss·n, correct, seen
    # BatchNorm layers with momentum None (cumulative average): name -> num_batches_tracked, shared by all members
    cumulative: dict[str, int]

    @classmethod
    def of(cls, states: Sequence[TrainingState], config: RunConfig) -> Pack:
        """Stack the members' models, optimizer states and epoch sums (all at the same step)."""
        models = [s.model for s in states]
        params, buffers = stack_module_state(models)
        names = [n for n, _ in models[0].named_parameters()]
        leaves = [params[n] for n in names]
        optimizer = stacked_optimizer(config, leaves)
        solo = [s.optimizer.state_dict() for s in states]
        stacked_state: dict[int, dict[str, Any]] = {}
        for i in solo[0]["state"]:
            entry: dict[str, Any] = {}
            for key, value in solo[0]["state"][i].items():
                if key in SHARED_STATE_KEYS or not isinstance(value, torch.Tensor):
                    entry[key] = value.clone() if isinstance(value, torch.Tensor) else value
                else:
                    entry[key] = torch.stack([sd["state"][i][key] for sd in solo])
            stacked_state[i] = entry
        groups = optimizer.state_dict()["param_groups"]
        groups[0].update({k: v for k, v in solo[0]["param_groups"][0].items() if k != "params"})
        optimizer.load_state_dict({"state": stacked_state, "param_groups": groups})
        base = vmap_friendly(copy.deepcopy(models[0]).to("meta")).train()
        sums = torch.stack([s.epoch_sums for s in states])
        cumulative = cumulative_counts(base, buffers)
        return cls(base=base, params=params, buffers=buffers, optimizer=optimizer, sums=sums, cumulative=cumulative)

    @property
    def size(self) -> int:
        return self.sums.shape[0]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every member on its batch (x [K, B, …], y [K, B]): the members' losses
        [K] and logits [K, B, C], detached."""

        def loss_of(
            params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            with autocast_for(xb.device):
                logits = functional_call(self.base, (params, buffers), (xb,))
            return F.cross_entropy(logits.float(), yb), logits

        leaves = {n: p.detach() for n, p in self.params.items()}
        layers = {name: _batchnorm(self.base.get_submodule(name)) for name in self.cumulative}
        try:
            for name, layer in layers.items():  # torch's cumulative factor 1/num_batches_tracked, after its += 1
                layer.momentum = 1.0 / float(self.cumulative[name] + 1)
            with exact_attention():  # vmap batches the math backend, not the fused kernels
                # buffers batched (in_dims 0): BatchNorm updates each member's running statistics in place
                grads, (loss, logits) = vmap(grad_and_value(loss_of, has_aux=True))(leaves, self.buffers, x, y)
        finally:
            for layer in layers.values():
                layer.momentum = None
        for name in self.cumulative:
            self.cumulative[name] += 1
        for name, p in self.params.items():
            p.grad = grads[name]
        self.optimizer.step()
        return loss.detach(), logits.detach()

    def write_back(self, k: int, state: TrainingState) -> None:
        """Member k's model, optimizer state and epoch sums into its solo `state` (as solo training has them)."""
        with torch.no_grad():
            for name, p in state.model.named_parameters():
                p.copy_(self.params[name][k])
            for name, b in state.model.named_buffers():
                b.copy_(self.buffers[name][k])
        packed = self.optimizer.state_dict()
        member = {
            i: {key: _member_value(key, value, k) for key, value in entry.items()}
            for i, entry in packed["state"].items()
        }
        groups = state.optimizer.state_dict()["param_groups"]
        groups[0].update({key: v for key, v in packed["param_groups"][0].items() if key != "params"})
        state.optimizer.load_state_dict({"state": member, "param_groups": groups})
        state.epoch_sums = self.sums[k].clone()


class GlobalAveragePool(torch.nn.Module):
    """AdaptiveAvgPool2d(1) as a mean over (H, W): the same function, with a vmap batching rule (torch has
    none for adaptive_avg_pool2d's as_strided_, so vmap would loop over the members there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)


def vmap_friendly(base: torch.nn.Module) -> torch.nn.Module:
    """`base` (a parameterless skeleton for functional_call) with global adaptive average pools as means."""
    for name, module in list(base.named_modules()):
        size = getattr(module, "output_size", None)
        if isinstance(module, torch.nn.AdaptiveAvgPool2d) and size in (1, (1, 1)):
            parent, _, attr = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, attr, GlobalAveragePool())
    return base


def cumulative_counts(base: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> dict[str, int]:
    """The BatchNorm layers of `base` that keep a cumulative average (momentum None), with their
    num_batches_tracked (the members' stacked buffers): UsageError unless all members share it."""
    counts: dict[str, int] = {}
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        if module.momentum is not None or not module.track_running_stats:
            continue
        tracked = buffers[f"{name}.num_batches_tracked" if name else "num_batches_tracked"].tolist()
        if len(set(tracked)) > 1:
            raise UsageError(
                f"train_pack: BatchNorm layer {name} (momentum None: a cumulative average) has tracked "
                f"{', '.join(map(str, tracked))} batches in the members; allowed: members that share the count"
            )
        counts[name] = int(tracked[0])
    return counts


def _batchnorm(module: torch.nn.Module) -> torch.nn.modules.batchnorm._BatchNorm:
    assert isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
    return module


def _member_value(key: str, value: Any, k: int) -> Any:
    """Member k's part of one optimizer-state value: its slice of a stacked tensor, a copy of a shared one."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.clone() if key in SHARED_STATE_KEYS else value[k].clone()


def stacked_optimizer(config: RunConfig, leaves: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The run's optimizer (as `make_optimizer` builds it) over the stacked leaves."""
    if config.train.optimizer not in ELEMENTWISE_OPTIMIZERS:
        raise UsageError(
            f"train_pack: --optimizer {config.train.optimizer}: allowed: {', '.join(ELEMENTWISE_OPTIMIZERS)}"
        )
    return optimizer_over(config, leaves)


@dataclass
class Member:
    """One run of the pack while it trains."""

    config: RunConfig
    run: Run
    plan: Train
    state: TrainingState
    history: list[dict[str, Any]]
    reference: float | None = None
    error: str | None = None  # why it diverged


def train_pack(
    configs: Sequence[RunConfig],
    options: RunOptions = DEFAULT_OPTIONS,
    callback: Callable[[int, TrainState], None] | None = None,
) -> list[Run]:
    """Train the runs of `configs` (equal except their seeds) together; their runs, in the order given.

    Stored complete runs are reused; the others are trained in one pack (one per stored start step, see
    the module docstring) holding every member's lock (taken in hash order). `callback(i, state)` is
    called after every step for member i (its index in `configs`). A member that diverges is marked so
    and the rest finish; then `PackDiverged` is raised."""
    normalised = check_packable(configs)
    store = RunStore(options.runs_dir)
    device = resolve_device(options.device)
    runs: dict[int, Run] = {}
    for i, config in enumerate(normalised):
        stored = stored_complete(store, config, options.checkpoints)
        if stored is not None:
            runs[i] = stored
    pending = [i for i in range(len(normalised)) if i not in runs]
    if not pending:
        return [runs[i] for i in range(len(normalised))]

    first = normalised[pending[0]]
    train_ds, test_ds = load_datasets(first, options, device)
    check_model_packable(init_model(first, train_ds.info), first)
    schedule = Schedule.of(first, options.checkpoints, len(train_ds))
    diverged: list[str] = []
    with ExitStack() as locks:
        for i in sorted(pending, key=lambda i: normalised[i].run_hash()):
            run = store.run(normalised[i].run_hash())
            locks.enter_context(artifact_lock(run.path, root=store.root, what=f"run {run.path.name}"))
        plans: dict[int, Train] = {}
        for i in pending:
            plan = settle_plan(store, normalised[i], schedule, options, device)
            if isinstance(plan, Reuse):
                runs[i] = plan.run
            else:
                plans[i] = plan
        states = {
            i: (
                TrainingState.initial(normalised[i], train_ds.info, device)
                if plan.source is None
                else TrainingState.from_checkpoint(normalised[i], train_ds.info, device, plan.source)
            )
            for i, plan in plans.items()
        }
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for i, plan in plans.items():
            groups.setdefault((states[i].step, plan.stop, plan.filling), []).append(i)
        for key in sorted(groups):
            members = [
                _open_member(normalised[i], plans[i], states[i], options, device, train_ds, test_ds)
                for i in groups[key]
            ]
            _record_pack(members)
            indexed = dict(zip(groups[key], members, strict=True))
            wrapped = None if callback is None else _indexed_callback(callback, groups[key])
            _train_members(members, options, train_ds, test_ds, wrapped)
            for i, m in indexed.items():
                runs[i] = m.run
                if m.error is not None:
                    diverged.append(m.run.hash)
    ordered = [runs[i] for i in range(len(normalised))]
    if diverged:
        raise PackDiverged(
            f"{len(diverged)} of {len(ordered)} packed runs diverged ({', '.join(diverged)}; their meta.json "
            "says where); the others finished",
            ordered,
            diverged,
        )
    return ordered


def _indexed_callback(
    callback: Callable[[int, TrainState], None], indices: list[int]
) -> Callable[[int, TrainState], None]:
    return lambda k, state: callback(indices[k], state)


def _open_member(
    config: RunConfig,
    plan: Train,
    state: TrainingState,
    options: RunOptions,
    device: torch.device,
    train_ds: DeviceDataset,
    test_ds: DeviceDataset,
) -> Member:
    """The member's run opened and its meta.json set as the solo trainer sets it (`trainer.start_run`)."""
    run = RunStore(options.runs_dir).open(config, preset=options.preset)
    history = [] if plan.source is None else run.meta.history_until(state.step)
    start_run(run, config, plan, state, options, device, train_ds, test_ds)
    return Member(config=config, run=run, plan=plan, state=state, history=history)


def _record_pack(members: list[Member]) -> None:
    """meta.json `pack`: the packed segments this run was trained in (start step, size, members' hashes)."""
    hashes = [m.run.hash for m in members]
    for m in members:
        if m.plan.filling:
            continue
        start = m.state.step
        earlier = [] if m.plan.source is None else [s for s in (m.run.meta.pack or []) if s["start_step"] < start]
        segment = {
            "start_step": start,
            "size": len(members),
            "members": hashes,
            "step": "vmap over stacked parameters, one optimizer over stacked leaves",
            "bits": "equal to solo training up to float summation order (batched matmuls); see lmclab.training.packed",
        }
        m.run.update_meta(pack=[*earlier, segment])


def _train_members(
    members: list[Member],
    options: RunOptions,
    train_ds: DeviceDataset,
    test_ds: DeviceDataset,
    callback: Callable[[int, TrainState], None] | None,
) -> None:
    """Train the members (all at the same step, same stop) as one pack to their stop; finish them."""
    first = members[0]
    config, plan = first.config, first.plan
    schedule, filling = plan.schedule, plan.filling
    spe, total, wanted, stop = schedule.steps_per_epoch, schedule.total_steps, schedule.checkpoints, plan.stop
    n, bs = len(train_ds), config.train.batch_size
    device = first.state.epoch_sums.device
    check_every = 1 if device.type == "cpu" else 25
    num_classes, window = train_ds.info.num_classes, min(DIVERGENCE_WINDOW, spe)
    for m in members:
        m.reference = None if m.state.step == 0 else reference_loss(m.run, num_classes)
    active = list(range(len(members)))  # indices into members, in pack order
    pack = Pack.of([m.state for m in members], config)
    step = first.state.step
    epoch_start = time.perf_counter()
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"pack of {len(members)}",
        unit="step",
        disable=not options.progress,
        dynamic_ncols=True,
        leave=True,
    )
    finished = False
    try:
        while step < stop and active:
            pos = step % spe
            xs, ys = [], []
            for k in active:
                s = members[k].state
                if pos == 0 or s.order is None:
                    s.order = torch.randperm(n, generator=s.data_gen).to(device)
                x, y = train_ds.batch(s.order[pos * bs : (pos + 1) * bs], s.aug_gen)
                xs.append(x)
                ys.append(y)
            y_all = torch.stack(ys)
            lr = learning_rate(config.train, step, total, spe)
            pack.set_lr(lr)
            loss, logits = pack.step(torch.stack(xs), y_all)
            step += 1
            for k in active:
                members[k].state.step = step
            count = float(y_all.shape[1])
            pack.sums += torch.stack(
                [
                    loss.double() * count,
                    (logits.argmax(-1) == y_all).sum(1).double(),
                    torch.full_like(loss, count, dtype=torch.float64),
                ],
                dim=1,
            )
            bar.update(1)
            if any(members[k].reference is None for k in active):
                initial = loss.tolist()
                for j, k in enumerate(active):
                    m = members[k]
                    if not filling and math.isfinite(initial[j]):
                        m.run.update_meta(initial_loss=initial[j])
                    m.reference = reference_loss(m.run, num_classes, initial[j])

            epoch_end = step % spe == 0 or step == total
            dropped: list[int] = []
            if step % check_every == 0 or epoch_end:
                sums = pack.sums[:, 0::2].tolist()
                for j, k in enumerate(active):
                    m = members[k]
                    value, seen = sums[j]
                    assert m.reference is not None
                    if not math.isfinite(value):
                        m.error = diverged_message(m.run, step, spe, value)
                    else:
                        in_epoch, limit = (step - 1) % spe + 1, divergence_limit(m.reference)
                        if (in_epoch >= window or epoch_end) and value / seen > limit:
                            detail = (
                                f" (the mean of this epoch's {in_epoch} steps so far, above the divergence limit "
                                f"max({DIVERGENCE_FACTOR:g} × L0, L0 + {DIVERGENCE_MARGIN:g}) = {limit:.4g} with "
                                f"L0 = {m.reference:.4g} from the initial loss)"
                            )
                            m.error = diverged_message(m.run, step, spe, value / seen, detail)
                    if m.error is not None:
                        dropped.append(j)
            if callback is not None:
                losses = loss.tolist()
                for j, k in enumerate(active):
                    if j not in dropped:
                        callback(k, TrainState(step=step, epoch=math.ceil(step / spe), loss=losses[j]))
            if epoch_end and not filling:
                epoch = math.ceil(step / spe)
                due = (options.eval_every and epoch % options.eval_every == 0) or step == total
                for j, k in enumerate(active):
                    if j in dropped:
                        continue
                    m = members[k]
                    sums_j = pack.sums[j]
                    entry: dict[str, Any] = {
                        "epoch": epoch,
                        "step": step,
                        "lr": lr,
                        "train_loss": (sums_j[0] / sums_j[2]).item(),
                        "train_accuracy": (sums_j[1] / sums_j[2]).item(),
                        "time": time.perf_counter() - epoch_start,
                    }
                    if due:
                        pack.write_back(j, m.state)
                        test = evaluate(m.state.model, test_ds, options.eval_batch_size)
                        if not all(math.isfinite(v) for v in test.values()):
                            m.error = diverged_message(m.run, step, spe, float("nan")) + f" Metrics: {test}"
                            dropped.append(j)
                            continue
                        entry.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
                    m.history.append(entry)
                    m.run.update_meta(history=m.history)
            for j in dropped:
                m = members[active[j]]
                if not filling:
                    m.run.update_meta(status="diverged", error=m.error)
            if epoch_end:
                pack.sums.zero_()
                epoch_start = time.perf_counter()
            saves = [
                (j, k)
                for j, k in enumerate(active)
                if j not in dropped and (step in wanted or (epoch_end and step < total and not filling))
            ]
            for j, k in saves:
                m = members[k]
                pack.write_back(j, m.state)
                if epoch_end and step < total and not filling:
                    m.state.save(m.run.resume_path, spe, m.run.path.name)
                if step in wanted:
                    m.state.save(m.run.checkpoint_path(step), spe, m.run.path.name)
            if dropped:
                keep = [j for j in range(len(active)) if j not in dropped]
                for j in keep:
                    pack.write_back(j, members[active[j]].state)
                active = [active[j] for j in keep]
                if active:
                    pack = Pack.of([members[k].state for k in active], config)
        for j, k in enumerate(active):
            pack.write_back(j, members[k].state)
        finished = True
    finally:
        bar.close()
        if not finished and not filling:
            for k in active:
                members[k].run.update_meta(status="interrupted")
    for k in active:
        m = members[k]
        if filling:
            continue
        try:
            finish(m.state, m.plan, options, train_ds, test_ds, m.history)
        except TrainingDiverged as exc:
            m.error = str(exc)
            m.run.update_meta(status="diverged", error=m.error)
