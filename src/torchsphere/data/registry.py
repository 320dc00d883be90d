"""``build_dataset``: the dataset registry, the file lookup and the synthetic smoke-test set. Nothing downloads.

Lookup for file-based datasets: an explicit ``data_dir`` is searched alone (it and its subfolders named like the
dataset: asking for a folder and silently reading another would hide a mistake). Without one: ``$TORCHSPHERE_DATA``
(and its subfolders named like the dataset), then system folders (``/usr/share/datasets/fashion-mnist`` for
Fashion-MNIST, from the Debian package ``dataset-fashion-mnist``). A miss raises :class:`DatasetNotFoundError` listing
every place searched and how to get the files.

Each dataset has a default batch augmentation (:data:`DEFAULT_AUGMENTS`): Fashion-MNIST, CIFAR-10 and image folders
a random horizontal flip, CIFAR-100 the ``cifar10+`` crop-and-flip recipe of the MHE code, MNIST, digits and
synthetic none. ``TrainConfig(augment=None)`` means this default, and the run's ``config.yaml`` records the name that
actually ran.
"""
from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .cifar import CIFAR10_FOLDER, CIFAR100_FOLDER, has_cifar_files, read_cifar10, read_cifar100
from .digits import DIGITS_MAX, read_digits
from .folder import read_image_folder
from .idx import has_mnist_files, read_mnist_split
from .splits import DatasetNotFoundError, DatasetSplits, check_fraction, check_limit, make_splits

ENV_VAR = "TORCHSPHERE_DATA"
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


@dataclass
class _Raw:
    """What a dataset entrypoint returns: raw pixels (uint8, or 0..``max_value``) before subsetting/normalizing."""

    train_x: object
    train_y: Tensor
    test_x: object
    test_y: Tensor
    classes: list[str]
    source: str
    augment: str
    max_value: float = 255.0


_DATASETS: dict[str, Callable[..., _Raw]] = {}
# the augmentation each dataset trains with when TrainConfig.augment is None (see the module docstring)
DEFAULT_AUGMENTS: dict[str, str] = {"fashion-mnist": "flip", "mnist": "none", "cifar10": "flip",
                                    "cifar100": "cifar10+", "digits": "none", "imagefolder": "flip",
                                    "synthetic": "none"}


def register_dataset(name: str, *,
                     augment: str | None = None) -> Callable[[Callable[..., _Raw]], Callable[..., _Raw]]:
    """Decorator adding a dataset entrypoint ``fn(data_dir, **options) -> _Raw``; duplicate names raise.

    Args:
        name: the registry name.
        augment: the dataset's default augmentation, recorded in :data:`DEFAULT_AUGMENTS` (what ``augment=None``
            trains with; the entry's ``_Raw.augment`` should agree). None: keep the table's entry, else ``"none"``.
    """
    def deco(fn: Callable[..., _Raw]) -> Callable[..., _Raw]:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = fn
        if augment is not None:
            DEFAULT_AUGMENTS[name] = augment
        return fn
    return deco


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`."""
    return list(_DATASETS)


def default_augment(name: str) -> str:
    """The augmentation dataset ``name`` trains with by default (``"none"`` for a dataset registered without one)."""
    if not isinstance(name, str) or name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {list_datasets()}")
    return DEFAULT_AUGMENTS.get(name, "none")


def candidate_dirs(data_dir: str | os.PathLike | None, subfolders: tuple[str, ...],
                   system: tuple[str, ...] = ()) -> list[Path]:
    """Folders to search, in order: ``data_dir`` and its ``subfolders`` alone when ``data_dir`` is given; else
    ``$TORCHSPHERE_DATA``, its subfolders, then ``system``."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        return [root, *(root / s for s in subfolders)]
    roots = [Path(os.environ[ENV_VAR]).expanduser()] if os.environ.get(ENV_VAR) else []
    dirs = [d for root in roots for d in (root, *(root / s for s in subfolders))]
    return dirs + [Path(s) for s in system]


def _locate(name: str, dirs: list[Path], found: Callable[[Path], bool], how: str) -> Path:
    for d in dirs:
        if d.is_dir() and found(d):
            return d
    looked = "\n".join(f"  - {d}" + ("" if d.is_dir() else " (does not exist)") for d in dirs) or \
        f"  (nowhere: no data_dir was given and ${ENV_VAR} is not set)"
    raise DatasetNotFoundError(
        f"dataset {name!r} not found. Looked in:\n{looked}\n"
        f"(pass data_dir / --data-dir, or set ${ENV_VAR}; a data_dir given is searched alone). To get it: {how}")


def _mnist_like(name: str, data_dir, subfolders: tuple[str, ...], system: tuple[str, ...], how: str,
                classes: list[str], augment: str) -> _Raw:
    directory = _locate(name, candidate_dirs(data_dir, subfolders, system), has_mnist_files, how)
    train_x, train_y = read_mnist_split(directory, "train")
    test_x, test_y = read_mnist_split(directory, "test")
    return _Raw(train_x, train_y, test_x, test_y, classes, str(directory), augment)


@register_dataset("fashion-mnist")
def _fashion_mnist(data_dir) -> _Raw:
    how = ("install the Debian/Ubuntu package (sudo apt-get install dataset-fashion-mnist, which puts the files in "
           f"{FASHION_MNIST_SYSTEM_DIR}), or copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
           "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
           "https://github.com/zalandoresearch/fashion-mnist into one of the folders above")
    subfolders = ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw")
    return _mnist_like("fashion-mnist", data_dir, subfolders, (FASHION_MNIST_SYSTEM_DIR,), how, FASHION_MNIST_CLASSES,
                       DEFAULT_AUGMENTS["fashion-mnist"])


@register_dataset("mnist")
def _mnist(data_dir) -> _Raw:
    how = ("copy train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
           "(.gz or not) from the MNIST database (http://yann.lecun.com/exdb/mnist/) into one of the folders above")
    return _mnist_like("mnist", data_dir, ("mnist", "MNIST", "MNIST/raw"), (), how, [str(i) for i in range(10)],
                       DEFAULT_AUGMENTS["mnist"])


def _cifar_how(archive: str, folder: str) -> str:
    return (f"download the python version {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
            f"(tar xzf {archive}) so that its folder {folder}/ sits in, or is, one of the folders above")


@register_dataset("cifar10")
def _cifar10(data_dir) -> _Raw:
    dirs = candidate_dirs(data_dir, (CIFAR10_FOLDER,))
    directory = _locate("cifar10", dirs, lambda d: has_cifar_files(d, "cifar10"),
                        _cifar_how("cifar-10-python.tar.gz", CIFAR10_FOLDER))
    train_x, train_y, test_x, test_y, classes = read_cifar10(directory)
    return _Raw(train_x, train_y, test_x, test_y, classes, str(directory),
                DEFAULT_AUGMENTS["cifar10"])  # official SphereNet-9 CIFAR-10


@register_dataset("cifar100")
def _cifar100(data_dir, label_mode: str = "fine") -> _Raw:
    dirs = candidate_dirs(data_dir, (CIFAR100_FOLDER,))
    directory = _locate("cifar100", dirs, lambda d: has_cifar_files(d, "cifar100"),
                        _cifar_how("cifar-100-python.tar.gz", CIFAR100_FOLDER))
    train_x, train_y, test_x, test_y, classes = read_cifar100(directory, label_mode)
    return _Raw(train_x, train_y, test_x, test_y, classes, str(directory),
                DEFAULT_AUGMENTS["cifar100"])  # MHE CIFAR-100 recipe


@register_dataset("digits")
def _digits(data_dir, image_size: int = 8, test_fraction: float = 0.2) -> _Raw:
    train_x, train_y, test_x, test_y, classes = read_digits(image_size, test_fraction)
    return _Raw(train_x, train_y, test_x, test_y, classes, "sklearn.datasets.load_digits",
                DEFAULT_AUGMENTS["digits"], DIGITS_MAX)


@register_dataset("imagefolder")
def _imagefolder(data_dir, image_size: int = 32, channels: int = 3, test_fraction: float = 0.2) -> _Raw:
    if data_dir is None and not os.environ.get(ENV_VAR):
        raise DatasetNotFoundError(
            f"dataset 'imagefolder' needs a folder: pass data_dir / --data-dir (or set ${ENV_VAR}) pointing at "
            "root/<class>/<image> or root/train/<class>/... with root/test/ (or val/)")
    root = Path(data_dir if data_dir is not None else os.environ[ENV_VAR]).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"dataset 'imagefolder': folder {root} does not exist")
    train_x, train_y, test_x, test_y, classes = read_image_folder(root, image_size, channels, test_fraction)
    return _Raw(train_x, train_y, test_x, test_y, classes, str(root), DEFAULT_AUGMENTS["imagefolder"])


def synthetic_images(n: int, num_classes: int, channels: int, image_size: int, noise: float, seed: int,
                     data_seed: int) -> tuple[Tensor, Tensor]:
    """``n`` noisy images of ``num_classes`` smooth random class templates, as 0..255 uint8, balanced labels.

    The templates depend only on ``data_seed`` (so train and test share them); ``seed`` draws labels and noise.
    """
    gen = torch.Generator().manual_seed(data_seed)
    coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)  # low-frequency class patterns
    templates = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear",
                                                align_corners=False)  # (K, C, S, S) in [0, 1]
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=gen)]
    x = templates[y] + noise * torch.randn(n, channels, image_size, image_size, generator=gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


@register_dataset("synthetic")
def _synthetic(data_dir, num_classes: int = 4, channels: int = 1, image_size: int = 8,
               train_size: int = 512, test_size: int = 256, noise: float = 0.25, data_seed: int = 0) -> _Raw:
    for key, value, low in (("num_classes", num_classes, 2), ("channels", channels, 1), ("image_size", image_size, 1),
                            ("train_size", train_size, 1), ("test_size", test_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"synthetic {key} must be an int >= {low}; got {value!r}")
    if not isinstance(noise, (int, float)) or noise < 0:
        raise ValueError(f"synthetic noise must be a number >= 0; got {noise!r}")
    train_x, train_y = synthetic_images(train_size, num_classes, channels, image_size, noise, data_seed + 1, data_seed)
    test_x, test_y = synthetic_images(test_size, num_classes, channels, image_size, noise, data_seed + 2, data_seed)
    source = (f"synthetic(num_classes={num_classes}, channels={channels}, image_size={image_size}, "
              f"noise={noise}, data_seed={data_seed})")
    return _Raw(train_x, train_y, test_x, test_y, [f"pattern_{i}" for i in range(num_classes)], source,
                DEFAULT_AUGMENTS["synthetic"])


def build_dataset(name: str, data_dir: str | os.PathLike | None = None, *, val_fraction: float = 0.1, seed: int = 0,
                  limit_train: int | None = None, limit_test: int | None = None, **options) -> DatasetSplits:
    """Reads (or generates) a dataset into memory as normalized tensors with a seeded validation split.

    Pixels are normalized as in the official code, ``(x - 127.5) / 128`` on 0..255 values (digits are first scaled
    from 0..16 to 0..255).

    Args:
        name: one of :func:`list_datasets`: ``"fashion-mnist"``, ``"mnist"``, ``"cifar10"``, ``"cifar100"``,
            ``"digits"``, ``"imagefolder"``, ``"synthetic"``.
        data_dir: folder to search first (see the module docstring for the lookup order).
        val_fraction: fraction of each class of the training set held out for validation, in [0, 1).
        seed: seeds the validation split and the ``limit_train`` subset.
        limit_train: keep at most this many training-set examples (train + validation), a seeded random subset.
        limit_test: keep at most this many test examples, a random subset fixed across seeds.
        **options: dataset-specific options — ``cifar100``: ``label_mode`` ("fine" | "coarse"); ``digits``:
            ``image_size`` (8 keeps the originals), ``test_fraction``; ``imagefolder``: ``image_size`` (32),
            ``channels`` (3 | 1), ``test_fraction``; ``synthetic``: ``num_classes`` (4), ``channels`` (1),
            ``image_size`` (8), ``train_size`` (512), ``test_size`` (256), ``noise`` (0.25), ``data_seed`` (0).

    Raises:
        ValueError: unknown name or bad split arguments.
        TypeError: an option the dataset does not take (the message lists those it takes).
        DatasetNotFoundError: the files were not found (the message says where it looked and how to get them).
    """
    if not isinstance(name, str) or name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {list_datasets()}")
    val_fraction = check_fraction("val_fraction", val_fraction)
    limit_train, limit_test = check_limit("limit_train", limit_train), check_limit("limit_test", limit_test)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {type(seed).__name__} {seed!r}")
    entry = _DATASETS[name]
    accepted = [p for p in inspect.signature(entry).parameters if p != "data_dir"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"dataset {name!r} got unknown options {unknown}; it accepts {accepted}")
    raw = entry(data_dir, **options)
    return make_splits(name, raw.train_x, raw.train_y, raw.test_x, raw.test_y, classes=raw.classes, source=raw.source,
                       augment=raw.augment, val_fraction=val_fraction, seed=seed, limit_train=limit_train,
                       limit_test=limit_test, max_value=raw.max_value)
