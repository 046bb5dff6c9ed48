"""Experiment presets from TOML files (`experiments/presets/<experiment>.toml`), one table per preset.

A preset holds experiment-wide options (points, orders, …) and a list of *settings*: a training
preset with overrides, the number of independently seeded pairs, and an evaluation subset size.
Pair i of a setting trains members with `SeedConfig.from_seed(2i)` and `from_seed(2i + 1)`.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from lmclab.config import SECTIONS, RunConfig, SeedConfig, _section_from_dict
from lmclab.training import get_preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Setting:
    name: str
    label: str
    preset: str
    pairs: int
    eval_examples: int | None = None
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # per-setting values of experiment options

    def option(self, preset: "ExperimentPreset", key: str, default: Any = None) -> Any:
        """This setting's value of an experiment option, else the preset's."""
        return self.options.get(key, preset.options.get(key, default))

    def check(self) -> None:
        """Raise ValueError for values a setting cannot have (subclasses add their own fields' checks)."""
        if self.pairs < 0:
            raise ValueError(f"setting {self.name}: pairs must be ≥ 0, got {self.pairs}")

    def base_config(self) -> RunConfig:
        config = get_preset(self.preset).config
        for section, values in self.overrides.items():
            if section not in SECTIONS:
                raise ValueError(f"setting {self.name}: unknown override section {section!r}; valid: {', '.join(SECTIONS)}")
            current = dataclasses.asdict(getattr(config, section))
            config = dataclasses.replace(config, **{section: _section_from_dict(SECTIONS[section], {**current, **values})})
        return config.normalised()

    def member_config(self, pair: int, member: int) -> RunConfig:
        """Pair `pair`, member 0 or 1: all three seeds differ between members and between pairs."""
        return dataclasses.replace(self.base_config(), seeds=SeedConfig.from_seed(2 * pair + member))


@dataclass(frozen=True)
class ExperimentPreset:
    experiment: str
    name: str
    description: str
    settings: tuple[Setting, ...]
    options: dict[str, Any]

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise ValueError(f"preset {self.name} has no setting {name!r}; settings: {', '.join(s.name for s in self.settings)}")


def preset_names(experiment: str) -> list[str]:
    return list(_read(experiment))


def load_preset(experiment: str, name: str, setting_type: type[Setting] = Setting) -> ExperimentPreset:
    """Preset `name` of presets/<experiment>.toml; each settings table becomes a `setting_type` (a
    :class:`Setting` or a subclass with more fields), checked early (overrides, ``check()`` if defined)."""
    table = _read(experiment)
    if name not in table:
        raise ValueError(f"experiment {experiment!r} has no preset {name!r}; presets: {', '.join(table)}")
    body = dict(table[name])
    settings = tuple(setting_type(**s) for s in body.pop("settings"))
    for s in settings:
        s.base_config()  # fail early on a bad override
        s.check()
    description = body.pop("description", "")
    return ExperimentPreset(experiment, name, description, settings, body)


def _read(experiment: str) -> dict[str, Any]:
    resource = resources.files("lmclab.experiments").joinpath("presets", f"{experiment}.toml")
    if not resource.is_file():
        available = sorted(p.name.removesuffix(".toml") for p in resources.files("lmclab.experiments").joinpath("presets").iterdir()
                           if p.name.endswith(".toml"))
        raise ValueError(f"no experiment {experiment!r}; experiments: {', '.join(available)}")
    return tomllib.loads(resource.read_text())
