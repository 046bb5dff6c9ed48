"""The store owns every artifact directory under one root (the runs directory):

  train_<run hash>/          a training run (`runs`: a RunStore; `run(hash)`)
  align_<hash>/              an alignment of two runs, named by the content hash of its identity
  <kind>_<hash>/             any other result named by its identity (`lmc_<hash>/`: LMC paths of pairs of runs)
  steps/<kind>_<key>/        an experiment step's result (the key is `Step.key`)

Identities are hashed with `content_hash(identity, spaced=True)`, the form these directories were
first named with, so existing stores stay valid.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmclab.config import content_hash
from lmclab.store.atomic import register_root
from lmclab.store.runs import Run, RunStore, runs_root

ALIGNMENT_KIND = "align"
STEPS_DIR = "steps"


class Store:
    """Every artifact directory under `root` (default: $LMCLAB_RUNS_DIR, else ./runs)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = runs_root(root)
        register_root(self.root)  # writes below it never follow links (lmclab.store.atomic)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def runs(self) -> RunStore:
        """The training runs (`train_<hash>/`)."""
        return RunStore(self.root)

    def run(self, run_hash: str) -> Run:
        """The handle of the training run with hash `run_hash`, stored or not."""
        return self.runs.run(run_hash)

    def result_dir(self, kind: str, identity: Mapping[str, Any]) -> Path:
        """`<root>/<kind>_<hash of identity>/` (not created): where a result of `kind` with that identity lives."""
        if kind in (self.runs.kind, STEPS_DIR) or not kind or "/" in kind:
            raise ValueError(f"{kind!r} cannot name a result directory (it would clash with runs or steps)")
        return self.root / f"{kind}_{content_hash(dict(identity), spaced=True)}"

    def alignment_dir(self, identity: Mapping[str, Any]) -> Path:
        """`<root>/align_<hash>/`: the alignment with this identity (runs, method and its settings)."""
        return self.result_dir(ALIGNMENT_KIND, identity)

    def scratch_dir(self, name: str) -> Path:
        """`<root>/.<name>/` (not created): transient files of a tool (never results; e.g. the token files of the
        Ray executor's shared-store check), hidden from `lmclab runs`."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{name!r} cannot name a scratch directory")
        return self.root / f".{name}"

    def step_dir(self, kind: str, key: str) -> Path:
        """`<root>/steps/<kind>_<key>/` (not created): the stored result of an experiment step."""
        return self.root / STEPS_DIR / f"{kind}_{key}"
