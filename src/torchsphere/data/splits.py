"""In-memory dataset splits, the official pixel normalization and the seeded subset / validation carving.

Every image dataset is normalized as in the official SphereNet and MHE code (wy1iu/SphereNet, wy1iu/MHE; Liu et al.,
*Deep Hyperspherical Learning*, NIPS 2017, arXiv 1711.03189): ``(x - 127.5) / 128`` on raw 0..255 pixel values, so
that every value lies in [-0.996, 0.996]. There is no per-channel mean/std.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

PIXEL_CENTER = 127.5  # official preprocessing: (x - 127.5) / 128 on 0..255 values
PIXEL_SCALE = 128.0


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files were not found; the message lists every place searched and how to get the data."""


def normalize_pixels(x: Tensor, max_value: float = 255.0) -> Tensor:
    """Maps raw pixel values in [0, ``max_value``] to float32 ``(x' - 127.5) / 128`` with ``x' = x * 255 / max_value``.

    Args:
        x: pixels, any real dtype (uint8 for the image files, 0..16 floats for scikit-learn digits).
        max_value: the value that maps to white (255 for 8-bit images).
    """
    x = x.to(torch.float32)
    if max_value != 255.0:
        x = x * (255.0 / max_value)
    return (x - PIXEL_CENTER) / PIXEL_SCALE


def check_fraction(name: str, value: object) -> float:
    """Returns ``value`` as a float if it lies in [0, 1), else raises ValueError/TypeError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1); got {type(value).__name__} {value!r}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1); got {value!r}")
    return float(value)


def check_limit(name: str, value: object) -> int | None:
    """Returns ``value`` if it is None or an int >= 1, else raises ValueError/TypeError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be None or a positive int; got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (or None for no limit); got {value!r}")
    return value


def subset_indices(n: int, limit: int | None, seed: int) -> Tensor:
    """Sorted indices of a seeded random subset of ``min(n, limit)`` of ``range(n)`` (all of them when no limit)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:limit].sort().values


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded stratified split of ``range(len(labels))`` into (kept, held-out) sorted index tensors.

    Exactly ``round(fraction * n)`` examples (halves rounded up) are held out; class ``c`` with ``n_c`` examples gives
    ``floor(fraction * n_c)`` or one more of them (largest remainders first), chosen by a seeded random permutation,
    so class proportions are kept in both parts.
    """
    n = labels.numel()
    if fraction == 0.0 or n == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    y = labels[perm].long()
    order = torch.argsort(y, stable=True)  # permuted indices grouped by class, random order within a class
    counts = torch.bincount(y)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - starts[y[order]]  # position of each example within its class
    # exactly round(fraction * n) held out, shared by largest remainder so every class gets floor or ceil of its share
    share = counts.double() * fraction
    quota = share.floor().long()
    extra = int(math.floor(n * fraction + 0.5)) - int(quota.sum())
    classes = torch.randperm(len(counts), generator=gen)  # ties between equal remainders broken at random
    quota[classes[torch.argsort((quota.double() - share)[classes], stable=True)[:max(extra, 0)]]] += 1
    held = rank < quota[y]
    return perm[~held].sort().values, perm[held].sort().values


@dataclass
class DatasetSplits:
    """A dataset held in memory as normalized tensors, split into train / validation / test.

    Attributes:
        name: registry name of the dataset (``"fashion-mnist"``, ``"cifar10"``, ...).
        train_x: (N, C, H, W) float32 images normalized as ``(x - 127.5) / 128``.
        train_y: (N,) int64 labels in ``[0, num_classes)``.
        val_x, val_y: the validation split, carved from the official training set with a seeded stratified
            permutation (empty when ``val_fraction == 0``); used for model selection, never the test set.
        test_x, test_y: the official test split.
        num_classes: number of classes.
        classes: class names, index ``i`` naming label ``i``.
        in_channels: C.
        image_size: (H, W).
        source: where the files were read from (a path, or a description for generated data).
        augment: the default augmentation name for this dataset, a key of ``torchsphere.data.list_augments()``.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    classes: list[str]
    in_channels: int
    image_size: tuple[int, int]
    source: str
    augment: str = "none"

    def to(self, device: torch.device | str) -> DatasetSplits:
        """A copy with every tensor moved to ``device`` (for training with the whole set on the accelerator)."""
        moved = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")}
        return replace(self, **moved)

    def describe(self) -> str:
        """One line for logs: sizes, shape, classes and source."""
        h, w = self.image_size
        return (f"{self.name}: train {len(self.train_y)}, val {len(self.val_y)}, test {len(self.test_y)}, "
                f"{self.in_channels}x{h}x{w}, {self.num_classes} classes, augment {self.augment!r}, from {self.source}")

    def __repr__(self) -> str:
        return f"DatasetSplits({self.describe()})"


def make_splits(name: str, train_x: Tensor | Sequence, train_y: Tensor, test_x: Tensor | Sequence, test_y: Tensor,
                *, classes: list[str], source: str, augment: str, val_fraction: float, seed: int,
                limit_train: int | None, limit_test: int | None, max_value: float = 255.0) -> DatasetSplits:
    """Subsets, carves the validation split and normalizes raw pixels into a :class:`DatasetSplits`.

    ``limit_train`` caps the examples taken from the official training set (train and validation together) by a
    random subset seeded with ``seed``; ``limit_test`` takes a random test subset with a fixed seed (0), so runs with
    different seeds are evaluated on the same images. ``train_x``/``test_x`` may be tensors or lazy sequences indexed
    by an index tensor (image folders decode only what is selected).
    """
    train_idx = subset_indices(len(train_y), limit_train, seed)
    test_idx = subset_indices(len(test_y), limit_test, 0)
    train_y, test_y = train_y[train_idx].long(), test_y[test_idx].long()
    for part, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise ValueError(f"{name}: {part} labels span [{int(y.min())}, {int(y.max())}]; "
                             f"expected [0, {len(classes) - 1}] for {len(classes)} classes")
    keep, held = stratified_split(train_y, val_fraction, seed)
    x = normalize_pixels(train_x[train_idx[keep]], max_value)  # (N, C, H, W)
    vx = normalize_pixels(train_x[train_idx[held]], max_value)
    tx = normalize_pixels(test_x[test_idx], max_value)
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be (N, C, H, W); got shape {tuple(x.shape)}")
    return DatasetSplits(
        name=name, train_x=x, train_y=train_y[keep], val_x=vx, val_y=train_y[held], test_x=tx, test_y=test_y,
        num_classes=len(classes), classes=list(classes), in_channels=x.shape[1], image_size=(x.shape[2], x.shape[3]),
        source=source, augment=augment)

