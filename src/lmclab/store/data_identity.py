"""Which data each run saw, and the one check that runs compared with each other saw the same data.

Two runs of one architecture trained on different datasets (an MNIST MLP and a Fashion-MNIST MLP) align,
interpolate and merge without any error, but the result evaluates both on one of the datasets. So every
comparison of runs (`lmclab align`, `interpolate`, `predict`, `merge`, `plane`, `spectrum --path-to`,
`curve` and their Python functions) calls :func:`check_same_data` first: runs trained on different data are
refused (:class:`DataMismatch`, one line naming both runs and their data) unless the caller asks to go on
(``allow=True``: the ``--allow-different-data`` flag, ``allow_different_data=True`` in Python; a curve,
fitted on run A's training data, never does); then the :class:`DataCheck` it returns says which data the
comparison was evaluated on, for figure titles and tables.

Two runs saw the same data when their data fingerprints (``DataInfo.fingerprint``: the train and test
splits as loaded, before any subset; see ``lmclab.data.fingerprint``) are equal. A run recorded before
lmclab kept fingerprints is compared by dataset name (and, for an image folder, the content fingerprint of
its config). Subsets of one dataset (``train_subset``, ``train_per_class``) are the same data: the runs
are evaluated on the same splits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmclab.data import short_fingerprint
from lmclab.store.runs import Run

ALLOW_FLAG = "--allow-different-data"


class DataMismatch(ValueError):
    """Runs trained on different data were given to one comparison, and it was not asked for."""


@dataclass(frozen=True)
class RunData:
    """The data one run saw, as recorded in its config and meta.json."""

    run: str  # the run's directory name
    dataset: str
    fingerprint: str | None  # DataInfo.fingerprint; None for runs recorded without one
    folder_fingerprint: str | None  # image folders: the content fingerprint of the config
    source: str | None  # where the data was read from
    train_size: int | None  # training examples used
    test_size: int | None

    @classmethod
    def of(cls, run: Run) -> RunData:
        config, info = run.config, run.meta.data_info
        return cls(
            run=run.path.name,
            dataset=config.data.dataset,
            fingerprint=None if info is None else info.fingerprint,
            folder_fingerprint=config.data.data_fingerprint or (None if info is None else info.folder_fingerprint),
            source=None if info is None else info.source,
            train_size=None if info is None else info.train_size,
            test_size=None if info is None else info.test_size,
        )

    def same_as(self, other: RunData) -> bool:
        if self.fingerprint is not None and other.fingerprint is not None:
            return self.fingerprint == other.fingerprint
        return self.dataset == other.dataset and (
            self.folder_fingerprint is None
            or other.folder_fingerprint is None
            or self.folder_fingerprint == other.folder_fingerprint
        )

    def label(self, *, source: bool = False) -> str:
        """ "mnist (data 1a2b3c4d5e6f)"; with `source`, where it was read from too."""
        where = f" from {self.source}" if source and self.source else ""
        return f"{self.dataset}{where} (data {short_fingerprint(self.fingerprint or self.folder_fingerprint)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "dataset": self.dataset,
            "fingerprint": self.fingerprint,
            "folder_fingerprint": self.folder_fingerprint,
            "source": self.source,
            "train_size": self.train_size,
            "test_size": self.test_size,
        }


@dataclass(frozen=True)
class DataCheck:
    """The outcome of :func:`check_same_data`: each run's data, whether they agree, what is evaluated on."""

    runs: tuple[RunData, ...]
    same: bool

    @property
    def evaluated_on(self) -> RunData:
        """Comparisons evaluate on the first (reference) run's data."""
        return self.runs[0]

    def different(self) -> list[RunData]:
        """The runs whose data differs from the first run's."""
        return [r for r in self.runs[1:] if not r.same_as(self.runs[0])]

    def note(self) -> str | None:
        """None when the runs share their data; else one line saying what the comparison was evaluated on."""
        if self.same:
            return None
        others = ", ".join(sorted({r.label() for r in self.different()}))
        return f"evaluated on {self.evaluated_on.label()}; runs trained on different data ({others})"

    def column(self) -> dict[str, str]:
        """The column tables carry when the runs' data differ ({} when it agrees)."""
        return {} if self.same else {"evaluated_on": self.evaluated_on.label()}

    def to_json(self) -> dict[str, Any]:
        return {
            "same": self.same,
            "evaluated_on": self.evaluated_on.label(),
            "note": self.note(),
            "runs": [r.to_json() for r in self.runs],
        }


def check_same_data(runs: Sequence[Run], *, allow: bool = False, unsupported: str | None = None) -> DataCheck:
    """Each run's data; :class:`DataMismatch` (one line naming the first run, a run whose data differs and
    both their data) if they differ and `allow` is False. Comparisons evaluate on the first run's data.

    `unsupported`: why the caller cannot compare runs trained on different data at all (the message then
    says so, instead of offering --allow-different-data)."""
    data = tuple(RunData.of(run) for run in runs)
    check = DataCheck(data, same=all(d.same_as(data[0]) for d in data[1:]))
    if check.same or allow:
        return check
    first, other = data[0], check.different()[0]
    sources = first.dataset == other.dataset  # same name, different content: say where each was read from
    more = len(check.different()) - 1
    raise DataMismatch(
        f"runs {first.run} and {other.run} were trained on different data: {first.label(source=sources)} vs "
        f"{other.label(source=sources)}"
        + (f" (and {more} more run(s) differ from {first.run})" if more else "")
        + (
            f"; {unsupported}, so only runs trained on the same data are compared"
            if unsupported
            else f"; comparing them evaluates both on {first.dataset}. Pass {ALLOW_FLAG} "
            "(Python: allow_different_data=True) to compare them anyway"
        )
    )
