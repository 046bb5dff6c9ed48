"""Experiments as graphs of cacheable steps, run by an executor.

A `Step` is data: a kind (the name of a registered step function), a JSON config, and named input
steps. Its key is a content hash of (kind, config, input keys), so a step's identity does not depend
on which process, machine or executor runs it. Results are JSON documents (plus any files the step
writes into its own directory) stored in the store's step directory `<runs_dir>/steps/<kind>_<key>/`
(`Store.step_dir`); a step whose result is stored is never run again. `LocalExecutor` runs a graph
in dependency order in this process; a cluster executor only has to ship (kind, config, input
results) to a worker and store what comes back — the experiment code does not change
(`lmclab.experiments.ray_executor.RayExecutor` does, on Ray). Both share one implementation: the loop
over the graph (`GraphExecutor.run`: a step whose input failed is skipped, every other step runs, then
`StepsFailed` names each failure) and the step itself (`claim_and_compute`): a step runs under its
claim, the store's lock on its directory (`lmclab.store.locks`, one per step key): a second process
asking for it waits, then reuses the result the first stored; a claim of a process that died is taken
over. Each stored result records its wall time (`seconds`), which `graph_plan` and the live view use
to estimate what is left. `Resources` per step kind (`step_kind(..., resources=CLASS)`, overridable
per preset) say what a cluster executor reserves for one step. Under `pack=True` an executor runs the
ready steps of a kind in PACK_KINDS that may share a pack (`train` steps differing only in their seeds)
as one (`claim_and_compute_pack`: one call for all, each result sealed as if it had run alone).

A stored result.json carries the sha256 of its content and of every file the step wrote beside it
(`lmclab.store.integrity`), verified whenever it is read: a result that differs raises IntegrityError
naming the file, never a wrong number. (One written before lmclab recorded checksums is read unverified,
with one warning.)
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmclab.experiments.costs import PACK_NOTE, DeviceProfile, Estimate, StepWork, estimate, step_work
from lmclab.store import Store, artifact_lock, content_hash, read_sealed_json, write_sealed_json
from lmclab.store.integrity import files_below

StepFn = Callable[["StepContext", dict[str, Any], dict[str, Any]], dict[str, Any]]
STEP_KINDS: dict[str, StepFn] = {}
SELF_CACHING: set[str] = set()  # kinds whose function keeps its own store (training runs, alignments)


@dataclass(frozen=True)
class Resources:
    """What one step of a kind takes on a worker: CPU cores and a (fraction of a) GPU. A cluster executor
    asks its scheduler for these; `cpus` also sets torch's thread count in the step's process."""

    cpus: float = 1.0
    gpus: float = 0.0

    def merged(self, override: Mapping[str, float]) -> Resources:
        """These resources with `override` ({"cpus": …, "gpus": …}, each optional) applied."""
        unknown = sorted(set(override) - {"cpus", "gpus"})
        if unknown:
            raise ValueError(f"resources: unknown key(s) {', '.join(unknown)}; allowed: cpus, gpus")
        cpus, gpus = float(override.get("cpus", self.cpus)), float(override.get("gpus", self.gpus))
        if not (cpus > 0 and gpus >= 0 and (gpus <= 1 or gpus == int(gpus))):
            raise ValueError(
                f"resources: cpus={cpus:g}, gpus={gpus:g}; allowed: cpus > 0, gpus a fraction in [0, 1] "
                "or a whole number"
            )
        return Resources(cpus, gpus)


#: Resource classes of step kinds and what a step of each takes by default (on a machine without GPUs
#: every step runs on CPUs). A preset overrides a class or a single kind (`resources` in its table).
RESOURCE_CLASSES: dict[str, Resources] = {
    "training": Resources(cpus=1, gpus=1),  # a small model: give the kind or preset a fraction, e.g. 0.25
    "evaluation": Resources(cpus=1, gpus=0.25),  # forward passes along a path, derivatives, merged models
    "assignment": Resources(cpus=1, gpus=0),  # weight matching: linear assignment problems on CPUs
}
KIND_RESOURCES: dict[str, str] = {}  # step kind -> its resource class


def step_kind(name: str, self_caching: bool = False, resources: str = "evaluation") -> Callable[[StepFn], StepFn]:
    """Register `fn(ctx, config, inputs) -> JSON result` as step kind `name`.

    `self_caching`: the function finds its own stored output cheaply (the run store does this for
    training and alignment), so the executor calls it every time instead of trusting a copy that
    could point at deleted files. `resources`: its class in RESOURCE_CLASSES (training, evaluation,
    assignment), what a cluster executor reserves for one step of the kind."""
    if resources not in RESOURCE_CLASSES:
        raise ValueError(f"step kind {name!r}: resources {resources!r}; allowed: {', '.join(RESOURCE_CLASSES)}")

    def register(fn: StepFn) -> StepFn:
        if name in STEP_KINDS and STEP_KINDS[name] is not fn:
            raise ValueError(f"step kind {name!r} is registered twice")
        STEP_KINDS[name] = fn
        KIND_RESOURCES[name] = resources
        if self_caching:
            SELF_CACHING.add(name)
        return fn

    return register


@dataclass(frozen=True)
class PackKind:
    """How ready steps of one kind run together as one pack under `GraphExecutor(pack=True)`.

    `joins(group, step)`: whether `step` may join the steps of `group` (all of this kind); `refusal(group)`:
    why a group of two or more cannot run as a pack after all (None: it can; said once, and its steps run
    one at a time); `run(contexts, configs, inputs)`: every step's result (or its exception), in order,
    computed at once, each result what the kind's step function would have returned for that step alone."""

    joins: Callable[[list[Step], Step], bool]
    refusal: Callable[[list[Step]], str | None]
    run: Callable[[list[StepContext], list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any] | Exception]]


PACK_KINDS: dict[str, PackKind] = {}  # step kind -> how its steps run as a pack


def pack_groups(steps: Iterable[Step], say: Callable[[str], None] = print) -> list[list[Step]]:
    """`steps` in groups that run together, in the order of each group's first step: a step of a kind in
    PACK_KINDS joins the first group it may join (`PackKind.joins`); a group its kind refuses
    (`PackKind.refusal`, said) falls apart into single steps; every other step is a group of one."""
    groups: list[list[Step]] = []
    for step in steps:
        kind = PACK_KINDS.get(step.kind)
        group = next((g for g in groups if kind is not None and g[0].kind == step.kind and kind.joins(g, step)), None)
        if group is None:
            groups.append([step])
        else:
            group.append(step)
    out: list[list[Step]] = []
    for group in groups:
        reason = PACK_KINDS[group[0].kind].refusal(group) if len(group) > 1 else None
        if reason is not None:
            say(f"--pack: {len(group)} {group[0].kind} steps run one at a time: {reason}")
        out.extend([[s] for s in group] if reason is not None else [group])
    return out


def resources_for(kind: str, overrides: Mapping[str, Mapping[str, float]] | None = None) -> Resources:
    """What one step of `kind` takes: its class's default, then `overrides[class]`, then `overrides[kind]`."""
    klass = KIND_RESOURCES.get(kind, "evaluation")
    result = RESOURCE_CLASSES[klass]
    for name in (klass, kind):
        if overrides and name in overrides:
            result = result.merged(overrides[name])
    return result


def check_resources(overrides: Mapping[str, Mapping[str, float]]) -> None:
    """ValueError unless every key of `overrides` is a resource class or a registered step kind and every
    value a valid {"cpus", "gpus"} table."""
    for name, override in overrides.items():
        if name not in RESOURCE_CLASSES and name not in STEP_KINDS:
            raise ValueError(
                f"resources.{name}: not a resource class or step kind; allowed: {', '.join(RESOURCE_CLASSES)} "
                f"or a step kind ({', '.join(sorted(STEP_KINDS))})"
            )
        Resources().merged(override)


@dataclass(frozen=True)
class Step:
    kind: str
    config: Mapping[str, Any]
    inputs: Mapping[str, Step] = field(default_factory=dict)

    @property
    def key(self) -> str:
        ident = {"kind": self.kind, "config": self.config, "inputs": {k: s.key for k, s in sorted(self.inputs.items())}}
        return content_hash(ident, spaced=True, default=str)

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.key}"


@dataclass
class StepContext:
    """What a step function may use besides its config and inputs: its own directory and run options."""

    directory: Path
    options: Mapping[str, Any]
    say: Callable[[str], None] = print


def topological_order(targets: Iterable[Step]) -> list[Step]:
    """Every step the targets need, each once, inputs before the steps that use them."""
    order: list[Step] = []
    seen: set[str] = set()

    def visit(step: Step, stack: tuple[str, ...]) -> None:
        if step.key in stack:
            raise ValueError(f"cycle in experiment graph at {step.name}")
        if step.key in seen:
            return
        for dep in step.inputs.values():
            visit(dep, stack + (step.key,))
        seen.add(step.key)
        order.append(step)

    for t in targets:
        visit(t, ())
    return order


# ------------------------------------------------------------------ one step: claim, compute, seal, reuse


def stored_result(store: Store, step: Step) -> dict[str, Any] | None:
    """The stored (verified) result of `step`; None if there is none, or if its kind keeps its own store."""
    if step.kind in SELF_CACHING:
        return None
    path = store.step_dir(step.kind, step.key) / "result.json"
    return read_sealed_json(path, kind="step result")["result"] if path.is_file() else None


@dataclass(frozen=True)
class StepOutcome:
    """What running one step gave: its result (JSON, as a later read from the store gives it), whether
    this call computed it (False: found stored, or a self-caching kind found its own output), whether
    its function was called at all, the seconds it took, and where it ran."""

    result: dict[str, Any]
    computed: bool
    seconds: float
    pid: int
    host: str
    called: bool = True


def claim_and_compute(
    store: Store, step: Step, inputs: Mapping[str, Any], options: Mapping[str, Any], say: Callable[[str], None]
) -> StepOutcome:
    """Run `step` under its claim (the store's lock on its directory: one holder across processes and
    machines; a holder that died frees it). Whoever waited for the claim reuses what the holder stored.
    The result is sealed into `<store>/steps/<kind>_<key>/result.json` with the step's wall time
    (`seconds`; a self-caching kind that found its own output keeps the first measured time)."""
    directory = store.step_dir(step.kind, step.key)
    host = os.uname().nodename
    with artifact_lock(directory, root=store.root, what=f"step {step.name}", say=say):
        cached = stored_result(store, step)  # another process ran it while this one waited for the lock
        if cached is not None:
            return StepOutcome(cached, False, 0.0, os.getpid(), host, called=False)
        directory.mkdir(parents=True, exist_ok=True)
        previous = _previous_record(directory / "result.json")
        start = time.perf_counter()
        result = STEP_KINDS[step.kind](StepContext(directory, options, say), dict(step.config), dict(inputs))
        return _seal(directory, step, result, time.perf_counter() - start, previous)


def _seal(
    directory: Path, step: Step, result: dict[str, Any], seconds: float, previous: dict[str, Any] | None
) -> StepOutcome:
    """Seal `result` of `step` into its directory's result.json (with its wall time, or the first one
    measured when a self-caching kind found its own output again, `previous` being the record there)."""
    host = os.uname().nodename
    result = json.loads(json.dumps(finite_or_none(result), sort_keys=True, allow_nan=False))
    reused = previous is not None and previous.get("result") == result  # a self-caching kind's own store
    first = previous.get("seconds") if reused and previous is not None else None
    write_sealed_json(
        directory / "result.json",
        {
            "kind": step.kind,
            "config": step.config,
            "inputs": {k: d.name for k, d in step.inputs.items()},
            "seconds": first if isinstance(first, float) else seconds,
            "host": host,
            "result": result,
        },
        files=files_below(directory, exclude=("result.json",)),
    )
    # Hand back what a later run will read from the store (sorted keys, lists), so that tables built
    # from a fresh result and from a stored one are identical.
    return StepOutcome(result, not reused, seconds, os.getpid(), host)


def claim_and_compute_pack(
    store: Store,
    steps: list[Step],
    inputs: list[dict[str, Any]],
    options: Mapping[str, Any],
    say: Callable[[str], None],
) -> list[StepOutcome | Exception]:
    """Run `steps` (one kind in PACK_KINDS) as one pack: every step's claim taken (in key order), the
    steps another process stored meanwhile reused, the others computed by one `PackKind.run` call, and
    each result sealed into its own directory exactly as `claim_and_compute` seals a step run alone (its
    `seconds`: the pack's wall time over the steps computed in it). One outcome (or exception) per step."""
    host = os.uname().nodename
    with ExitStack() as claims:
        for step in sorted(steps, key=lambda s: s.key):
            directory = store.step_dir(step.kind, step.key)
            claims.enter_context(artifact_lock(directory, root=store.root, what=f"step {step.name}", say=say))
        outcomes: dict[str, StepOutcome | Exception] = {}
        for step in steps:
            cached = stored_result(store, step)
            if cached is not None:
                outcomes[step.key] = StepOutcome(cached, False, 0.0, os.getpid(), host, called=False)
        todo = [(s, i) for s, i in zip(steps, inputs, strict=True) if s.key not in outcomes]
        if todo:
            directories = [store.step_dir(s.kind, s.key) for s, _ in todo]
            for d in directories:
                d.mkdir(parents=True, exist_ok=True)
            previous = [_previous_record(d / "result.json") for d in directories]
            start = time.perf_counter()
            results = PACK_KINDS[todo[0][0].kind].run(
                [StepContext(d, options, say) for d in directories],
                [dict(s.config) for s, _ in todo],
                [dict(i) for _, i in todo],
            )
            seconds = (time.perf_counter() - start) / len(todo)
            for (step, _), d, before, result in zip(todo, directories, previous, results, strict=True):
                sealed = result if isinstance(result, Exception) else _seal(d, step, result, seconds, before)
                outcomes[step.key] = sealed
        return [outcomes[s.key] for s in steps]


def _previous_record(path: Path) -> dict[str, Any] | None:
    """The result.json at `path` as written (unverified: only compared and its timing kept), or None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def measured_seconds(store: Store, kinds: Iterable[str]) -> dict[str, list[float]]:
    """Wall times of every stored step of each kind (`seconds` in its result.json), for estimates."""
    out: dict[str, list[float]] = {kind: [] for kind in kinds}
    for kind in out:
        pattern = store.step_dir(kind, "*")  # the store names step directories
        steps = pattern.parent
        for path in steps.glob(f"{pattern.name}/result.json") if steps.is_dir() else ():
            record = _previous_record(path)
            if record is not None and record.get("kind") == kind and isinstance(record.get("seconds"), (int, float)):
                out[kind].append(float(record["seconds"]))
    return out


# ------------------------------------------------------------------ a run of a graph: report, plan, view


@dataclass
class RunReport:
    """What an executor did with a graph: step names computed, reused (stored, or a self-caching kind's
    own store), failed (with the error) and skipped (an input failed or was skipped)."""

    executor: str
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        return {
            "computed": len(self.computed),
            "reused": len(self.reused),
            "failed": len(self.failed),
            "skipped": len(self.skipped),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "executor": self.executor,
            **self.counts(),
            "failed_steps": [{"step": name, "error": error} for name, error in self.failed.items()],
            "skipped_steps": list(self.skipped),
            "seconds": round(self.seconds, 3),
        }


class StepsFailed(RuntimeError):
    """Some steps of a graph failed: every step that did not depend on them still ran. `report` names each
    failed step with its error and the steps skipped because of them."""

    def __init__(self, report: RunReport, errors: dict[str, BaseException] | None = None) -> None:
        self.report = report
        #: each failed step's own exception (unwrapped from the executor's transport), by step name
        self.errors = dict(errors or {})
        failed = "; ".join(f"{name}: {error}" for name, error in report.failed.items())
        super().__init__(
            f"{len(report.failed)} step(s) failed ({failed}); {len(report.skipped)} step(s) that need them skipped, "
            f"{len(report.computed)} computed, {len(report.reused)} reused"
        )


@dataclass(frozen=True)
class KindPlan:
    kind: str
    resources: Resources
    steps: int
    stored: int
    measured: int  # stored steps of the kind (anywhere in the store) with a recorded wall time
    mean_seconds: float | None  # their mean, whatever their size
    works: tuple[StepWork, ...] = ()  # each step's work (lmclab.experiments.costs) and whether it is stored

    @property
    def to_run(self) -> int:
        return self.steps - self.stored

    def estimate(self, device: DeviceProfile) -> Estimate:
        """What the kind's steps take on `device` by the cost model (`costs.estimate`)."""
        return estimate(self.works, device)

    def to_json(self, device: DeviceProfile | None = None) -> dict[str, Any]:
        """The kind's counts and measured-mean estimate; with `device`, the cost model's estimate on it too."""
        estimate = None if self.mean_seconds is None else self.mean_seconds * self.to_run
        out = {
            "kind": self.kind,
            "steps": self.steps,
            "stored": self.stored,
            "to_run": self.to_run,
            "cpus": self.resources.cpus,
            "gpus": self.resources.gpus,
            "mean_seconds": self.mean_seconds,
            "measured_steps": self.measured,
            "estimated_seconds": estimate,
        }
        if device is not None:
            out.update(self.estimate(device).to_json())
        return out


def graph_plan(
    store: Store, targets: Iterable[Step], overrides: Mapping[str, Mapping[str, float]] | None = None
) -> list[KindPlan]:
    """The graph by step kind: how many steps, how many already stored (a result.json in the store), what
    one step takes, the mean measured wall time of the kind's stored steps (None: never measured), and each
    step's work for the cost model (`costs.step_work`: sizes only; nothing is run or read but configs)."""
    order = topological_order(targets)
    kinds = sorted({s.kind for s in order}, key=[s.kind for s in order].index)
    times = measured_seconds(store, kinds)
    plans = []
    for kind in kinds:
        steps = [s for s in order if s.kind == kind]
        stored = [(store.step_dir(kind, s.key) / "result.json").is_file() for s in steps]
        mean = sum(times[kind]) / len(times[kind]) if times[kind] else None
        works = tuple(StepWork(step_work(s), done) for s, done in zip(steps, stored, strict=True))
        plans.append(
            KindPlan(kind, resources_for(kind, overrides), len(steps), sum(stored), len(times[kind]), mean, works)
        )
    return plans


def describe_plan(plans: list[KindPlan], device: DeviceProfile | None = None, pack: bool = False) -> str:
    """The plan as a table: kind, steps, stored, to run, resources, mean measured time (of the kind's stored
    steps, whatever their size), its estimate; with `device`, the cost model's seconds per step and estimate
    of the steps to run on it, the steps of unknown cost, and totals in the device's hours (whole graph and
    still to run) with the throughput each model was given and where it comes from."""
    if device is None:
        return _describe_measured(plans)
    lines = [
        f"{'kind':<20} {'steps':>6} {'stored':>7} {'to run':>7} {'gpus':>5} {'measured s/step':>16} "
        f"{'model s/step':>13} {'model est.':>11} {'unknown':>8}"
    ]
    estimates = [p.estimate(device) for p in plans]
    for p, e in zip(plans, estimates, strict=True):
        per_step = e.to_run_seconds / e.known_to_run if e.known_to_run else (e.seconds / e.known if e.known else None)
        lines.append(
            f"{p.kind:<20} {p.steps:>6} {p.stored:>7} {p.to_run:>7} {p.resources.gpus:>5g} "
            f"{'—' if p.mean_seconds is None else f'{p.mean_seconds:.2f}':>16} "
            f"{'—' if per_step is None else f'{per_step:.1f}':>13} "
            f"{(_duration(e.to_run_seconds) if e.known_to_run else '—' if e.unknown_to_run else '0 s'):>11} "
            f"{e.unknown:>8}"
        )
    whole, left = sum(e.seconds for e in estimates), sum(e.to_run_seconds for e in estimates)
    lines.append(
        f"model estimate on {device.name}: {whole / 3600:.3g} {device.unit} for the whole graph "
        f"({sum(e.known for e in estimates)} of {sum(p.steps for p in plans)} steps costed), "
        f"{left / 3600:.3g} still to run ({sum(p.to_run for p in plans)} steps), steps one after another"
    )
    unknown = [(p.kind, e) for p, e in zip(plans, estimates, strict=True) if e.unknown]
    if unknown:
        lines.append("not in the total (cost unknown):")
        lines += [f"  {kind}: {e.unknown} step(s) ({'; '.join(e.reasons)})" for kind, e in unknown]
    else:
        lines.append("every step is costed")
    lines.append(f"throughput assumed on {device.name} (training images/s at batch 256):")
    models = {m.key: m for e in estimates for m in e.models}
    for m in models.values():
        t = device.throughput(m)
        lines.append(f"  {m.key}: {t.images_per_second:,.0f} img/s [{t.status}] {t.source}")
    lines += [f"  {note}" for note in device.notes]
    if pack:
        lines.append(f"--pack: {PACK_NOTE}")
    return "\n".join(lines)


def plan_total(plans: list[KindPlan], device: DeviceProfile) -> dict[str, Any]:
    """The cost model's totals of `plans` on `device` (JSON): seconds and hours of one device for the whole
    graph and for the steps still to run, the steps of unknown cost by kind (with why), the throughput each
    model was given (with its source) and the profile's notes."""
    estimates = {p.kind: p.estimate(device) for p in plans}
    whole, left = sum(e.seconds for e in estimates.values()), sum(e.to_run_seconds for e in estimates.values())
    models = {m.key: m for e in estimates.values() for m in e.models}
    return {
        "profile": device.name,
        "unit": device.unit,
        "seconds": whole,
        "hours": whole / 3600,
        "to_run_seconds": left,
        "to_run_hours": left / 3600,
        "unknown": {k: {"steps": e.unknown, "reasons": list(e.reasons)} for k, e in estimates.items() if e.unknown},
        "throughput": [device.throughput(m).to_json() for m in models.values()],
        "notes": list(device.notes),
        "pack": PACK_NOTE,
    }


def _describe_measured(plans: list[KindPlan]) -> str:
    lines = [
        f"{'kind':<20} {'steps':>6} {'stored':>7} {'to run':>7} {'cpus':>5} {'gpus':>5} {'s/step':>9} {'estimate':>10}"
    ]
    total = 0.0
    unknown = []
    for p in plans:
        estimate = None if p.mean_seconds is None else p.mean_seconds * p.to_run
        total += estimate or 0.0
        if estimate is None and p.to_run:
            unknown.append(p.kind)
        lines.append(
            f"{p.kind:<20} {p.steps:>6} {p.stored:>7} {p.to_run:>7} {p.resources.cpus:>5g} {p.resources.gpus:>5g} "
            f"{'—' if p.mean_seconds is None else f'{p.mean_seconds:.2f}':>9} "
            f"{'—' if estimate is None else _duration(estimate):>10}"
        )
    lines.append(
        f"total: {sum(p.steps for p in plans)} steps, {sum(p.stored for p in plans)} stored, "
        f"{sum(p.to_run for p in plans)} to run; estimated {_duration(total)} of step time"
        + (f" plus the kinds never measured in this store ({', '.join(unknown)})" if unknown else "")
        + " (one worker; divide by the workers that run at once)"
    )
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LiveView:
    """Steps done / running / failed / pending by kind and an ETA, as one progress bar on stderr.

    `slots(kind)`: how many steps of the kind the executor runs at once (local: 1; Ray: what the cluster's
    CPUs and GPUs hold). Steps submitted beyond that count as pending (queued); the ETA is, per kind, the
    steps left × the mean measured time of one step ÷ its slots, summed over kinds."""

    def __init__(
        self,
        steps: list[Step],
        measured: Mapping[str, list[float]],
        enabled: bool,
        slots: Callable[[str], float] = lambda kind: 1.0,
    ) -> None:
        self.kinds = sorted({s.kind for s in steps}, key=[s.kind for s in steps].index)
        self.waiting = {k: sum(s.kind == k for s in steps) for k in self.kinds}  # not yet submitted
        self.submitted = dict.fromkeys(self.kinds, 0)
        self.done = dict.fromkeys(self.kinds, 0)
        self.failed = dict.fromkeys(self.kinds, 0)
        self.times = {k: list(measured.get(k, [])) for k in self.kinds}
        self.slots = {k: max(1.0, slots(k)) for k in self.kinds}
        self.bar = tqdm(total=len(steps), desc="steps", unit="step", disable=not enabled or not steps, leave=False)

    def running(self, kind: str) -> int:
        return min(self.submitted[kind], int(self.slots[kind]))

    def pending(self, kind: str) -> int:
        return self.waiting[kind] + self.submitted[kind] - self.running(kind)

    def start(self, kind: str) -> None:
        self.waiting[kind] -= 1
        self.submitted[kind] += 1
        self._show()

    def finish(self, kind: str, seconds: float | None, ok: bool = True, started: bool = True) -> None:
        if started:
            self.submitted[kind] -= 1
        else:
            self.waiting[kind] -= 1
        (self.done if ok else self.failed)[kind] += 1
        if ok and seconds:
            self.times[kind].append(seconds)
        self.bar.update(1)
        self._show()

    def eta(self) -> float | None:
        """Seconds left (None until every kind with steps left has a measured step)."""
        left = 0.0
        for k in self.kinds:
            remaining = self.pending(k) + self.running(k) / 2  # a running step is half done, on average
            if remaining and not self.times[k]:
                return None
            if self.times[k]:
                left += remaining * sum(self.times[k]) / len(self.times[k]) / self.slots[k]
        return left

    def _show(self) -> None:
        if self.bar.disable:
            return
        parts = [
            f"{k} {self.done[k]}✓ {self.running(k)}▶ {self.failed[k]}✗ {self.pending(k)}…"
            for k in self.kinds
            if self.pending(k) + self.running(k) + self.failed[k] or self.done[k]
        ]
        eta = self.eta()
        self.bar.set_postfix_str(" | ".join(parts) + f" | ETA {'?' if eta is None else _duration(eta)}")

    def close(self) -> None:
        self.bar.close()


# ------------------------------------------------------------------ executors


class GraphExecutor:
    """Runs a graph in dependency order, reusing every stored result: the loop shared by every executor.

    A subclass says how a step runs (`_submit`: start it; `_collect`: wait for one started step and give
    its outcome or error). A step whose input failed (or was skipped) is skipped; every other step runs;
    if any failed, `run` raises :class:`StepsFailed` once all that could run has run. `ran` lists the
    steps whose function was called (a self-caching kind included), `report` the run's accounting.

    `pack`: the steps that are ready together and may run as one pack (`pack_groups`: train steps that
    differ only in their seeds) are submitted as one (`_submit_pack`; by default still one at a time);
    each is accounted for, stored and reused as a step of its own."""

    name = "graph"

    def __init__(
        self,
        runs_dir: str | Path | None = None,
        options: Mapping[str, Any] | None = None,
        progress: bool = True,
        say: Callable[[str], None] = print,
        resources: Mapping[str, Mapping[str, float]] | None = None,
        pack: bool = False,
    ) -> None:
        self.store = Store(runs_dir)
        self.options = dict(options or {})
        self.progress = progress
        self.say = say
        self.resources = dict(resources or {})
        self.pack = pack
        self.ran: list[str] = []  # names of the steps this executor actually ran (not reused)
        self.report = RunReport(self.name)

    def directory(self, step: Step) -> Path:
        return self.store.step_dir(step.kind, step.key)

    def stored(self, step: Step) -> dict[str, Any] | None:
        return stored_result(self.store, step)

    def plan(self, targets: Iterable[Step]) -> list[KindPlan]:
        return graph_plan(self.store, targets, self.resources)

    def slots(self, kind: str) -> float:
        """How many steps of `kind` run at once (for the live view's ETA)."""
        return 1.0

    def _submit(self, step: Step, inputs: dict[str, Any]) -> None:
        raise NotImplementedError

    def _submit_pack(self, steps: list[Step], inputs: list[dict[str, Any]]) -> None:
        """Start `steps` (two or more of one kind, see `pack_groups`) as one pack; `_collect` then gives
        each step's outcome on its own. By default they are started one at a time."""
        for step, step_inputs in zip(steps, inputs, strict=True):
            self._submit(step, step_inputs)

    def _collect(self) -> tuple[Step, StepOutcome | BaseException]:
        raise NotImplementedError

    def _describe(self, error: BaseException) -> str:
        return f"{type(error).__name__}: {error}"

    def _cause(self, error: BaseException) -> BaseException:
        """The step's own exception behind `error` (executors that wrap errors in transit unwrap it)."""
        return error

    def run(self, targets: Iterable[Step]) -> dict[str, dict[str, Any]]:
        """Results of all steps the targets need, keyed by step key (StepsFailed if any step failed)."""
        start = time.perf_counter()
        order = topological_order(targets)
        unknown = sorted({s.kind for s in order if s.kind not in STEP_KINDS})
        if unknown:
            raise KeyError(f"no step kind {unknown[0]!r}; registered: {', '.join(sorted(STEP_KINDS))}")
        self.report = report = RunReport(self.name)
        results: dict[str, dict[str, Any]] = {}
        stored = {s.key: self.stored(s) for s in order}  # each stored result read and verified once
        todo = [s for s in order if stored[s.key] is None]
        measured = measured_seconds(self.store, {s.kind for s in todo}) if self.progress else {}
        view = LiveView(todo, measured, self.progress, self.slots)
        for step in order:
            if stored[step.key] is not None:
                results[step.key] = stored[step.key]  # type: ignore[assignment]
                report.reused.append(step.name)
        bad: set[str] = set()  # keys of failed or skipped steps
        waiting = {s.key: s for s in todo}
        running = 0
        first_error: BaseException | None = None
        errors: dict[str, BaseException] = {}
        try:
            while waiting or running:
                ready: list[Step] = []
                for step in list(waiting.values()):  # in dependency order: inputs first
                    deps = [d.key for d in step.inputs.values()]
                    if any(k in bad for k in deps):
                        del waiting[step.key]
                        bad.add(step.key)
                        report.skipped.append(step.name)
                        view.finish(step.kind, None, ok=False, started=False)
                    elif all(k in results for k in deps):
                        del waiting[step.key]
                        ready.append(step)
                for group in pack_groups(ready, self.say) if self.pack else [[s] for s in ready]:
                    inputs = [{name: results[d.key] for name, d in s.inputs.items()} for s in group]
                    for step in group:
                        view.start(step.kind)
                    if len(group) == 1:
                        self._submit(group[0], inputs[0])
                    else:
                        self._submit_pack(group, inputs)
                    running += len(group)
                if not running:
                    continue
                step, outcome = self._collect()
                running -= 1
                if isinstance(outcome, StepOutcome):
                    results[step.key] = outcome.result
                    if outcome.called:
                        self.ran.append(step.name)
                    (report.computed if outcome.computed else report.reused).append(step.name)
                    view.finish(step.kind, outcome.seconds if outcome.computed else None)
                else:
                    bad.add(step.key)
                    report.failed[step.name] = self._describe(outcome)
                    first_error = first_error or outcome
                    errors[step.name] = self._cause(outcome)
                    view.finish(step.kind, None, ok=False)
        finally:
            view.close()
            report.seconds = time.perf_counter() - start
        if report.failed:
            raise StepsFailed(report, errors) from first_error  # the first failure's traceback rides along
        return results


class LocalExecutor(GraphExecutor):
    """Runs steps in this process, in dependency order, reusing every stored result."""

    name = "local"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: list[tuple[list[Step], list[dict[str, Any]]]] = []
        self._done: list[tuple[Step, StepOutcome | BaseException]] = []  # a pack's outcomes not yet collected

    def _submit(self, step: Step, inputs: dict[str, Any]) -> None:
        self._queue.append(([step], [inputs]))

    def _submit_pack(self, steps: list[Step], inputs: list[dict[str, Any]]) -> None:
        self._queue.append((steps, inputs))

    def _collect(self) -> tuple[Step, StepOutcome | BaseException]:
        if self._done:
            return self._done.pop(0)
        steps, inputs = self._queue.pop(0)
        outcomes: list[StepOutcome | BaseException]
        try:
            if len(steps) == 1:
                outcomes = [claim_and_compute(self.store, steps[0], inputs[0], self.options, self.say)]
            else:
                outcomes = list(claim_and_compute_pack(self.store, steps, inputs, self.options, self.say))
        except Exception as exc:  # a failing step (or pack); KeyboardInterrupt and the like stop the run
            outcomes = [exc] * len(steps)
        self._done.extend(zip(steps, outcomes, strict=True))
        return self._done.pop(0)


def finite_or_none(value: Any) -> Any:
    """JSON-safe copy: NaN and ±inf become None (reported as missing, never drawn as numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
