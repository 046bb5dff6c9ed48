"""Data identity: fingerprints of the data a run saw, cheap enough to compute on every load.

- :func:`split_fingerprint`: sha256 of one split as loaded (its uint8 images with their shape, and its
  int64 labels). The same whichever copy or file format the split was read from (IDX or ``.gz``, a
  directory or a zip); a re-encoded copy (CIFAR-10's JPEG-recompressed zip) differs, as its pixels do.
- :func:`data_fingerprint`: one identity for a dataset, from the fingerprints of its splits.
- :func:`content_fingerprint`: an image folder's content: sha256 over the relative path and the sha256 of
  the bytes of every image file it reads (``ImageTree.fingerprint`` feeds it), the same for a directory
  and a zip holding one tree. :func:`memoised` keeps it per stat signature (paths, sizes, modification and
  change times, inodes), in this process and in ``cache_dir()/fingerprints``, so that a folder's files
  are read once until one of them changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .sources import cache_dir

SHORT = 12  # hex digits shown where a fingerprint is named in a message, a title or a table
_CONTENT_FORMAT = "lmclab-imagefolder-content-v1"
_MEMO: dict[str, str] = {}


def split_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of one split as loaded: uint8 images (N, C, H, W) with their shape, then int64 labels."""
    h = hashlib.sha256()
    h.update(f"images uint8 {tuple(int(s) for s in images.shape)}\n".encode())
    h.update(np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.uint8).reshape(-1).data)
    y = np.ascontiguousarray(labels.detach().cpu().numpy(), dtype="<i8").reshape(-1)
    h.update(f"labels int64 {tuple(labels.shape)}\n".encode())
    h.update(y.data)
    return h.hexdigest()


def data_fingerprint(splits: Mapping[str, str]) -> str:
    """One identity of a dataset from its splits' fingerprints (split name → fingerprint)."""
    return hashlib.sha256("".join(f"{s}:{splits[s]}\n" for s in sorted(splits)).encode()).hexdigest()


def content_fingerprint(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (relative path, sha256 of the file's bytes) of every file, in the order given (sorted)."""
    h = hashlib.sha256(f"{_CONTENT_FORMAT}\n".encode())
    for rel, data in files:
        h.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


def stat_signature(path: os.PathLike | str) -> list[Any]:
    """What changes when a file is rewritten: size, modification and change times (ns), inode."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def memoised(signature: Any, compute: Callable[[], str]) -> str:
    """`compute()` once per `signature` (JSON-able; it must change whenever the result could): kept in this
    process and, best effort, in ``cache_dir()/fingerprints`` (an unwritable cache only costs a recompute)."""
    key = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()
    if key in _MEMO:
        return _MEMO[key]
    path = cache_dir() / "fingerprints" / key
    try:
        stored = path.read_text().strip()
    except OSError:
        stored = ""
    if len(stored) == 64 and all(c in "0123456789abcdef" for c in stored):
        _MEMO[key] = stored
        return stored
    value = compute()
    _MEMO[key] = value
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return value


def short_fingerprint(fingerprint: str | None) -> str:
    """The first :data:`SHORT` hex digits, or "none recorded"."""
    return fingerprint[:SHORT] if fingerprint else "none recorded"
