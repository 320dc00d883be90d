"""Class subsets and seeded k-examples-per-class draws of any registered dataset (the ``"subset"`` dataset).

Transfer experiments need two things the plain datasets do not give: an *upstream* task made of some classes of a
dataset (e.g. six Fashion-MNIST classes) and a *downstream* few-shot task made of the other classes with ``shots``
training and ``val_shots`` validation examples per class, drawn with a seed (Mustafa et al., *Deep Ensembles for
Low-Data Transfer Learning*, arXiv 2010.06866, 2020, evaluate on VTAB-1k's few-shot splits; the draw here is
torchsphere's own offline miniature of that protocol).

``build_dataset("subset", base="fashion-mnist", classes=[0, 2, 4, 6], shots=5, val_shots=10, draw=3)`` returns a
:class:`~torchsphere.data.DatasetSplits` whose labels are re-indexed ``0..len(classes) - 1`` in the order given.

Draw rule (per class ``c`` of the base training split): the class's examples are permuted by a generator seeded with
``(draw, c)``; the first ``val_shots`` are the validation examples, the next ``shots`` the training examples. With a
fixed ``val_shots`` the training sets of one draw are nested (the 5-shot set is part of the 10-shot set) and the
validation set is the same for every ``shots``. The test split holds every base test example of the classes.
``part="val"`` puts the validation examples in the training split (how a training run that must not see them is kept
apart from the evaluation that uses them: see :func:`fewshot_task`). Without ``shots`` every training example of the
classes is kept and the validation split is carved as usual (``val_fraction``).
"""
from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .registry import _DATASETS, _Raw, build_dataset, register_dataset

PARTS: tuple[str, ...] = ("train", "val")
_DRAW_STRIDE = 1_000_003  # seeds (draw, class) -> one integer; a prime larger than any class count


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value!r}")
    return value


def check_classes(classes: object, num_classes: int, base: str) -> list[int]:
    """``classes`` as a list of distinct class indices of a ``num_classes``-class dataset, else ValueError/TypeError."""
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise TypeError(f"classes must be a list of class indices; got {type(classes).__name__} {classes!r}")
    out = [_check_int("classes entry", c, 0) for c in classes]
    if len(out) < 2:
        raise ValueError(f"classes must name at least 2 classes; got {list(classes)!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"classes must be distinct; got {out!r}")
    bad = [c for c in out if c >= num_classes]
    if bad:
        raise ValueError(f"classes {bad} do not exist in dataset {base!r}, which has classes 0..{num_classes - 1}")
    return out


@functools.lru_cache(maxsize=4)
def _base_raw(base: str, data_dir: str | None, options: tuple[tuple[str, Any], ...]) -> _Raw:
    # the base dataset is read once per process (a sweep of fine-tuning runs rebuilds the task many times)
    return _DATASETS[base](data_dir, **dict(options))


def base_dataset(base: str, data_dir: str | os.PathLike | None, options: dict[str, Any] | None) -> _Raw:
    """The raw (unnormalized) splits of the registered dataset ``base`` (cached per process)."""
    if not isinstance(base, str) or base not in _DATASETS or base == "subset":
        choices = [d for d in _DATASETS if d != "subset"]
        raise ValueError(f"unknown base dataset {base!r}; choose from {choices}")
    options = dict(options or {})
    accepted = [p for p in inspect.signature(_DATASETS[base]).parameters if p != "data_dir"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"base dataset {base!r} got unknown options {unknown}; it accepts {accepted}")
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
    return _base_raw(base, None if data_dir is None else str(data_dir), key)


def draw_indices(labels: Tensor, classes: Sequence[int], shots: int, val_shots: int,
                 draw: int) -> tuple[Tensor, Tensor]:
    """(train, val) index tensors of a seeded draw of ``shots`` + ``val_shots`` examples per class (module rule).

    Raises:
        ValueError: a class has fewer than ``shots + val_shots`` examples.
    """
    train, val = [], []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        need = shots + val_shots
        if members.numel() < need:
            raise ValueError(f"class {c} has only {members.numel()} training examples; shots + val_shots = "
                             f"{shots} + {val_shots} = {need} are needed")
        gen = torch.Generator().manual_seed(draw * _DRAW_STRIDE + c)
        order = members[torch.randperm(members.numel(), generator=gen)]
        val.append(order[:val_shots])
        train.append(order[val_shots:need])
    return torch.cat(train), torch.cat(val)


def _remap(labels: Tensor, classes: Sequence[int]) -> Tensor:
    table = torch.full((int(labels.max()) + 1 if labels.numel() else 1,), -1, dtype=torch.long)
    table[torch.tensor(list(classes))] = torch.arange(len(classes))
    return table[labels.long()]


@register_dataset("subset")
def _subset(data_dir, base: str = "fashion-mnist", classes: Sequence[int] | None = None, shots: int | None = None,
            val_shots: int = 0, draw: int = 0, part: str = "train", base_options: dict[str, Any] | None = None) -> _Raw:
    raw = base_dataset(base, data_dir, base_options)
    if classes is None:
        raise ValueError("dataset 'subset' needs classes (a list of class indices of the base dataset); got None")
    classes = check_classes(classes, len(raw.classes), base)
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; choose from {list(PARTS)}")
    _check_int("val_shots", val_shots, 0)
    _check_int("draw", draw, 0)
    train_y = torch.as_tensor(raw.train_y).long()
    if shots is None:
        if part != "train" or val_shots:
            raise ValueError(f"part={part!r} / val_shots={val_shots!r} need shots (examples per class); got None")
        keep = torch.nonzero(torch.isin(train_y, torch.tensor(classes))).flatten()
    else:
        _check_int("shots", shots, 1)
        train_idx, val_idx = draw_indices(train_y, classes, shots, val_shots, draw)
        keep = train_idx if part == "train" else val_idx
        if keep.numel() == 0:
            raise ValueError(f"part='val' with val_shots=0 selects no examples; give val_shots >= 1")
    test_y = torch.as_tensor(raw.test_y).long()
    test_keep = torch.nonzero(torch.isin(test_y, torch.tensor(classes))).flatten()
    source = (f"subset of {base} ({raw.source}): classes {classes}"
              + ("" if shots is None else f", {shots} per class, val_shots {val_shots}, draw {draw}, part {part}"))
    return _Raw(raw.train_x[keep], _remap(train_y[keep], classes), raw.test_x[test_keep],
                _remap(test_y[test_keep], classes), [raw.classes[c] for c in classes], source, raw.augment,
                raw.max_value)


@dataclass
class FewShotTask:
    """A downstream few-shot task: normalized tensors of the three splits and the options that rebuild it.

    Attributes:
        train_x, train_y: ``shots`` examples per class (what fine-tuning and the kNN ranking see).
        val_x, val_y: ``val_shots`` other examples per class (hyperparameter and ensemble selection).
        test_x, test_y: the base test examples of the classes (touched once, to report).
        classes: class names in label order.
        dataset_kwargs: options of the ``"subset"`` dataset that give the training split (``part="train"``), for a
            :class:`~torchsphere.train.TrainConfig` with ``dataset="subset"``.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    dataset_kwargs: dict[str, Any]

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def fewshot_task(base: str, classes: Sequence[int], shots: int, *, val_shots: int = 10, draw: int = 0,
                 data_dir: str | os.PathLike | None = None, base_options: dict[str, Any] | None = None,
                 limit_test: int | None = None) -> FewShotTask:
    """Draws a downstream task: ``shots`` training and ``val_shots`` validation examples per class, seeded by ``draw``.

    Args:
        base: a registered dataset (``"fashion-mnist"``, ``"synthetic"``, ...).
        classes: class indices of ``base``; they become labels ``0..len(classes) - 1`` in this order.
        shots: training examples per class (k), >= 1.
        val_shots: validation examples per class, >= 1.
        draw: seed of the draw; equal draws give equal examples (paired comparisons across methods).
        data_dir: where the base dataset's files are.
        base_options: options of the base dataset (e.g. ``{"num_classes": 6}`` for ``synthetic``).
        limit_test: keep at most this many test examples (a subset fixed across draws).

    Raises:
        ValueError/TypeError: bad arguments, or more examples asked for than a class has (the message says which).
    """
    _check_int("shots", shots, 1)
    _check_int("val_shots", val_shots, 1)
    kwargs = dict(base=base, classes=list(classes), shots=shots, val_shots=val_shots, draw=draw,
                  base_options=dict(base_options or {}))
    train = build_dataset("subset", data_dir, val_fraction=0.0, limit_test=limit_test, **kwargs, part="train")
    val = build_dataset("subset", data_dir, val_fraction=0.0, limit_test=1, **kwargs, part="val")
    return FewShotTask(train.train_x, train.train_y, val.train_x, val.train_y, train.test_x, train.test_y,
                       list(train.classes), dict(kwargs, part="train"))
