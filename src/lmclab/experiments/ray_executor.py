"""Running a step graph on Ray: each step a Ray task, the content-addressed store the source of truth.

`RayExecutor` is `GraphExecutor` (`lmclab.experiments.graph`: the same loop over the graph, the same
skipping of a failed step's descendants, the same report) whose steps run as Ray Core tasks. A task
runs `claim_and_compute` on its worker: it claims the step with the store's lock on the step's
directory (one holder across drivers, workers and retries; the kernel frees the lock of a process
that died, so the retry of a killed worker takes the claim over), computes it unless another claimant
stored it meanwhile, seals the result into the store and returns only that small JSON result. A worker
killed mid-step: Ray retries the task (`max_retries`). The driver killed: nothing finished is lost,
since every finished step is in the store and a rerun reuses it.

The store must be on a filesystem every node sees at the same path: at start the driver writes a
token file below the store root and a task on every node reads it back, refusing to run otherwise.

What one step takes is its kind's `Resources` (`graph.resources_for`: training 1 GPU, evaluation a
quarter of one, assignment CPUs only; a preset overrides them). Where the cluster has no GPU every
step runs on CPUs. Each task sets torch's thread count to its CPU share. Under `pack=True` the
steps that run as one pack (`graph.pack_groups`) are one task asking for what one step of their kind
takes (a pack shares one device), which seals each step's result as if it had run alone
(`claim_and_compute_pack`).

Ray is optional (`pip install 'lmclab[ray]'`): it is imported only when a RayExecutor runs.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lmclab.config import UsageError
from lmclab.experiments.graph import (
    PACK_KINDS,
    SELF_CACHING,
    STEP_KINDS,
    GraphExecutor,
    PackKind,
    Resources,
    Step,
    StepFn,
    StepOutcome,
    claim_and_compute,
    claim_and_compute_pack,
    resources_for,
)
from lmclab.store import Store

CHECK_DIR = "ray_store_check"  # the store's scratch directory for the token files of the shared-store check


def parse_address(text: str) -> str:
    """`auto` (the Ray cluster this machine belongs to) or HOST:PORT (a cluster's head); else ValueError."""
    if text == "auto":
        return text
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not allowed; allowed: auto or HOST:PORT (the head node's address)")
    return text


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _run_step(
    root: str,
    step: Step,
    inputs: dict[str, Any],
    options: dict[str, Any],
    cpus: float,
    fn: StepFn,
    self_caching: bool,
) -> StepOutcome:
    """The body of one Ray task: torch's threads set to the task's CPU share, the step's function made
    known to this worker, then the step claimed, computed (or found stored) and sealed into the store."""
    torch.set_num_threads(max(1, int(cpus)))
    STEP_KINDS.setdefault(step.kind, fn)
    if self_caching:
        SELF_CACHING.add(step.kind)
    return claim_and_compute(Store(root), step, inputs, options, _stderr)


def _run_pack(
    root: str,
    steps: list[Step],
    inputs: list[dict[str, Any]],
    options: dict[str, Any],
    cpus: float,
    fn: StepFn,
    pack: PackKind,
    self_caching: bool,
) -> list[StepOutcome | Exception]:
    """The body of one Ray task running `steps` as one pack (as `_run_step` runs one step)."""
    torch.set_num_threads(max(1, int(cpus)))
    STEP_KINDS.setdefault(steps[0].kind, fn)
    PACK_KINDS.setdefault(steps[0].kind, pack)
    if self_caching:
        SELF_CACHING.add(steps[0].kind)
    return claim_and_compute_pack(Store(root), steps, inputs, options, _stderr)


def _read_token(path: str) -> tuple[str, str | None]:
    """(this node's host name, the token file's content or None): the shared-store check's task."""
    try:
        return os.uname().nodename, Path(path).read_text()
    except OSError:
        return os.uname().nodename, None


class RayExecutor(GraphExecutor):
    """Runs each step as a Ray task (see the module docstring); `address`: None for a Ray instance on
    this machine (its CPUs and GPUs; or the one this process already started), `auto` or HOST:PORT for a
    running cluster. `max_retries`: how often a step whose worker died is tried again."""

    name = "ray"

    def __init__(
        self,
        runs_dir: str | Path | None = None,
        options: Mapping[str, Any] | None = None,
        progress: bool = True,
        say: Callable[[str], None] = print,
        resources: Mapping[str, Mapping[str, float]] | None = None,
        *,
        address: str | None = None,
        max_retries: int = 3,
        pack: bool = False,
    ) -> None:
        super().__init__(runs_dir, options, progress, say, resources, pack)
        self.address = address
        self.max_retries = max_retries
        self.root = self.store.root.resolve()  # workers may start in another directory
        self._pending: dict[Any, list[Step]] = {}  # task -> its steps (two or more: a pack)
        self._done: list[tuple[Step, StepOutcome | BaseException]] = []  # a pack's outcomes not yet collected
        self._remote: Any = None
        self._remote_pack: Any = None
        self._gpus = False
        self._node_cpus = 0.0
        self._cluster: dict[str, float] = {}

    def task_options(self, resources: Resources) -> dict[str, Any]:
        """The step options a worker gets: paths made absolute, no per-step progress bars (the driver's
        live view shows the run), and the device Ray gave the task (`cuda`: the GPU Ray made visible to
        it; `cpu` for a task without a GPU, or where --device cpu was asked for)."""
        options = dict(self.options)
        if options.get("device", "auto") != "cpu":
            options["device"] = "cuda" if resources.gpus > 0 else "cpu"
        for key in ("runs_dir", "data_dir"):
            if options.get(key):
                options[key] = str(Path(options[key]).resolve())
        if "progress" in options:
            options["progress"] = False
        return options

    def resources_of(self, kind: str) -> Resources:
        """What a step of `kind` asks Ray for: no GPU where the cluster has none."""
        r = resources_for(kind, self.resources)
        return r if self._gpus else Resources(r.cpus, 0.0)

    def slots(self, kind: str) -> float:
        """Steps of `kind` the cluster holds at once: its CPUs (and GPUs) over what one step takes."""
        r = self.resources_of(kind)
        cpus = self._cluster.get("CPU", 0.0) / r.cpus
        return min(cpus, self._cluster.get("GPU", 0.0) / r.gpus) if r.gpus else cpus

    def run(self, targets: Any) -> dict[str, dict[str, Any]]:
        targets = list(targets)
        ray, started = self._connect()
        try:
            self._check_shared_store(ray)
            return super().run(targets)
        finally:
            for ref in list(self._pending):
                ray.cancel(ref, force=True)
            self._pending.clear()
            self._done.clear()
            if started:
                ray.shutdown()

    def _connect(self) -> tuple[Any, bool]:
        """Ray, and whether this executor started it (and so shuts it down)."""
        try:
            import ray  # optional: lmclab[ray]
        except ImportError:
            raise UsageError("--executor ray needs Ray; install it with: pip install 'lmclab[ray]'") from None
        started = False
        if not ray.is_initialized():
            try:
                if self.address is None:
                    ray.init(include_dashboard=False, log_to_driver=True)
                else:
                    ray.init(address=self.address, log_to_driver=True)
            except ConnectionError as exc:
                raise UsageError(f"--address {self.address}: no Ray cluster there ({exc})") from None
            started = True
        self._cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
        self._gpus = self._cluster.get("GPU", 0) > 0
        self._node_cpus = max(
            (float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0
        )
        self._remote = ray.remote(_run_step)
        self._remote_pack = ray.remote(_run_pack)
        return ray, started

    def _check_shared_store(self, ray: Any) -> None:
        """UsageError unless a task on every alive node reads the token this driver wrote below the store."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        check = self.store.scratch_dir(CHECK_DIR).resolve()
        check.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        path = check / token
        path.write_text(token)
        try:
            reader = ray.remote(_read_token)
            nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
            refs = [
                reader.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
                    str(path)
                )
                for node in nodes
            ]
            blind = sorted({host for host, seen in ray.get(refs) if seen != token})
        finally:
            path.unlink(missing_ok=True)
            try:
                check.rmdir()  # unless another driver's check is under way
            except OSError:
                pass
        if blind:
            raise UsageError(
                f"the Ray workers on {', '.join(blind)} do not see the store {self.root} (a file this driver "
                "wrote there is not there for them); put the store (--runs-dir or $LMCLAB_RUNS_DIR) on a "
                "filesystem every node mounts at the same path"
            )

    def check_fits(self, kinds: set[str]) -> None:
        """UsageError if a step kind asks for more CPUs than any node has (its tasks would never start)."""
        for kind in sorted(kinds):
            r = self.resources_of(kind)
            if self._node_cpus and r.cpus > self._node_cpus:
                raise UsageError(
                    f"resources of {kind}: {r.cpus:g} CPUs per step, but the largest node has {self._node_cpus:g}; "
                    "lower it in the preset's resources"
                )

    def _submit(self, step: Step, inputs: dict[str, Any]) -> None:
        kind = step.kind
        self._launch(self._remote, kind, f"lmclab {step.name}", [step], step, inputs, (STEP_KINDS[kind],))

    def _submit_pack(self, steps: list[Step], inputs: list[dict[str, Any]]) -> None:
        kind = steps[0].kind
        name = f"lmclab pack of {len(steps)} {kind} steps ({steps[0].name}, …)"
        self._launch(self._remote_pack, kind, name, steps, steps, inputs, (STEP_KINDS[kind], PACK_KINDS[kind]))

    def _launch(
        self, remote: Any, kind: str, name: str, steps: list[Step], work: Any, inputs: Any, fns: tuple[Any, ...]
    ) -> None:
        """One Ray task `remote`(root, work, inputs, task options, CPUs, *fns, self-caching) for `steps`, with
        `kind`'s resources (`_run_step`: work = one step, fns = its function; `_run_pack`: the steps, + pack)."""
        self.check_fits({kind})
        r = self.resources_of(kind)
        ref = remote.options(
            num_cpus=r.cpus,
            num_gpus=r.gpus,
            max_retries=self.max_retries,
            retry_exceptions=False,
            name=name,
        ).remote(str(self.root), work, inputs, self.task_options(r), r.cpus, *fns, kind in SELF_CACHING)
        self._pending[ref] = steps

    def _collect(self) -> tuple[Step, StepOutcome | BaseException]:
        import ray

        if self._done:
            return self._done.pop(0)
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        steps = self._pending.pop(ready[0])
        outcomes: list[StepOutcome | BaseException]
        try:
            got = ray.get(ready[0])
            outcomes = list(got) if len(steps) > 1 else [got]
        except ray.exceptions.RayError as exc:
            outcomes = [exc] * len(steps)
        self._done.extend(zip(steps, outcomes, strict=True))
        return self._done.pop(0)

    def _cause(self, error: BaseException) -> BaseException:
        cause = getattr(error, "cause", None)  # a RayTaskError carries the task's own exception
        return cause if isinstance(cause, BaseException) else error

    def _describe(self, error: BaseException) -> str:
        cause = self._cause(error)
        if cause is not error:
            return f"{type(cause).__name__}: {cause}"
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0] if text else ''}"
