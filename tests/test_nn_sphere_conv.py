"""SphereConv1d/2d/3d and SphereLinear modules (Liu et al., *Deep Hyperspherical Learning*, NIPS 2017)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import AUTOCAST_ATOL, DEVICE, assert_close
from torch import nn

from torchsphere.functional import sphere_conv1d, sphere_conv2d, sphere_conv3d
from torchsphere.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

OPERATORS = ["linear", "cosine", "sigmoid", "learnable_sigmoid"]
LAYERS = {1: (SphereConv1d, nn.Conv1d, sphere_conv1d), 2: (SphereConv2d, nn.Conv2d, sphere_conv2d),
          3: (SphereConv3d, nn.Conv3d, sphere_conv3d)}
SPATIAL = {1: (9,), 2: (7, 6), 3: (5, 4, 5)}


class SmallSphereNet(nn.Module):
    """Two SphereConv blocks and a SphereLinear head: the network compiled and exported below."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = SphereConv2d(3, 8, 3, padding=1, operator="linear")
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = SphereConv2d(8, 8, 3, stride=2, padding=1, operator="learnable_sigmoid")
        self.conv3 = SphereConv2d(8, 8, 3, padding=1, padding_mode="reflect", operator="sigmoid", bias=True)
        self.fc = SphereLinear(8, 5, operator="cosine")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, 5)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv3(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


# ------------------------------------------------------------------------------------------------ construction
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_defaults_follow_official_code(nd):
    sphere, parent, _ = LAYERS[nd]
    layer = sphere(4, 6, 3)
    assert isinstance(layer, parent)
    assert layer.bias is None  # the official SphereNet has no conv bias
    assert layer.operator == "cosine" and layer.eps == 1e-4 and layer.sigmoid_k == 0.3
    assert layer.sigmoid_k_raw is None and [n for n, _ in layer.named_parameters()] == ["weight"]
    assert SphereLinear(4, 3).bias is None


@pytest.mark.parametrize("operator", OPERATORS)
def test_extra_repr_shows_operator(operator):
    layer = SphereConv2d(3, 4, 3, operator=operator)
    assert f"operator='{operator}'" in repr(layer)
    assert f"operator='{operator}'" in repr(SphereLinear(3, 4, operator=operator))
    assert "sigmoid_k=0.3" in repr(layer) if operator == "sigmoid" else "sigmoid_k=" not in repr(layer)
    assert "eps=1e-06" in repr(SphereConv2d(3, 4, 3, eps=1e-6))


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("operator", OPERATORS)
def test_forward_matches_functional(nd, operator):
    sphere, _, fn = LAYERS[nd]
    layer = sphere(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, bias=True, operator=operator).to(DEVICE)
    x = torch.randn(2, 4, *SPATIAL[nd], device=DEVICE)
    out = layer(x)
    k = layer.sigmoid_k_raw.abs() + 0.05 if operator == "learnable_sigmoid" else 0.3
    expected = fn(x, layer.weight, layer.bias, 2, 1, 1, 2, operator=operator, sigmoid_k=k)
    assert_close(out, expected)
    assert out.abs().max() <= 1.0 + layer.bias.abs().max() + 1e-6


# ------------------------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_load_state_dict_round_trip_from_plain_conv(nd, bias):
    sphere, parent, _ = LAYERS[nd]
    conv = parent(4, 6, 3, padding=1, bias=bias)
    layer = sphere(4, 6, 3, padding=1, bias=bias, operator="linear")
    result = layer.load_state_dict(conv.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.weight, conv.weight)
    back = parent(4, 6, 3, padding=1, bias=bias)
    back.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(back.weight, conv.weight)
    if bias:
        assert torch.equal(back.bias, conv.bias)


def test_load_state_dict_from_linear():
    lin = nn.Linear(5, 3, bias=True)
    layer = SphereLinear(5, 3, bias=True, operator="sigmoid")
    layer.load_state_dict(lin.state_dict(), strict=True)
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.bias, lin.bias)


def test_learnable_sigmoid_reports_exactly_k_missing():
    conv = nn.Conv2d(3, 4, 3)
    layer = SphereConv2d(3, 4, 3, bias=True, operator="learnable_sigmoid")
    result = layer.load_state_dict(conv.state_dict(), strict=False)
    assert result.missing_keys == ["sigmoid_k_raw"] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match="sigmoid_k_raw"):
        layer.load_state_dict(conv.state_dict(), strict=True)
    layer.load_state_dict(layer.state_dict(), strict=True)
    # a plain conv loads a learnable sphere layer's state dict once the extra key is dropped
    state = {k: v for k, v in layer.state_dict().items() if k != "sigmoid_k_raw"}
    nn.Conv2d(3, 4, 3).load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------ equivalences
def test_cosine_layer_equals_conv_divided_by_norms():
    layer = SphereConv2d(3, 5, 3, stride=2, padding=1, operator="cosine").to(DEVICE)
    x = torch.randn(2, 3, 9, 8, device=DEVICE)
    eps = layer.eps
    conv = F.conv2d(x, layer.weight, None, 2, 1)  # (N, C_out, H', W')
    patches = F.unfold(x, 3, padding=1, stride=2)  # (N, C_in * 9, H' W')
    x_norm = torch.sqrt(patches.square().sum(1) + eps).reshape(2, 1, *conv.shape[2:])
    w_norm = torch.sqrt(layer.weight.square().sum((1, 2, 3)) + eps).reshape(1, -1, 1, 1)
    assert_close(layer(x), conv / x_norm / w_norm)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_padding_mode_equals_explicit_padding(nd, mode):
    sphere, _, fn = LAYERS[nd]
    padding = (1,) + (2,) * (nd - 1)
    layer = sphere(3, 4, 3, stride=(2,) + (1,) * (nd - 1), padding=padding, padding_mode=mode,
                   operator="sigmoid").double()
    x = torch.randn(2, 3, *SPATIAL[nd], dtype=torch.float64)
    pads = [p for d in reversed(padding) for p in (d, d)]  # F.pad order: last dim first
    expected = fn(F.pad(x, pads, mode=mode), layer.weight, None, layer.stride, 0, operator="sigmoid")
    assert_close(layer(x), expected)
    zeros = sphere(3, 4, 3, stride=layer.stride, padding=layer.padding, operator="sigmoid").double()
    zeros.load_state_dict(layer.state_dict())
    assert not torch.allclose(zeros(x), layer(x))  # the mode really changes the border


def test_padding_mode_same():
    layer = SphereConv2d(2, 3, (3, 2), padding="same", padding_mode="circular").double()
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    out = layer(x)
    assert out.shape[2:] == x.shape[2:]
    # 'same' with an even kernel pads (0 before, 1 after) on the last dim and (1, 1) on the first
    expected = sphere_conv2d(F.pad(x, [0, 1, 1, 1], mode="circular"), layer.weight)
    assert_close(out, expected)


# ------------------------------------------------------------------------------------------------ learnable k
def test_learnable_k_init_and_training():
    layer = SphereConv2d(3, 4, 3, padding=1, operator="learnable_sigmoid")
    assert layer.sigmoid_k_raw.shape == (4,)
    torch.testing.assert_close(layer.sigmoid_k_raw.detach(), torch.full((4,), 0.7))
    torch.testing.assert_close(layer.effective_k().detach(), torch.full((4,), 0.75))
    assert layer.sigmoid_k_raw in set(layer.parameters())
    custom = SphereConv2d(3, 4, 3, operator="learnable_sigmoid", sigmoid_k=0.3)
    torch.testing.assert_close(custom.effective_k().detach(), torch.full((4,), 0.3))

    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(4, 3, 6, 6)
    before = layer.sigmoid_k_raw.detach().clone()
    loss = layer(x).square().mean()
    loss.backward()
    assert layer.sigmoid_k_raw.grad is not None and torch.isfinite(layer.sigmoid_k_raw.grad).all()
    assert layer.sigmoid_k_raw.grad.abs().min() > 0
    opt.step()
    assert not torch.equal(layer.sigmoid_k_raw.detach(), before)
    assert layer(x).square().mean() != loss


def test_learnable_k_moves_with_to():
    layer = SphereConv2d(3, 4, 3, operator="learnable_sigmoid").to(torch.float64)
    assert layer.sigmoid_k_raw.dtype == torch.float64
    out = layer(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_every_parameter_gets_a_gradient():
    model = SmallSphereNet()
    model(torch.randn(2, 3, 8, 8)).logsumexp(1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------------------------ compile / export
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = SmallSphereNet().eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    assert_close(compiled(x), model(x))
    if backend == "aot_eager":  # gradients through the compiled graph, learnable k included
        model.train()
        ref = torch.autograd.grad(model(x).sum(), list(model.parameters()))
        got = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
        for g_ref, g_got in zip(ref, got):
            assert_close(g_got, g_ref, atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_torch_export_matches_eager():
    model = SmallSphereNet().eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    assert_close(program.module()(x), model(x))
    x2 = torch.randn(2, 3, 8, 8)
    assert_close(program.module()(x2), model(x2))


# ------------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("operator", OPERATORS)
def test_bf16_autocast_layer(operator):
    """Finite, within AUTOCAST_ATOL of float32, and in the convolution's autocast dtype (bfloat16)."""
    layer = SphereConv2d(8, 16, 3, padding=1, operator=operator).to(DEVICE)
    x = torch.randn(2, 8, 8, 8, device=DEVICE)
    ref = layer(x)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = layer(x)
        plain = F.conv2d(x, layer.weight)
    assert out.dtype == plain.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=AUTOCAST_ATOL)
    out.float().sum().backward()
    assert torch.isfinite(layer.weight.grad).all()


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_operator_raises():
    with pytest.raises(ValueError, match=r"unknown sphere operator 'sigmiod'"):
        SphereConv2d(3, 4, 3, operator="sigmiod")
    with pytest.raises(ValueError, match=r"unknown sphere operator 'none'"):
        SphereLinear(3, 4, operator="none")


def test_non_str_operator_raises():
    with pytest.raises(TypeError, match=r"operator must be a str.*got int 1"):
        SphereConv1d(3, 4, 3, operator=1)


@pytest.mark.parametrize("value", [0.0, -0.3, float("inf")])
def test_bad_sigmoid_k_raises(value):
    with pytest.raises(ValueError, match=r"sigmoid_k must be a finite number > 0; got"):
        SphereConv2d(3, 4, 3, operator="sigmoid", sigmoid_k=value)


def test_non_number_sigmoid_k_raises():
    with pytest.raises(TypeError, match=r"sigmoid_k must be a positive real number; got str '0.3'"):
        SphereConv2d(3, 4, 3, operator="sigmoid", sigmoid_k="0.3")


def test_learnable_initial_k_below_minimum_raises():
    with pytest.raises(ValueError, match=r"initial effective k\) must be > 0.05 for 'learnable_sigmoid'; got 0.04"):
        SphereConv3d(3, 4, 3, operator="learnable_sigmoid", sigmoid_k=0.04)


@pytest.mark.parametrize("value", [0.0, -1e-4])
def test_bad_eps_raises(value):
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0; got"):
        SphereConv2d(3, 4, 3, eps=value)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0"):
        SphereLinear(3, 4, eps=value)
