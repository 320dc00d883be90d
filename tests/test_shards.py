"""Site partitions (torchsphere.data.shards): iid, label shards, Dirichlet label skew; seeded; clear errors."""
from __future__ import annotations

import pytest
import torch

from torchsphere.data.shards import PARTITIONS, partition_labels


def balanced_labels(per_class: int = 20, classes: int = 10) -> torch.Tensor:
    labels = torch.arange(classes).repeat_interleave(per_class)
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(5))]


@pytest.mark.parametrize("method", PARTITIONS)
@pytest.mark.parametrize("sites", [1, 3, 4])
def test_shards_are_disjoint_cover_the_split_and_are_seeded(method, sites):
    labels = balanced_labels()
    part = partition_labels(labels, sites, method, seed=3, alpha=1.0)
    everything = torch.cat(part.shards)
    assert torch.equal(everything.sort().values, torch.arange(labels.numel()))  # disjoint and complete
    assert all(torch.equal(s, s.sort().values) for s in part.shards)
    assert part.histograms == [torch.bincount(labels[s], minlength=10).tolist() for s in part.shards]
    assert part.sizes == [sum(h) for h in part.histograms]
    again = partition_labels(labels, sites, method, seed=3, alpha=1.0)
    assert all(torch.equal(a, b) for a, b in zip(part.shards, again.shards))  # a pure function of the seed
    record = part.describe()
    assert record["method"] == method and record["seed"] == 3 and record["num_sites"] == sites


def test_one_iid_site_is_the_split_in_order_and_iid_sizes_are_balanced():
    labels = balanced_labels()
    assert torch.equal(partition_labels(labels, 1).shards[0], torch.arange(200))
    sizes = partition_labels(labels, 3, seed=1).sizes
    assert sorted(sizes) == [66, 67, 67]
    other = partition_labels(labels, 3, seed=2).shards
    assert not torch.equal(partition_labels(labels, 3, seed=1).shards[0], other[0])


def test_label_shards_give_each_site_at_most_shards_per_site_classes():
    labels = balanced_labels(per_class=20, classes=10)  # 10 pieces of 20: each piece is one class
    part = partition_labels(labels, 5, "label-shards", shards_per_site=2, seed=0)
    for hist in part.histograms:
        assert sum(1 for c in hist if c) <= 2
    assert part.options["shards_per_site"] == 2


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = balanced_labels(per_class=100)

    def mean_top_share(alpha: float) -> float:
        hists = torch.tensor(partition_labels(labels, 4, "dirichlet", alpha=alpha, seed=0).histograms).double()
        return float((hists.max(dim=1).values / hists.sum(dim=1)).mean())

    skewed, mild = mean_top_share(0.1), mean_top_share(100.0)
    assert skewed > 0.3 > 0.15 > mild  # iid gives 0.1 per class; alpha = 0.1 concentrates sites on a few
    assert partition_labels(labels, 4, "dirichlet", alpha=0.5, seed=0).sizes != \
        partition_labels(labels, 4, "dirichlet", alpha=0.5, seed=1).sizes


def test_dirichlet_leaves_the_global_rng_alone():
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    partition_labels(balanced_labels(), 3, "dirichlet", seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_errors_name_the_problem():
    labels = balanced_labels()
    with pytest.raises(ValueError, match=r"unknown partition 'random'; choose from \['iid', 'label-shards'"):
        partition_labels(labels, 2, "random")
    with pytest.raises(ValueError, match=r"sites=8 is more than the data allows: 200 training examples give no "
                                         r"site 32 examples \(at most 6 sites of 32\)"):
        partition_labels(labels, 8, min_size=32)
    with pytest.raises(ValueError, match=r"num_sites must be >= 1; got 0"):
        partition_labels(labels, 0)
    with pytest.raises(TypeError, match=r"num_sites must be an int; got float 2.0"):
        partition_labels(labels, 2.0)
    with pytest.raises(ValueError, match=r"labels span \[0, 9\] but num_classes=5: the class count does not match"):
        partition_labels(labels, 2, num_classes=5)
    with pytest.raises(TypeError, match=r"labels must be a 1-D integer tensor; got a 1-D torch.float32 tensor"):
        partition_labels(labels.float(), 2)
    with pytest.raises(ValueError, match=r"dirichlet alpha must be a finite number > 0; got 0"):
        partition_labels(labels, 2, "dirichlet", alpha=0)
    with pytest.raises(ValueError, match=r"label-shards needs sites \* shards_per_site <= 200 examples; got 2 \* 101"):
        partition_labels(labels, 2, "label-shards", shards_per_site=101)
    with pytest.raises(ValueError, match=r"partition 'dirichlet' gave site \d+ \d+ examples, fewer than the 20 it "
                                         r"needs \(one batch\) \(raise dirichlet_alpha"):
        partition_labels(labels, 8, "dirichlet", alpha=0.05, min_size=20, seed=0)
