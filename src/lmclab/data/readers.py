"""File-format readers: IDX (MNIST family), official CIFAR pickles, image folders (dir or zip)."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import pickle
import secrets
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .fingerprint import content_fingerprint, memoised, stat_signature
from .registry import DataError
from .sources import bytes_digest, cache_dir, check_digest

# ---------------------------------------------------------------- IDX


def parse_idx(data: bytes, path: Path | str) -> np.ndarray:
    """Parse an uncompressed IDX (unsigned byte) file; DataError naming ``path`` if malformed or truncated."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{path}: unsupported IDX element type 0x{data[2]:02x} (only unsigned bytes, 0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: file is truncated ({len(data)} bytes, shorter than its own header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count
    if len(data) < expected:
        raise DataError(
            f"{path}: file is truncated: its header says shape {tuple(dims)} ({expected} bytes) "
            f"but it has only {len(data)} bytes"
        )
    if len(data) > expected:
        raise DataError(
            f"{path}: file size disagrees with its header: shape {tuple(dims)} needs {expected} bytes, "
            f"the file has {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims).copy()


def read_idx(path: Path, sha256: str | None, gz_md5: str | None) -> np.ndarray:
    """Read a verified IDX file: ``.gz`` files are checked against ``gz_md5``, uncompressed ones against
    ``sha256`` (after the header/size check, so truncation is reported as such)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if path.suffix == ".gz":
        check_digest(path, "md5", gz_md5, bytes_digest(raw, "md5"))
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from e
        return parse_idx(raw, path)
    array = parse_idx(raw, path)
    check_digest(path, "sha256", sha256, bytes_digest(raw, "sha256"))
    return array


# ---------------------------------------------------------------- CIFAR pickles (restricted)


def _numpy_attr(modules: tuple[str, ...], attr: str) -> Callable[[], Any]:
    """Lazy resolver for a numpy internal that moved between numpy 1.x and 2.x."""

    def resolve() -> Any:
        for mod in modules:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError):
                continue
        raise DataError(f"numpy provides no {attr} in {modules}")

    return resolve


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_reconstruct = _numpy_attr(_MULTIARRAY, "_reconstruct")
_frombuffer = _numpy_attr(_NUMERIC, "_frombuffer")
# Exactly the globals that pickled numpy arrays (and Python-3 protocol-2 bytes) need; nothing else loads.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals in ``ALLOWED_GLOBALS`` (numpy array reconstruction)."""

    def find_class(self, module: str, name: str) -> Any:
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise DataError(f"refusing to unpickle the global {module}.{name} (not part of a CIFAR data file)")
        return resolve()


def load_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one official CIFAR batch file: images uint8 (n, 3, 32, 32) and labels int64 (n,)."""
    try:
        with open(path, "rb") as f:
            entry = RestrictedUnpickler(f, encoding="bytes").load()
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a broken file
        raise DataError(f"{path}: not a readable CIFAR batch file ({type(e).__name__}: {e})") from e
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a dict, found {type(entry).__name__}")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (n, 3072)")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {label_key!r} is not a list of integers") from e
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {label_key!r} has {labels.size} entries for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------- image folders

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
_GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_CACHE_FORMAT = "1"


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Decode one image to uint8 (H, W) for greyscale or (H, W, 3) for colour; DataError naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L" if im.mode in _GREY_MODES else "RGB"))
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for broken files
        raise DataError(f"{where}: cannot decode image ({type(e).__name__}: {e})") from e


class ImageTree:
    """A ``train/<class>/*`` + ``test/<class>/*`` image tree in a directory or a zip file."""

    def __init__(self, root: Path):
        self.root = root
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if root.is_dir():
            names = sorted(
                p.relative_to(root).as_posix()
                for top in ("train", "test")
                if (root / top).is_dir()
                for p in (root / top).rglob("*")
                if p.is_file()
            )
        elif root.is_file():
            try:
                self._zip = zipfile.ZipFile(root)
                names = sorted(i.filename for i in self._zip.infolist() if not i.is_dir())
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{root}: not a readable zip file ({e})") from e
            tops = {n.split("/", 1)[0] for n in names}
            if not tops & {"train", "test"} and len(tops) == 1:  # tolerate one enclosing folder
                self._prefix = tops.pop() + "/"
                names = [n[len(self._prefix) :] for n in names]
        else:
            raise DataError(f"image folder {root} does not exist (expected a directory or a .zip)")
        self.files: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}  # split -> [(class, relpath)]
        for rel in names:
            parts = rel.split("/")
            if (
                len(parts) >= 3
                and parts[0] in self.files
                and Path(rel).suffix.lower() in IMAGE_SUFFIXES
                and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
            ):
                self.files[parts[0]].append((parts[1], rel))
        self.classes = tuple(sorted({c for c, _ in self.files["train"]}))
        if not self.classes:
            raise DataError(
                f"{root}: no images found under train/<class>/ (expected train/<class>/* and "
                "test/<class>/* image files)"
            )
        unknown = sorted({c for c, _ in self.files["test"]} - set(self.classes))
        if unknown:
            raise DataError(f"{root}: test/ has classes not present in train/: {unknown}")

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def read(self, rel: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self._prefix + rel)
        return (self.root / rel).read_bytes()

    def fingerprint(self) -> str:
        """The tree's content fingerprint (:func:`lmclab.data.fingerprint.content_fingerprint`): the relative
        path and the sha256 of the bytes of every image file it reads, the same for a directory and a zip of
        it. Memoised by the files' stat signature (a zip's own), so the files are read once until one changes."""
        rels = sorted(rel for split in ("train", "test") for _, rel in self.files[split])
        try:
            if self._zip is not None:
                signature: list[Any] = ["zip", str(self.root), self._prefix, stat_signature(self.root)]
            else:
                signature = ["dir", str(self.root), [[rel, *stat_signature(self.root / rel)] for rel in rels]]
        except OSError as e:
            raise DataError(f"{self.root}: cannot read the image folder ({e})") from e
        return memoised(signature, lambda: content_fingerprint((rel, self._read_checked(rel)) for rel in rels))

    def _read_checked(self, rel: str) -> bytes:
        try:
            return self.read(rel)
        except (OSError, zipfile.BadZipFile, zlib.error) as e:
            where = f"{self.root}/{rel}" if self._zip is None else f"{self.root}:{self._prefix}{rel}"
            raise DataError(f"{where}: cannot read ({e})") from e

    def decode(self, split: str, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """Decode a split: uint8 (N, C, H, W) in class order (then file name order), int64 labels."""
        files = sorted(self.files[split])
        if not files:
            raise DataError(f"{self.root}: no images found under {split}/<class>/")
        index = {c: i for i, c in enumerate(self.classes)}
        arrays: list[np.ndarray] = []
        first = ""
        for _cls, rel in tqdm(
            files, desc=f"Decoding {split} images of {self.root.name}", unit="img", disable=not progress, leave=False
        ):
            where = f"{self.root}/{rel}" if self._zip is None else f"{self.root}:{self._prefix}{rel}"
            try:
                raw = self.read(rel)
            except (OSError, zipfile.BadZipFile, zlib.error) as e:
                raise DataError(f"{where}: cannot read ({e})") from e
            img = decode_image(raw, where)
            if arrays and img.shape[:2] != arrays[0].shape[:2]:
                h, w = img.shape[:2]
                h0, w0 = arrays[0].shape[:2]
                raise DataError(
                    f"{where} is {w}x{h} but {first} is {w0}x{h0}: all images of an image "
                    "folder must have the same size (resize them first)"
                )
            first = first or where
            arrays.append(img)
        channels = 3 if any(a.ndim == 3 for a in arrays) else 1
        height, width = arrays[0].shape[:2]
        images = np.empty((len(arrays), channels, height, width), dtype=np.uint8)
        for i, a in enumerate(arrays):
            images[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]  # grey broadcasts to RGB if mixed
        labels = np.array([index[c] for c, _ in files], dtype=np.int64)
        return images, labels


def folder_fingerprint(root: Path) -> str:
    """The content fingerprint of the image folder (directory or zip) at `root` (see ``ImageTree.fingerprint``)."""
    tree = ImageTree(root)
    try:
        return tree.fingerprint()
    finally:
        tree.close()


def load_image_tree(
    root: Path, split: str, progress: bool, expected_classes: tuple[str, ...] | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Decoded split of an image tree, cached in ``cache_dir()/decoded/<key>.safetensors``."""
    tree = ImageTree(root)
    try:
        if expected_classes is not None and tree.classes != expected_classes:
            raise DataError(f"{root}: classes {list(tree.classes)} differ from the expected {list(expected_classes)}")
        key = f"imagefolder-v{_CACHE_FORMAT}-{tree.fingerprint()[:24]}-{split}"
        path = cache_dir() / "decoded" / f"{key}.safetensors"
        cached = _read_cache(path, tree.classes)
        if cached is not None:
            return cached[0], cached[1], tree.classes
        images, labels = tree.decode(split, progress)
    finally:
        tree.close()
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    _write_cache(
        path,
        x,
        y,
        {"classes": json.dumps(list(tree.classes)), "source": str(root), "split": split, "format": _CACHE_FORMAT},
    )
    return x, y, tree.classes


def _tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's data bytes (what the decoded cache records for each of its two tensors)."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()


def _read_cache(path: Path, classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached decoded split, verified against the sha256 of its tensors recorded when it was written.

    A cache is derived data: one that is unreadable, corrupt (its tensors differ from their checksums) or
    without checksums (written by an earlier lmclab) is named in a warning, not used, and rebuilt from
    the (checksum-verified) source files."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        if "sha256" not in meta:
            warnings.warn(f"decoded-image cache {path} has no checksums (older lmclab); decoding again", stacklevel=3)
            return None
        recorded = json.loads(meta["sha256"])
        corrupt = [name for name, t in (("images", images), ("labels", labels)) if _tensor_sha256(t) != recorded[name]]
        if corrupt:
            warnings.warn(
                f"decoded-image cache {path} is corrupt: its {' and '.join(corrupt)} differ from the checksum "
                "recorded when it was written; not used, decoding again",
                stacklevel=3,
            )
            return None
        ok = (
            tuple(json.loads(meta.get("classes", "null")) or ()) == classes
            and images.dtype == torch.uint8
            and images.ndim == 4
            and labels.dtype == torch.int64
            and labels.shape == images.shape[:1]
        )
    except Exception as e:  # noqa: BLE001 - a damaged cache file is simply rebuilt
        warnings.warn(f"ignoring unreadable decoded-image cache {path} ({e}); decoding again", stacklevel=3)
        return None
    return (images, labels) if ok else None


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor, meta: dict[str, str]) -> None:
    """Write the decoded cache atomically, with the sha256 of its tensors; failure to write only warns (the
    data is still returned). The file's mode is 0o666 less the umask, like any file the user creates."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        candidate = str(path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp")
        fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        tmp = candidate
        mode = os.fstat(fd).st_mode & 0o7777  # 0o666 less the umask
        os.close(fd)
        tensors = {"images": images.contiguous(), "labels": labels.contiguous()}
        meta = {**meta, "sha256": json.dumps({name: _tensor_sha256(t) for name, t in tensors.items()})}
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, mode)  # (safetensors writes 0600)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write decoded-image cache {path} ({e})", stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (population) of uint8 images (N, C, H, W), in [0, 1] units."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = hist.sum()
        mean = (hist * values).sum() / n
        var = (hist * (values - mean) ** 2).sum() / n
        means.append(float(mean))
        stds.append(float(var.sqrt()) or 1.0)  # a constant channel would otherwise normalise to inf
    return tuple(means), tuple(stds)
