"""Experiment presets: TOML tables (`experiments/presets/<experiment>.toml`, one table per preset) read
into typed, frozen options.

An experiment's options type subclasses :class:`ExperimentOptions`: its fields are the keys a preset
may set, with the defaults the experiment uses for a key left out, and ``settings`` holds one
:class:`Setting` (or subclass) per ``[[<preset>.settings]]`` table: a training preset with overrides,
an evaluation subset size, and an ``options`` table that overrides any of the experiment's options for
that setting (:meth:`ExperimentOptions.at`; a nested table is merged key by key). Pair i of a
:class:`PairSetting` trains members with `SeedConfig.from_seed(2i)` and `from_seed(2i + 1)`.

:func:`load_preset` reads a preset into its type and refuses, with a :class:`PresetError` (a
ValueError) naming the preset and its file, a key the type does not have (listing the valid keys), a
missing required key, and a value of the wrong type; the settings' overrides and checks run at once,
so that a bad preset fails before anything is trained.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from lmclab.config import SECTIONS, RunConfig, SeedConfig, _section_from_dict
from lmclab.training import get_preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class PresetError(ValueError):
    """A preset that does not fit its experiment: no such preset, an unknown or missing key, a value of
    the wrong type, or a value the experiment cannot run with."""


#: Metadata of a field the loader fills in itself (never a key of the TOML table).
SET_BY_LOADER = {"set_by_loader": True}


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One ``[[<preset>.settings]]`` table: a training preset with overrides, and how the experiment treats it.

    `options`: this setting's values of experiment options (checked against the experiment's options
    type when the preset is loaded; :meth:`ExperimentOptions.at` applies them)."""

    name: str
    label: str
    preset: str
    eval_examples: int | None = None
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Raise ValueError for values a setting cannot have (subclasses add their own fields' checks)."""
        if self.eval_examples is not None and self.eval_examples < 1:
            raise ValueError(
                f"setting {self.name}: eval_examples must be ≥ 1 (leave it out for the whole split), "
                f"got {self.eval_examples}"
            )

    def base_config(self) -> RunConfig:
        config = get_preset(self.preset).config
        for section, values in self.overrides.items():
            if section not in SECTIONS:
                raise ValueError(
                    f"setting {self.name}: unknown override section {section!r}; valid: {', '.join(SECTIONS)}"
                )
            current = dataclasses.asdict(getattr(config, section))
            config = dataclasses.replace(
                config, **{section: _section_from_dict(SECTIONS[section], {**current, **values})}
            )
        return config.normalised()


@dataclass(frozen=True, kw_only=True)
class PairSetting(Setting):
    """A setting of `pairs` independently seeded pairs of members."""

    pairs: int

    def check(self) -> None:
        super().check()
        if self.pairs < 0:
            raise ValueError(f"setting {self.name}: pairs must be ≥ 0, got {self.pairs}")

    def member_config(self, pair: int, member: int) -> RunConfig:
        """Pair `pair`, member 0 or 1: all three seeds differ between members and between pairs."""
        return dataclasses.replace(self.base_config(), seeds=SeedConfig.from_seed(2 * pair + member))


OptionsT = TypeVar("OptionsT", bound="ExperimentOptions")


@dataclass(frozen=True, kw_only=True)
class ExperimentOptions:
    """What a preset holds: a description, the settings, and (in a subclass) the experiment's options."""

    name: str = field(default="", metadata=SET_BY_LOADER)  # the preset's name
    description: str = ""
    settings: tuple[Setting, ...] = ()
    # what one step takes on a cluster, by resource class or step kind: {"training": {"gpus": 0.25}, …}
    resources: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise ValueError(
            f"preset {self.name} has no setting {name!r}; settings: {', '.join(s.name for s in self.settings)}"
        )

    def at(self: OptionsT, setting: Setting) -> OptionsT:  # noqa: PYI019  (typing.Self needs Python 3.11)
        """These options as `setting` sees them: its ``options`` table applied (a nested table, such as a
        method's keywords, merged key by key into the preset's)."""
        changes: dict[str, Any] = {}
        for key, value in setting.options.items():
            current = getattr(self, key)
            if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
                value = dataclasses.replace(current, **value)  # type: ignore[type-var]
            changes[key] = value
        return dataclasses.replace(self, **changes) if changes else self

    def check(self, setting: Setting) -> None:
        """Raise ValueError for option values the experiment cannot run `setting` with (`self`: the options
        :meth:`at` that setting). Called for every setting when the preset is loaded; nothing by default."""

    @classmethod
    def option_names(cls) -> list[str]:
        """The experiment's own options: the keys a setting's ``options`` table may set."""
        base = {f.name for f in dataclasses.fields(ExperimentOptions)}
        return [f.name for f in dataclasses.fields(cls) if f.name not in base]


def preset_names(experiment: str) -> list[str]:
    return list(read_presets(experiment))


def load_preset(experiment: str, name: str, options_type: type[OptionsT]) -> OptionsT:
    """Preset `name` of presets/<experiment>.toml as an `options_type`: every key checked (known, of the
    right type), each setting's ``options`` checked against the experiment's options, overrides applied
    once (a bad training override fails here) and every setting's checks run."""
    table = read_presets(experiment)
    if name not in table:
        raise PresetError(f"experiment {experiment!r} has no preset {name!r}; presets: {', '.join(table)}")
    return parse_preset(options_type, table[name], name=name, where=f"preset {name!r} of {preset_file(experiment)}")


def parse_preset(
    options_type: type[OptionsT], table: Mapping[str, Any], *, name: str = "", where: str = ""
) -> OptionsT:
    """An `options_type` from one preset's table (what :func:`load_preset` does once the file is read)."""
    where = where or f"preset {name!r}"
    values = parse_table(options_type, table, where)
    settings = []
    for i, s in enumerate(values.get("settings", ())):
        at = f"{where}, settings[{i}] ({s.name!r})"
        options = parse_table(options_type, s.options, f"{at}, options", partial=True, keys=options_type.option_names())
        settings.append(dataclasses.replace(s, options=options))
    names = [s.name for s in settings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise PresetError(f"{where}: setting name(s) {', '.join(duplicates)} used more than once")
    preset = options_type(name=name, **{**values, "settings": tuple(settings)})
    for s in preset.settings:
        try:
            s.base_config()  # fail early on a bad override
            s.check()
            preset.at(s).check(s)
        except PresetError:
            raise
        except ValueError as exc:
            raise PresetError(f"{where}: {exc}") from exc
    return preset


def parse_table(
    cls: type, table: Any, where: str, *, partial: bool = False, keys: list[str] | None = None
) -> dict[str, Any]:
    """The checked field values of dataclass `cls` in TOML table `table`: unknown keys, missing required
    keys (unless `partial`) and wrongly typed values raise a :class:`PresetError` that names `where`.
    `keys`: the fields a table may set (default: every field not set by the loader). With `partial`, a
    nested table of a dataclass field is itself partial (a dict of its given fields)."""
    if not isinstance(table, Mapping):
        raise PresetError(f"{where}: expected a table, got {table!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("set_by_loader")}
    valid = sorted(fields if keys is None else keys)
    unknown = [k for k in table if k not in valid]
    if unknown:
        raise PresetError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"valid keys: {', '.join(valid)}"
        )
    if not partial:
        missing = [
            k
            for k in valid
            if k not in table
            and fields[k].default is dataclasses.MISSING
            and fields[k].default_factory is dataclasses.MISSING
        ]
        if missing:
            raise PresetError(
                f"{where}: missing key{'s' if len(missing) > 1 else ''} "
                + ", ".join(f"{k!r} ({describe(hints[k])})" for k in missing)
            )
    return {key: _check(hints[key], value, key, where, partial) for key, value in table.items()}


def _check(hint: Any, value: Any, key: str, where: str, partial: bool = False) -> Any:
    """`value` (from TOML) as a value of type `hint`: lists become tuples, tables of dataclass fields
    become the dataclass (or, `partial`, a dict of its checked fields); else a PresetError."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):  # TOML has no null: an optional key is left out or has a value
        for arm in (a for a in args if a is not type(None)):
            try:
                return _check(arm, value, key, where, partial)
            except PresetError:
                continue
        raise _type_error(hint, value, key, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise _type_error(hint, value, key, where)
        fields = parse_table(hint, value, f"{where}, {key}", partial=partial)
        return fields if partial else hint(**fields)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _type_error(hint, value, key, where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check(args[0], v, _element(key, i, v), where) for i, v in enumerate(value))
        if len(args) != len(value):
            raise _type_error(hint, value, key, where)
        return tuple(_check(a, v, _element(key, i, v), where) for i, (a, v) in enumerate(zip(args, value)))
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise _type_error(hint, value, key, where)
        item = args[1] if len(args) == 2 else Any
        return {k: _check(item, v, f"{key}.{k}", where) for k, v in value.items()}
    if origin is Literal:
        if value in args:
            return value
        raise _type_error(hint, value, key, where)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),  # kept as written: 1 stays 1
        str: lambda v: isinstance(v, str),
    }
    if hint not in ok:
        raise TypeError(f"options type {hint!r} of {key} is not supported by the preset loader")
    if not ok[hint](value):
        raise _type_error(hint, value, key, where)
    return value


def _element(key: str, index: int, value: Any) -> str:
    name = value.get("name") if isinstance(value, Mapping) else None
    return f"{key}[{index}]" + (f" ({name!r})" if isinstance(name, str) else "")


def _type_error(hint: Any, value: Any, key: str, where: str) -> PresetError:
    return PresetError(f"{where}: {key} must be {describe(hint)}, got {value!r}")


_NAMES = {
    bool: ("true or false", "booleans"),
    int: ("an integer", "integers"),
    float: ("a number", "numbers"),
    str: ("a string", "strings"),
}


def describe(hint: Any, plural: bool = False) -> str:
    """A type in a preset's words: "an integer", "a list of strings", "a table", …"""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a, plural) for a in args if a is not type(None))
    if hint in _NAMES:
        return _NAMES[hint][plural]
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        items = describe(args[0], True) if len(args) == 2 and args[1] is Ellipsis else "items"
        return f"lists of {items}" if plural else f"a list of {items}"
    if dataclasses.is_dataclass(hint) or origin in (Mapping, dict) or hint in (Mapping, dict):
        return "tables" if plural else "a table"
    return "values" if plural else "a value"


def preset_file(experiment: str) -> str:
    """Where an experiment's presets live (the path of presets/<experiment>.toml)."""
    return str(resources.files("lmclab.experiments").joinpath("presets", f"{experiment}.toml"))


def read_presets(experiment: str) -> dict[str, Any]:
    """The tables of presets/<experiment>.toml by preset name, as TOML gives them (unchecked)."""
    resource = resources.files("lmclab.experiments").joinpath("presets", f"{experiment}.toml")
    if not resource.is_file():
        available = sorted(
            p.name.removesuffix(".toml")
            for p in resources.files("lmclab.experiments").joinpath("presets").iterdir()
            if p.name.endswith(".toml")
        )
        raise PresetError(f"no experiment {experiment!r}; experiments: {', '.join(available)}")
    try:
        return tomllib.loads(resource.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{resource}: not valid TOML: {exc}") from exc
