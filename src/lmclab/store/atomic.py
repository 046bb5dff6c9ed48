"""Atomic file writes: a reader sees the old file or the complete new one, never half of either.

Modes: the temporary file is created with mode 0o666, which the kernel reduces by the process's umask
(and a directory's default ACL), exactly as for any file the user creates. That mode is kept: a writer
that recreates the file with its own mode (safetensors writes 0600) gets it set back, and `os.replace`
keeps it. So with umask 022 every file lmclab writes is 0644, with 002 it is 0664. (No umask is read or
set, so there is no window in which another thread creates files under a changed umask.)

Links: a write never follows a symbolic link. The target itself must not be a link (it is refused, not
replaced), and inside a store root every directory between the root and the target must be a real
directory, so nothing the store writes lands outside it. Store roots are registered by the store
(`register_root`, done by `Store`, `RunStore` and `Run`) or passed as `root=`; the root itself may be a
link (a store kept on another disk). Refusals raise `UnsafePathError` naming the link.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmclab.store.errors import UnsafePathError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

_roots: set[str] = set()
_roots_lock = threading.Lock()


def register_root(root: str | os.PathLike) -> None:
    """Make `root` a store root: writes below it refuse linked directories between it and the target."""
    with _roots_lock:
        _roots.add(os.path.abspath(root))


def store_root_of(path: str | os.PathLike) -> str | None:
    """The innermost registered store root that `path` lies below (lexically), if any."""
    target = os.path.abspath(path)
    with _roots_lock:
        found = [r for r in _roots if target.startswith(r.rstrip(os.sep) + os.sep)]
    return max(found, key=len) if found else None


def refuse_links(path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """UnsafePathError if `path` is a symbolic link or, below `root` (default: its registered store
    root), any directory between the root and `path` is."""
    target = os.path.abspath(path)
    base = os.path.abspath(root) if root is not None else store_root_of(target)
    checked = [target]
    if base is not None and target.startswith(base.rstrip(os.sep) + os.sep):
        parent = os.path.dirname(target)
        while len(parent) > len(base):
            checked.append(parent)
            parent = os.path.dirname(parent)
    for p in checked:
        if os.path.islink(p):
            where = f" inside the store {base}" if base is not None and p != target else ""
            raise UnsafePathError(
                f"refusing to write {path}: {p} is a symbolic link{where} (lmclab never follows links when "
                "writing); replace it with a real " + ("file" if p == target else "directory")
            )


def _create_temporary(directory: Path, name: str) -> tuple[Path, int]:
    """A new empty file beside the target, mode 0o666 less the umask, never through a link; and its mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o7777
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"could not create a temporary file beside {directory / name}")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | _NOFOLLOW) if not directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], *, root: str | os.PathLike | None = None
) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then `os.replace` it into place.

    Whatever `write` returns (a byte count, say) is ignored. `root`: the store root `path` lies in
    (default: the registered one, if any); see the module docstring for modes and links."""
    path = Path(path)
    refuse_links(path, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_links(path, root)  # (directories made by someone else meanwhile)
    tmp, mode = _create_temporary(path.parent, path.name)
    try:
        write(tmp)
        if os.lstat(tmp).st_mode & 0o7777 != mode:
            os.chmod(tmp, mode)  # (recreated by `write` with a mode of its own)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        _fsync(path.parent, directory=True)  # the rename itself survives a crash
    except OSError:
        pass  # (some platforms and filesystems cannot fsync a directory)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, root: str | os.PathLike | None = None) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text), root=root)
