"""Datasets for lmclab: MNIST, Fashion-MNIST, CIFAR-10/100 and image folders, as device-resident tensors.

Local copies are searched first (``default_data_dirs``), then the official files are downloaded into
``cache_dir()/data`` and verified by checksum. See ``load_split`` and ``DeviceDataset``.
"""

from .device import DeviceDataset, per_class_subset, stratified_subset
from .fingerprint import data_fingerprint, short_fingerprint, split_fingerprint
from .loading import imagefolder_root, load_split
from .readers import folder_fingerprint
from .registry import DATASET_NAMES, IMAGEFOLDER_PREFIX, DataError, DatasetInfo
from .sources import cache_dir, default_data_dirs

__all__ = [
    "DATASET_NAMES",
    "IMAGEFOLDER_PREFIX",
    "DataError",
    "DatasetInfo",
    "DeviceDataset",
    "cache_dir",
    "data_fingerprint",
    "default_data_dirs",
    "folder_fingerprint",
    "imagefolder_root",
    "load_split",
    "per_class_subset",
    "short_fingerprint",
    "split_fingerprint",
    "stratified_subset",
]
