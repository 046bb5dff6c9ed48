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
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from lmclab.data import DATASET_NAMES, IMAGEFOLDER_PREFIX, folder_fingerprint, imagefolder_root
from lmclab.data.registry import DATASETS, normalise_name
from lmclab.models import MODEL_NAMES, NORMS, ModelError, model_defaults
from lmclab.models.vit import auto_patch

HASH_LENGTH = 16


class UsageError(ValueError):
    """A value the user gave that is not allowed, found before anything ran: its message is one line naming
    the setting (its flag), the value and what is allowed. The command line prints it without a traceback
    and exits with status 2. A ValueError, so code that caught the errors these checks pre-empt still does."""


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
    # Image folders only, filled on normalise: the folder's content fingerprint (lmclab.data.folder_fingerprint),
    # so a changed folder is a different run. None (left out of config.json and the hash) for named datasets.
    data_fingerprint: str | None = None
    # Train (and test) on these classes only (labels kept, the model keeps every class's logit). None: all
    # classes; left out of config.json and the hash while None, so earlier runs keep their hashes.
    classes: tuple[int, ...] | None = None

    def validate(self) -> None:
        """UsageError (one line: the flag, the value, what is allowed) unless every field is allowed."""
        _validate_section(self)
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise UsageError(
                f"--classes {_spell(self.classes)}: allowed: distinct class indices (config field data.classes)"
            )
        entry = DATASETS.get(normalise_name(self.dataset)) if self.classes is not None else None
        if entry is not None and self.classes is not None and max(self.classes) >= entry.info.num_classes:
            raise UsageError(
                f"--classes {_spell(self.classes)}: allowed: class indices of {entry.name}, 0 to "
                f"{entry.info.num_classes - 1} (config field data.classes)"
            )


#: Model options filled in with the model's defaults on normalise (part of every run's hash).
FILLED_MODEL_OPTIONS: tuple[str, ...] = ("width", "hidden", "norm")
#: Model options added later (the transformers'): on normalise a value equal to the model's default is left unset
#: (None, so out of config.json and the hash), so runs from before them keep their hashes and an option spelled
#: out at its default names the same run as one left unset.
SPARSE_MODEL_OPTIONS: tuple[str, ...] = ("patch", "dim", "depth", "heads", "mlp_ratio")
MODEL_OPTIONS: tuple[str, ...] = FILLED_MODEL_OPTIONS + SPARSE_MODEL_OPTIONS


@dataclass(frozen=True)
class ModelConfig:
    """Architecture by name; options not given take the model's defaults (filled in on normalise)."""

    model: str = "mlp"
    width: int | None = None
    hidden: tuple[int, ...] | None = None  # MLP hidden sizes
    norm: str | None = None  # layernorm | batchnorm | none (CNNs)
    # Transformers (vit, seq_transformer); None: the model's default, left out of config.json and the hash.
    patch: int | None = None  # ViT patch size (0: automatic, 7 on 28×28, 4 on 32×32)
    dim: int | None = None  # embedding dimension (× width)
    depth: int | None = None  # transformer blocks
    heads: int | None = None  # attention heads
    mlp_ratio: float | None = None  # MLP hidden size ÷ embedding dimension

    def validate(self) -> None:
        """UsageError unless every field is allowed, the model takes every option given, the heads divide the
        embedding dimension (dim · width) and the MLP has a hidden unit."""
        _validate_section(self)
        takes = model_defaults(self.model)
        for name in MODEL_OPTIONS:
            if getattr(self, name) is not None and name not in takes:
                raise UsageError(
                    f"{_flag('model', name)} {_spell(getattr(self, name))}: model {self.model} takes no {name}; "
                    f"its options: {', '.join(_flag('model', k) for k in takes)}"
                )
        opts = {**takes, **{k: getattr(self, k) for k in MODEL_OPTIONS if getattr(self, k) is not None}}
        if "dim" in opts and "width" in opts:
            d = int(opts["dim"]) * int(opts["width"])
            if "heads" in opts and d % int(opts["heads"]):
                raise UsageError(
                    f"--heads {_spell(opts['heads'])}: allowed: a divisor of the embedding dimension dim × width = "
                    f"{d} (--dim {_spell(opts['dim'])}, --width {_spell(opts['width'])}; config field model.heads)"
                )
            if "mlp_ratio" in opts and int(d * float(opts["mlp_ratio"])) < 1:
                raise UsageError(
                    f"--mlp-ratio {_spell(opts['mlp_ratio'])}: allowed: a ratio giving the MLP at least one hidden "
                    f"unit, int(dim × width × ratio) >= 1 with dim × width = {d} (config field model.mlp_ratio)"
                )


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

    def validate(self) -> None:
        """UsageError unless every field is allowed (and Nesterov momentum has SGD with a momentum)."""
        _validate_section(self)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise UsageError(
                f"--nesterov true: allowed only with --optimizer sgd and --momentum > 0; "
                f"got --optimizer {self.optimizer} --momentum {_spell(self.momentum)}"
            )


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

    def validate(self) -> None:
        """UsageError unless every seed is an integer in [0, 2^64)."""
        _validate_section(self)


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
        """UsageError (a ValueError) unless unset, or a parent with exactly one non-negative fork point."""
        if not self.is_set:
            return
        if not self.parent:
            raise UsageError(
                f"fork {self} names no parent run; give the parent's run hash (fork.parent, --fork-parent)"
            )
        points = [p for p in (self.epoch, self.step) if p is not None]
        if len(points) != 1:
            raise UsageError(
                f"fork of {self.parent} needs exactly one of epoch or step (--fork-epoch, --fork-step); "
                f"got epoch={self.epoch}, step={self.step}"
            )
        _validate_section(self)


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a trained run's weights (on a given device type)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seeds: SeedConfig = field(default_factory=SeedConfig)
    fork: ForkConfig = field(default_factory=ForkConfig)

    def validate(self) -> None:
        """Check every value before anything is trained or stored: a `UsageError` (a ValueError) whose one
        line names the flag, the value and what is allowed (`ALLOWED`), for the first value that is not.
        The command line and `lmclab.training.train` call it; it reads no data and writes nothing."""
        for name in SECTIONS:
            getattr(self, name).validate()
        d = self.data
        if d.train_subset is not None and d.train_per_class is not None:
            raise UsageError(
                f"--train-subset {d.train_subset} and --train-per-class {d.train_per_class}: allowed: at most "
                "one of them (a stratified subset in all, or the first N of each class)"
            )
        entry = DATASETS.get(normalise_name(d.dataset)) if self.model.patch else None
        if entry is not None and self.model.patch:
            _, h, w = entry.info.input_shape
            if h % self.model.patch or w % self.model.patch:
                raise UsageError(
                    f"--patch {self.model.patch}: allowed: 0 (automatic) or a divisor of the image size {h}×{w} of "
                    f"{entry.name} (config field model.patch)"
                )

    def normalised(self) -> RunConfig:
        """Fill model defaults so that equal runs spelled differently hash equally (and check the fork): the
        `FILLED_MODEL_OPTIONS` take the model's default when unset, the `SPARSE_MODEL_OPTIONS` are unset when at
        it; an image folder gets its absolute path and content fingerprint (`DataConfig.data_fingerprint`)."""
        self.fork.validate()

        defaults = model_defaults(self.model.model)
        # Registry defaults are untyped options (int width, hidden sizes, norm name); passed on as they are.
        filled: dict[str, Any] = {
            k: (getattr(self.model, k) if getattr(self.model, k) is not None else defaults.get(k))
            for k in FILLED_MODEL_OPTIONS
        }
        if filled["hidden"] is not None:
            filled["hidden"] = tuple(filled["hidden"])
        unknown = [k for k in MODEL_OPTIONS if getattr(self.model, k) is not None and k not in defaults]
        if unknown:
            raise ValueError(
                f"model {self.model.model!r} takes no option(s) {unknown}; its options are {sorted(defaults)}"
            )
        sparse = {k: _sparse_option(getattr(self.model, k), defaults.get(k)) for k in SPARSE_MODEL_OPTIONS}
        if sparse["patch"] is not None and sparse["patch"] == self._automatic_patch():
            sparse["patch"] = None  # the patch "automatic" picks for the dataset's images: the same model
        model = ModelConfig(model=self.model.model, **filled, **sparse)
        return dataclasses.replace(self, data=_normalised_data(self.data), model=model)

    def _automatic_patch(self) -> int | None:
        """The patch size `patch = 0` gives on this config's dataset (None when its image size is unknown)."""
        entry = DATASETS.get(normalise_name(self.data.dataset))
        if entry is None:
            return None
        _, h, w = entry.info.input_shape
        try:
            return auto_patch(h, w)
        except ModelError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict; optional sections (`fork`) are left out while unset."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        for section, name in OPTIONAL_FIELDS:
            if d[section].get(name, 0) is None:
                del d[section][name]
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
        return {k: getattr(m, k) for k in MODEL_OPTIONS if getattr(m, k) is not None}


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "seeds": SeedConfig,
    "fork": ForkConfig,
}
OPTIONAL_SECTIONS = frozenset({"fork"})  # left out of to_dict() and the hash while all their fields are None
# Fields left out of to_dict() (config.json, step keys) while None, so that earlier configs read the same.
OPTIONAL_FIELDS = frozenset(
    {("data", "data_fingerprint"), ("data", "classes"), *(("model", k) for k in SPARSE_MODEL_OPTIONS)}
)
DERIVED_FIELDS = frozenset({("data", "data_fingerprint")})  # filled by normalised(), not CLI flags
FLAG_PREFIX = {"fork": "fork-"}  # `--fork-parent`, `--fork-epoch`, `--fork-step` (not to be confused with --epochs)


def _sparse_option(value: Any, default: Any) -> Any:
    """A later model option as normalised: None when unset or equal to the model's default; a float where the
    default is one (so `mlp_ratio = 1` in a TOML preset and `--mlp-ratio 1.0` hash alike)."""
    if value is None or value == default:
        return None
    return float(value) if isinstance(default, float) else value


def _normalised_data(data: DataConfig) -> DataConfig:
    """An image folder's data: its absolute path and (unless already given) its content fingerprint, so that a
    changed folder is a different run. Named datasets are left as they are (their hashes stay the same)."""
    root = imagefolder_root(data.dataset)
    if root is None:
        if data.data_fingerprint is not None:
            raise ValueError(
                f"data_fingerprint applies to imagefolder: datasets only (it is filled in from the folder); "
                f"dataset {data.dataset!r} has none"
            )
        return data
    fingerprint = data.data_fingerprint or folder_fingerprint(root)
    return dataclasses.replace(data, dataset=f"{IMAGEFOLDER_PREFIX}{root}", data_fingerprint=fingerprint)


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


# ---------------------------------------------------------------------------------- validation

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam", "adamw")  # TrainConfig.optimizer (built in lmclab.training.state)
SCHEDULES: tuple[str, ...] = ("constant", "step", "cosine", "linear")  # TrainConfig.schedule (training.schedules)


@dataclass(frozen=True)
class Allowed:
    """The values a setting allows: `admits(value)`, and `describe()`, the words for error messages and
    --help ("an integer >= 1", "one of sgd, adam, adamw"). Registry-backed choices are read when asked."""

    describe: Callable[[], str]
    admits: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: int | None = None) -> Allowed:
    """An integer in [low, high] (no upper bound without `high`)."""
    words = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Allowed(lambda: words, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def number(low: float, *, strict: bool = False, below: float | None = None) -> Allowed:
    """A finite number > `low` (`strict`) or >= `low`, and < `below` if given."""
    words = f"a finite number {'>' if strict else '>='} {low:g}" + ("" if below is None else f" and < {below:g}")
    return Allowed(
        lambda: words,
        lambda v: _is_number(v) and (v > low if strict else v >= low) and (below is None or v < below),
    )


def one_of(names: Callable[[], Sequence[str]]) -> Allowed:
    """One of the names `names()` returns (read when checked, so registries added to later count)."""
    return Allowed(lambda: "one of " + ", ".join(names()), lambda v: isinstance(v, str) and v in names())


def integers(low: int, *, nonempty: bool, example: str) -> Allowed:
    """A comma-separated list of integers >= `low` (a tuple), e.g. `example`."""
    words = f"{'one or more' if nonempty else 'zero or more'} integers >= {low}, comma-separated (e.g. {example})"
    return Allowed(
        lambda: words,
        lambda v: isinstance(v, tuple) and (len(v) > 0 or not nonempty) and all(_is_int(x) and x >= low for x in v),
    )


BOOLEAN = Allowed(lambda: "true or false", lambda v: isinstance(v, bool))
TEXT = Allowed(lambda: "a non-empty string", lambda v: isinstance(v, str) and v != "")
SEED = Allowed(lambda: "an integer >= 0 (below 2^64)", lambda v: _is_int(v) and 0 <= v < 2**64)


def _is_dataset(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    if v.startswith(IMAGEFOLDER_PREFIX):
        return len(v) > len(IMAGEFOLDER_PREFIX)
    return normalise_name(v) in DATASET_NAMES


@dataclass(frozen=True)
class Setting:
    """One config field's rule (what it allows) and its one-line meaning, for validation and --help."""

    allowed: Allowed
    help: str


#: Every config field's rule, by (section, field). `RunConfig.validate` checks each value against it, the
#: CLI flag of the field parses with it (so argparse refuses a bad value itself) and its --help shows it.
ALLOWED: dict[tuple[str, str], Setting] = {
    ("data", "dataset"): Setting(
        Allowed(
            lambda: "one of " + ", ".join(DATASET_NAMES) + f", or {IMAGEFOLDER_PREFIX}<dir or zip>",
            _is_dataset,
        ),
        "dataset name (`lmclab datasets`)",
    ),
    ("data", "train_subset"): Setting(integer(1), "train on N examples in all, stratified by class"),
    ("data", "train_per_class"): Setting(integer(1), "train on the first N examples of each class"),
    ("data", "augment"): Setting(
        BOOLEAN, "training augmentation (unset: the dataset's own; CIFAR crop+flip, MNIST none)"
    ),
    ("data", "data_fingerprint"): Setting(TEXT, "an image folder's content fingerprint (filled in)"),
    ("data", "classes"): Setting(
        integers(0, nonempty=True, example="0,1,2,3,4"), "train and test on these classes only (all logits kept)"
    ),
    ("model", "model"): Setting(one_of(lambda: MODEL_NAMES), "architecture (`lmclab models`)"),
    ("model", "width"): Setting(integer(1), "width multiplier"),
    ("model", "hidden"): Setting(integers(1, nonempty=True, example="512,512"), "MLP hidden sizes"),
    ("model", "norm"): Setting(one_of(lambda: NORMS), "normalisation layers of the CNNs"),
    ("model", "patch"): Setting(integer(0), "ViT patch size in pixels (0: automatic, 7 on 28×28, 4 on 32×32)"),
    ("model", "dim"): Setting(integer(1), "transformer embedding dimension (multiplied by --width)"),
    ("model", "depth"): Setting(integer(1), "transformer blocks"),
    ("model", "heads"): Setting(integer(1), "attention heads (a divisor of dim × width)"),
    ("model", "mlp_ratio"): Setting(number(0, strict=True), "transformer MLP hidden size ÷ embedding dimension"),
    ("train", "optimizer"): Setting(one_of(lambda: OPTIMIZERS), "optimiser"),
    ("train", "lr"): Setting(number(0, strict=True), "peak learning rate"),
    ("train", "momentum"): Setting(number(0, below=1), "SGD momentum (Adam: beta1 stays 0.9)"),
    ("train", "nesterov"): Setting(BOOLEAN, "Nesterov momentum (SGD with momentum > 0)"),
    ("train", "weight_decay"): Setting(number(0), "weight decay"),
    ("train", "schedule"): Setting(one_of(lambda: SCHEDULES), "learning-rate schedule after warm-up"),
    ("train", "milestones"): Setting(
        integers(0, nonempty=False, example="80,120"), "epochs where the step schedule multiplies lr by gamma"
    ),
    ("train", "gamma"): Setting(number(0, strict=True), "step schedule factor"),
    ("train", "warmup_epochs"): Setting(number(0), "linear warm-up from 0, in epochs (fractions allowed)"),
    ("train", "batch_size"): Setting(integer(1), "examples per optimiser step"),
    ("train", "epochs"): Setting(integer(0), "training length in epochs (0: the initialisation only)"),
    ("train", "steps"): Setting(integer(1), "training length in optimiser steps (overrides epochs)"),
    ("seeds", "seed_init"): Setting(SEED, "seed of the weight initialisation"),
    ("seeds", "seed_data"): Setting(SEED, "seed of the data order"),
    ("seeds", "seed_augment"): Setting(SEED, "seed of the augmentation draws"),
    ("fork", "parent"): Setting(TEXT, "fork this stored run (a name, hash prefix or path)"),
    ("fork", "epoch"): Setting(integer(0), "fork at the end of this parent epoch (0: its initialisation)"),
    ("fork", "step"): Setting(integer(0), "or fork at this parent optimiser step"),
}
SECTION_OF: dict[type, str] = {cls: name for name, cls in SECTIONS.items()}


def _flag(section: str, name: str) -> str:
    """The command-line flag of a config field: `--lr`, `--batch-size`, `--fork-epoch`."""
    return "--" + FLAG_PREFIX.get(section, "") + name.replace("_", "-")


def _spell(value: Any) -> str:
    """A value as it would be spelled on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(_spell, value)) or "''"
    return str(value) if isinstance(value, (int, float, str)) else repr(value)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _optional(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)


def _validate_section(obj: Any) -> None:
    """UsageError for the first field of a config section that its `ALLOWED` rule refuses (None is allowed
    where the field is optional)."""
    section = SECTION_OF[type(obj)]
    hints = _hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None and _optional(hints[f.name]):
            continue
        allowed = ALLOWED[(section, f.name)].allowed
        if not allowed.admits(value):
            raise UsageError(
                f"{_flag(section, f.name)}: {_spell(value)} is not allowed; allowed: {allowed.describe()} "
                f"(config field {section}.{f.name})"
            )


def argument_type(allowed: Allowed, parse: Callable[[str], Any] = str) -> Callable[[str], Any]:
    """An argparse `type=`: parse the text, then check it, so that argparse itself refuses a bad value with
    one line ("argument --lr: 'nan' is not allowed; allowed: a finite number > 0") and exit status 2."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except (ValueError, argparse.ArgumentTypeError):
            value = None
        if value is None or not allowed.admits(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: {allowed.describe()}")
        return value

    convert.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in some messages
    return convert


# ----------------------------------------------------------------------------------------- CLI


def _parse_bool(text: str) -> bool:
    t = text.lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_ints(text: str) -> tuple[int, ...]:
    """`512,512` or `512x512` (empty: none); ValueError for an empty or non-integer item (`16,x`, `16,,8`)."""
    text = text.strip()
    return tuple(int(t) for t in text.replace("x", ",").split(",")) if text else ()


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
            if (section, f.name) in DERIVED_FIELDS:
                continue
            setting = ALLOWED[(section, f.name)]
            group.add_argument(
                _flag(section, f.name),
                dest=f"cfg_{section}_{f.name}",
                type=argument_type(setting.allowed, _parser_for(hints[f.name])),
                default=None,
                metavar=_metavar(hints[f.name]),
                help=(
                    f"{setting.help}; allowed: {setting.allowed.describe()}"
                    + ("" if section == "fork" else " (default: the preset's)")
                ).replace("%", "%%"),
            )
    parser.add_argument(
        "--seed",
        type=argument_type(SEED, int),
        default=None,
        metavar="INT",
        help=f"set all three seeds distinctly from one number; allowed: {SEED.describe()} (--seed-* apply after it)",
    )


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
