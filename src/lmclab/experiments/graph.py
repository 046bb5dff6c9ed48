"""Experiments as graphs of cacheable steps, run by an executor.

A `Step` is data: a kind (the name of a registered step function), a JSON config, and named input
steps. Its key is a content hash of (kind, config, input keys), so a step's identity does not depend
on which process, machine or executor runs it. Results are JSON documents (plus any files the step
writes into its own directory) stored in the store's step directory `<runs_dir>/steps/<kind>_<key>/`
(`Store.step_dir`); a step whose result is stored is never run again. `LocalExecutor` runs a graph
in dependency order in this process; a cluster executor only has to ship (kind, config, input
results) to a worker and store what comes back — the experiment code does not change. A step runs
under its lock (`lmclab.store.locks`, one per step key): a second process asking for it waits, then
reuses the result the first stored.

A stored result.json carries the sha256 of its content and of every file the step wrote beside it
(`lmclab.store.integrity`), verified whenever it is read: a result that differs raises IntegrityError
naming the file, never a wrong number. (One written before lmclab recorded checksums is read unverified,
with one warning.)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmclab.store import Store, artifact_lock, content_hash, read_sealed_json, write_sealed_json
from lmclab.store.integrity import files_below

StepFn = Callable[["StepContext", dict[str, Any], dict[str, Any]], dict[str, Any]]
STEP_KINDS: dict[str, StepFn] = {}
SELF_CACHING: set[str] = set()  # kinds whose function keeps its own store (training runs, alignments)


def step_kind(name: str, self_caching: bool = False) -> Callable[[StepFn], StepFn]:
    """Register `fn(ctx, config, inputs) -> JSON result` as step kind `name`.

    `self_caching`: the function finds its own stored output cheaply (the run store does this for
    training and alignment), so the executor calls it every time instead of trusting a copy that
    could point at deleted files."""

    def register(fn: StepFn) -> StepFn:
        if name in STEP_KINDS and STEP_KINDS[name] is not fn:
            raise ValueError(f"step kind {name!r} is registered twice")
        STEP_KINDS[name] = fn
        if self_caching:
            SELF_CACHING.add(name)
        return fn

    return register


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


class LocalExecutor:
    """Runs steps in this process, in dependency order, reusing every stored result."""

    def __init__(
        self,
        runs_dir: str | Path | None = None,
        options: Mapping[str, Any] | None = None,
        progress: bool = True,
        say: Callable[[str], None] = print,
    ) -> None:
        self.store = Store(runs_dir)
        self.options = dict(options or {})
        self.progress = progress
        self.say = say
        self.ran: list[str] = []  # names of the steps this executor actually ran (not reused)

    def directory(self, step: Step) -> Path:
        return self.store.step_dir(step.kind, step.key)

    def stored(self, step: Step) -> dict[str, Any] | None:
        if step.kind in SELF_CACHING:
            return None
        path = self.directory(step) / "result.json"
        return read_sealed_json(path, kind="step result")["result"] if path.is_file() else None

    def run(self, targets: Iterable[Step]) -> dict[str, dict[str, Any]]:
        """Results of all steps the targets need, keyed by step key."""
        order = topological_order(targets)
        results: dict[str, dict[str, Any]] = {}
        stored = {s.key: self.stored(s) for s in order}  # each stored result read and verified once
        todo = [s for s in order if stored[s.key] is None]
        bar = tqdm(total=len(todo), desc="steps", unit="step", disable=not self.progress or not todo, leave=False)
        for step in order:
            cached = stored[step.key]
            if cached is not None:
                results[step.key] = cached
                continue
            if step.kind not in STEP_KINDS:
                raise KeyError(f"no step kind {step.kind!r}; registered: {', '.join(sorted(STEP_KINDS))}")
            bar.set_postfix_str(step.kind)
            with artifact_lock(self.directory(step), root=self.store.root, what=f"step {step.name}", say=self.say):
                cached = self.stored(step)  # another process ran it while this one waited for the lock
                if cached is not None:
                    results[step.key] = cached
                    bar.update(1)
                    continue
                directory = self.directory(step)
                directory.mkdir(parents=True, exist_ok=True)
                inputs = {name: results[dep.key] for name, dep in step.inputs.items()}
                start = time.perf_counter()
                context = StepContext(directory, self.options, self.say)
                result = STEP_KINDS[step.kind](context, dict(step.config), inputs)
                result = finite_or_none(result)
                write_sealed_json(
                    directory / "result.json",
                    {
                        "kind": step.kind,
                        "config": step.config,
                        "inputs": {k: d.name for k, d in step.inputs.items()},
                        "seconds": time.perf_counter() - start,
                        "result": result,
                    },
                    files=files_below(directory, exclude=("result.json",)),
                )
                # Hand back what a later run will read from the store (sorted keys, lists), so that tables
                # built from a fresh result and from a stored one are identical.
                results[step.key] = json.loads(json.dumps(result, sort_keys=True, allow_nan=False))
                self.ran.append(step.name)
                bar.update(1)
        bar.close()
        return results


def finite_or_none(value: Any) -> Any:
    """JSON-safe copy: NaN and ±inf become None (reported as missing, never drawn as numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
