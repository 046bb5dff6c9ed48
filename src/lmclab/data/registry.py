"""The dataset registry: named datasets (:data:`STATIC_INFO`, one entry each), constants, and the per-format
file, URL and checksum tables (plain data, so tests can monkeypatch them).

Adding a dataset in a known format: one :data:`STATIC_INFO` entry plus its rows in that format's tables
(IDX: ``IDX_FOLDERS``, ``IDX_SHA256``, …; CIFAR: ``CIFAR_*``) and ``MIRRORS``; :data:`DATASET_NAMES`
follows.
"""
from __future__ import annotations

from dataclasses import dataclass

IMAGEFOLDER_PREFIX = "imagefolder:"
SPLITS: tuple[str, ...] = ("train", "test")

# Environment variables.
ENV_DATA_DIR = "LMCLAB_DATA_DIR"
ENV_CACHE_DIR = "LMCLAB_CACHE_DIR"
ENV_MIRROR = "LMCLAB_DATASET_MIRROR"


class DataError(Exception):
    """A dataset could not be found, downloaded, verified or decoded; the message says what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a loaded dataset split."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    augment_default: bool  # pad-4 random crop + horizontal flip by default on the train split
    classes: tuple[str, ...]
    source: str  # where the data came from


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
    maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
    plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail
    snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout
    tulip turtle wardrobe whale willow_tree wolf woman worm""".split()
)
assert len(CIFAR100_CLASSES) == 100
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: The named datasets: everything about each except where it was loaded from (the loader fills in source).
STATIC_INFO: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), False,
                         tuple(str(i) for i in range(10)), ""),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), False,
                                 FASHION_MNIST_CLASSES, ""),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True,
                           CIFAR10_CLASSES, ""),
    "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True,
                            CIFAR100_CLASSES, ""),
}

#: Names accepted by the loaders (besides ``imagefolder:<path>``): the registered datasets, in order.
DATASET_NAMES: tuple[str, ...] = tuple(STATIC_INFO)

# ---------------------------------------------------------------- MNIST family (IDX files)
# Folder below each search dir (torchvision's layout: <dir>/<folder>/raw/<file>).
IDX_FOLDERS: dict[str, str] = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
IDX_FILES: dict[str, tuple[str, str]] = {  # split -> (images, labels), uncompressed names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# sha256 of the uncompressed IDX files (from shared/data/README.md; byte-identical to the official files).
IDX_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    "fashion_mnist": {
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
}
# md5 of the official gzipped IDX files (the values torchvision's datasets/mnist.py uses).
IDX_GZ_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

# ---------------------------------------------------------------- CIFAR (pickled batches)
CIFAR_TARBALLS: dict[str, tuple[str, str]] = {  # name -> (tarball file name, md5)
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
CIFAR_FOLDERS: dict[str, str] = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_SPLIT_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "cifar10": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "cifar100": {"train": ("train",), "test": ("test",)},
}
CIFAR_LABEL_KEY: dict[str, str] = {"cifar10": "labels", "cifar100": "fine_labels"}
# md5 of the extracted batch files (the values torchvision's datasets/cifar.py uses).
CIFAR_FILES_MD5: dict[str, dict[str, str]] = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    },
}
# Offline fallback for CIFAR-10: a JPEG-recompressed image-folder zip (see shared/data/README.md).
CIFAR10_JPEG_ZIP: tuple[str, str] = (
    "cifar10-jpeg.zip", "5b7649f4fe59055e3b83f4279687b854acaa998051522b0abfa361affb4636e8",
)

# ---------------------------------------------------------------- download mirrors, tried in order
# $LMCLAB_DATASET_MIRROR (if set) is tried before these for every file.
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
}
DOWNLOAD_TIMEOUT_S: float = 60.0
