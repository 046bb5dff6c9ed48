"""Checksums of what the store writes, recorded at write time and verified on every read.

Tensor files (safetensors: checkpoints, resume files, permutations) carry in their header metadata, under
`INTEGRITY_KEY`, a JSON record

    {"algorithm": "sha256", "tensors": {name: digest}, "metadata": {key: digest}}

where a tensor's digest covers its dtype, shape and data bytes, and a metadata entry's digest its text (the
"lmclab" header with the step and optimizer settings). JSON documents (experiment step results) carry a
field `JSON_FIELD`:

    {"algorithm": "sha256", "content": digest of the rest of the document, "files": {name: digest}}

`content` is the sha256 of the document's canonical JSON (sorted keys, no spaces) as JSON reads it back;
`files` the sha256 of each file the step wrote into its directory. A file that differs from its record
raises `IntegrityError` naming the file and what differs; nothing of it is used.

Files written before lmclab recorded checksums have no record. They are read as *legacy, unverified*:
accepted (existing stores keep working), with one `UnverifiedFileWarning` per file and process naming
it. A record that is present but unreadable is an error, never a reason to skip the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from lmclab.store.atomic import atomic_write_json
from lmclab.store.errors import IntegrityError

ALGORITHM = "sha256"
INTEGRITY_KEY = "lmclab.integrity"  # safetensors header metadata key
JSON_FIELD = "integrity"  # the field of a sealed JSON document
_CHUNK = 1 << 20


class UnverifiedFileWarning(UserWarning):
    """A stored file written before lmclab recorded checksums was read without verification."""


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_unverified(path: str | os.PathLike, kind: str) -> None:
    """Say once per process that the `kind` file at `path` has no checksum and is used unverified."""
    key = os.path.abspath(path)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"{kind} {path} was written before lmclab recorded checksums: it is read unverified "
        "(it is verified once rewritten)",
        UnverifiedFileWarning,
        stacklevel=3,
    )


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and data bytes (native byte order, row-major)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}\n".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- tensor files


def tensor_record(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The integrity record (JSON text) of a tensor file's tensors and other metadata entries."""
    record = {
        "algorithm": ALGORITHM,
        "tensors": {name: tensor_digest(t) for name, t in sorted(tensors.items())},
        "metadata": {key: text_digest(value) for key, value in sorted(metadata.items()) if key != INTEGRITY_KEY},
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def verify_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    kind: str = "file",
    describe: Callable[[list[str]], str] | None = None,
) -> bool:
    """Check tensors and metadata read from `path` against the file's integrity record.

    True when verified; False for a legacy file without a record (warned once). IntegrityError naming the
    file and the differing tensors (`describe` words a list of tensor names) otherwise."""
    text = metadata.get(INTEGRITY_KEY)
    if text is None:
        warn_unverified(path, kind)
        return False
    try:
        record = json.loads(text)
        expected_tensors: dict[str, str] = dict(record["tensors"])
        expected_meta: dict[str, str] = dict(record["metadata"])
        algorithm = record["algorithm"]
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{kind} {path} has an unreadable checksum record ({exc}); it was not used", path) from exc
    if algorithm != ALGORITHM:
        raise IntegrityError(f"{kind} {path} records checksums of an unknown kind {algorithm!r}; it was not used", path)
    missing = sorted(set(expected_tensors) - set(tensors))
    added = sorted(set(tensors) - set(expected_tensors))
    changed = sorted(
        k for k in set(expected_tensors) & set(tensors) if tensor_digest(tensors[k]) != expected_tensors[k]
    )
    meta_changed = sorted(
        k for k, digest in expected_meta.items() if k not in metadata or text_digest(metadata[k]) != digest
    )
    meta_changed += sorted(k for k in metadata if k != INTEGRITY_KEY and k not in expected_meta)
    if not (missing or added or changed or meta_changed):
        return True
    word = describe or _names
    problems = []
    if changed:
        problems.append(f"the data of {word(changed)} differs from the checksum recorded when it was written")
    if missing:
        problems.append(f"{word(missing)} recorded but missing")
    if added:
        problems.append(f"{word(added)} not recorded")
    if meta_changed:
        problems.append(f"its header ({', '.join(meta_changed)}) differs from the checksum recorded")
    raise IntegrityError(
        f"{kind} {path} is corrupt: {'; '.join(problems)}; it was not used (restore it from a copy or delete it)",
        path,
        changed + missing + added + meta_changed,
    )


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f", … ({len(names)} in all)" if len(names) > 5 else "")
    return f"tensor{'s' if len(names) > 1 else ''} {shown}"


# ---------------------------------------------------------------- JSON documents


def json_digest(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, no spaces, NaN refused)."""
    return text_digest(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False))


def sealed(obj: Mapping[str, Any], files: Iterable[tuple[str, Path]] = ()) -> dict[str, Any]:
    """`obj` as JSON reads it back, with its integrity record (and that of each (name, path) in `files`)."""
    doc = json.loads(json.dumps(obj, allow_nan=False))  # int keys become strings, tuples lists, as on disk
    if not isinstance(doc, dict):
        raise TypeError(f"a sealed JSON document is an object; got {type(obj).__name__}")
    doc.pop(JSON_FIELD, None)
    record: dict[str, Any] = {"algorithm": ALGORITHM, "content": json_digest(doc)}
    record["files"] = {name: file_digest(path) for name, path in sorted(files)}
    return {**doc, JSON_FIELD: record}


def write_sealed_json(
    path: str | os.PathLike,
    obj: Mapping[str, Any],
    files: Iterable[tuple[str, Path]] = (),
    *,
    root: str | os.PathLike | None = None,
) -> Path:
    """Atomically write `obj` with its integrity record (see `sealed`); `root` as for `atomic_write_json`."""
    return atomic_write_json(path, sealed(obj, files), root=root)


def files_below(directory: Path, exclude: Iterable[str] = ()) -> list[tuple[str, Path]]:
    """(relative POSIX name, path) of every regular file below `directory`, except names in `exclude` and
    hidden ones (temporary files, locks)."""
    skip = set(exclude)
    found = []
    for p in sorted(directory.rglob("*")):
        rel = p.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or rel.as_posix() in skip:
            continue
        if p.is_file() and not p.is_symlink():
            found.append((rel.as_posix(), p))
    return found


def read_sealed_json(path: str | os.PathLike, *, kind: str = "file") -> dict[str, Any]:
    """Read a JSON document written by `write_sealed_json` and verify it (and the files it records, which
    lie beside it); the record is removed from what is returned. A document without a record is legacy
    (warned once); an unreadable or differing one raises IntegrityError naming the file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(
            f"{kind} {path} is unreadable (truncated or not JSON: {exc}); it was not used", path
        ) from exc
    if not isinstance(doc, dict):
        raise IntegrityError(f"{kind} {path} is not a JSON object; it was not used", path)
    record = doc.pop(JSON_FIELD, None)
    if record is None:
        warn_unverified(path, kind)
        return doc
    try:
        algorithm, content, files = record["algorithm"], record["content"], dict(record.get("files", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{kind} {path} has an unreadable checksum record ({exc}); it was not used", path) from exc
    if algorithm != ALGORITHM:
        raise IntegrityError(f"{kind} {path} records checksums of an unknown kind {algorithm!r}; it was not used", path)
    if json_digest(doc) != content:
        raise IntegrityError(
            f"{kind} {path} is corrupt: its content differs from the checksum recorded when it was written; "
            "it was not used (delete it to compute it again)",
            path,
            ["content"],
        )
    for name, digest in sorted(files.items()):
        file = path.parent / name
        if not file.is_file():
            raise IntegrityError(f"{file}, recorded in {kind} {path}, is missing; {path} was not used", file, [name])
        if file_digest(file) != digest:
            raise IntegrityError(
                f"{file} is corrupt: it differs from the checksum recorded in {kind} {path} when it was written; "
                "it was not used (delete the directory to compute it again)",
                file,
                [name],
            )
    return doc
