"""torchsphere.data.partitions: the learning-curve measurement protocol (disjoint, stratified, stable partitions; a
validation split and a test set that never change with n)."""
from __future__ import annotations

import pytest
import torch

from torchsphere.data.partitions import (Partition, class_pools, max_per_class, partition_indices,
                                         partition_schedule)
from torchsphere.train import TrainConfig
from torchsphere.train.builders import build_data


def labels_with_counts(counts: list[int], seed: int = 0) -> torch.Tensor:
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))]


def test_partitions_are_disjoint_stratified_and_stable():
    y = labels_with_counts([70, 64, 90])
    assert max_per_class(y) == 64
    for n, reps in ((64, 1), (32, 2), (16, 4), (8, 8)):
        parts = [partition_indices(y, Partition(n, i, seed=5)) for i in range(reps)]
        joined = torch.cat(parts)
        assert joined.unique().numel() == joined.numel() == 3 * n * reps       # disjoint
        for idx in parts:
            assert torch.bincount(y[idx], minlength=3).tolist() == [n, n, n]  # exactly n of every class
            assert torch.equal(idx, idx.sort().values)
        again = [partition_indices(y, Partition(n, i, seed=5)) for i in range(reps)]
        assert all(torch.equal(a, b) for a, b in zip(parts, again))          # stable across calls
    other = partition_indices(y, Partition(16, 0, seed=6))
    assert not torch.equal(other, partition_indices(y, Partition(16, 0, seed=5)))  # the seed matters


def test_class_pools_are_permutations_of_each_class():
    y = labels_with_counts([5, 7])
    pools = class_pools(y, seed=1)
    assert [sorted(p.tolist()) for p in pools] == [torch.nonzero(y == c).flatten().tolist() for c in (0, 1)]


def test_too_many_partitions_are_refused():
    y = labels_with_counts([40, 30])
    with pytest.raises(ValueError, match=r"partition 3 of 10 per class needs 40 examples.*smallest class of the "
                                         r"training pool has 30: at most 3 disjoint"):
        partition_indices(y, Partition(10, 3))
    with pytest.raises(ValueError, match="smallest class of the training pool has 0"):
        partition_indices(y, Partition(1, 0), num_classes=3)


def test_schedule_defaults_and_guards():
    schedule = partition_schedule(5400)
    assert schedule.sizes == (5400, 2700, 1350, 675, 337) and schedule.reps == (1, 2, 4, 8, 16)
    assert partition_schedule(5400, 3).reps == (1, 2, 4)
    parts = partition_schedule(100, 3, [1, 2, 3]).partitions(seed=2)
    assert [(p.per_class, p.index, p.seed) for p in parts] == [(100, 0, 2), (50, 0, 2), (50, 1, 2), (25, 0, 2),
                                                               (25, 1, 2), (25, 2, 2)]
    with pytest.raises(ValueError, match="size 50 per class holds at most 2 disjoint partitions"):
        partition_schedule(100, 2, [1, 3])
    with pytest.raises(ValueError, match=r"one count per size \(3"):
        partition_schedule(100, 3, [1, 2])
    with pytest.raises(ValueError, match="cannot be halved 7 times"):
        partition_schedule(100, 8)
    with pytest.raises(ValueError, match="reps must be ints >= 1"):
        partition_schedule(100, 2, [1, 0])


@pytest.mark.parametrize(("values", "error", "match"), [
    ({"per_class": 0}, ValueError, "per_class must be >= 1; got 0"),
    ({"per_class": 10, "index": -1}, ValueError, "index must be >= 0; got -1"),
    ({"per_class": 2.5}, TypeError, "per_class must be an int; got float 2.5"),
    ({"index": 1}, ValueError, "needs 'per_class'"),
    ({"per_class": 1, "fold": 2}, ValueError, "needs 'per_class' and may have 'index', 'seed'"),
    ([10, 0], TypeError, "a partition is a mapping"),
])
def test_bad_partition_raises(values, error, match):
    with pytest.raises(error, match=match):
        Partition.from_dict(values)


def test_train_config_partition_guards():
    with pytest.raises(ValueError, match="limit_train and partition exclude each other"):
        TrainConfig(partition={"per_class": 10}, limit_train=100)
    assert TrainConfig(partition={"per_class": 10}).partition == {"per_class": 10, "index": 0, "seed": 0}


def test_validation_and_test_splits_never_change_with_n_or_the_run_seed():
    base = dict(dataset="synthetic", val_fraction=0.1)
    datasets = [build_data(TrainConfig(**base, seed=s, partition={"per_class": n, "index": i, "seed": 3}))
                for s, n, i in ((0, 100, 0), (4, 50, 1), (1, 25, 3))]
    first = datasets[0]
    for data in datasets:
        assert torch.equal(data.val_x, first.val_x) and torch.equal(data.val_y, first.val_y)
        assert torch.equal(data.test_x, first.test_x)
    assert [d.train_y.numel() for d in datasets] == [400, 200, 100]
    # the partitions come from the pool: none of their images is a validation image
    full = build_data(TrainConfig(**base, seed=3))
    pool = {tuple(x.flatten().tolist()) for x in full.train_x}
    assert all(tuple(x.flatten().tolist()) in pool for x in datasets[1].train_x)
    # N/2 partitions 0 and 1 are disjoint
    half = [build_data(TrainConfig(**base, partition={"per_class": 50, "index": i, "seed": 3})) for i in (0, 1)]
    a, b = ({tuple(x.flatten().tolist()) for x in d.train_x} for d in half)
    assert not a & b


def test_train_command_takes_a_partition(capsys):
    from torchsphere.cli import build_parser, main, train_config

    args = build_parser().parse_args(["train", "--partition", "10,1,2", "--output", "x"])
    assert train_config(args, args._parser).partition == {"per_class": 10, "index": 1, "seed": 2}
    args = build_parser().parse_args(["train", "--partition", "10", "--output", "x"])
    assert train_config(args, args._parser).partition == {"per_class": 10, "index": 0, "seed": 0}
    with pytest.raises(SystemExit) as info:
        main(["train", "--partition", "0,1", "--output", "x"])
    assert info.value.code == 2
    assert "expected PER_CLASS[,INDEX[,SEED]] with PER_CLASS >= 1, got '0,1'" in capsys.readouterr().err
