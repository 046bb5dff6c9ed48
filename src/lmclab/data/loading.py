"""``load_split``: resolve a dataset name to verified local files (or a download) and read one split.

A registered dataset (``registry.DATASETS``) is read by the loader of its source's format
(:data:`FORMAT_LOADERS`); ``imagefolder:<path>`` names a directory or zip of images instead.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import registry
from .fingerprint import split_fingerprint
from .readers import channel_stats, folder_fingerprint, load_cifar_batch, load_image_tree, read_idx
from .registry import CifarSource, DataError, DatasetEntry, DatasetInfo, IdxSource
from .sources import check_file, default_data_dirs, download, download_dir, extract_tar_folder, not_found_error

SplitData = tuple[torch.Tensor, torch.Tensor, DatasetInfo]
Arrays = tuple[torch.Tensor, torch.Tensor]
Loaded = tuple[torch.Tensor, torch.Tensor, str]  # images, labels, where they were read from


def imagefolder_root(name: str) -> Path | None:
    """The absolute path an ``imagefolder:<path>`` name reads (``~`` expanded); None for a named dataset."""
    if not name.startswith(registry.IMAGEFOLDER_PREFIX):
        return None
    if not name[len(registry.IMAGEFOLDER_PREFIX) :]:
        raise DataError("imagefolder: needs a path, e.g. 'imagefolder:/data/pets' or 'imagefolder:pets.zip'")
    return Path(name[len(registry.IMAGEFOLDER_PREFIX) :]).expanduser().absolute()


def _canonical_name(name: str) -> str:
    if imagefolder_root(name) is not None:
        return name
    canon = registry.normalise_name(name)
    if canon not in registry.DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; valid names: {', '.join(registry.DATASET_NAMES)}, "
            f"or {registry.IMAGEFOLDER_PREFIX}<path> (a directory or .zip with train/<class>/* and "
            "test/<class>/* images)"
        )
    return canon


def load_split(
    name: str, split: str, *, data_dir: str | os.PathLike | None = None, download: bool = True, progress: bool = True
) -> SplitData:
    """Load one split as CPU tensors: images uint8 (N, C, H, W) contiguous, labels int64 (N,), and its info.

    Local copies in ``default_data_dirs(data_dir)`` are preferred (in search order); otherwise the official
    files are downloaded (if ``download``) into ``cache_dir()/data``. ``imagefolder:<path>`` reads that path
    (``data_dir``/``download`` do not apply); its normalisation statistics come from its train split, which is
    therefore decoded (and cached) too when the test split is requested. Raises DataError on bad input.
    """
    canon = _canonical_name(name)
    if split not in registry.SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(registry.SPLITS)}")
    if canon.startswith(registry.IMAGEFOLDER_PREFIX):
        images, labels, info = _load_imagefolder(canon, split, progress)
        return images, labels, _identified(info, images, labels)
    entry = registry.DATASETS[canon]
    loader = FORMAT_LOADERS.get(type(entry.source))
    if loader is None:
        raise DataError(f"dataset {canon!r}: no loader for its source format {type(entry.source).__name__}")
    images, labels, source = loader(entry, entry.source, split, default_data_dirs(data_dir), download, progress)
    info = dataclasses.replace(entry.info, source=source)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(f"{source}: labels outside 0..{info.num_classes - 1}")
    if tuple(images.shape[1:]) != info.input_shape:
        raise DataError(f"{source}: images have shape {tuple(images.shape[1:])}, expected {info.input_shape}")
    images = images.contiguous()
    return images, labels, _identified(info, images, labels)


def _identified(info: DatasetInfo, images: torch.Tensor, labels: torch.Tensor) -> DatasetInfo:
    """`info` with the split's identity as loaded: its fingerprint and size (lmclab.data.fingerprint)."""
    return dataclasses.replace(info, fingerprint=split_fingerprint(images, labels), examples=int(labels.numel()))


def _warn_skipped(message: str) -> None:
    warnings.warn(f"{message} Looking for another copy.", stacklevel=4)


# ---------------------------------------------------------------- MNIST family


def _load_idx(
    entry: DatasetEntry, src: IdxSource, split: str, dirs: list[Path], allow_download: bool, progress: bool
) -> Loaded:
    name, folder = entry.name, src.folder
    tried: list[str] = []
    found: list[tuple[np.ndarray, Path] | None] = []
    for fname in src.files[split]:  # look for every file before failing, so the error lists all places
        hit = _find_idx(src, fname, dirs, tried)
        if hit is None and allow_download:
            dest = download_dir() / folder / "raw" / f"{fname}.gz"
            if download(src.mirrors, f"{fname}.gz", dest, src.gz_md5.get(f"{fname}.gz"), progress, tried):
                hit = _read_idx_candidate(src, dest, tried)
        found.append(hit)
    if any(hit is None for hit in found):
        files = ", ".join(src.files[split])
        raise not_found_error(
            f"{name} ({split} split)",
            tried,
            f"DIR/{folder}/raw/<file> for each of {files} (uncompressed, or as <file>.gz)",
            allow_download,
        )
    (images, images_path), (labels, labels_path) = found  # type: ignore[misc]
    paths = [images_path, labels_path]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"{paths[0]} and {paths[1]} do not form an image/label pair (shapes {images.shape} and {labels.shape})"
        )
    return (
        torch.from_numpy(images).unsqueeze(1).contiguous(),
        torch.from_numpy(labels.astype(np.int64)),
        str(paths[0].parent),
    )


def _read_idx_candidate(src: IdxSource, path: Path, tried: list[str]) -> tuple[np.ndarray, Path] | None:
    plain = path.name.removesuffix(".gz")
    try:
        return read_idx(path, src.sha256.get(plain), src.gz_md5.get(f"{plain}.gz")), path
    except DataError as e:
        tried.append(str(e))
        _warn_skipped(str(e))
        return None


def _find_idx(src: IdxSource, fname: str, dirs: list[Path], tried: list[str]) -> tuple[np.ndarray, Path] | None:
    for d in dirs:
        raw = d / src.folder / "raw"
        for path in (raw / fname, raw / f"{fname}.gz"):
            if not path.is_file():
                tried.append(f"{path}: not found")
                continue
            found = _read_idx_candidate(src, path, tried)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------- CIFAR


def _read_cifar_folder(src: CifarSource, split: str, folder: Path) -> Arrays:
    """Verify (md5) then read the batch files of ``split`` in an extracted official CIFAR folder."""
    files = src.files[split]
    for f in files:
        if not (folder / f).is_file():
            raise DataError(f"{folder / f}: not found")
        check_file(folder / f, "md5", src.md5.get(f))
    parts = [load_cifar_batch(folder / f, src.label_key) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _load_cifar(
    entry: DatasetEntry, src: CifarSource, split: str, dirs: list[Path], allow_download: bool, progress: bool
) -> Loaded:
    name, folder, tar_name, tar_md5 = entry.name, src.folder, src.tarball, src.tarball_md5
    tried: list[str] = []

    def attempt(fn: Callable[..., Arrays], *args: object) -> Arrays | None:
        try:
            return fn(*args)
        except DataError as e:
            tried.append(str(e))
            _warn_skipped(str(e))
            return None

    def from_tarball(tar: Path) -> Arrays:
        extracted = download_dir() / folder
        if extracted.is_dir():  # extracted earlier: use it if it verifies
            try:
                return _read_cifar_folder(src, split, extracted)
            except DataError:
                pass
        check_file(tar, "md5", tar_md5)
        return _read_cifar_folder(src, split, extract_tar_folder(tar, folder, download_dir()))

    for d in dirs:  # official copies first, in search order
        for path, reader in ((d / folder, _read_cifar_folder), (d / tar_name, None)):
            if not path.exists():
                tried.append(f"{path}: not found")
                continue
            result = attempt(from_tarball, path) if reader is None else attempt(reader, src, split, path)
            if result is not None:
                return (*result, str(path))
    if src.image_zip is not None:  # offline fallback: an image-folder zip (CIFAR-10: JPEG-recompressed)
        zip_name, zip_sha = src.image_zip
        for d in dirs:
            path = d / zip_name
            if not path.is_file():
                tried.append(f"{path}: not found")
                continue
            try:
                check_file(path, "sha256", zip_sha)
                images, labels, _ = load_image_tree(path, split, progress, entry.info.classes)
                return images, labels, f"{path} (JPEG-recompressed copy)"
            except DataError as e:
                tried.append(str(e))
                _warn_skipped(str(e))
    if allow_download:
        dest = download_dir() / tar_name
        if download(src.mirrors, tar_name, dest, tar_md5, progress, tried):
            result = attempt(from_tarball, dest)
            if result is not None:
                return (*result, str(dest))
    files = ", ".join(src.files[split])
    layout = f"DIR/{folder}/ (the extracted official archive, holding {files}) or DIR/{tar_name}"
    if src.image_zip is not None:
        layout += f", or (offline fallback) DIR/{src.image_zip[0]}"
    raise not_found_error(f"{name} ({split} split)", tried, layout, allow_download)


#: The loader of each source format: loader(entry, entry.source, split, search dirs, allow_download, progress).
FORMAT_LOADERS: dict[type, Callable[..., Loaded]] = {IdxSource: _load_idx, CifarSource: _load_cifar}


# ---------------------------------------------------------------- image folders


def _load_imagefolder(name: str, split: str, progress: bool) -> SplitData:
    root = imagefolder_root(name)
    assert root is not None
    images, labels, classes = load_image_tree(root, split, progress)
    train = images if split == "train" else load_image_tree(root, "train", progress)[0]
    if train.shape[1:] != images.shape[1:]:
        raise DataError(
            f"{root}: {split} images have shape {tuple(images.shape[1:])} but train images have "
            f"{tuple(train.shape[1:])}; both splits must share size and channels"
        )
    mean, std = channel_stats(train)
    shape = tuple(int(s) for s in images.shape[1:])
    info = DatasetInfo(
        name=name,
        num_classes=len(classes),
        input_shape=shape,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        augment_default=shape[0] == 3,
        classes=classes,
        source=str(root),
        folder_fingerprint=folder_fingerprint(root),
    )
    return images.contiguous(), labels, info
