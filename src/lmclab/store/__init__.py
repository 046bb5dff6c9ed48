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
from lmclab.store.data_identity import DataCheck, DataMismatch, RunData, check_same_data
from lmclab.store.errors import IntegrityError, RunDamaged, UnsafePathError
from lmclab.store.integrity import UnverifiedFileWarning, read_sealed_json, write_sealed_json
from lmclab.store.locks import ArtifactLock, LockTimeout, artifact_lock, lock_path
from lmclab.store.meta import DataInfo, ForkRecord, ResumedFrom, RunMeta
from lmclab.store.runs import Run, RunNotFound, RunScan, RunStore, environment_record, runs_root

__all__ = [
    "ArtifactLock",
    "CheckpointError",
    "DataCheck",
    "DataInfo",
    "DataMismatch",
    "ForkRecord",
    "IntegrityError",
    "LockTimeout",
    "ResumedFrom",
    "Run",
    "RunMeta",
    "RunDamaged",
    "RunData",
    "RunNotFound",
    "RunScan",
    "RunStore",
    "Store",
    "UnsafePathError",
    "UnverifiedFileWarning",
    "artifact_lock",
    "atomic_write",
    "atomic_write_json",
    "check_compatible",
    "check_same_data",
    "content_hash",
    "environment_record",
    "load_checkpoint",
    "load_model_state",
    "lock_path",
    "read_sealed_json",
    "runs_root",
    "save_checkpoint",
    "write_sealed_json",
]
