"""Device-resident datasets (normalisation and augmentation on the device) and deterministic subsets."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .loading import load_split
from .registry import DataError, DatasetInfo

PAD = 4  # random-crop padding (torchvision RandomCrop(H, padding=4) with zero fill)


def _class_positions(labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(class, ascending positions of that class) for every class present in ``labels``."""
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
    y = labels.detach().to("cpu", torch.int64)
    return [(int(c), (y == c).nonzero().flatten()) for c in torch.unique(y)]


def stratified_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (ascending) of ``n`` examples keeping class proportions (largest-remainder rounding, ties to the
    lower class id), taking the first examples of each class in dataset order. Deterministic."""
    total = labels.numel()
    if not 0 <= n <= total:
        raise DataError(f"cannot take a subset of {n} examples from {total}")
    groups = _class_positions(labels)
    quotas = [n * len(pos) // total for _, pos in groups]
    remainders = [n * len(pos) % total for _, pos in groups]
    order = sorted(range(len(groups)), key=lambda i: (-remainders[i], groups[i][0]))
    for i in order[: n - sum(quotas)]:
        quotas[i] += 1
    picked = [pos[:q] for (_, pos), q in zip(groups, quotas)]
    out = torch.cat(picked) if picked else torch.empty(0, dtype=torch.int64)
    return out.sort().values.to(labels.device)


def per_class_subset(labels: torch.Tensor, n_per_class: int) -> torch.Tensor:
    """Indices (ascending) of the first ``n_per_class`` examples of every class present in ``labels``."""
    if n_per_class < 0:
        raise DataError(f"n_per_class must be >= 0, got {n_per_class}")
    groups = _class_positions(labels)
    short = [f"class {c}: {len(pos)}" for c, pos in groups if len(pos) < n_per_class]
    if short:
        raise DataError(f"cannot take {n_per_class} examples per class; too few in " + ", ".join(short))
    picked = [pos[:n_per_class] for _, pos in groups]
    out = torch.cat(picked) if picked else torch.empty(0, dtype=torch.int64)
    return out.sort().values.to(labels.device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class DeviceDataset:
    """A whole split resident on one device as uint8; batches are normalised (and augmented) on that device."""

    images: torch.Tensor  # uint8 (N, C, H, W) on device
    labels: torch.Tensor  # int64 (N,) on device
    info: DatasetInfo
    augment: bool

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, augment: bool = False):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise DataError(
                f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
            )
        if images.device != labels.device:
            raise DataError(f"images ({images.device}) and labels ({labels.device}) must be on one device")
        channels = images.shape[1]
        if len(info.mean) != channels or len(info.std) != channels:
            raise DataError(f"info has {len(info.mean)} mean / {len(info.std)} std values for {channels} channels")
        self.images, self.labels, self.info, self.augment = images.contiguous(), labels, info, bool(augment)
        self._mean = torch.tensor(info.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)

    @classmethod
    def load(
        cls,
        name: str,
        split: str,
        *,
        data_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        subset: int | None = None,
        per_class: int | None = None,
        augment: bool | None = None,
        download: bool = True,
        progress: bool = True,
        classes: tuple[int, ...] | None = None,
    ) -> DeviceDataset:
        """Load a split (see ``load_split``), optionally take a subset, and move it to ``device``.

        ``subset``: stratified subset of that many examples; ``per_class``: first that many of each class
        (mutually exclusive). ``augment=None`` means ``info.augment_default`` on train, off on test.
        ``classes``: keep only the examples of these classes (labels unchanged), before any subset.
        """
        if subset is not None and per_class is not None:
            raise DataError("subset and per_class are mutually exclusive; give at most one")
        images, labels, info = load_split(name, split, data_dir=data_dir, download=download, progress=progress)
        if classes is not None:
            bad = [c for c in classes if not 0 <= c < info.num_classes]
            if bad or not classes:
                raise DataError(f"classes {list(classes)}: {name} has classes 0…{info.num_classes - 1}")
            keep = torch.isin(labels, torch.tensor(sorted(classes), dtype=labels.dtype)).nonzero().flatten()
            images, labels = images[keep], labels[keep]
        if subset is not None:
            idx = stratified_subset(labels, subset)
            images, labels = images[idx], labels[idx]
        elif per_class is not None:
            idx = per_class_subset(labels, per_class)
            images, labels = images[idx], labels[idx]
        if augment is None:
            augment = info.augment_default and split == "train"
        return cls(images.to(device), labels.to(device), info, augment)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        return self.images.shape[0]

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """float32 ``(x / 255 - mean) / std`` per channel, on the dataset's device."""
        if images_uint8.dtype != torch.uint8:
            raise DataError(f"normalize expects uint8 images, got {images_uint8.dtype}")
        x = images_uint8.to(self.device, torch.float32).div_(255.0)
        return x.sub_(self._mean).div_(self._std)

    def random_crop_flip(self, images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pad-4 (black) random crop back to H×W, then horizontal flip with p=0.5, vectorised over the batch.

        Draws, in order, the row offsets, the column offsets (each in 0..8) and the flip coins from
        ``generator``, which must live on the dataset's device; the same generator state gives the same output.
        """
        if not _same_device(generator.device, self.device):
            raise DataError(
                f"the generator is on {generator.device} but the data is on {self.device}; "
                f"create it with torch.Generator(device={str(self.device)!r})"
            )
        b, c, h, w = images_uint8.shape
        dev = self.device
        padded = F.pad(images_uint8, (PAD, PAD, PAD, PAD))
        top = torch.randint(0, 2 * PAD + 1, (b,), generator=generator, device=dev)
        left = torch.randint(0, 2 * PAD + 1, (b,), generator=generator, device=dev)
        flip = torch.rand(b, generator=generator, device=dev) < 0.5
        cols = torch.arange(w, device=dev)
        rows = top[:, None] + torch.arange(h, device=dev)  # (b, h)
        cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (b, w)
        return padded[
            torch.arange(b, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]

    def batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 images (N, C, H, W) and int64 labels for ``indices``.

        Augmented (``random_crop_flip``) only if ``self.augment`` and a ``generator`` (on the data's device) is given.
        """
        idx = torch.as_tensor(indices, device=self.device, dtype=torch.int64)
        x = self.images[idx]
        if self.augment and generator is not None:
            x = self.random_crop_flip(x, generator)
        return self.normalize(x), self.labels[idx]

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All examples in order, un-augmented, ``batch_size`` at a time (the last batch may be smaller)."""
        if batch_size <= 0:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.normalize(self.images[start : start + batch_size]), self.labels[start : start + batch_size]
