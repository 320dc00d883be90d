"""Partitions of a training set into the shards of K sites: iid, label shards, Dirichlet(alpha) label skew.

Collaborative training across sites (Xu, Mi, Feng et al., *Collaborative Deep Learning Across Multiple Data Centers*,
arXiv 1810.06877, 2018; Sci. China Inf. Sci. 63(8):182102, 2020) keeps each site's data where it is. To study it on one
dataset, the training split is cut into K disjoint shards, one per site:

- ``iid``: a seeded random permutation cut into K parts of sizes ``n // K`` or one more. With K = 1 the shard is the
  whole training split in its original order, so one site trains exactly as plain training does.
- ``label-shards``: the pathological non-iid split of FedAvg (McMahan et al., *Communication-Efficient Learning of Deep
  Networks from Decentralized Data*, AISTATS 2017, arXiv 1602.05629): the examples sorted by label are cut into
  ``K * shards_per_site`` contiguous pieces of nearly equal size, and each site receives ``shards_per_site`` pieces at
  random, so it sees only a few classes.
- ``dirichlet``: label skew of Hsu, Qi & Brown (*Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification*, arXiv 1909.06335, 2019): for every class, the shares of the K sites are drawn from
  Dirichlet(alpha, ..., alpha) and the class's examples are dealt out in those proportions. Small alpha (0.1) gives
  sites dominated by one or two classes; large alpha (100) is nearly iid. Shard sizes vary.

Every partition is a pure function of (labels, K, method, options, seed): every process of a multi-process run computes
the same one. Shards are sorted index tensors into the training split. A shard with fewer than ``min_size`` examples
(e.g. fewer than one batch) raises a ValueError naming the site; nothing is silently resampled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

PARTITIONS: tuple[str, ...] = ("iid", "label-shards", "dirichlet")


@dataclass(frozen=True)
class SitePartition:
    """The shards of K sites over one training split.

    Attributes:
        method: one of :data:`PARTITIONS`.
        shards: one sorted int64 index tensor per site, disjoint, together covering the split.
        num_classes: number of classes of the labels.
        histograms: per site, the number of examples of each class.
        options: the partition's settings (seed, shards_per_site or alpha), for the run record.
    """

    method: str
    shards: list[Tensor]
    num_classes: int
    histograms: list[list[int]]
    options: dict[str, Any]

    @property
    def sizes(self) -> list[int]:
        return [int(s.numel()) for s in self.shards]

    def describe(self) -> dict[str, Any]:
        """A JSON-safe record: method, options, per-site size and class histogram."""
        return dict(method=self.method, **self.options, num_sites=len(self.shards), num_classes=self.num_classes,
                    sizes=self.sizes, class_histograms=self.histograms)


def partition_labels(labels: Tensor, num_sites: int, method: str = "iid", *, seed: int = 0,
                     num_classes: int | None = None, shards_per_site: int = 2, alpha: float = 0.5,
                     min_size: int = 1) -> SitePartition:
    """Cuts ``range(len(labels))`` into the shards of ``num_sites`` sites.

    Args:
        labels: (N,) integer class labels of the training split.
        num_sites: K >= 1.
        method: ``"iid"``, ``"label-shards"`` or ``"dirichlet"`` (see the module docstring).
        seed: seeds the partition (and nothing else).
        num_classes: the number of classes (default: ``labels.max() + 1``); labels outside ``[0, num_classes)`` raise.
        shards_per_site: label-shards only: pieces per site (at most this many classes per site, plus boundaries).
        alpha: dirichlet only: the concentration, > 0.
        min_size: the fewest examples a site may hold (the caller passes its batch size).

    Returns:
        A :class:`SitePartition`.

    Raises:
        ValueError: an unknown method, K < 1, K larger than the data allows, a bad option, labels outside the class
            range, or a shard with fewer than ``min_size`` examples.
        TypeError: a non-integer K or labels tensor of a floating type.
    """
    if method not in PARTITIONS:
        raise ValueError(f"unknown partition {method!r}; choose from {list(PARTITIONS)}")
    _check_int("num_sites", num_sites, 1)
    _check_int("min_size", min_size, 1)
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
        raise TypeError(f"labels must be a 1-D integer tensor; got {_describe(labels)}")
    labels = labels.long().cpu()
    n = labels.numel()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if n else 0
    _check_int("num_classes", num_classes, 1)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels span [{int(labels.min())}, {int(labels.max())}] but num_classes={num_classes}: "
                         f"the class count does not match the data")
    if num_sites * min_size > n:
        raise ValueError(f"sites={num_sites} is more than the data allows: {n} training examples give no site "
                         f"{min_size} examples (at most {n // min_size} sites of {min_size})")
    generator = torch.Generator().manual_seed(seed)
    options: dict[str, Any] = dict(seed=seed)
    if method == "iid":
        shards = _iid(n, num_sites, generator)
    elif method == "label-shards":
        _check_int("shards_per_site", shards_per_site, 1)
        if num_sites * shards_per_site > n:
            raise ValueError(f"label-shards needs sites * shards_per_site <= {n} examples; got "
                             f"{num_sites} * {shards_per_site}")
        options["shards_per_site"] = shards_per_site
        shards = _label_shards(labels, num_sites, shards_per_site, generator)
    else:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < float("inf"):
            raise ValueError(f"dirichlet alpha must be a finite number > 0; got {alpha!r}")
        options["alpha"] = float(alpha)
        shards = _dirichlet(labels, num_sites, num_classes, float(alpha), seed)
    for site, shard in enumerate(shards):
        if shard.numel() < min_size:
            hint = " (raise dirichlet_alpha, use fewer sites or a smaller batch, or change the seed)" \
                if method == "dirichlet" else ""
            raise ValueError(f"partition {method!r} gave site {site} {shard.numel()} examples, fewer than the "
                             f"{min_size} it needs (one batch){hint}")
    histograms = [torch.bincount(labels[s], minlength=num_classes).tolist() for s in shards]
    return SitePartition(method, shards, num_classes, histograms, options)


def _iid(n: int, k: int, generator: torch.Generator) -> list[Tensor]:
    if k == 1:
        return [torch.arange(n)]  # one site: the split itself, in order (plain training's data order)
    perm = torch.randperm(n, generator=generator)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return [part.sort().values for part in torch.split(perm, sizes)]


def _label_shards(labels: Tensor, k: int, per_site: int, generator: torch.Generator) -> list[Tensor]:
    perm = torch.randperm(labels.numel(), generator=generator)  # random order within a class
    by_label = perm[torch.argsort(labels[perm], stable=True)]
    pieces = torch.tensor_split(by_label, k * per_site)
    owner = torch.randperm(k * per_site, generator=generator)  # piece owner[j] goes to site j // per_site
    return [torch.cat([pieces[int(owner[j])] for j in range(s * per_site, (s + 1) * per_site)]).sort().values
            for s in range(k)]


def _dirichlet(labels: Tensor, k: int, num_classes: int, alpha: float, seed: int) -> list[Tensor]:
    parts: list[list[Tensor]] = [[] for _ in range(k)]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the gamma sampler draws from the global RNG: isolate and seed it
        torch.manual_seed(seed)
        shares = torch.distributions.Dirichlet(torch.full((k,), alpha, dtype=torch.float64)).sample((num_classes,))
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        cuts = (torch.cumsum(shares[c], 0) * members.numel()).round().long().clamp(max=members.numel())
        start = 0
        for site in range(k):
            stop = int(cuts[site]) if site < k - 1 else members.numel()
            parts[site].append(members[start:stop])
            start = max(start, stop)
    return [torch.cat(p).sort().values for p in parts]


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {_describe(value)}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value!r}")


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.ndim}-D {value.dtype} tensor"
    return f"{type(value).__name__} {value!r}"
