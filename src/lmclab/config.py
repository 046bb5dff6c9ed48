"""Typed hyperparameters (OpenLTH-style): each field is a CLI flag and part of a run's content hash.

A run is identified by `RunConfig.run_hash()`: sha256 of the canonical JSON of its *normalised*
config (model defaults filled in, tuples as lists, keys sorted, None fields and unset sections left out; a
forked child's `fork` section names its parent's hash and the fork point). Fields that cannot change the
trained weights (where to store, which device, progress bars, checkpoint schedule) are not part of
it; they live in `RunOptions`.

`content_hash` is the one content hash of lmclab: run hashes, experiment step keys and the names of
the store's alignment and result directories are all computed with it (the store re-exports it; it
lives here, the lowest layer that needs it, so that config does not import the store above it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from lmclab.models import model_defaults

HASH_LENGTH = 16


def canonical_json(obj: Any, *, spaced: bool = False, default: typing.Callable[[Any], Any] | None = None) -> str:
    """`obj` as JSON with sorted keys: compact (`,` and `:`) or, with `spaced`, json.dumps' default
    separators (`, ` and `: `). `default` converts values JSON cannot hold (as in json.dumps)."""
    separators = (", ", ": ") if spaced else (",", ":")
    return json.dumps(obj, sort_keys=True, separators=separators, default=default)


def content_hash(
    obj: Any, length: int = HASH_LENGTH, *, spaced: bool = False, default: typing.Callable[[Any], Any] | None = None
) -> str:
    """The first `length` hex digits of sha256 of `canonical_json(obj, spaced=…, default=…)`.

    Run hashes use the compact form; step keys and the store's alignment and LMC result directories
    were first named with the spaced form and keep it, so that every stored name stays valid."""
    return hashlib.sha256(canonical_json(obj, spaced=spaced, default=default).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class DataConfig:
    """Which data a model sees. Subsets take the first examples of each class, deterministically."""

    dataset: str = "mnist"
    train_subset: int | None = None  # n examples total, stratified by class
    train_per_class: int | None = None  # first n examples of each class
    augment: bool | None = None  # None: the dataset's default (CIFAR: crop+flip; MNIST family: none)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture by name; options not given take the model's defaults (filled in on normalise)."""

    model: str = "mlp"
    width: int | None = None
    hidden: tuple[int, ...] | None = None  # MLP hidden sizes
    norm: str | None = None  # layernorm | batchnorm | none (CNNs)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and length. `steps` (if set) overrides `epochs`."""

    optimizer: str = "adam"  # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.9  # sgd momentum (adam/adamw: beta1 is fixed at 0.9)
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | step | cosine | linear
    milestones: tuple[int, ...] = ()  # step schedule, in epochs
    gamma: float = 0.1  # step schedule factor
    warmup_epochs: float = 0.0  # linear warm-up from 0 (any schedule)
    batch_size: int = 128
    epochs: int = 10
    steps: int | None = None


@dataclass(frozen=True)
class SeedConfig:
    """Three independent sources of randomness, each with its own generator."""

    seed_init: int = 0  # weight initialisation
    seed_data: int = 1  # data order
    seed_augment: int = 2  # augmentation draws

    @staticmethod
    def from_seed(seed: int) -> SeedConfig:
        """One `--seed S` sets all three, distinctly: sha256("S/stream") truncated to 63 bits."""
        return SeedConfig(*(derive_seed(seed, s) for s in ("init", "data", "augment")))


def derive_seed(seed: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class ForkConfig:
    """A child run: starts from the full training state of run `parent` (a run hash) at one point.

    Exactly one of `epoch` (= step epoch·steps_per_epoch) or `step`. Unset (all None) for a run
    trained from its initialisation; an unset section is left out of the hash and of config.json.
    """

    parent: str | None = None  # the parent run's hash
    epoch: int | None = None  # fork at the end of this parent epoch (0: the initialisation)
    step: int | None = None  # or at this parent optimiser step

    @property
    def is_set(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def validate(self) -> None:
        """ValueError unless unset, or a parent with exactly one non-negative fork point."""
        if not self.is_set:
            return
        if not self.parent:
            raise ValueError(f"fork {self} names no parent run; give the parent's run hash (fork.parent)")
        points = [p for p in (self.epoch, self.step) if p is not None]
        if len(points) != 1:
            raise ValueError(
                f"fork of {self.parent} needs exactly one of epoch or step; got epoch={self.epoch}, step={self.step}"
            )
        if points[0] < 0:
            raise ValueError(f"fork point must be >= 0; got epoch={self.epoch}, step={self.step}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a trained run's weights (on a given device type)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: SeedConfig = field(default_factory=SeedConfig)
    fork: ForkConfig = field(default_factory=ForkConfig)

    def normalised(self) -> RunConfig:
        """Fill model defaults so that equal runs spelled differently hash equally (and check the fork)."""
        self.fork.validate()

        defaults = model_defaults(self.model.model)
        # Registry defaults are untyped options (int width, hidden sizes, norm name); passed on as they are.
        filled: dict[str, Any] = {
            k: (getattr(self.model, k) if getattr(self.model, k) is not None else defaults.get(k))
            for k in ("width", "hidden", "norm")
        }
        if filled["hidden"] is not None:
            filled["hidden"] = tuple(filled["hidden"])
        unknown = [k for k in ("width", "hidden", "norm") if getattr(self.model, k) is not None and k not in defaults]
        if unknown:
            raise ValueError(
                f"model {self.model.model!r} takes no option(s) {unknown}; its options are {sorted(defaults)}"
            )
        return dataclasses.replace(self, model=ModelConfig(model=self.model.model, **filled))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; optional sections (`fork`) are left out while unset."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        return {k: v for k, v in d.items() if not (k in OPTIONAL_SECTIONS and all(x is None for x in v.values()))}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        return RunConfig(**{name: _section_from_dict(cls, d.get(name, {})) for name, cls in SECTIONS.items()})

    def run_hash(self) -> str:
        """sha256 of the normalised config as canonical JSON, fields that are None left out and sections
        left empty by that dropped (so a new optional field or section, None by default, keeps every
        earlier run's hash)."""
        unset_dropped = {
            section: {k: v for k, v in values.items() if v is not None}
            for section, values in self.normalised().to_dict().items()
        }
        unset_dropped = {section: values for section, values in unset_dropped.items() if values}
        return content_hash(unset_dropped)

    def model_options(self) -> dict[str, Any]:
        """Keyword options for `lmclab.models.build_model` (only those the model takes)."""
        m = self.normalised().model
        return {k: getattr(m, k) for k in ("width", "hidden", "norm") if getattr(m, k) is not None}


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "seeds": SeedConfig,
    "fork": ForkConfig,
}
OPTIONAL_SECTIONS = frozenset({"fork"})  # left out of to_dict() and the hash while all their fields are None
FLAG_PREFIX = {"fork": "fork-"}  # `--fork-parent`, `--fork-epoch`, `--fork-step` (not to be confused with --epochs)


def _section_from_dict(cls: type, values: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**{k: _coerce(hints[k], v) for k, v in values.items()})


def _coerce(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    base = _strip_optional(hint)
    if get_origin(base) is tuple:
        return tuple(value)
    return value


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0]
    return hint


# ----------------------------------------------------------------------------------------- CLI


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_ints(text: str) -> tuple[int, ...]:
    text = text.strip()
    return tuple(int(t) for t in text.replace("x", ",").split(",") if t) if text else ()


def _parser_for(hint: Any) -> typing.Callable[[str], Any]:
    base = _strip_optional(hint)
    if get_origin(base) is tuple:
        return _parse_ints
    if base is bool:
        return _parse_bool
    return base


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per config field (`--batch-size`, `--seed-init`, `--fork-epoch`, …), default None = keep preset."""
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.splitlines()[0] if cls.__doc__ else ''})")
        hints = get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            group.add_argument(
                "--" + FLAG_PREFIX.get(section, "") + f.name.replace("_", "-"),
                dest=f"cfg_{section}_{f.name}",
                type=_parser_for(hints[f.name]),
                default=None,
                metavar=_metavar(hints[f.name]),
                help=f"default: {default!r}" if default not in (None, ()) else None,
            )
    parser.add_argument("--seed", type=int, default=None, help="set all three seeds distinctly from one number")


def _metavar(hint: Any) -> str:
    base = _strip_optional(hint)
    if get_origin(base) is tuple:
        return "N,N,…"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(base, "VALUE")


def config_from_args(base: RunConfig, args: argparse.Namespace) -> RunConfig:
    """Apply the flags that were given on top of a preset. `--seed` applies first, `--seed-*` after."""
    config = base
    if getattr(args, "seed", None) is not None:
        config = dataclasses.replace(config, seeds=SeedConfig.from_seed(args.seed))
    for section in SECTIONS:
        given = {
            f.name: getattr(args, f"cfg_{section}_{f.name}")
            for f in fields(SECTIONS[section])
            if getattr(args, f"cfg_{section}_{f.name}", None) is not None
        }
        if given:
            config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **given)})
    return config
