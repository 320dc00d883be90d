"""The "subset" dataset and few-shot draws (torchsphere.data.subset): determinism, disjointness, nesting, errors."""
from __future__ import annotations

import pytest
import torch

from torchsphere.data import build_dataset, fewshot_task

OPTIONS = dict(num_classes=6, train_size=240, test_size=120)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(row.numpy().tobytes()) for row in x.flatten(1)}


def test_class_subset_relabels_in_the_given_order():
    full = build_dataset("synthetic", val_fraction=0.0, **OPTIONS)
    sub = build_dataset("subset", val_fraction=0.0, base="synthetic", classes=[4, 1], base_options=OPTIONS)
    assert sub.num_classes == 2 and sub.classes == ["pattern_4", "pattern_1"]
    assert torch.equal(sub.train_x[sub.train_y == 0], full.train_x[full.train_y == 4])
    assert torch.equal(sub.test_x[sub.test_y == 1], full.test_x[full.test_y == 1])
    carved = build_dataset("subset", val_fraction=0.25, base="synthetic", classes=[4, 1], base_options=OPTIONS)
    assert carved.val_y.numel() == round(0.25 * 80) and carved.train_y.numel() == 60


def test_fewshot_draws_are_seeded_disjoint_and_nested():
    a = fewshot_task("synthetic", [0, 2, 5], 3, val_shots=4, draw=1, base_options=OPTIONS)
    again = fewshot_task("synthetic", [0, 2, 5], 3, val_shots=4, draw=1, base_options=OPTIONS)
    assert torch.equal(a.train_x, again.train_x) and torch.equal(a.val_x, again.val_x)
    assert torch.bincount(a.train_y).tolist() == [3, 3, 3] and torch.bincount(a.val_y).tolist() == [4, 4, 4]
    assert not _rows(a.train_x) & _rows(a.val_x)  # train and validation examples differ
    assert a.test_y.numel() == 60 and a.num_classes == 3 and a.image_size == (8, 8)
    bigger = fewshot_task("synthetic", [0, 2, 5], 6, val_shots=4, draw=1, base_options=OPTIONS)
    assert _rows(a.train_x) <= _rows(bigger.train_x)  # more shots extend the same draw
    assert torch.equal(bigger.val_x, a.val_x)  # the validation set does not depend on shots
    other = fewshot_task("synthetic", [0, 2, 5], 3, val_shots=4, draw=2, base_options=OPTIONS)
    assert not torch.equal(other.train_x, a.train_x)
    assert a.dataset_kwargs["part"] == "train"
    rebuilt = build_dataset("subset", val_fraction=0.0, **a.dataset_kwargs)
    assert torch.equal(rebuilt.train_x, a.train_x)  # what a fine-tuning run trains on


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(shots=30), ValueError, r"class 0 has only 40 training examples; shots \+ val_shots = 30 \+ 20 = 50"),
    (dict(classes=[0, 9]), ValueError, r"classes \[9\] do not exist in dataset 'synthetic'"),
    (dict(classes=[1]), ValueError, "classes must name at least 2 classes"),
    (dict(classes=[1, 1]), ValueError, "classes must be distinct"),
    (dict(shots=0), ValueError, "shots must be >= 1; got 0"),
    (dict(base="subset"), ValueError, "unknown base dataset 'subset'"),
    (dict(base_options=dict(colour=True)), TypeError, r"base dataset 'synthetic' got unknown options \['colour'\]"),
])
def test_errors(kwargs, error, match):
    args = dict(base="synthetic", classes=[0, 1], shots=2, val_shots=20, draw=0, base_options=OPTIONS)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fewshot_task(args.pop("base"), args.pop("classes"), args.pop("shots"), **args)


def test_subset_needs_classes():
    with pytest.raises(ValueError, match="dataset 'subset' needs classes"):
        build_dataset("subset", base="synthetic")
