"""The store: every artifact directory (runs, alignments, results, experiment steps), content-addressed,
with safetensors checkpoints, typed run metadata and atomic writes."""

from lmclab.config import content_hash
from lmclab.store.artifacts import Store
from lmclab.store.atomic import atomic_write, atomic_write_json
from lmclab.store.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from lmclab.store.meta import DataInfo, ForkRecord, ResumedFrom, RunMeta
from lmclab.store.runs import Run, RunNotFound, RunStore, environment_record, runs_root

__all__ = [
    "CheckpointError",
    "DataInfo",
    "ForkRecord",
    "ResumedFrom",
    "Run",
    "RunMeta",
    "RunNotFound",
    "RunStore",
    "Store",
    "atomic_write",
    "atomic_write_json",
    "check_compatible",
    "content_hash",
    "environment_record",
    "load_checkpoint",
    "load_model_state",
    "runs_root",
    "save_checkpoint",
]
