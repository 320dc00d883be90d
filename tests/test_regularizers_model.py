"""HypersphericalRegularizer: layer discovery, coefficients, include/exclude, gradients, poles, defaults."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close
from torchsphere.functional import orthonormal_penalty
from torchsphere.nn import AngularHead, SphereConv2d
from torchsphere.regularizers import (METHODS, HypersphericalRegularizer, PoleConfig, default_lambdas,
                                      hyperspherical_energy, mgd, mhc, mhp, mhs, r_mhp, stochastic_energy)


def plain_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 12), nn.ReLU(), nn.Linear(12, 5),
    )


class SphereNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(SphereConv2d(3, 6, 3), nn.ReLU(), SphereConv2d(6, 8, 3, operator="linear"))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = AngularHead(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def test_finds_conv_and_linear_layers_and_the_classifier():
    reg = HypersphericalRegularizer(plain_net(), "mhe")
    assert reg.hidden_layers == ["0", "3", "6"]
    assert reg.output_layer == "8"


def test_finds_sphere_layers_and_an_angular_head():
    reg = HypersphericalRegularizer(SphereNet(), "mhe")
    assert reg.hidden_layers == ["features.0", "features.2"]
    assert reg.output_layer == "head"


def test_output_named_by_the_user_may_be_a_conv():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 10, 1))  # CNN-9 style 1x1 score conv
    assert HypersphericalRegularizer(model).output_layer is None
    reg = HypersphericalRegularizer(model, output="2")
    assert reg.hidden_layers == ["0"] and reg.output_layer == "2"


@pytest.mark.parametrize("method", ["mhe", "mhe_half", "mhe_angular"])
def test_sum_with_lambdas_and_half_space_only_on_hidden_layers(method):
    model = plain_net()
    reg = HypersphericalRegularizer(model, method, lambda_hidden=0.3, lambda_output=2.0, s=1)
    angular, half = method == "mhe_angular", method == "mhe_half"
    hidden = sum(hyperspherical_energy(model[i].weight, 1, angular=angular, half_space=half) for i in (0, 3, 6))
    out = hyperspherical_energy(model[8].weight, 1, angular=angular)
    assert_close(reg(), 0.3 * hidden + 2.0 * out)


def test_each_method_matches_its_function():
    torch.manual_seed(0)
    model = plain_net()
    w_h, w_o = [model[i].weight for i in (0, 3, 6)], model[8].weight
    expected = {
        "mhs": lambda r: sum(mhs(w, half_space=True) for w in w_h) * 0.1 + mhs(w_o),
        "mgd": lambda r: sum(mgd(w, half_space=True) for w in w_h) * 0.01 + 0.1 * mgd(w_o),
        "r_mhp": lambda r: sum(r_mhp(w) for w in w_h) * 0.01 + 0.1 * r_mhp(w_o),
        "mhp": lambda r: sum(mhp(w, p, half_space=True) for w, p in zip(w_h, r.poles)) + 10 * mhp(w_o, r.poles[3]),
        "mhc": lambda r: (sum(mhc(w, p, half_space=True) for w, p in zip(w_h, r.poles)) * 0.01
                          + 0.1 * mhc(w_o, r.poles[3])),
        "orthonormal": lambda r: 1e-4 * sum(orthonormal_penalty(w) for w in w_h),
    }
    for method, fn in expected.items():
        reg = HypersphericalRegularizer(model, method)
        assert_close(reg(), fn(reg).detach())


def test_labels_give_the_batch_class_estimate_for_the_output_layer():
    model = plain_net()
    reg = HypersphericalRegularizer(model, "mhe_half", s=0)
    labels = torch.tensor([1, 3, 3])
    hidden = sum(hyperspherical_energy(model[i].weight, 0, half_space=True) for i in (0, 3, 6))
    out = stochastic_energy(model[8].weight, 0, labels=labels)
    assert_close(reg(labels), hidden + 10 * out)
    assert_close(reg(torch.arange(5)), reg())  # every class present: the exact energy
    with pytest.raises(ValueError, match="labels apply to the MHE methods"):
        HypersphericalRegularizer(model, "mgd")(labels)


def test_include_and_exclude_select_layers():
    model = plain_net()
    assert HypersphericalRegularizer(model, include=["0", "8"]).hidden_layers == ["0"]
    assert HypersphericalRegularizer(model, include="[03]").layers[-1].name == "3"
    reg = HypersphericalRegularizer(model, exclude="8")
    assert reg.output_layer is None and reg.hidden_layers == ["0", "3", "6"]
    sphere = HypersphericalRegularizer(SphereNet(), include="features.*")
    assert sphere.hidden_layers == ["features.0", "features.2"] and sphere.output_layer is None


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_the_regularized_weights_only(method):
    model = SphereNet()
    reg = HypersphericalRegularizer(model, method, exclude="features.2", lambda_output=1.0)
    loss = reg()
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.features[0].weight.grad).all()
    assert model.features[0].weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0
    assert model.features[2].weight.grad is None
    assert all(p.grad is None for p in reg.poles)  # the poles are held fixed in the network term


@pytest.mark.parametrize("method", ["mhp", "mhc"])
def test_pole_step_moves_the_poles_not_the_model(method):
    model = plain_net()
    reg = HypersphericalRegularizer(model, method, poles=PoleConfig(steps=3, lr=0.05))
    assert reg.has_poles and len(reg.poles) == 4
    assert [tuple(p.shape) for p in reg.poles] == [(1, 27), (1, 54), (1, 128), (1, 12)]
    before = [p.detach().clone() for p in reg.poles]
    value = reg.pole_step()
    assert value.dim() == 0 and torch.isfinite(value)
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, reg.poles))
    assert all(p.grad is None for p in model.parameters())
    assert set(reg.state_dict()) == {f"poles.{i}" for i in range(4)}


def test_pole_step_is_a_no_op_without_poles():
    reg = HypersphericalRegularizer(plain_net(), "mhe")
    assert not reg.has_poles and reg.pole_step() is None and len(list(reg.parameters())) == 0


def test_documented_defaults():
    assert default_lambdas("mhe") == (0.1, 1.0)  # full space: consistent with the official logs
    assert default_lambdas("mhe_half") == (1.0, 10.0)  # half space: the released code
    assert default_lambdas("mhe_angular", s=0) == (0.1, 1.0)
    assert default_lambdas("mhe_angular", s=2) == pytest.approx((0.01, 0.1))
    assert default_lambdas("mhe_angular_half", s=1) == pytest.approx((0.1, 1.0))
    assert default_lambdas("orthonormal") == (1e-4, 0.0)
    reg = HypersphericalRegularizer(plain_net(), "mhe", half_space=True)
    assert (reg.lambda_hidden, reg.lambda_output, reg.s) == (1.0, 10.0, 2.0)
    assert HypersphericalRegularizer(plain_net(), "mhs").half_space


def test_shared_weights_and_single_neuron_layers():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 3), nn.Linear(3, 1))
    with pytest.warns(UserWarning, match=r"fewer than 2 neurons: \['4'\]"):
        reg = HypersphericalRegularizer(model, output="3")
    assert reg.hidden_layers == ["0"] and reg.output_layer == "3"
    assert [layer.name for layer in HypersphericalRegularizer(model, "orthonormal").layers] == ["0", "3", "4"]


def test_result_is_float32_under_autocast():
    model = plain_net()
    reg = HypersphericalRegularizer(model, "mhe_half")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = reg()
    assert value.dtype == torch.float32
    assert_close(value, reg())


def test_bad_arguments_raise():
    model = plain_net()
    with pytest.raises(ValueError, match="unknown regularizer method 'mhx'; choose from"):
        HypersphericalRegularizer(model, "mhx")
    with pytest.raises(ValueError, match="include pattern 'conv\\*' matches no"):
        HypersphericalRegularizer(model, include="conv*")
    with pytest.raises(ValueError, match="exclude pattern 'fc' matches no"):
        HypersphericalRegularizer(model, exclude=["fc"])
    with pytest.raises(ValueError, match="output='head' names no module"):
        HypersphericalRegularizer(model, output="head")
    with pytest.raises(ValueError, match="output='2' has no weight"):
        HypersphericalRegularizer(model, output="2")
    with pytest.raises(ValueError, match="s must be a finite number >= 0; got -1"):
        HypersphericalRegularizer(model, s=-1)
    with pytest.raises(ValueError, match="s applies to the MHE methods"):
        HypersphericalRegularizer(model, "mgd", s=1)
    with pytest.raises(ValueError, match="method 'r_mhp' has no half-space form"):
        HypersphericalRegularizer(model, "r_mhp", half_space=True)
    with pytest.raises(ValueError, match="method 'mhe_half' is half-space"):
        HypersphericalRegularizer(model, "mhe_half", half_space=False)
    with pytest.raises(ValueError, match="gamma applies to method 'mhc' only"):
        HypersphericalRegularizer(model, "mhp", gamma=5.0)
    with pytest.raises(ValueError, match="lambda_hidden must be a finite number >= 0; got -0.1"):
        HypersphericalRegularizer(model, lambda_hidden=-0.1)
    with pytest.raises(ValueError, match="eps must be a finite number > 0; got 0"):
        HypersphericalRegularizer(model, eps=0)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1 or None; got 0"):
        HypersphericalRegularizer(model, chunk_size=0)
    with pytest.raises(TypeError, match="model must be an nn.Module; got list"):
        HypersphericalRegularizer([model])
