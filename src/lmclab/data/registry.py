"""The dataset registry: one :class:`DatasetEntry` per named dataset in :data:`DATASETS`, and constants.

An entry is the dataset's static :class:`DatasetInfo` plus its source: where its files live in a known file
format, with their names per split, checksums, download mirrors and offline fallbacks (:class:`IdxSource`,
:class:`CifarSource`; ``loading.FORMAT_LOADERS`` reads each format). Adding a dataset in a known format is
one entry and one :func:`register_dataset` call; :data:`DATASET_NAMES` follows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

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
    # Identity of the split as loaded (before any subset; lmclab.data.fingerprint); None in static entries.
    fingerprint: str | None = None  # sha256 of its uint8 images and labels
    examples: int | None = None  # its size
    folder_fingerprint: str | None = None  # image folders: the folder's content fingerprint


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
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Seconds a download may wait for the server (per connection attempt and read).
DOWNLOAD_TIMEOUT_S: float = 60.0


# ---------------------------------------------------------------- sources: one dataclass per file format


@dataclass(frozen=True)
class IdxSource:
    """MNIST-family IDX files, in torchvision's layout: ``DIR/<folder>/raw/<file>`` (or ``<file>.gz``).

    Downloads fetch ``<file>.gz`` from each mirror in turn into ``cache_dir()/data/<folder>/raw``.
    """

    folder: str
    files: Mapping[str, tuple[str, str]]  # split -> (images, labels), uncompressed names
    sha256: Mapping[str, str] = field(default_factory=dict)  # uncompressed file -> sha256
    gz_md5: Mapping[str, str] = field(default_factory=dict)  # "<file>.gz" -> md5 of the official gzipped file
    mirrors: tuple[str, ...] = ()  # download base URLs, tried in order (after $LMCLAB_DATASET_MIRROR)

    def __post_init__(self) -> None:
        _check_splits(self.files, "IdxSource")


@dataclass(frozen=True)
class CifarSource:
    """Pickled CIFAR batches: the extracted official archive ``DIR/<folder>/<batch>`` or its tarball
    ``DIR/<tarball>`` (extracted into ``cache_dir()/data/<folder>``); optionally, offline, an image-folder zip.
    """

    folder: str  # the archive's top folder, holding the batch files
    tarball: str
    tarball_md5: str | None
    files: Mapping[str, tuple[str, ...]]  # split -> batch files, concatenated in this order
    label_key: str  # the batches' label entry ("labels", "fine_labels")
    md5: Mapping[str, str] = field(default_factory=dict)  # batch file -> md5
    mirrors: tuple[str, ...] = ()  # download base URLs for the tarball, tried in order (after $LMCLAB_DATASET_MIRROR)
    image_zip: tuple[str, str] | None = None  # offline fallback: (file name, sha256) of an image-folder zip

    def __post_init__(self) -> None:
        _check_splits(self.files, "CifarSource")


def _check_splits(files: Mapping[str, Any], what: str) -> None:
    missing = [s for s in SPLITS if s not in files]
    if missing:
        raise ValueError(f"{what} declares no files for split(s) {', '.join(missing)}")


#: A dataset's source: any of the format dataclasses above (each has a loader in ``loading.FORMAT_LOADERS``).
DatasetSource = IdxSource | CifarSource


@dataclass(frozen=True)
class DatasetEntry:
    """A named dataset: its static info (``info.source`` is filled in by the loader) and where its files are."""

    name: str
    info: DatasetInfo
    source: DatasetSource


#: The named datasets, in registration order.
DATASETS: dict[str, DatasetEntry] = {}


def normalise_name(name: str) -> str:
    """The canonical form of a dataset name: stripped, lower case, ``-`` as ``_`` (``Fashion-MNIST``)."""
    return name.strip().lower().replace("-", "_")


def register_dataset(entry: DatasetEntry) -> DatasetEntry:
    """Register ``entry`` under ``entry.name`` (canonical, equal to ``entry.info.name``, not taken yet)."""
    name = entry.name
    if not name or name != normalise_name(name) or ":" in name:
        raise ValueError(f"dataset name {name!r} must be non-empty, lower case, with '_' for '-' and no ':'")
    if entry.info.name != name:
        raise ValueError(f"dataset {name!r}: its info is named {entry.info.name!r}")
    if name in DATASETS:
        raise ValueError(f"dataset {name!r} is already registered")
    DATASETS[name] = entry
    return entry


class _Names(Sequence[str]):
    """The registered dataset names, in registration order: a live read-only view of :data:`DATASETS` that
    compares equal to the tuple of the same names."""

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...

    def __getitem__(self, index: int | slice) -> str | tuple[str, ...]:
        return tuple(DATASETS)[index]

    def __len__(self) -> int:
        return len(DATASETS)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(DATASETS))

    def __contains__(self, name: object) -> bool:
        return name in DATASETS

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (tuple, _Names)):
            return tuple(self) == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(self))


class _Infos(Mapping[str, DatasetInfo]):
    """Name -> static info of the registered datasets: a live read-only view of :data:`DATASETS`."""

    def __getitem__(self, name: str) -> DatasetInfo:
        return DATASETS[name].info

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(DATASETS))

    def __len__(self) -> int:
        return len(DATASETS)


#: Names accepted by the loaders (besides ``imagefolder:<path>``): the registered datasets, in order (live).
DATASET_NAMES: Sequence[str] = _Names()
#: The registered datasets' static info by name (live; the loader fills in ``source``).
STATIC_INFO: Mapping[str, DatasetInfo] = _Infos()


# ---------------------------------------------------------------- the built-in datasets

#: The MNIST family's file names per split (Fashion-MNIST uses the same).
MNIST_FILES: Mapping[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# sha256 of the uncompressed IDX files (from shared/data/README.md; byte-identical to the official files);
# md5 of the official gzipped IDX files (the values torchvision's datasets/mnist.py uses).
register_dataset(
    DatasetEntry(
        "mnist",
        DatasetInfo("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), False, tuple(str(i) for i in range(10)), ""),
        IdxSource(
            folder="MNIST",
            files=MNIST_FILES,
            sha256={
                "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            },
            gz_md5={
                "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
            },
            mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        ),
    )
)

register_dataset(
    DatasetEntry(
        "fashion_mnist",
        DatasetInfo("fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), False, FASHION_MNIST_CLASSES, ""),
        IdxSource(
            folder="FashionMNIST",
            files=MNIST_FILES,
            sha256={
                "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            },
            gz_md5={
                "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
            },
            mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        ),
    )
)

# md5 of the tarballs and of the extracted batch files (the values torchvision's datasets/cifar.py uses).
register_dataset(
    DatasetEntry(
        "cifar10",
        DatasetInfo(
            "cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), True, CIFAR10_CLASSES, ""
        ),
        CifarSource(
            folder="cifar-10-batches-py",
            tarball="cifar-10-python.tar.gz",
            tarball_md5="c58f30108f718f92721af3b95e74349a",
            files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
            label_key="labels",
            md5={
                "data_batch_1": "c99cafc152244af753f735de768cd75f",
                "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                "test_batch": "40351d587109b95175f43aff81a1287e",
            },
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
            # a JPEG-recompressed image-folder zip (see shared/data/README.md)
            image_zip=("cifar10-jpeg.zip", "5b7649f4fe59055e3b83f4279687b854acaa998051522b0abfa361affb4636e8"),
        ),
    )
)

register_dataset(
    DatasetEntry(
        "cifar100",
        DatasetInfo(
            "cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), True, CIFAR100_CLASSES, ""
        ),
        CifarSource(
            folder="cifar-100-python",
            tarball="cifar-100-python.tar.gz",
            tarball_md5="eb9058c3a382ffc7106e4002c42a8d85",
            files={"train": ("train",), "test": ("test",)},
            label_key="fine_labels",
            md5={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
            mirrors=("https://www.cs.toronto.edu/~kriz/",),
        ),
    )
)
