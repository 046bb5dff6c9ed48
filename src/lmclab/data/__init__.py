"""Datasets for lmclab: MNIST, Fashion-MNIST, CIFAR-10/100 and image folders, as device-resident tensors.

Local copies are searched first (``default_data_dirs``), then the official files are downloaded into
``cache_dir()/data`` and verified by checksum. See ``load_split`` and ``DeviceDataset``.
"""

from .device import DeviceDataset, per_class_subset, stratified_subset
from .loading import load_split
from .registry import DATASET_NAMES, DataError, DatasetInfo
from .sources import cache_dir, default_data_dirs

__all__ = [
    "DATASET_NAMES",
    "DataError",
    "DatasetInfo",
    "DeviceDataset",
    "cache_dir",
    "default_data_dirs",
    "load_split",
    "per_class_subset",
    "stratified_subset",
]
