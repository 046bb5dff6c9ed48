"""What every experiment is: a name, a one-line description, an options type read from its presets,
and a function `run(options, ctx)`; and what it is given besides its options, an
:class:`ExperimentContext` (where results go, the run store, data, device, progress, messages), which
sets up the executor of its step graph in one place.

The experiments register in :mod:`lmclab.experiments.registry`; `lmclab run` takes them from there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from lmclab.experiments.graph import GraphExecutor, KindPlan, LocalExecutor, RunReport, Step, check_resources
from lmclab.experiments.ray_executor import RayExecutor
from lmclab.experiments.settings import ExperimentOptions, PresetError, load_preset, preset_names

OptionsT = TypeVar("OptionsT", bound=ExperimentOptions)


def default_out(experiment: str, preset: str) -> Path:
    """Where an experiment's figures and tables go unless told otherwise: out/EXPERIMENT-PRESET."""
    return Path("out") / f"{experiment}-{preset}"


EXECUTORS = ("local", "ray")


@dataclass
class Execution:
    """How step graphs run: the executor (`local`: in this process; `ray`: Ray tasks, on this machine or
    the cluster at `address`, each step retried up to `max_retries` times when its worker dies), or only
    planned (`plan`: :meth:`ExperimentContext.run_steps` raises :class:`PlanReady`). `pack`: train steps
    ready together that differ only in their seeds train as one pack (`lmclab.training.train_pack`; see
    `GraphExecutor`). `reports` collects each graph run's :class:`RunReport` (computed / reused / failed /
    skipped)."""

    executor: str = "local"
    address: str | None = None
    plan: bool = False
    max_retries: int = 3
    pack: bool = False
    reports: list[RunReport] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor {self.executor!r}; allowed: {', '.join(EXECUTORS)}")


_EXECUTION: ContextVar[Execution | None] = ContextVar("lmclab_execution", default=None)


def current_execution() -> Execution:
    """The execution set by the innermost :func:`using_execution` (default: local, run everything)."""
    return _EXECUTION.get() or Execution()


@contextmanager
def using_execution(execution: Execution) -> Iterator[Execution]:
    """Every ExperimentContext made inside runs its graphs as `execution` says (the CLI's `--executor`,
    `--address`, `--plan`); the reports of the graphs run are in `execution.reports` afterwards."""
    token = _EXECUTION.set(execution)
    try:
        yield execution
    finally:
        _EXECUTION.reset(token)


class PlanReady(Exception):  # noqa: N818  (not an error: the plan asked for instead of a run)
    """Raised by :meth:`ExperimentContext.run_steps` under ``Execution(plan=True)``: the graph by kind."""

    def __init__(self, plans: list[KindPlan]) -> None:
        super().__init__(f"plan of {sum(p.steps for p in plans)} steps")
        self.plans = plans


@dataclass(frozen=True, kw_only=True)
class ExperimentContext:
    """Where and how an experiment runs: its output directory `out`, the run store (`runs_dir`; steps are
    cached under it), local data, the device, progress bars, and `say` for its messages. `experiment` and
    `preset` name what runs (for its messages). `resources`: the preset's overrides of what a step of a
    class or kind takes (`graph.resources_for`); `execution`: which executor runs the graph."""

    out: Path
    experiment: str = ""
    preset: str = ""
    runs_dir: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    progress: bool = True
    say: Callable[[str], None] = print
    resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    execution: Execution = field(default_factory=current_execution)

    @classmethod
    def for_preset(
        cls,
        experiment: str,
        preset: str,
        *,
        out: str | Path | None = None,
        runs_dir: str | None = None,
        data_dir: str | None = None,
        device: str = "auto",
        progress: bool = True,
        say: Callable[[str], None] = print,
        resources: Mapping[str, Mapping[str, float]] | None = None,
    ) -> ExperimentContext:
        """The context of `experiment --preset preset`; `out` defaults to :func:`default_out`."""
        return cls(
            out=Path(out) if out is not None else default_out(experiment, preset),
            experiment=experiment,
            preset=preset,
            runs_dir=runs_dir,
            data_dir=data_dir,
            device=device,
            progress=progress,
            say=say,
            resources=dict(resources or {}),
        )

    def step_options(self) -> dict[str, Any]:
        """What every step may use besides its config and inputs (`StepContext.options`)."""
        return {"runs_dir": self.runs_dir, "data_dir": self.data_dir, "device": self.device, "progress": self.progress}

    def executor(self) -> GraphExecutor:
        """A fresh executor of this context's steps (its `ran` lists the steps it did not find stored):
        the local one, or Ray's (`execution.executor == "ray"`)."""
        if self.execution.executor == "ray":
            return RayExecutor(
                self.runs_dir,
                self.step_options(),
                progress=self.progress,
                say=self.say,
                resources=self.resources,
                address=self.execution.address,
                max_retries=self.execution.max_retries,
                pack=self.execution.pack,
            )
        return LocalExecutor(
            self.runs_dir, self.step_options(), progress=self.progress, say=self.say, pack=self.execution.pack
        )

    def run_steps(self, steps: Iterable[Step]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(results by step key, names of the steps run rather than reused) of `steps` and all they need.

        `StepsFailed` if a step failed (after every step not depending on it ran); `PlanReady` (nothing
        run) when the execution only plans."""
        executor = self.executor()
        steps = list(steps)
        if self.execution.plan:
            raise PlanReady(executor.plan(steps))
        try:
            results = executor.run(steps)
        finally:
            self.execution.reports.append(executor.report)
        return results, executor.ran

    def announce(self, description: str) -> None:
        self.say(f"{self.experiment} --preset {self.preset}: {description}")

    def summary(self, files: Mapping[str, str], steps_run: list[str]) -> dict[str, Any]:
        """Say where the figures and tables are; the summary an experiment returns: {"out", "files" (name ->
        path), "steps_run" (the steps not found in the store)}."""
        self.say(f"ran {len(steps_run)} step(s), reused the rest; figures and tables in {self.out}")
        for name, path in files.items():
            self.say(f"  {name}: {path}")
        return {"out": str(self.out), "files": dict(files), "steps_run": steps_run}


@dataclass(frozen=True)
class Experiment(Generic[OptionsT]):
    """An experiment: `run(options, ctx)` with `options` read from a preset of presets/<name>.toml as an
    `options_type`. Calling it runs a preset by name: ``benko.EXPERIMENT("smoke", out=…)``."""

    name: str
    description: str
    options_type: type[OptionsT]
    run: Callable[[OptionsT, ExperimentContext], dict[str, Any]]

    def presets(self) -> list[str]:
        return preset_names(self.name)

    def load(self, preset: str) -> OptionsT:
        """Preset `preset`, checked (a bad one raises :class:`~lmclab.experiments.settings.PresetError`)."""
        return load_preset(self.name, preset, self.options_type)

    def __call__(
        self,
        preset: str = "smoke",
        *,
        out: str | Path | None = None,
        runs_dir: str | None = None,
        data_dir: str | None = None,
        device: str = "auto",
        progress: bool = True,
        say: Callable[[str], None] = print,
    ) -> dict[str, Any]:
        """Run preset `preset` (loaded and checked before anything runs); figures and tables go to `out`
        (default out/NAME-PRESET). Returns the experiment's summary ({"out", "files", "steps_run", …})."""
        options = self.load(preset)
        resources = getattr(options, "resources", {})
        try:
            check_resources(resources)
        except ValueError as exc:
            raise PresetError(f"preset {preset!r} of {self.name}: {exc}") from None
        ctx = ExperimentContext.for_preset(
            self.name,
            preset,
            out=out,
            runs_dir=runs_dir,
            data_dir=data_dir,
            device=device,
            progress=progress,
            say=say,
            resources=resources,
        )
        return self.run(options, ctx)
