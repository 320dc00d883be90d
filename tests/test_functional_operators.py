"""The angular operators g(theta) of SphereConv and ``safe_acos`` (Liu et al., NIPS 2017; wy1iu/SphereNet values)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from torchsphere.functional import ACOS_EPS, angular_activation, learnable_k, safe_acos
from torchsphere.functional.operators import sigmoid_of_angle

OPERATORS = ["linear", "cosine", "sigmoid", "learnable_sigmoid"]
# largest deviation of g at theta = 0 or pi caused by the documented acos clamp (|dg/dtheta| <= 2/pi, 1/(2k tanh))
CLAMP_THETA = math.acos(1 - ACOS_EPS)


def _g(operator, theta, k=0.3):
    cos = torch.cos(torch.as_tensor(theta, dtype=torch.float64, device=DEVICE))
    return angular_activation(cos, operator, k if "sigmoid" in operator else None)


def test_clamp_margin_is_small():
    assert CLAMP_THETA < 1.5e-3


@pytest.mark.parametrize("operator", OPERATORS)
def test_anchor_values(operator):
    """g(0) = 1, g(pi/2) = 0, g(pi) = -1 (the ends up to the documented clamp)."""
    slope = 2 / math.pi if operator == "linear" else 1 / (2 * 0.3 * math.tanh(math.pi / 1.2))
    assert _g(operator, 0.0).item() == pytest.approx(1.0, abs=slope * CLAMP_THETA + 1e-12)
    assert _g(operator, math.pi / 2).item() == pytest.approx(0.0, abs=1e-12)
    assert _g(operator, math.pi).item() == pytest.approx(-1.0, abs=slope * CLAMP_THETA + 1e-12)
    assert _g(operator, 0.3).item() > _g(operator, 0.5).item()  # decreasing


def test_exact_anchor_values_away_from_clamp():
    """The formulas themselves hit the anchors exactly (no clamp involved)."""
    for k in (0.1, 0.3, 0.7, 2.0):
        theta = torch.tensor([0.0, math.pi / 2, math.pi], dtype=torch.float64)
        torch.testing.assert_close(sigmoid_of_angle(theta, k), torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64),
                                   rtol=0, atol=1e-14)


@pytest.mark.parametrize("k, constant, g_quarter", [(0.3, 1.0107, 0.873), (0.7, 1.2372, 0.629)])
def test_sigmoid_reference_constants(k, constant, g_quarter):
    """Values quoted in the SphereNet reference: the leading constant coth(pi/4k) and g(pi/4)."""
    a = math.exp(-math.pi / (2 * k))
    assert (1 + a) / (1 - a) == pytest.approx(constant, abs=5e-5)
    assert 1 / math.tanh(math.pi / (4 * k)) == pytest.approx(constant, abs=5e-5)
    assert _g("sigmoid", math.pi / 4, k).item() == pytest.approx(g_quarter, abs=5e-4)
    assert _g("learnable_sigmoid", math.pi / 4, torch.tensor(k)).item() == pytest.approx(g_quarter, abs=5e-4)


def test_sigmoid_matches_exp_form_and_limits():
    theta = torch.linspace(0, math.pi, 101, dtype=torch.float64)
    for k in (0.05, 0.3, 0.7, 3.0):
        a = math.exp(-math.pi / (2 * k))
        e = torch.exp(theta / k - math.pi / (2 * k))
        exp_form = (1 + a) / (1 - a) * (1 - e) / (1 + e)
        torch.testing.assert_close(sigmoid_of_angle(theta, k), exp_form, rtol=0, atol=1e-12)
    # small k approaches a step, large k approaches the linear operator
    assert sigmoid_of_angle(torch.tensor(0.3), 0.01).item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(sigmoid_of_angle(theta, 200.0), 1 - 2 * theta / math.pi, rtol=0, atol=1e-5)


def test_linear_and_cosine_formulas():
    theta = torch.linspace(0.01, math.pi - 0.01, 57, dtype=torch.float64)
    cos = torch.cos(theta)
    torch.testing.assert_close(angular_activation(cos, "linear"), 1 - 2 * theta / math.pi, rtol=0, atol=1e-12)
    assert angular_activation(cos, "cosine") is cos  # no acos at all


def test_sigmoid_default_k_is_official_0_3():
    cos = torch.rand(10, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(angular_activation(cos, "sigmoid"), angular_activation(cos, "sigmoid", 0.3))


def test_per_channel_k_broadcast_along_dim():
    cos = torch.rand(2, 3, 4, 5, dtype=torch.float64) * 2 - 1
    k = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    out = angular_activation(cos, "learnable_sigmoid", k, dim=1)
    for c in range(3):
        torch.testing.assert_close(out[:, c], angular_activation(cos[:, c], "sigmoid", k[c].item()))
    last = angular_activation(cos.movedim(1, -1), "sigmoid", k, dim=-1)
    torch.testing.assert_close(last, out.movedim(1, -1))


@pytest.mark.parametrize("operator", OPERATORS)
def test_gradcheck_operators(operator):
    for seed in range(5):
        torch.manual_seed(seed)
        cos = (torch.rand(4, 3, 5, dtype=torch.float64) * 1.9 - 0.95).requires_grad_()  # away from |cos| = 1
        k = (torch.rand(3, dtype=torch.float64) + 0.1).requires_grad_()
        if "sigmoid" in operator:
            assert torch.autograd.gradcheck(lambda c, k: angular_activation(c, operator, k), (cos, k))
        else:
            assert torch.autograd.gradcheck(lambda c: angular_activation(c, operator), (cos,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_acos_finite_at_plus_minus_one(dtype):
    x = torch.tensor([-1.0, -1.0 + 1e-9, 0.0, 1.0 - 1e-9, 1.0], dtype=dtype, requires_grad=True)
    y = safe_acos(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().max() <= 1 / math.sqrt(ACOS_EPS * (2 - ACOS_EPS)) * (1 + 1e-3)
    assert y[0].item() == pytest.approx(math.pi, abs=2e-3) and y[-1].item() == pytest.approx(0.0, abs=2e-3)
    torch.testing.assert_close(safe_acos(torch.tensor(0.3, dtype=dtype)), torch.acos(torch.tensor(0.3, dtype=dtype)))


@pytest.mark.parametrize("operator", OPERATORS)
def test_operator_finite_gradient_at_plus_minus_one(operator):
    cos = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    k = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = angular_activation(cos, operator, k if "sigmoid" in operator else None)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()
    if "sigmoid" in operator:
        assert torch.isfinite(k.grad)


def test_learnable_k_reparameterization():
    raw = torch.tensor([-0.7, 0.0, 0.7], requires_grad=True)
    k = learnable_k(raw)
    torch.testing.assert_close(k, torch.tensor([0.75, 0.05, 0.75]))
    k.sum().backward()
    torch.testing.assert_close(raw.grad, torch.tensor([-1.0, 0.0, 1.0]))


def test_output_within_range():
    cos = torch.linspace(-1, 1, 1001, dtype=torch.float64)
    for operator in OPERATORS:
        out = angular_activation(cos, operator, torch.tensor(0.05) if "sigmoid" in operator else None)
        assert out.abs().max() <= 1.0
        assert (out.diff() >= 0).all()  # increasing in cos = decreasing in theta
