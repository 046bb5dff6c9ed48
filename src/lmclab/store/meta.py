"""A run's metadata (meta.json) as typed records that round-trip the file exactly.

Each record is a frozen dataclass over one JSON object: the keys lmclab writes are typed fields,
any other key is kept in `extra`, and a record read from JSON writes back exactly the keys it held
plus those set since (`updated`; a field set to None is written as null). So reading and rewriting a
meta.json, even one written by another version of lmclab, changes nothing but the fields that were
set. A record constructed directly holds every field.

`RunMeta["key"]` is the stored JSON value under `key` (plain dicts and lists, as in the file), for
scripts that read meta.json as a dictionary; code in lmclab uses the typed attributes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeGuard, TypeVar

from lmclab.data import DeviceDataset, data_fingerprint

R = TypeVar("R", bound="JsonRecord")
STATUSES = ("created", "running", "interrupted", "diverged", "complete")


@dataclass(frozen=True)
class JsonRecord:
    """A JSON object as a frozen dataclass (see the module docstring).

    `present`: the typed fields the object holds (written back by `to_json`); None, when a record is
    constructed directly, means all of them."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    present: frozenset[str] | None = field(default=None, kw_only=True, repr=False)

    #: fields holding a nested record, by name
    NESTED: ClassVar[dict[str, type[JsonRecord]]] = {}

    def __post_init__(self) -> None:
        if self.present is None:
            object.__setattr__(self, "present", frozenset(self.field_names()))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in ("extra", "present"))

    @classmethod
    def _typed(cls, name: str, value: Any) -> Any:
        nested = cls.NESTED.get(name)
        return nested.from_json(value) if nested is not None and isinstance(value, dict) else value

    @classmethod
    def from_json(cls: type[R], obj: dict[str, Any]) -> R:
        """The record of a JSON object; ValueError naming the keys it lacks that the record requires."""
        names = set(cls.field_names())
        required = [
            f.name
            for f in fields(cls)
            if f.name in names and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        lacking = [k for k in required if k not in obj]
        if lacking:
            raise ValueError(f"{cls.__name__} needs key(s) {lacking}; got {obj}")
        known = {k: cls._typed(k, v) for k, v in obj.items() if k in names}
        return cls(**known, extra={k: v for k, v in obj.items() if k not in names}, present=frozenset(known))

    def to_json(self) -> dict[str, Any]:
        assert self.present is not None
        out = {n: _json_value(getattr(self, n)) for n in self.field_names() if n in self.present}
        return {**out, **self.extra}

    def updated(self: R, **changes: Any) -> R:
        """A copy with `changes` set (nested records may be given as records or as JSON dicts; keys that
        are not fields go to `extra`)."""
        names = set(self.field_names())
        known = {k: self._typed(k, v) for k, v in changes.items() if k in names}
        extra = {**self.extra, **{k: v for k, v in changes.items() if k not in names}}
        assert self.present is not None
        return dataclasses.replace(self, **known, extra=extra, present=self.present | frozenset(known))

    def __getitem__(self, key: str) -> Any:
        """The stored JSON value under `key` (KeyError if the object does not hold it)."""
        return self.to_json()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()


def _json_value(value: Any) -> Any:
    return value.to_json() if isinstance(value, JsonRecord) else value


@dataclass(frozen=True)
class DataInfo(JsonRecord):
    """The data a run saw (`data_info`): the dataset, how many examples of each split it used, and the
    data's identity (lmclab.data.fingerprint), which runs compared with each other must share
    (`lmclab.store.check_same_data`). Runs recorded before lmclab kept the identity have no
    `fingerprint`, `splits` or `folder_fingerprint` (None); they are compared by dataset name."""

    name: str
    input_shape: list[int]
    num_classes: int
    classes: list[str]
    source: str
    train_size: int  # training examples used (after train_subset / train_per_class)
    test_size: int  # test examples evaluated
    augment: bool
    fingerprint: str | None = None  # sha256 over the fingerprints of the full train and test splits as loaded
    # per split: {"examples": used, "of": the split's size as loaded, "fingerprint": sha256 of the split as loaded}
    splits: dict[str, dict[str, Any]] | None = None
    folder_fingerprint: str | None = None  # image folders: the folder's content fingerprint (also in the config)

    @classmethod
    def of(cls, train: DeviceDataset, test: DeviceDataset) -> DataInfo:
        """The record of a run's loaded training and test data (the train split possibly a subset)."""
        info = train.info
        splits = {
            name: {"examples": len(ds), "of": ds.info.examples, "fingerprint": ds.info.fingerprint}
            for name, ds in (("train", train), ("test", test))
        }
        fingerprints = {name: ds.info.fingerprint for name, ds in (("train", train), ("test", test))}
        return cls(
            name=info.name,
            input_shape=list(info.input_shape),
            num_classes=info.num_classes,
            classes=list(info.classes),
            source=info.source,
            train_size=len(train),
            test_size=len(test),
            augment=train.augment,
            fingerprint=data_fingerprint(fingerprints) if _all_known(fingerprints) else None,
            splits=splits,
            folder_fingerprint=info.folder_fingerprint,
        )


def _all_known(values: dict[str, str | None]) -> TypeGuard[dict[str, str]]:
    return all(v is not None for v in values.values())


@dataclass(frozen=True)
class ForkRecord(JsonRecord):
    """Where a forked child started (`fork`): its parent run and the fork point."""

    parent: str  # the parent's run hash
    parent_run: str  # the parent's directory name (children are stored beside it)
    parent_path: str
    step: int
    epoch: float


@dataclass(frozen=True)
class ResumedFrom(JsonRecord):
    """The stored state a run was last resumed from (`resumed_from`)."""

    path: str
    step: int


@dataclass(frozen=True)
class RunMeta(JsonRecord):
    """meta.json: status, library versions, device, schedule, data, history, final metrics, fork.

    `history`: one dict per finished epoch (epoch, step, lr, train_loss, train_accuracy, time and,
    when evaluated, test_loss and test_accuracy)."""

    status: str | None = None  # one of STATUSES
    hash: str | None = None
    preset: str | None = None
    environment: dict[str, Any] | None = None
    device: str | None = None
    precision: str | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    data_info: DataInfo | None = None
    parameters: int | None = None
    resumed_from: ResumedFrom | None = None
    fork: ForkRecord | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    final_metrics: dict[str, float] | None = None
    error: str | None = None
    initial_loss: float | None = None  # the loss of the run's first step (the divergence rule's L0)
    seed: int | None = None  # the `--seed` the run was made with, when its seeds are that seed's
    # packed training (lmclab.training.packed): one record per segment trained in a pack
    # ({start_step, size, members, step, bits})
    pack: list[dict[str, Any]] | None = None

    NESTED: ClassVar[dict[str, type[JsonRecord]]] = {
        "data_info": DataInfo,
        "resumed_from": ResumedFrom,
        "fork": ForkRecord,
    }

    def history_until(self, step: int) -> list[dict[str, Any]]:
        """The history entries of epochs that ended at or before `step`."""
        return [h for h in self.history if h["step"] <= step]
