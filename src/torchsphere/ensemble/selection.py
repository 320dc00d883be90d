"""Greedy ensemble selection on validation cross-entropy (Caruana et al., ICML 2004), as used by Mustafa et al.

*Ensemble selection from libraries of models* (R. Caruana, A. Niculescu-Mizil, G. Crew, A. Ksikes, ICML 2004) builds
an ensemble by forward stepwise selection: start empty, repeatedly add the library model that most improves the
metric of the *averaged* predictions on a hill-climbing (validation) set, with replacement (a model may be added again,
which raises its weight). *Deep Ensembles for Low-Data Transfer Learning* (Mustafa et al., arXiv 2010.06866, 2020)
"greedily construct[s] an ensemble to minimise validation cross-entropy" over fine-tuned pre-trained models; the
paper's body was not available to us, so the details below are torchsphere's choices, not the paper's:

- objective: the mean negative log-likelihood of the labels under the **averaged probabilities** (not logits), in
  float64, with the probability floored at :data:`PROB_FLOOR` so a confidently wrong member cannot make it infinite;
- **with replacement** by default (Caruana et al.'s first fix against overfitting the hill-climbing set; also
  auto-sklearn's and AutoGluon's ``EnsembleSelection``), ``replacement=False`` for distinct members;
- **stopping rule**: stop when no candidate lowers the objective by more than ``tol`` (default 0: strictly lowers),
  or after ``max_size`` picks (repeats count). The trajectory is therefore strictly decreasing and the result never
  has a higher validation cross-entropy than the best single candidate (the first pick);
- ties are broken by the lowest candidate index (bit-reproducible; auto-sklearn breaks them at random);
- a candidate with a non-finite probability is never chosen (its objective counts as +inf, as in AutoGluon);
- ``groups`` (e.g. the pre-trained model each fine-tuned run came from) optionally forbids two members of one group.

Greedy selection is not globally optimal: it can start from a model that a better multiset would not contain
(``tests/test_ensemble_selection.py`` documents such a case next to the one where it finds the brute-force optimum).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PROB_FLOOR = 1e-12  # log(max(p, floor)): a finite objective even when every member gives the label p = 0
ROW_SUM_TOL = 1e-5  # a probability row may deviate this much from 1


@dataclass
class EnsembleSelection:
    """The result of :func:`greedy_ensemble`.

    Attributes:
        picks: candidate index of each pick, in order (repeats when selecting with replacement).
        members: the distinct candidates, in the order first picked.
        weights: ``weights[i]`` = share of the picks that are ``members[i]`` (they sum to 1).
        trajectory: the validation cross-entropy after each pick (strictly decreasing).
        probs: (N, C) the ensemble's averaged validation probabilities.
    """

    picks: list[int]
    members: list[int]
    weights: list[float]
    trajectory: list[float]
    probs: Tensor


def check_probs(probs: Tensor, labels: Tensor | None = None, *, name: str = "probs") -> tuple[Tensor, Tensor | None]:
    """Validates a (models, examples, classes) probability tensor and (examples,) labels; returns them as float64 /
    int64. Non-finite candidates are allowed (they are never selected); finite ones must be probability rows.

    Raises:
        TypeError: not tensors, or labels not integers.
        ValueError: wrong shapes, an empty library, negative values, rows not summing to 1, labels out of range.
    """
    if not isinstance(probs, Tensor):
        raise TypeError(f"{name} must be a tensor of shape (models, examples, classes); got {type(probs).__name__}")
    if probs.dim() != 3:
        raise ValueError(f"{name} must have shape (models, examples, classes); got shape {tuple(probs.shape)}")
    if 0 in probs.shape:
        raise ValueError(f"{name} must hold at least one model, example and class; got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{name} must be floating point probabilities; got dtype {probs.dtype}")
    p = probs.detach().to(torch.float64)
    finite = torch.isfinite(p).flatten(1).all(dim=1)  # (M,)
    good = p[finite]
    if good.numel():
        if float(good.min()) < 0:
            raise ValueError(f"{name} holds negative values (min {float(good.min()):.3g}); pass probabilities "
                             "(softmax outputs), not logits")
        err = float((good.sum(dim=2) - 1).abs().max())
        if err > ROW_SUM_TOL:
            raise ValueError(f"{name} rows must sum to 1 (within {ROW_SUM_TOL}); the largest deviation is {err:.3g}. "
                             "Pass probabilities (softmax outputs), not logits")
    if labels is None:
        return p, None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor of shape (examples,); got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if tuple(labels.shape) != (p.shape[1],):
        raise ValueError(f"labels must have shape ({p.shape[1]},) to match {name} of shape {tuple(p.shape)}; got "
                         f"{tuple(labels.shape)}")
    y = labels.long()
    if int(y.min()) < 0 or int(y.max()) >= p.shape[2]:
        raise ValueError(f"labels must lie in [0, {p.shape[2] - 1}]; got range [{int(y.min())}, {int(y.max())}]")
    return p, y


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of ``labels`` (N,) under probability rows ``probs`` (N, C), floored, float64."""
    p = probs.to(torch.float64).gather(1, labels.long()[:, None]).squeeze(1)
    return float(-torch.log(p.clamp_min(PROB_FLOOR)).mean())


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of probability (or score) rows (N, C); ties go to the lowest class index."""
    return float((probs.argmax(dim=1) == labels.long()).to(torch.float64).mean())


def average(probs: Tensor, members: Sequence[int], weights: Sequence[float] | None = None) -> Tensor:
    """The (weighted) mean of ``probs[members]`` over models: (N, C)."""
    if not members:
        raise ValueError("an ensemble needs at least one member; got none")
    p = probs[list(members)].to(torch.float64)
    if weights is None:
        return p.mean(dim=0)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    return (w[:, None, None] * p).sum(dim=0) / w.sum()


def greedy_ensemble(probs: Tensor, labels: Tensor, max_size: int, *, replacement: bool = True, tol: float = 0.0,
                    groups: Sequence[object] | None = None) -> EnsembleSelection:
    """Forward stepwise (Caruana) selection minimising the validation cross-entropy of the averaged probabilities.

    Args:
        probs: (models, examples, classes) validation probabilities of every candidate.
        labels: (examples,) the validation labels.
        max_size: the most picks (repeats count toward it), >= 1.
        replacement: allow a candidate to be picked again (a larger weight).
        tol: a pick must lower the objective by more than this (>= 0).
        groups: one hashable per candidate; at most one candidate of each group joins (repeats of it are allowed).

    Returns:
        :class:`EnsembleSelection`; see the module docstring for the stopping rule and tie-breaking.

    Raises:
        TypeError/ValueError: see :func:`check_probs`; ``max_size`` < 1, ``tol`` < 0, ``groups`` of the wrong
            length; every candidate non-finite.
    """
    p, y = check_probs(probs, labels)
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int; got {type(max_size).__name__} {max_size!r}")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1; got {max_size!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0; got {tol!r}")
    num_models = p.shape[0]
    if groups is not None and len(groups) != num_models:
        raise ValueError(f"groups must give one entry per candidate ({num_models}); got {len(groups)}")
    finite = torch.isfinite(p).flatten(1).all(dim=1)
    if not bool(finite.any()):
        raise ValueError("every candidate has non-finite probabilities; nothing can be selected")
    target = p.gather(2, y[None, :, None].expand(num_models, -1, 1)).squeeze(2)  # (M, N) p(label) per candidate
    target = torch.where(finite[:, None], target, torch.zeros_like(target))
    total = torch.zeros(p.shape[1], dtype=torch.float64)  # running sum of the picks' p(label)
    picks: list[int] = []
    trajectory: list[float] = []
    used_groups: set[object] = set()
    best = math.inf
    for size in range(1, max_size + 1):
        scores = -torch.log(((total[None, :] + target) / size).clamp_min(PROB_FLOOR)).mean(dim=1)  # (M,)
        allowed = finite.clone()
        if not replacement:
            allowed[picks] = False
        if groups is not None:
            for m in range(num_models):
                if groups[m] in used_groups and m not in picks:
                    allowed[m] = False
        scores = torch.where(allowed, scores, torch.full_like(scores, math.inf))
        choice = int(torch.argmin(scores))  # the first minimum: lowest index wins ties
        score = float(scores[choice])
        if not math.isfinite(score) or (picks and not score < best - tol):
            break
        picks.append(choice)
        trajectory.append(score)
        best = score
        total += target[choice]
        if groups is not None:
            used_groups.add(groups[choice])
    members = list(dict.fromkeys(picks))
    weights = [picks.count(m) / len(picks) for m in members]
    return EnsembleSelection(picks, members, weights, trajectory, average(p, picks))


def greedy_select(probs: Tensor, labels: Tensor, max_size: int) -> list[int]:
    """The member indices chosen by greedy selection with replacement, in pick order (repeats allowed).

    ``probs`` has shape (models, examples, classes): each candidate's validation probabilities; ``labels`` (examples,)
    the validation labels; at most ``max_size`` picks. See :func:`greedy_ensemble` for the rule and the options.

    Example:
        >>> members = greedy_select(val_probs, val_labels, max_size=5)   # e.g. [3, 0, 3]
        >>> test_probs[members].mean(dim=0)                             # the ensemble's test probabilities
    """
    return greedy_ensemble(probs, labels, max_size).picks


def brute_force_ensemble(probs: Tensor, labels: Tensor, max_size: int) -> tuple[tuple[int, ...], float]:
    """The multiset of at most ``max_size`` candidates with the lowest validation cross-entropy (exhaustive search
    over ``C(M + k - 1, k)`` multisets per size k: only for small libraries; the reference the tests compare to)."""
    import itertools

    p, y = check_probs(probs, labels)
    best: tuple[tuple[int, ...], float] = ((), math.inf)
    for size in range(1, max_size + 1):
        for combo in itertools.combinations_with_replacement(range(p.shape[0]), size):
            if not all(bool(torch.isfinite(p[c]).all()) for c in set(combo)):
                continue
            value = nll(average(p, combo), y)
            if value < best[1] - 1e-15:
                best = (combo, value)
    return best
