"""k-NN ranking (torchsphere.ensemble.knn) against a naive float64 reference; invariances; 1-shot; errors."""
from __future__ import annotations

import math

import pytest
import torch

from torchsphere.ensemble import knn_loo_accuracy, knn_predict, rank_score


def clusters(num_classes: int = 5, per_class: int = 10, dim: int = 16, spread: float = 10.0, noise: float = 0.1,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = spread * torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(labels.numel(), dim, generator=gen, dtype=torch.float64), labels


def naive_loo(features, labels, k, metric, weighting, temperature=0.07) -> float:
    """Plain loops: for every example, sort the others by similarity (ties by index), vote, break vote ties by the
    class of the nearest tied neighbour."""
    f = [[float(v) for v in row] for row in features]
    y = [int(v) for v in labels]

    def sim(a, b):
        if metric == "cosine":
            dot = sum(x * z for x, z in zip(a, b))
            return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(z * z for z in b)))
        return -math.sqrt(sum((x - z) ** 2 for x, z in zip(a, b)))

    correct = 0
    for i in range(len(f)):
        others = sorted((j for j in range(len(f)) if j != i), key=lambda j: (-sim(f[i], f[j]), j))[:k]
        best_sim = sim(f[i], f[others[0]])
        votes: dict[int, float] = {}
        first: dict[int, int] = {}
        for pos, j in enumerate(others):
            w = 1.0 if weighting == "uniform" else math.exp((sim(f[i], f[j]) - best_sim) / temperature)
            votes[y[j]] = votes.get(y[j], 0.0) + w
            first.setdefault(y[j], pos)
        top = max(votes.values())
        tied = [c for c in votes if votes[c] >= top * (1 - 1e-12)]
        pred = min(tied, key=lambda c: first[c])
        correct += pred == y[i]
    return correct / len(f)


def test_separable_features_score_one():
    x, y = clusters()
    assert knn_loo_accuracy(x, y, k=1, metric="cosine") == 1.0
    assert knn_loo_accuracy(x, y, k=3, metric="euclidean") == 1.0
    assert knn_loo_accuracy(x, y, k=5, weighting="exp") == 1.0
    random = torch.randn(50, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert knn_loo_accuracy(random, y) < 0.5  # isotropic noise: near chance (0.2)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("weighting", ["uniform", "exp"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_matches_the_naive_reference(metric, weighting, k):
    x, y = clusters(num_classes=3, per_class=7, dim=5, spread=1.0, noise=1.0, seed=k)  # overlapping classes
    x = torch.cat([x, x[:2]])  # exact duplicates and ties in similarity
    y = torch.cat([y, y[:2]])
    got = knn_loo_accuracy(x, y, k=k, metric=metric, weighting=weighting)
    assert got == pytest.approx(naive_loo(x, y, k, metric, weighting), abs=1e-12)
    assert 0.0 < got < 1.0


def test_knn_predict_matches_the_reference_on_held_out_queries():
    x, y = clusters(num_classes=3, per_class=8, dim=4, spread=1.0, noise=1.0, seed=3)
    pred = knn_predict(x[:18], y[:18], x[18:], k=3)
    sims = torch.nn.functional.normalize(x[18:], dim=1) @ torch.nn.functional.normalize(x[:18], dim=1).T
    for q in range(6):
        order = sorted(range(18), key=lambda j: (-float(sims[q, j]), j))[:3]
        labels = [int(y[j]) for j in order]
        counts = {c: labels.count(c) for c in labels}
        best = max(counts.values())
        assert int(pred[q]) == next(c for c in labels if counts[c] == best)


def test_invariances():
    x, y = clusters(num_classes=4, per_class=6, dim=8, spread=1.0, noise=1.0, seed=5)
    base = knn_loo_accuracy(x, y)
    assert knn_loo_accuracy(7.0 * x, y) == base  # cosine: scale
    perm = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(1))
    assert knn_loo_accuracy(x[perm], y[perm]) == base  # example order
    assert knn_loo_accuracy(x.float(), y) == pytest.approx(base)  # dtype: computed in float64 anyway


def test_one_shot_leave_one_out_is_zero_and_rank_score_falls_back():
    x, y = clusters(num_classes=4, per_class=1, spread=10.0)
    assert knn_loo_accuracy(x, y) == 0.0  # the only example of the true class is the one left out
    val_x, val_y = clusters(num_classes=4, per_class=3, spread=10.0)  # same centres (seed 0), other noise
    score, protocol = rank_score(x, y, val_x, val_y)
    assert protocol == "loo-train+val" and score == 1.0
    x5, y5 = clusters(num_classes=4, per_class=3)
    assert rank_score(x5, y5, val_x, val_y) == (1.0, "loo-train")


def test_duplicates_are_excluded_by_index_only():
    # exact duplicate rows: each example's twin is its nearest neighbour, so even random features score 1.0
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(20) % 5
    assert knn_loo_accuracy(x, y) < 0.5
    assert knn_loo_accuracy(torch.cat([x, x]), torch.cat([y, y])) == 1.0


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(k=10), "k=10 is larger than the 9 neighbours left when one of the 10 examples is left out"),
    (dict(k=0), "k must be an int >= 1; got 0"),
    (dict(metric="manhattan"), "unknown metric 'manhattan'; choose from"),
    (dict(weighting="distance"), "unknown weighting 'distance'; choose from"),
    (dict(temperature=0.0), "temperature must be a number > 0; got 0.0"),
])
def test_errors(kwargs, match):
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match=match):
        knn_loo_accuracy(x, y, **kwargs)


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\) to match features"):
        knn_loo_accuracy(torch.randn(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features must have shape \(examples, dims\)"):
        knn_loo_accuracy(torch.randn(10), torch.zeros(10, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        knn_loo_accuracy(torch.randn(10, 3), torch.zeros(10))
    with pytest.raises(ValueError, match="leave-one-out needs at least 2 examples; got 1"):
        knn_loo_accuracy(torch.randn(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="features hold non-finite values"):
        knn_loo_accuracy(torch.full((4, 2), math.nan), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"k=5 is larger than the 4 training examples"):
        knn_predict(torch.randn(4, 3), torch.arange(4), torch.randn(2, 3), k=5)
    with pytest.raises(ValueError, match=r"query_features must have shape \(queries, 3\)"):
        knn_predict(torch.randn(4, 3), torch.arange(4), torch.randn(2, 5))
