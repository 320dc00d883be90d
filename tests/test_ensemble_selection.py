"""Greedy ensemble selection (torchsphere.ensemble.selection): brute force, monotonicity, contract, errors."""
from __future__ import annotations

import math

import pytest
import torch

from torchsphere.ensemble import brute_force_ensemble, greedy_ensemble, greedy_select
from torchsphere.ensemble.selection import accuracy, average, nll

N, C = 300, 3


def _rows(labels: torch.Tensor, correct: torch.Tensor, p_true_ok: float, p_true_bad: float) -> torch.Tensor:
    """(N, C) probabilities: p_true_ok on the label where ``correct``, else p_true_bad on it and the argmax on the
    next class."""
    out = torch.zeros(labels.numel(), C, dtype=torch.float64)
    for i, (y, ok) in enumerate(zip(labels.tolist(), correct.tolist())):
        wrong = (y + 1) % C
        if ok:
            out[i] = (1 - p_true_ok) / (C - 1)
            out[i, y] = p_true_ok
        else:
            out[i, y] = p_true_bad
            out[i, wrong] = 1 - p_true_bad - 0.1
            out[i, (y + 2) % C] = 0.1
    return out


def experts_library(p_expert_wrong: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[generalist, duplicate of it, expert 0, expert 1, expert 2]: each expert is confidently right (0.9) except on
    its own third of the examples; the generalist is right on about 77% at confidence 0.6."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(C, (N,), generator=gen)
    third = torch.arange(N) * 3 // N  # which expert is weak on each example
    general_ok = torch.rand(N, generator=gen) < 0.78
    generalist = _rows(labels, general_ok, 0.6, 0.2)
    experts = [_rows(labels, third != t, 0.9, p_expert_wrong) for t in range(3)]
    return torch.stack([generalist, generalist.clone(), *experts]), labels


def test_greedy_finds_the_known_optimum_and_equals_brute_force():
    probs, labels = experts_library(0.2)
    singles = [nll(p, labels) for p in probs]
    assert accuracy(probs[0], labels) > accuracy(probs[2], labels)  # the generalist is the best single by accuracy
    assert min(singles) == pytest.approx(singles[2])  # ... but the experts have the lower cross-entropy
    result = greedy_ensemble(probs, labels, max_size=4)
    assert sorted(result.picks) == [2, 3, 4]  # the three experts, each once
    assert len(result.picks) < 4  # stopped before the cap: no fourth pick lowers the cross-entropy
    best_set, best_value = brute_force_ensemble(probs, labels, max_size=4)
    assert sorted(best_set) == [2, 3, 4]
    assert result.trajectory[-1] == pytest.approx(best_value, abs=1e-12)
    assert result.trajectory[-1] == pytest.approx(-math.log(2 / 3), abs=1e-12)  # (0.9 + 0.9 + 0.2) / 3 per example
    assert all(b < a for a, b in zip(result.trajectory, result.trajectory[1:]))
    assert accuracy(result.probs, labels) == 1.0
    assert result.weights == pytest.approx([1 / 3] * 3) and sum(result.weights) == pytest.approx(1.0)
    assert greedy_select(probs, labels, 4) == result.picks
    # top-2 by accuracy would pick the generalist and its duplicate: no better than the generalist alone
    assert nll(average(probs, [0, 1]), labels) == pytest.approx(singles[0])


def test_greedy_is_not_globally_optimal_but_never_worse_than_the_best_single():
    probs, labels = experts_library(0.05)  # experts now worse than the generalist one by one
    singles = [nll(p, labels) for p in probs]
    for replacement in (True, False):
        result = greedy_ensemble(probs, labels, max_size=4, replacement=replacement)
        _, brute = brute_force_ensemble(probs, labels, max_size=4)
        assert result.picks[0] == 0  # starts from the generalist
        assert min(singles) >= result.trajectory[-1] >= brute - 1e-12
        assert result.trajectory[-1] > brute + 1e-3  # strictly worse than the optimum here
        assert all(b < a for a, b in zip(result.trajectory, result.trajectory[1:]))


@pytest.mark.parametrize("seed", range(4))
def test_greedy_never_raises_the_validation_cross_entropy(seed):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.distributions.Dirichlet(torch.ones(4)).sample((5, 30)).double()  # (5, 30, 4)
    labels = torch.randint(4, (30,), generator=gen)
    result = greedy_ensemble(probs, labels, max_size=6)
    singles = [nll(p, labels) for p in probs]
    assert result.trajectory[0] == pytest.approx(min(singles))
    assert all(b < a for a, b in zip(result.trajectory, result.trajectory[1:]))
    for i in range(len(result.picks)):  # each prefix's recorded value is its true cross-entropy
        assert result.trajectory[i] == pytest.approx(nll(average(probs, result.picks[:i + 1]), labels), abs=1e-12)
    _, brute = brute_force_ensemble(probs, labels, max_size=3)
    assert brute <= greedy_ensemble(probs, labels, max_size=3).trajectory[-1] + 1e-12


def test_permuting_the_library_permutes_the_picks():
    gen = torch.Generator().manual_seed(1)
    probs = torch.distributions.Dirichlet(torch.ones(3)).sample((6, 40)).double()  # continuous: no ties
    labels = torch.randint(3, (40,), generator=gen)
    perm = torch.tensor([3, 0, 5, 2, 1, 4])
    picks = greedy_select(probs, labels, 5)
    permuted = greedy_select(probs[perm], labels, 5)
    assert len(picks) >= 2
    assert [int(perm[i]) for i in permuted] == picks


def test_options_replacement_groups_single_candidate_nonfinite():
    probs, labels = experts_library(0.2)
    assert greedy_select(probs[2:3], labels, 3) == [0]  # one candidate -> that candidate
    distinct = greedy_ensemble(probs, labels, 5, replacement=False)
    assert len(set(distinct.picks)) == len(distinct.picks)
    # groups: experts 0 and 1 come from one upstream model -> only one of them may join
    grouped = greedy_ensemble(probs, labels, 4, groups=["g", "g2", "e", "e", "f"])
    assert not {2, 3} <= set(grouped.picks)
    bad = probs.clone()
    bad[2, 0, 0] = math.nan  # the best single candidate becomes non-finite: never chosen
    assert 2 not in greedy_select(bad, labels, 4)
    assert len(greedy_select(probs, labels, 1)) == 1  # the cap


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(probs=torch.rand(4, 3)), ValueError, r"shape \(models, examples, classes\); got shape \(4, 3\)"),
    (dict(probs=torch.zeros(0, 4, 3)), ValueError, "at least one model"),
    (dict(probs=torch.randn(2, 4, 3)), ValueError, "not logits"),
    (dict(probs=torch.full((2, 4, 3), 0.5)), ValueError, "rows must sum to 1"),
    (dict(probs=torch.ones(2, 4, 3, dtype=torch.long)), TypeError, "floating point"),
    (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
    (dict(labels=torch.full((4,), 3)), ValueError, r"labels must lie in \[0, 2\]"),
    (dict(labels=torch.zeros(4)), TypeError, "labels must be integer"),
    (dict(max_size=0), ValueError, "max_size must be >= 1; got 0"),
    (dict(max_size=2.0), TypeError, "max_size must be an int"),
    (dict(probs=torch.full((2, 4, 3), math.nan)), ValueError, "every candidate has non-finite"),
])
def test_errors_name_the_argument(kwargs, error, match):
    args = dict(probs=torch.full((2, 4, 3), 1 / 3), labels=torch.zeros(4, dtype=torch.long), max_size=3)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        greedy_select(args["probs"], args["labels"], args["max_size"])


def test_groups_length_and_tol_are_checked():
    probs, labels = torch.full((2, 4, 3), 1 / 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"groups must give one entry per candidate \(2\); got 1"):
        greedy_ensemble(probs, labels, 2, groups=["a"])
    with pytest.raises(ValueError, match="tol must be a finite number >= 0; got -1"):
        greedy_ensemble(probs, labels, 2, tol=-1)
