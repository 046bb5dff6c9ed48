"""Exclusive locks on store artifacts: one process at a time trains a run, computes an alignment, runs a step.

A lock is an advisory `fcntl.flock` on a small lock file, `<root>/.locks/<artifact>.lock`, where
`<artifact>` is the artifact directory's path below the store root (`train_<hash>`, `align_<hash>`,
`steps/<kind>_<key>`); an artifact outside any store root is locked in `<its parent>/.locks/`. Lock
files live outside the artifact directories, so taking a lock never creates a (half-made) artifact.

What holds:

- **Exclusive between processes.** A second process asking for a held lock waits, saying so once on
  stderr (``waiting for run train_… held by pid N on host since …``), and polls until the lock is
  free or its timeout passes (`timeout=`, else ``$LMCLAB_LOCK_TIMEOUT`` seconds, else forever):
  `LockTimeout` then names the holder. Whoever waited must look at the store again once it holds the
  lock: the artifact may have been finished meanwhile.
- **Dead holders free their locks.** The kernel drops a flock when the last descriptor of the holder's
  open file closes, which process exit, a crash and SIGKILL all do; the next process takes the lock
  over without any staleness guess. The lock file itself is never deleted (deleting it would let two
  processes lock two different files); it holds the holder's pid, host, start time and artifact, for
  messages only, and is emptied on release, so a lock file found non-empty on acquiring was left by
  a holder that died, which is reported ("… taking it over").
- **Re-entrant within one thread** (a nested acquire of the same lock counts); distinct threads
  exclude each other. A child made by `os.fork` while a lock is held shares it (one open file);
  `subprocess` children do not inherit it (descriptors are close-on-exec).

Network filesystems: on one machine (any local filesystem) the above is exact. On NFS, Linux emulates
flock with NFS byte-range locks, so exclusion holds across client machines when the server's lock
service works, but a lock held by a client machine that crashed (rather than a process that died)
stays held until the server's lease or lock recovery expires it (NFSv4: about 90 s); the pid and host
in the message say who it was. Some filesystems (Lustre mounted without ``flock``, some FUSE and SMB
mounts) refuse flock (ENOLCK, EOPNOTSUPP): lmclab then warns once and goes on without locking, as
before locks existed (concurrent identical commands may then duplicate work; atomic writes keep the
store consistent). Others lock only within one client: do not run one store from several machines
there. A distributed executor builds on this module: a worker's claim on a step is this lock plus
the holder record (pid, host, time), to which it adds a heartbeat so that a claim of a lost machine
can be taken over without the kernel's help.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from lmclab.config import UsageError

LOCKS_DIR = ".locks"
TIMEOUT_ENV = "LMCLAB_LOCK_TIMEOUT"
POLL_SECONDS = 0.5
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockTimeout(TimeoutError):
    """A lock stayed held longer than the timeout; the message names the holder."""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a lock, as its lock file says."""

    pid: int
    host: str
    since: float  # seconds since the epoch
    what: str

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {when}"

    def to_text(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "since": self.since, "what": self.what}) + "\n"

    @staticmethod
    def parse(text: str) -> Holder | None:
        """The holder record in `text`; None for an empty or unreadable one."""
        try:
            obj: Any = json.loads(text)
            return Holder(int(obj["pid"]), str(obj["host"]), float(obj["since"]), str(obj["what"]))
        except (ValueError, KeyError, TypeError):
            return None


def lock_path(directory: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The lock file of the artifact at `directory`: `<root>/.locks/<directory below root>.lock`, or
    `<parent>/.locks/<name>.lock` when `directory` is not below `root` (or no root is given)."""
    directory = Path(directory)
    if root is not None:
        base = Path(root)
        try:
            rel = directory.resolve().relative_to(base.resolve())
        except ValueError:
            rel = None
        if rel is not None and rel.parts and LOCKS_DIR not in rel.parts:
            return base / LOCKS_DIR / rel.parent / f"{rel.name}.lock"
    return directory.parent / LOCKS_DIR / f"{directory.name}.lock"


def is_locked(directory: str | os.PathLike, root: str | os.PathLike | None = None) -> bool:
    """Whether some process (this one included) holds the lock of the artifact at `directory` now:
    a non-blocking flock on the lock file is refused. False where there is no lock file or flock is
    unsupported."""
    path = lock_path(directory, root)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_timeout_from_env() -> float | None:
    """$LMCLAB_LOCK_TIMEOUT in seconds (unset or empty: wait forever)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"${TIMEOUT_ENV}={text!r}: allowed: a number of seconds >= 0 (unset: wait forever)")
    return value


# (lock file, thread) -> [descriptor or None when unsupported, nesting depth]
_HELD: dict[tuple[str, int], list[Any]] = {}
_HELD_GUARD = threading.Lock()
_warned_unsupported: set[str] = set()


class ArtifactLock:
    """An exclusive lock on one artifact (see the module docstring); a context manager.

    After `acquire`: `waited` is True if another process held the lock first (look at the store again),
    `waited_for` is the last holder seen while waiting, `took_over` the holder of a lock left by a
    process that died."""

    def __init__(
        self,
        path: str | os.PathLike,
        what: str,
        *,
        timeout: float | None = None,
        say: Callable[[str], None] | None = None,
        poll: float = POLL_SECONDS,
    ) -> None:
        self.path = Path(path)
        self.what = what
        self.timeout = lock_timeout_from_env() if timeout is None else timeout
        self.say = say or _stderr
        self.poll = poll
        self.waited = False
        self.waited_for: Holder | None = None
        self.took_over: Holder | None = None
        self._key: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"ArtifactLock({str(self.path)!r}, {self.what!r})"

    def holder(self) -> Holder | None:
        """The holder record in the lock file now (None if free, or held by a process that has not yet
        written it). For messages only: the lock itself is the flock."""
        try:
            return Holder.parse(self.path.read_text())
        except OSError:
            return None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> ArtifactLock:
        """Take the lock, waiting as long as the timeout allows; LockTimeout names the holder."""
        if self._key is not None:
            raise RuntimeError(f"{self!r} is already acquired through this object")
        key = (str(self.path.resolve()), threading.get_ident())
        with _HELD_GUARD:
            if key in _HELD:  # re-entered by the thread that holds it
                _HELD[key][1] += 1
                self._key = key
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            locked = self._wait(fd)
            if locked:
                self._claim(fd)
        except BaseException:
            os.close(fd)
            raise
        if not locked:  # flock unsupported here: go on without it
            os.close(fd)
        with _HELD_GUARD:
            _HELD[key] = [fd if locked else None, 1]
        self._key = key
        return self

    def _wait(self, fd: int) -> bool:
        """flock `fd`, polling while another process holds it; False if the filesystem refuses flock."""
        start = time.monotonic()
        announced: Holder | None = None
        said_anything = False
        delay = min(0.05, self.poll)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._warn_unsupported(exc)
                return False
            holder = self.holder()
            # A holder writes its record just after taking the flock: on the first refusal an empty
            # record usually means "just taken", so wait one poll before saying "another process".
            first_look = not self.waited
            if (holder is not None and holder != announced) or (
                holder is None and not first_look and not said_anything
            ):
                self.say(f"waiting for {self.what} held by {holder.describe() if holder else 'another process'} …")
                announced = holder
                said_anything = True
            self.waited = True
            self.waited_for = holder or self.waited_for
            waited = time.monotonic() - start
            if self.timeout is not None and waited >= self.timeout:
                raise LockTimeout(
                    f"{self.what} is still held by {holder.describe() if holder else 'another process'} after "
                    f"{waited:.0f} s (lock file {self.path}; timeout from ${TIMEOUT_ENV} or the caller)"
                )
            pause = delay if self.timeout is None else min(delay, max(0.0, self.timeout - waited))
            time.sleep(pause)
            delay = min(delay * 2, self.poll)

    def _claim(self, fd: int) -> None:
        """Note a holder that died holding the lock, then write this process's holder record."""
        with os.fdopen(os.dup(fd), "r+") as fh:
            left = Holder.parse(fh.read())
            if left is not None and left.pid != os.getpid():
                self.took_over = left
                self.say(
                    f"{self.what}: its lock was left by {left.describe()}, which ended without releasing it; "
                    "taking it over"
                )
            fh.seek(0)
            fh.truncate()
            fh.write(Holder(os.getpid(), socket.gethostname(), time.time(), self.what).to_text())
            fh.flush()

    def _warn_unsupported(self, exc: OSError) -> None:
        where = str(self.path.parent)
        if where not in _warned_unsupported:
            _warned_unsupported.add(where)
            warnings.warn(
                f"file locking is not supported in {where} ({exc.strerror}); going on without locks: "
                "two identical commands at once may both do the work",
                RuntimeWarning,
                stacklevel=4,
            )

    def release(self) -> None:
        """Give the lock back (the outermost release of a re-entered lock frees it)."""
        key, self._key = self._key, None
        if key is None:
            return
        with _HELD_GUARD:
            entry = _HELD[key]
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[key]
        fd = entry[0]
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly (not left by a dead holder)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> ArtifactLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def artifact_lock(
    directory: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    what: str | None = None,
    timeout: float | None = None,
    say: Callable[[str], None] | None = None,
) -> ArtifactLock:
    """The lock of the artifact at `directory` of the store at `root` (not yet acquired: use `with`).

    `what` names it in messages (default: the directory's name)."""
    return ArtifactLock(lock_path(directory, root), what or Path(directory).name, timeout=timeout, say=say)
