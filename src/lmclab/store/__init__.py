"""Run store: content-addressed runs, safetensors checkpoints, atomic metadata."""
from lmclab.store.atomic import atomic_write, atomic_write_json
from lmclab.store.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from lmclab.store.runs import Run, RunNotFound, RunStore, environment_record, runs_root

__all__ = [
    "CheckpointError",
    "Run",
    "RunNotFound",
    "RunStore",
    "atomic_write",
    "atomic_write_json",
    "check_compatible",
    "environment_record",
    "load_checkpoint",
    "load_model_state",
    "runs_root",
    "save_checkpoint",
]
