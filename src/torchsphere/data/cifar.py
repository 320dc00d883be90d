"""CIFAR-10 and CIFAR-100 from the official python-version archives.

A. Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009
(https://www.cs.toronto.edu/~kriz/cifar.html).
``cifar-10-python.tar.gz`` extracts to ``cifar-10-batches-py/`` with pickles ``data_batch_1`` .. ``data_batch_5``,
``test_batch`` and ``batches.meta``; ``cifar-100-python.tar.gz`` extracts to ``cifar-100-python/`` with ``train``,
``test`` and ``meta``. Each batch is a dict with bytes keys: ``b"data"`` a (N, 3072) uint8 array, rows holding the
1024 red, then green, then blue values of a 32x32 image in row-major order; ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` / ``b"coarse_labels"`` (CIFAR-100) lists of ints.

The pickles are read with ``encoding="bytes"`` (they were written by Python 2) through an unpickler that only admits
the few globals a numpy array needs, so a tampered file cannot run code.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_LABEL_KEYS = {"fine": (b"fine_labels", b"fine_label_names"),
                       "coarse": (b"coarse_labels", b"coarse_label_names")}
CIFAR_SHAPE = (3, 32, 32)

# what unpickling a numpy array needs, across numpy 1.x (numpy.core) and 2.x (numpy._core) and pickle protocols
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def load_pickle(path: str | os.PathLike) -> dict:
    """Loads one CIFAR pickle (``encoding="bytes"``, numpy arrays only) and checks that it is a dict.

    Raises:
        ValueError: the file is not a CIFAR batch pickle.
    """
    with open(path, "rb") as f:
        try:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: not a CIFAR python pickle ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a CIFAR batch must be a dict; got {type(obj).__name__}")
    return obj


def _batch_arrays(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = load_pickle(path)
    for key in (b"data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: key {key!r} missing; found {sorted(batch)}")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != int(np.prod(CIFAR_SHAPE)) or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {label_key!r} has {labels.shape[0]} entries and b'data' shape {data.shape}; "
                         f"expected (N, {int(np.prod(CIFAR_SHAPE))}) with N labels")
    return data, labels


def read_batches(directory: str | os.PathLike, names: tuple[str, ...], label_key: bytes) -> tuple[Tensor, Tensor]:
    """Reads and concatenates CIFAR batches.

    Returns:
        images (N, 3, 32, 32) uint8 and labels (N,) int64.

    Raises:
        FileNotFoundError: a batch file is missing.
        ValueError: a batch is malformed.
    """
    directory = Path(directory)
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR batch files {missing} not found in {directory}")
    parts = [_batch_arrays(directory / n, label_key) for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, *CIFAR_SHAPE)  # rows are R, G, B planes
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(data), torch.from_numpy(labels)


def _names(directory: Path, meta: str, key: bytes) -> list[str] | None:
    if not (directory / meta).is_file():
        return None
    names = load_pickle(directory / meta).get(key)
    return None if names is None else [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def read_cifar10(directory: str | os.PathLike) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """Reads an extracted ``cifar-10-batches-py`` folder.

    Returns:
        train images (50000, 3, 32, 32) uint8, train labels, test images, test labels (int64) and the class names
        (from ``batches.meta`` when present).
    """
    directory = Path(directory)
    train_x, train_y = read_batches(directory, CIFAR10_TRAIN, b"labels")
    test_x, test_y = read_batches(directory, CIFAR10_TEST, b"labels")
    classes = _names(directory, "batches.meta", b"label_names") or list(CIFAR10_CLASSES)
    return train_x, train_y, test_x, test_y, classes


def read_cifar100(directory: str | os.PathLike, label_mode: str = "fine"
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """Reads an extracted ``cifar-100-python`` folder.

    Args:
        directory: the folder holding ``train``, ``test`` (and optionally ``meta``).
        label_mode: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    Returns:
        train images (50000, 3, 32, 32) uint8, train labels, test images, test labels (int64) and the class names
        (from ``meta`` when present, else ``"class_<i>"``).
    """
    if label_mode not in CIFAR100_LABEL_KEYS:
        raise ValueError(f"label_mode must be one of {list(CIFAR100_LABEL_KEYS)}; got {label_mode!r}")
    directory = Path(directory)
    label_key, names_key = CIFAR100_LABEL_KEYS[label_mode]
    train_x, train_y = read_batches(directory, ("train",), label_key)
    test_x, test_y = read_batches(directory, ("test",), label_key)
    num_classes = 100 if label_mode == "fine" else 20
    classes = _names(directory, "meta", names_key) or [f"class_{i}" for i in range(num_classes)]
    return train_x, train_y, test_x, test_y, classes


def has_cifar_files(directory: str | os.PathLike, which: str) -> bool:
    """True if ``directory`` holds the train and test batches of ``which`` (``"cifar10"`` or ``"cifar100"``)."""
    names = CIFAR10_TRAIN + CIFAR10_TEST if which == "cifar10" else ("train", "test")
    return all((Path(directory) / n).is_file() for n in names)
