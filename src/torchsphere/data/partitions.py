"""The learning-curve measurement protocol: class-stratified, disjoint partitions of a training set.

As the official learning-curve README recommends (github.com/allenai/learning-curve; Hoiem et al., ICML 2021): train
on partitions of the training set at sizes N, N/2, N/4, N/8, N/16 per class with 1, 2, 4, 8, 16 partitions (so every
size costs about the same compute; fewer partitions work too), "partition the set of samples from each class into the
required number of disjoint subsets" to keep the class distribution, and evaluate every model on the same test set.

Here the validation split is carved once from the official training set, with ``split_seed``, *before* any
partitioning, so it never changes with n or with the model; what remains is the pool. Each class's pool is put in a
seeded random order (``split_seed`` again), and partition ``i`` of size ``n`` per class takes positions
``[i n, (i + 1) n)`` of every class. Partitions of one size are therefore disjoint, every partition holds exactly
``n`` examples of each class, and the same arguments always give the same indices. N is at most the smallest class
of the pool (:func:`max_per_class`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .splits import DatasetSplits

PARTITION_KEYS = ("per_class", "index", "seed")
DEFAULT_REPS = (16, 8, 4, 2, 1)  # repetitions at N/16 ... N (the official README's schedule)


@dataclass(frozen=True)
class Partition:
    """One training subset of the protocol.

    Attributes:
        per_class: examples of every class in the subset (n).
        index: which of the disjoint subsets of that size, from 0.
        seed: the split seed: it carves the validation split and orders each class's pool.
    """

    per_class: int
    index: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("per_class", 1), ("index", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"partition {name} must be an int; got {type(value).__name__} {value!r}")
            if value < low:
                raise ValueError(f"partition {name} must be >= {low}; got {value!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Partition:
        """From ``{"per_class": n, "index": i, "seed": s}`` (``index`` and ``seed`` optional); unknown keys raise."""
        if not isinstance(values, dict):
            raise TypeError(f"a partition is a mapping with keys {list(PARTITION_KEYS)}; got "
                            f"{type(values).__name__} {values!r}")
        unknown = sorted(set(values) - set(PARTITION_KEYS))
        if unknown or "per_class" not in values:
            raise ValueError(f"a partition needs 'per_class' and may have 'index', 'seed'; got keys "
                             f"{sorted(values)}")
        return cls(**values)

    def to_dict(self) -> dict[str, int]:
        return dict(per_class=self.per_class, index=self.index, seed=self.seed)


def class_pools(labels: Tensor, seed: int) -> list[Tensor]:
    """For each class ``c``, the indices of its examples in a random order seeded by ``seed`` (empty if absent)."""
    labels = labels.long()
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(labels.numel(), generator=gen)
    y = labels[perm]
    return [perm[y == c] for c in range(num_classes)]


def max_per_class(labels: Tensor, num_classes: int | None = None) -> int:
    """The largest n such that every class has n examples: the size of the smallest class (0 when one is absent)."""
    counts = torch.bincount(labels.long(), minlength=num_classes or 0)
    return int(counts.min()) if counts.numel() else 0


def partition_indices(labels: Tensor, partition: Partition, num_classes: int | None = None) -> Tensor:
    """Sorted indices into ``labels`` of ``partition``: ``per_class`` examples of each class, disjoint across indices.

    Args:
        labels: (P,) integer labels of the pool (the training split after the validation carve).
        partition: size, index and seed.
        num_classes: classes expected (default: ``max(labels) + 1``); a class without examples is an error.

    Raises:
        ValueError: the pool cannot hold ``index + 1`` disjoint subsets of ``per_class`` examples of every class.
    """
    pools = class_pools(labels, partition.seed)
    if num_classes is not None and len(pools) < num_classes:
        pools += [torch.empty(0, dtype=torch.long)] * (num_classes - len(pools))
    start, stop = partition.index * partition.per_class, (partition.index + 1) * partition.per_class
    smallest = min(p.numel() for p in pools)
    if stop > smallest:
        raise ValueError(f"partition {partition.index} of {partition.per_class} per class needs {stop} examples of "
                         f"every class, but the smallest class of the training pool has {smallest}: at most "
                         f"{smallest // partition.per_class} disjoint partitions of this size fit")
    return torch.cat([p[start:stop] for p in pools]).sort().values


def apply_partition(data: DatasetSplits, partition: Partition) -> DatasetSplits:
    """``data`` with its training split replaced by ``partition`` of it; validation and test are untouched."""
    idx = partition_indices(data.train_y, partition, data.num_classes)
    return replace(data, train_x=data.train_x[idx], train_y=data.train_y[idx],
                   source=f"{data.source}; partition {partition.to_dict()}")


@dataclass(frozen=True)
class SizeSchedule:
    """The sizes (per class, descending from N) and how many disjoint partitions each gets."""

    sizes: tuple[int, ...]
    reps: tuple[int, ...]

    def partitions(self, seed: int = 0) -> list[Partition]:
        """Every partition of the schedule, largest size first."""
        return [Partition(n, i, seed) for n, r in zip(self.sizes, self.reps) for i in range(r)]


def partition_schedule(N: int, num_sizes: int = 5, reps: Sequence[int] | None = None) -> SizeSchedule:
    """Sizes ``floor(N / 2**j)`` for j = 0 .. num_sizes - 1 and the partitions of each.

    Args:
        N: the largest size, per class (at most :func:`max_per_class` of the pool).
        num_sizes: how many halvings (official 5: N ... N/16).
        reps: partitions per size, largest size first (default 1, 2, 4, 8, 16: the official schedule, cut to
            ``num_sizes``). Size ``N / 2**j`` holds at most ``2**j`` disjoint partitions.

    Raises:
        ValueError: a size below 1, more partitions than fit, a repetition count below 1, or a length mismatch.
    """
    for name, value in (("N", N), ("num_sizes", num_sizes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    sizes = tuple(N // 2 ** j for j in range(num_sizes))
    if sizes[-1] < 1:
        raise ValueError(f"N = {N} per class cannot be halved {num_sizes - 1} times (sizes {list(sizes)})")
    reps = tuple(DEFAULT_REPS[::-1][:num_sizes]) if reps is None else tuple(reps)
    if len(reps) != num_sizes:
        raise ValueError(f"reps must give one count per size ({num_sizes}: {list(sizes)}); got {list(reps)}")
    for j, r in enumerate(reps):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"reps must be ints >= 1; got {list(reps)}")
        if r * sizes[j] > N:
            raise ValueError(f"size {sizes[j]} per class holds at most {N // sizes[j]} disjoint partitions of N = "
                             f"{N}; reps asks {r} (reps {list(reps)})")
    return SizeSchedule(sizes, reps)

