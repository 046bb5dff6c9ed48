"""Where data files live: search dirs, checksums, downloads and safe archive extraction."""

from __future__ import annotations

import hashlib
import http.client
import os
import secrets
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from . import registry
from .registry import DataError

_USER_AGENT = "lmclab-data/0.1 (+urllib)"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The cache root: ``$LMCLAB_CACHE_DIR`` or ``~/.cache/lmclab``.

    Downloads go to ``cache_dir()/data``, decoded image arrays to ``cache_dir()/decoded``.
    """
    env = os.environ.get(registry.ENV_CACHE_DIR, "").strip()
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "lmclab").absolute()


def download_dir() -> Path:
    """Where downloaded official files are stored (the last search dir)."""
    return cache_dir() / "data"


def default_data_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for local copies, in order.

    The explicit ``data_dir`` (if given), then each entry of ``$LMCLAB_DATA_DIR`` (``os.pathsep``-separated),
    then ``cache_dir()/data`` (where downloads land). Duplicates are dropped.
    """
    dirs: list[Path] = []
    if data_dir is not None and str(data_dir) != "":
        dirs.append(Path(data_dir))
    for entry in os.environ.get(registry.ENV_DATA_DIR, "").split(os.pathsep):
        if entry.strip():
            dirs.append(Path(entry.strip()))
    dirs.append(download_dir())
    dirs = [d.expanduser().absolute() for d in dirs]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


# ---------------------------------------------------------------- checksums

_DIGEST_MEMO: dict[tuple[str, int, int, str], str] = {}


def bytes_digest(data: bytes, algo: str) -> str:
    """Hex digest of in-memory bytes."""
    return hashlib.new(algo, data, usedforsecurity=False).hexdigest()


def file_digest(path: Path, algo: str) -> str:
    """Hex digest of a file, memoised per (path, size, mtime) within this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, algo)
    if key not in _DIGEST_MEMO:
        h = hashlib.new(algo, usedforsecurity=False)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _DIGEST_MEMO[key] = h.hexdigest()
    return _DIGEST_MEMO[key]


def check_digest(what: str | Path, algo: str, expected: str | None, actual: str) -> None:
    """Raise DataError if ``actual`` differs from ``expected`` (``None``: no known checksum, accepted)."""
    if expected is not None and actual.lower() != expected.lower():
        raise DataError(
            f"{what}: {algo} checksum mismatch (expected {expected.lower()}, got {actual}); "
            "the file is corrupt or not the official one and was NOT used. Delete or replace it."
        )


def check_file(path: Path, algo: str, expected: str | None) -> None:
    """Verify a file on disk against a known digest (DataError naming the file on mismatch)."""
    if expected is not None:
        check_digest(path, algo, expected, file_digest(path, algo))


# ---------------------------------------------------------------- downloads


def mirror_urls(mirrors: Sequence[str], filename: str) -> list[str]:
    """URLs to try for ``filename``: ``$LMCLAB_DATASET_MIRROR`` first (if set), then the dataset's ``mirrors``."""
    bases = [os.environ.get(registry.ENV_MIRROR, "").strip(), *mirrors]
    return [b.rstrip("/") + "/" + filename for b in bases if b]


def _fetch(url: str, dest: Path, md5: str | None, progress: bool) -> None:
    """Download one URL to a temp file beside ``dest``, verify its md5, then move it into place (mode 0o666
    less the umask, like any file the user creates)."""
    tmp: Path | None = None
    try:
        candidate = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        tmp = candidate
        h = hashlib.new("md5", usedforsecurity=False)
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=registry.DOWNLOAD_TIMEOUT_S) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"Downloading {dest.name}",
                disable=not progress,
                leave=False,
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        actual = h.hexdigest()
        if md5 is not None and actual != md5.lower():
            raise DataError(f"{url}: md5 mismatch (expected {md5.lower()}, got {actual}); the download was discarded")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException, ValueError) as e:  # URLError, timeouts, bad URLs
        raise DataError(f"{url}: download failed ({type(e).__name__}: {e})") from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def download(
    mirrors: Sequence[str], filename: str, dest: Path, md5: str | None, progress: bool, tried: list[str]
) -> bool:
    """Try every mirror (see :func:`mirror_urls`) for ``filename`` until one yields a file with the right md5
    at ``dest``.

    Each failure is appended to ``tried``; returns whether a verified file is now at ``dest``.
    """
    urls = mirror_urls(mirrors, filename)
    if not urls:
        tried.append(f"(no download mirror configured for {filename})")
        return False
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        tried.append(f"{dest.parent}: cannot create download directory ({e})")
        return False
    for url in urls:
        try:
            _fetch(url, dest, md5, progress)
            return True
        except DataError as e:
            tried.append(str(e))
    return False


# ---------------------------------------------------------------- archives


def extract_tar_folder(tar_path: Path, folder: str, dest_root: Path) -> Path:
    """Safely extract the members under ``folder/`` of a tarball to ``dest_root/folder`` (atomically).

    Absolute names and ``..`` are refused; links and special files are skipped; Python's ``data`` extraction
    filter is applied where available.
    """
    final = dest_root / folder
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_root))
    try:
        with tarfile.open(tar_path, "r:*") as tf:
            members = []
            for m in tf.getmembers():
                parts = PurePosixPath(m.name).parts
                if m.name.startswith("/") or ".." in parts:
                    raise DataError(f"{tar_path}: refusing unsafe member name {m.name!r}")
                if parts[:1] == (folder,) and (m.isfile() or m.isdir()):
                    members.append(m)
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, members=members, filter="data")
            else:
                tf.extractall(tmp, members=members)
        if not (tmp / folder).is_dir():
            raise DataError(f"{tar_path}: archive has no {folder}/ folder")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp / folder, final)
        return final
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{tar_path}: could not extract ({type(e).__name__}: {e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- error messages


def not_found_error(label: str, tried: list[str], layout: str, download: bool) -> DataError:
    """A DataError listing every place looked and how to provide the data."""
    places = "\n".join(f"  - {t}" for t in tried) or "  (nothing)"
    dl = (
        f"allow downloading (download=True; needs internet access; files are stored under {download_dir()})"
        if not download
        else f"check the internet connection (downloads go to {download_dir()})"
    )
    return DataError(
        f"No usable copy of {label} was found.\nPlaces looked:\n{places}\n"
        f"To provide it, either {dl},\n"
        f"or put the files in a directory DIR and pass --data-dir DIR (data_dir=DIR) or set "
        f"{registry.ENV_DATA_DIR}=DIR (several directories separated by {os.pathsep!r}).\n"
        f"Expected layout: {layout}"
    )
