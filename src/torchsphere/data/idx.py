"""IDX files (MNIST, Fashion-MNIST), plain or gzip-compressed.

Format (Y. LeCun, C. Cortes, C. Burges, *The MNIST database*, http://yann.lecun.com/exdb/mnist/; Fashion-MNIST,
H. Xiao, K. Rasul, R. Vollgraf, arXiv 1708.07747, uses the same files): a 4-byte magic number ``0x00 0x00 T D`` where
``T`` is the element type code and ``D`` the number of dimensions, then ``D`` big-endian uint32 sizes, then the data
in C order, big-endian. Image files are ``0x00000803`` (uint8, N x 28 x 28), label files ``0x00000801`` (uint8, N).
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# IDX element type code -> big-endian numpy dtype
IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"

# the four files of an MNIST-style dataset: split -> (images stem, labels stem)
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Reads one IDX file (gzip-compressed or not, detected from the content) into a tensor of its element type.

    Args:
        path: the file.

    Returns:
        A tensor shaped by the file's dimensions: uint8 for MNIST images (N, 28, 28) and labels (N,).

    Raises:
        ValueError: the file is not a well-formed IDX file (bad magic number, unknown type code, wrong size).
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == GZIP_MAGIC:
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number must start with two zero bytes; got {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX element type 0x{code:02X}; expected one of "
                         f"{['0x%02X' % c for c in IDX_DTYPES]}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX shape {shape} of {dtype.name} needs {expected} data bytes; "
                         f"the file has {len(raw) - header}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dtype.newbyteorder("="), copy=True))


def find_idx_file(directory: str | os.PathLike, stem: str) -> Path | None:
    """The file for ``stem`` in ``directory``: ``stem``, ``stem.gz``, or the ``train-images.idx3-ubyte`` spelling."""
    directory = Path(directory)
    dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte, as some mirrors name them
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def has_mnist_files(directory: str | os.PathLike) -> bool:
    """True if ``directory`` holds all four MNIST-style IDX files (any accepted spelling)."""
    return all(find_idx_file(directory, stem) is not None for pair in MNIST_FILES.values() for stem in pair)


def read_mnist_split(directory: str | os.PathLike, split: str) -> tuple[Tensor, Tensor]:
    """Reads the ``"train"`` or ``"test"`` split of an MNIST-style folder.

    Returns:
        images (N, 1, 28, 28) uint8 and labels (N,) int64.

    Raises:
        ValueError: unknown ``split``, or image and label files that do not match.
        FileNotFoundError: a file of the split is missing.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be one of {list(MNIST_FILES)}; got {split!r}")
    found = []
    for stem in MNIST_FILES[split]:
        path = find_idx_file(directory, stem)
        if path is None:
            raise FileNotFoundError(f"{stem} (or {stem}.gz) not found in {directory}")
        found.append(path)
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{directory}: {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                         "do not form an (N, H, W) / (N,) pair")
    return images.unsqueeze(1), labels.long()  # (N, 1, H, W), (N,)
