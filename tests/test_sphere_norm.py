"""Tests of torchsphere.nn.SphereNorm1d/2d/3d."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import AUTOCAST_ATOL, assert_close
from torchsphere.nn import SphereConv2d, SphereNorm1d, SphereNorm2d, SphereNorm3d, param_groups

OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
NORM = {1: SphereNorm1d, 2: SphereNorm2d, 3: SphereNorm3d}


def _g(cos: float, operator: str, k: float) -> float:
    """The operators written the slow way (official SphereNet sigmoid form)."""
    theta = math.acos(min(max(cos, -1 + 1e-6), 1 - 1e-6))
    if operator == "cosine":
        return cos
    if operator == "linear":
        return 1 - 2 * theta / math.pi
    e, t = math.exp(-math.pi / (2 * k)), math.exp(theta / k - math.pi / (2 * k))
    return (1 + e) / (1 - e) * (1 - t) / (1 + t)


def reference_sphere_norm2d(layer: SphereNorm2d, x: torch.Tensor) -> torch.Tensor:
    """gamma g(theta) (||w|| ||x_patch||)^rho + beta, one patch and one filter at a time (unfold, float64)."""
    w = layer.weight.detach().double()
    c_out = w.shape[0]
    kh, kw = w.shape[2:]
    cols = F.unfold(x.double(), (kh, kw), layer.dilation, layer.padding, layer.stride)  # (N, C_in k k, L)
    n, _, length = cols.shape
    g_in = w.shape[1]
    per_group = c_out // layer.groups
    ks = (layer.effective_k().detach().tolist() if layer.operator == "learnable_sigmoid"
          else [layer.sigmoid_k] * c_out)
    rho = [0.0] * c_out if layer.rho is None else layer.effective_rho().detach().tolist()
    gamma, beta = layer.gamma.detach().tolist(), layer.beta.detach().tolist()
    out = torch.empty(n, c_out, length, dtype=torch.float64)
    for i in range(n):
        for c in range(c_out):
            group = c // per_group
            wc = w[c].flatten().tolist()
            w_norm = math.sqrt(sum(v * v for v in wc) + layer.eps)
            for pos in range(length):
                patch = cols[i, group * g_in * kh * kw:(group + 1) * g_in * kh * kw, pos].tolist()
                x_norm = math.sqrt(sum(v * v for v in patch) + layer.eps)
                cos = sum(a * b for a, b in zip(wc, patch)) / (w_norm * x_norm)
                out[i, c, pos] = gamma[c] * _g(cos, layer.operator, ks[c]) * (w_norm * x_norm) ** rho[c] + beta[c]
    h_out = (x.shape[2] + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1) // layer.stride[0] + 1
    return out.reshape(n, c_out, h_out, -1)


def _randomize(layer, rho=True):
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 2.0)
        layer.beta.uniform_(-1.0, 1.0)
        if layer.rho is not None and rho:
            layer.rho.uniform_(0.1, 0.9)
        if layer.sigmoid_k_raw is not None:
            layer.sigmoid_k_raw.uniform_(-0.5, 0.8)
    return layer


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (1, 1, 2, 2)])
def test_matches_per_patch_reference(operator, groups, stride, padding, dilation):
    layer = _randomize(SphereNorm2d(4, 6, 3, stride, padding, dilation, groups, operator=operator,
                                    dtype=torch.float64))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    x[0, :, :3, :3] = 0  # an all-zero patch
    assert_close(layer(x), reference_sphere_norm2d(layer, x))


@pytest.mark.parametrize("nd", (1, 2, 3))
@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 0, 1), (1, 1, 2, 2)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_rho_one_cosine_reproduces_the_convolution(nd, bias, groups, stride, padding, dilation, dtype, device):
    layer = NORM[nd](4, 6, 3, stride, padding, dilation, groups, bias=bias, operator="cosine", dtype=dtype)
    with torch.no_grad():
        layer.rho.fill_(1.0)
        if bias:
            layer.bias.normal_()
    layer = layer.to(device)
    x = torch.randn(2, 4, *([7] * nd), dtype=dtype).to(device)
    expected = CONV[nd](x, layer.weight, layer.bias, stride, padding, dilation, groups)
    assert_close(layer(x), expected)


def test_rho_one_reproduces_a_loaded_conv2d():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    layer = SphereNorm2d(3, 5, 3, padding=1, bias=True)
    missing = layer.load_state_dict(conv.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["beta", "gamma", "rho"]
    with torch.no_grad():
        layer.rho.fill_(1.0)
    x = torch.randn(2, 3, 8, 8)
    assert_close(layer(x), conv(x))


@pytest.mark.parametrize("operator", OPERATORS)
def test_init_equals_sphereconv(operator):
    layer = SphereNorm2d(3, 5, 3, padding=1, operator=operator)
    conv = SphereConv2d(3, 5, 3, padding=1, operator=operator)
    conv.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 3, 6, 6)
    assert_close(layer(x), conv(x))
    torch.testing.assert_close(layer.gamma, torch.ones(5))
    torch.testing.assert_close(layer.beta, torch.zeros(5))
    torch.testing.assert_close(layer.effective_rho(), torch.zeros(5))


@pytest.mark.parametrize("nd", (1, 2, 3))
@pytest.mark.parametrize("operator", OPERATORS)
def test_no_batch_statistics(nd, operator, device):
    layer = _randomize(NORM[nd](3, 4, 3, padding=1, operator=operator)).to(device)
    x = torch.randn(5, 3, *([6] * nd)).to(device)
    layer.train()
    batched = layer(x)
    singles = torch.cat([layer(x[i:i + 1]) for i in range(5)])  # batch size 1
    assert_close(singles, batched)
    assert_close(layer(x[1:4]), batched[1:4])
    layer.eval()
    assert_close(layer(x), batched)
    assert_close(layer(x[0]), batched[0])  # unbatched input


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("magnitude", (True, False))
def test_gradcheck_float64(operator, magnitude):
    layer = _randomize(SphereNorm2d(2, 2, 2, stride=1, padding=1, operator=operator, magnitude=magnitude,
                                    bias=True, dtype=torch.float64))
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    names = list(params)

    def fn(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *params.values()), fast_mode=True)


def test_rho_is_clamped_to_unit_interval():
    layer = SphereNorm2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        layer.rho.fill_(1.0)
    at_one = layer(x)
    with torch.no_grad():
        layer.rho.fill_(1.7)
    assert_close(layer(x), at_one)
    with torch.no_grad():
        layer.rho.fill_(-0.3)
    torch.testing.assert_close(layer.effective_rho(), torch.zeros(4))
    with torch.no_grad():
        layer.rho.zero_()
    at_zero = layer(x)
    no_magnitude = SphereNorm2d(3, 4, 3, padding=1, magnitude=False)
    assert no_magnitude.load_state_dict(layer.state_dict(), strict=False).unexpected_keys == ["rho"]
    assert_close(at_zero, no_magnitude(x))
    # gradient reaches rho at its init 0 (clamp passes the gradient at the bound)
    layer(x).sum().backward()
    assert layer.rho.grad is not None and (layer.rho.grad != 0).all()


@pytest.mark.parametrize("operator", OPERATORS)
def test_magnitude_false_is_affine_sphereconv(operator):
    layer = _randomize(SphereNorm2d(3, 4, 3, padding=1, operator=operator, magnitude=False))
    assert layer.rho is None and "rho" not in layer.state_dict()
    conv = SphereConv2d(3, 4, 3, padding=1, operator=operator)
    conv.load_state_dict(layer.state_dict(), strict=False)
    x = torch.randn(2, 3, 5, 5)
    expected = layer.gamma.view(1, -1, 1, 1) * conv(x) + layer.beta.view(1, -1, 1, 1)
    assert_close(layer(x), expected)
    assert layer(x).abs().max() <= (layer.gamma.abs() + layer.beta.abs()).max() + 1e-6  # bounded, as SphereConv


def test_padding_mode_and_scale_invariance():
    layer = _randomize(SphereNorm2d(3, 4, 3, padding=1, padding_mode="reflect", magnitude=False))
    plain = SphereNorm2d(3, 4, 3, padding=0, magnitude=False)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert_close(layer(x), plain(F.pad(x, (1, 1, 1, 1), mode="reflect")))
    assert_close(layer(5.0 * x), layer(x), atol=1e-4, rtol=1e-4)  # rho = 0: scale invariant up to eps


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_autocast(dtype, device):
    layer = _randomize(SphereNorm2d(3, 4, 3, padding=1), rho=False).to(device)
    x = torch.randn(2, 3, 6, 6).to(device)
    reference = layer(x)
    with torch.autocast(device.type, dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out.float(), reference, atol=AUTOCAST_ATOL * 4, rtol=0)  # gamma up to 2, beta up to 1
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_param_groups_and_repr():
    layer = SphereNorm2d(3, 4, 3, operator="learnable_sigmoid")
    decay, no_decay = param_groups(nn.Sequential(layer))
    decayed = {id(p) for p in decay["params"]}
    assert id(layer.weight) not in decayed and id(layer.sigmoid_k_raw) not in decayed
    assert {id(layer.gamma), id(layer.beta), id(layer.rho)} <= decayed
    assert "magnitude=True" in repr(layer) and "operator='learnable_sigmoid'" in repr(layer)
    assert set(layer.state_dict()) == {"weight", "sigmoid_k_raw", "gamma", "beta", "rho"}


def test_bad_input_raises():
    with pytest.raises(TypeError, match="magnitude must be a bool"):
        SphereNorm2d(3, 4, 3, magnitude=1)
    with pytest.raises(ValueError, match="unknown sphere operator 'tanh'"):
        SphereNorm2d(3, 4, 3, operator="tanh")
    layer = SphereNorm2d(3, 4, 3)
    with pytest.raises(ValueError, match="input has 5 channels but weight expects 3"):
        layer(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match="input of sphere_conv2d must have 4 dims"):
        layer(torch.randn(6, 6))
