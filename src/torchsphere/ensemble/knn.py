"""k-nearest-neighbour classification of frozen features, and the leave-one-out accuracy that ranks a model pool.

Mustafa et al. (*Deep Ensembles for Low-Data Transfer Learning*, arXiv 2010.06866, 2020) rank pre-trained models by
the nearest-neighbour accuracy of their representation on the downstream data, leave-one-out on the downstream
training examples (as a third-party summary of the paper states; its body was not available to us). k, the metric
and the voting rule are not known from the paper; torchsphere's defaults are its own:

- ``metric="cosine"`` (features L2-normalised, similarity = dot product; the features of a hyperspherical network
  live on a sphere) or ``"euclidean"`` (similarity = minus the distance);
- ``k=1``; votes ``"uniform"`` (one per neighbour) or ``"exp"`` (``exp(similarity / temperature)``, as DINO's k-NN
  evaluation, facebookresearch/dino ``eval_knn.py``, with its temperature 0.07);
- neighbours are ordered by similarity, equal similarities by index; a tie in votes goes to the class of the
  nearest neighbour among the tied classes (deterministic);
- leave-one-out excludes each example **by index** (not "take the second neighbour", which goes wrong with duplicate
  rows). Exact duplicates of an example still count as its neighbours, which inflates the score: deduplicate first
  if the data has them.
- with one example per class leave-one-out is always wrong (the only example of the true class is the one left out),
  so :func:`rank_score` falls back to leave-one-out over the training and validation examples pooled, and says so.

All arithmetic is in float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

METRICS: tuple[str, ...] = ("cosine", "euclidean")
WEIGHTINGS: tuple[str, ...] = ("uniform", "exp")
DEFAULT_TEMPERATURE = 0.07  # DINO eval_knn.py


def _check(features: Tensor, labels: Tensor, name: str = "features") -> tuple[Tensor, Tensor]:
    if not isinstance(features, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"{name} and labels must be tensors; got {type(features).__name__}, {type(labels).__name__}")
    if features.dim() != 2:
        raise ValueError(f"{name} must have shape (examples, dims); got shape {tuple(features.shape)}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},) to match {name}; got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0; got min {int(labels.min())}")
    f = features.detach().to(torch.float64)
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"{name} hold non-finite values")
    return f, labels.long()


def _check_options(k: int, metric: str, weighting: str, temperature: float) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose from {list(WEIGHTINGS)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}")


def similarity(query: Tensor, reference: Tensor, metric: str = "cosine") -> Tensor:
    """(Q, R) similarities: cosine of L2-normalised rows, or minus the Euclidean distance."""
    if metric == "cosine":
        q = query / query.norm(dim=1, keepdim=True).clamp_min(1e-300)
        r = reference / reference.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return q @ r.T
    if metric == "euclidean":
        return -torch.cdist(query, reference)
    raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")


def _vote(sim: Tensor, ref_labels: Tensor, num_classes: int, k: int, weighting: str, temperature: float) -> Tensor:
    """Predicted class per row of ``sim`` (Q, R); excluded references carry -inf similarity."""
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]  # (Q, k), ties by index
    top = sim.gather(1, order)
    votes_w = torch.ones_like(top) if weighting == "uniform" else torch.exp((top - top[:, :1]) / temperature)
    cls = ref_labels[order]  # (Q, k)
    votes = torch.zeros(sim.shape[0], num_classes, dtype=torch.float64).scatter_add_(1, cls, votes_w)
    rank = torch.full((sim.shape[0], num_classes), float(k), dtype=torch.float64)
    positions = torch.arange(k, dtype=torch.float64).expand_as(top).contiguous()
    rank = rank.scatter_reduce(1, cls, positions, reduce="amin")  # position of each class's nearest neighbour
    best = votes.max(dim=1, keepdim=True).values
    tied = votes >= best * (1 - 1e-12)
    return torch.where(tied, rank, torch.full_like(rank, math.inf)).argmin(dim=1)


def knn_predict(train_features: Tensor, train_labels: Tensor, query_features: Tensor, *, k: int = 1,
                metric: str = "cosine", weighting: str = "uniform", temperature: float = DEFAULT_TEMPERATURE) -> Tensor:
    """Class predicted for each query row by its ``k`` nearest training rows (see the module docstring).

    Raises:
        ValueError: ``k`` larger than the training set, mismatched shapes, unknown options.
    """
    _check_options(k, metric, weighting, temperature)
    f, y = _check(train_features, train_labels, "train_features")
    if not isinstance(query_features, Tensor) or query_features.dim() != 2 or query_features.shape[1] != f.shape[1]:
        shape = tuple(query_features.shape) if isinstance(query_features, Tensor) else type(query_features).__name__
        raise ValueError(f"query_features must have shape (queries, {f.shape[1]}); got {shape}")
    if k > f.shape[0]:
        raise ValueError(f"k={k} is larger than the {f.shape[0]} training examples")
    sim = similarity(query_features.detach().to(torch.float64), f, metric)
    return _vote(sim, y, int(y.max()) + 1, k, weighting, temperature)


def knn_loo_accuracy(features: Tensor, labels: Tensor, *, k: int = 1, metric: str = "cosine",
                     weighting: str = "uniform", temperature: float = DEFAULT_TEMPERATURE) -> float:
    """Leave-one-out k-NN accuracy: each example classified by its ``k`` nearest *other* examples.

    Raises:
        ValueError: ``k`` >= the number of examples (leave-one-out leaves ``n - 1`` neighbours), fewer than two
            examples, mismatched shapes, unknown options.
    """
    _check_options(k, metric, weighting, temperature)
    f, y = _check(features, labels)
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"leave-one-out needs at least 2 examples; got {n}")
    if k > n - 1:
        raise ValueError(f"k={k} is larger than the {n - 1} neighbours left when one of the {n} examples is left out")
    sim = similarity(f, f, metric)
    sim.fill_diagonal_(-math.inf)  # exclude each example by its index
    pred = _vote(sim, y, int(y.max()) + 1, k, weighting, temperature)
    return float((pred == y).to(torch.float64).mean())


def rank_score(train_features: Tensor, train_labels: Tensor, val_features: Tensor | None = None,
               val_labels: Tensor | None = None, *, k: int = 1, metric: str = "cosine", weighting: str = "uniform",
               temperature: float = DEFAULT_TEMPERATURE) -> tuple[float, str]:
    """The score that ranks a model: leave-one-out k-NN accuracy on the downstream training examples, or, when some
    class has a single training example, on training and validation examples pooled. Returns (score, protocol) with
    protocol ``"loo-train"`` or ``"loo-train+val"``."""
    _, y = _check(train_features, train_labels, "train_features")
    if int(torch.bincount(y).min() if y.numel() else 0) >= 2 or val_features is None:
        return knn_loo_accuracy(train_features, train_labels, k=k, metric=metric, weighting=weighting,
                                temperature=temperature), "loo-train"
    pooled = torch.cat([train_features.detach().to(torch.float64), val_features.detach().to(torch.float64)])
    pooled_y = torch.cat([train_labels.long(), val_labels.long()])
    return knn_loo_accuracy(pooled, pooled_y, k=k, metric=metric, weighting=weighting,
                            temperature=temperature), "loo-train+val"
