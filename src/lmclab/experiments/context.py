"""What every experiment is: a name, a one-line description, an options type read from its presets,
and a function `run(options, ctx)`; and what it is given besides its options, an
:class:`ExperimentContext` (where results go, the run store, data, device, progress, messages), which
sets up the executor of its step graph in one place.

The experiments register in :mod:`lmclab.experiments.registry`; `lmclab run` takes them from there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from lmclab.experiments.graph import LocalExecutor, Step
from lmclab.experiments.settings import ExperimentOptions, load_preset, preset_names

OptionsT = TypeVar("OptionsT", bound=ExperimentOptions)


def default_out(experiment: str, preset: str) -> Path:
    """Where an experiment's figures and tables go unless told otherwise: out/EXPERIMENT-PRESET."""
    return Path("out") / f"{experiment}-{preset}"


@dataclass(frozen=True, kw_only=True)
class ExperimentContext:
    """Where and how an experiment runs: its output directory `out`, the run store (`runs_dir`; steps are
    cached under it), local data, the device, progress bars, and `say` for its messages. `experiment` and
    `preset` name what runs (for its messages)."""

    out: Path
    experiment: str = ""
    preset: str = ""
    runs_dir: str | None = None
    data_dir: str | None = None
    device: str = "auto"
    progress: bool = True
    say: Callable[[str], None] = print

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
        )

    def step_options(self) -> dict[str, Any]:
        """What every step may use besides its config and inputs (`StepContext.options`)."""
        return {"runs_dir": self.runs_dir, "data_dir": self.data_dir, "device": self.device, "progress": self.progress}

    def executor(self) -> LocalExecutor:
        """A fresh executor of this context's steps (its `ran` lists the steps it did not find stored)."""
        return LocalExecutor(self.runs_dir, self.step_options(), progress=self.progress, say=self.say)

    def run_steps(self, steps: Iterable[Step]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """(results by step key, names of the steps run rather than reused) of `steps` and all they need."""
        executor = self.executor()
        results = executor.run(list(steps))
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
        ctx = ExperimentContext.for_preset(
            self.name, preset, out=out, runs_dir=runs_dir, data_dir=data_dir, device=device, progress=progress, say=say
        )
        return self.run(options, ctx)
