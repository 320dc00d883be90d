"""Weight-decay / no-decay parameter groups following the official SphereNet recipe."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from torchsphere.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear, param_groups


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.sphere = SphereConv2d(3, 4, 3, operator="learnable_sigmoid", bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.sphere1d = SphereConv1d(4, 4, 1)
        self.sphere3d = SphereConv3d(4, 4, 1, operator="sigmoid")
        self.shortcut = nn.Conv2d(3, 4, 1)
        self.ln = nn.LayerNorm(4)
        self.head_sphere = SphereLinear(4, 3, operator="learnable_sigmoid")
        self.fc = nn.Linear(4, 10)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_official_split():
    model = Mixed()
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert _names(model, no_decay) == {"sphere.weight", "sphere.sigmoid_k_raw", "sphere1d.weight", "sphere3d.weight",
                                       "head_sphere.weight", "head_sphere.sigmoid_k_raw"}
    assert _names(model, decay) == {"sphere.bias", "bn.weight", "bn.bias", "shortcut.weight", "shortcut.bias",
                                    "ln.weight", "ln.bias", "fc.weight", "fc.bias"}


def test_switches():
    model = Mixed()
    decay, no_decay = param_groups(model, 1e-4, decay_sphere_weights=True, decay_norm=False, decay_bias=False)
    assert _names(model, decay) == {"sphere.weight", "sphere1d.weight", "sphere3d.weight", "head_sphere.weight",
                                    "shortcut.weight", "fc.weight"}
    assert _names(model, no_decay) == {"sphere.sigmoid_k_raw", "head_sphere.sigmoid_k_raw", "sphere.bias", "bn.weight",
                                       "bn.bias", "ln.weight", "ln.bias", "shortcut.bias", "fc.bias"}


def test_every_trainable_parameter_once_and_optimizer_accepts_groups():
    model = Mixed()
    model.fc2 = model.fc  # a shared module: its parameters must appear once
    groups = param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    opt = torch.optim.SGD(groups, lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]


def test_negative_weight_decay_raises():
    with pytest.raises(ValueError, match=r"weight_decay must be >= 0; got -0.1"):
        param_groups(Mixed(), -0.1)
