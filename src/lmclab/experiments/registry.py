"""The experiments `lmclab run` knows, by name: each experiment module declares its
:class:`~lmclab.experiments.context.Experiment` (name, one-line description, options type, run function)
as ``EXPERIMENT``, and this module lists them. A new experiment adds its module here.
"""

from __future__ import annotations

from typing import Any

from lmclab.experiments import benko, ito, singh
from lmclab.experiments import width as width_experiment
from lmclab.experiments import zipit as zipit_experiment
from lmclab.experiments.context import Experiment
from lmclab.experiments.settings import PresetError

#: Experiments by name, in the order they are listed.
EXPERIMENTS: dict[str, Experiment[Any]] = {e.name: e for e in (benko.EXPERIMENT, ito.EXPERIMENT, singh.EXPERIMENT)}
EXPERIMENTS[zipit_experiment.EXPERIMENT.name] = zipit_experiment.EXPERIMENT
EXPERIMENTS[width_experiment.EXPERIMENT.name] = width_experiment.EXPERIMENT


def get_experiment(name: str) -> Experiment[Any]:
    """The experiment `name`; a :class:`PresetError` listing the experiments if there is none."""
    if name not in EXPERIMENTS:
        raise PresetError(f"no experiment {name!r}; experiments: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def catalogue() -> dict[str, dict[str, Any]]:
    """{experiment: {"description", "presets": {preset: its description}}}, every preset loaded (and so
    checked) on the way."""
    return {
        name: {"description": e.description, "presets": {p: e.load(p).description for p in e.presets()}}
        for name, e in EXPERIMENTS.items()
    }
