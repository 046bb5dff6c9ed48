"""The store's errors. Every one is a `CheckpointError`, so a caller that handles the store's errors
(the command line reports them in one line, exit status 2) handles them all."""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointError(Exception):
    """A stored file that cannot be read, written or trusted, or a checkpoint that does not fit the model it is
    loaded into."""


class IntegrityError(CheckpointError):
    """A stored file whose content differs from the checksum recorded when it was written (flipped bytes,
    a partial overwrite, an edit). `path`: the file; `what`: what differs (tensor names, "its content", …)."""

    def __init__(self, message: str, path: str | os.PathLike, what: list[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.what = list(what or [])


class RunDamaged(CheckpointError):
    """A run directory whose files do not say which run it is: config.json missing, unreadable, not a run
    config, or not hashing to the directory's name; meta.json unreadable or of another run. `reason` says
    which; the message names the directory."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(
            f"run {self.path} is damaged: {reason}; lmclab leaves it as it is (move it out of the store, or "
            "delete it, to train that config again)"
        )


class UnsafePathError(CheckpointError):
    """A write the store refuses because it would follow a symbolic link (and could land outside the store)."""
