"""The one-node SphereConv (torchsphere.functional.fused_conv) against the reference composition, float64."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, REF_ATOL, assert_close

from torchsphere.functional import fused_conv, sphere_conv1d, sphere_conv2d, sphere_conv3d

OPS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
FNS = {1: sphere_conv1d, 2: sphere_conv2d, 3: sphere_conv3d}
SPATIAL = {1: (9,), 2: (6, 7), 3: (4, 5, 4)}
# (groups, stride, padding, dilation): box-sum windows, strides, dilation (the all-ones convolution), 'same'
GEOMETRY = [(1, 1, 1, 1), (2, 2, 1, 1), (1, 1, 2, 2), (2, 1, "same", 1), (1, 2, 0, 1), (1, 1, "valid", 1)]


def _case(nd, op, groups, dtype=torch.float64):
    x = torch.randn(2, 4, *SPATIAL[nd], dtype=dtype).to(DEVICE).requires_grad_()
    w = torch.randn(6, 4 // groups, *([3] * nd), dtype=dtype).to(DEVICE).requires_grad_()
    b = torch.randn(6, dtype=dtype).to(DEVICE).requires_grad_()
    k = (0.2 + torch.rand(6, dtype=dtype)).to(DEVICE).requires_grad_()
    params = [x, w, b] + ([k] if op == "learnable_sigmoid" else [])
    return x, w, b, k, params


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_values_and_gradients_equal_the_reference(nd, op, memory_efficient):
    for groups, stride, padding, dilation in GEOMETRY:
        x, w, b, k, params = _case(nd, op, groups)
        kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, operator=op)
        if op == "learnable_sigmoid":
            kw["sigmoid_k"] = k
        fused = FNS[nd](x, w, b, impl="fused", memory_efficient=memory_efficient, **kw)
        ref = FNS[nd](x, w, b, impl="reference", **kw)
        torch.testing.assert_close(fused, ref, rtol=0, atol=REF_ATOL[torch.float64])
        g = torch.randn_like(ref)
        for a, e in zip(torch.autograd.grad(fused, params, g), torch.autograd.grad(ref, params, g)):
            torch.testing.assert_close(a, e, rtol=0, atol=REF_ATOL[torch.float64] * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("op", OPS)
def test_gradcheck(op):
    x, w, b, k, params = _case(2, op, 2)
    kw = {"sigmoid_k": k} if op == "learnable_sigmoid" else {}
    for me in (False, True):
        assert torch.autograd.gradcheck(
            lambda *p: sphere_conv2d(p[0], p[1], p[2], stride=2, padding=1, groups=2, operator=op,
                                     memory_efficient=me, **({"sigmoid_k": p[3]} if len(p) > 3 else kw)),
            tuple(params))


def test_the_layer_is_one_autograd_node():
    x, w, b, _, _ = _case(2, "linear", 1, torch.float32)
    out = sphere_conv2d(x, w, b, padding=1, operator="linear")
    assert type(out.grad_fn).__name__ == "SphereConvFnBackward"


def test_other_cases_take_the_composed_path():
    """Half dtypes, autocast and asymmetric 'same' padding go through the composition (same values)."""
    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 2, 2)
    assert fused_conv.sphere_conv_fn(2, x, w, None, 1, "same", 1, 1, "cosine", None, 1e-4, False) is None
    assert fused_conv.sphere_conv_fn(2, x.half(), w.half(), None, 1, 1, 1, 1, "cosine", None, 1e-4, False) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_conv.sphere_conv_fn(2, x, w, None, 1, 1, 1, 1, "cosine", None, 1e-4, False) is None
    torch.testing.assert_close(sphere_conv2d(x, w, padding="same"), sphere_conv2d(x, w, padding="same",
                                                                                 impl="reference"))


def test_sigmoid_k_shape_errors():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="sigmoid_k has 2 values but the output has 3 channels along dim 1"):
        sphere_conv2d(x, w, operator="learnable_sigmoid", sigmoid_k=torch.ones(2))
    with pytest.raises(ValueError, match=r"sigmoid_k tensor must be 0-d or 1-d.*got shape \(3, 1\)"):
        sphere_conv2d(x, w, operator="learnable_sigmoid", sigmoid_k=torch.ones(3, 1))


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 1, 0), (2, 1, 1), (5, 1, 2), (4, 1, 1),
                                                     (5, 1, 1), (3, 2, 1), (4, 1, 2)])
def test_window_sum_transpose_is_the_adjoint(nd, kernel, stride, padding):
    """<window_sum(s), v> = <s, window_sum_t(v)> for every path of the transpose (the flipped-padding sum pool at
    stride 1, the pool's backward, the all-ones convolution's), float64."""
    k, st, p, dil = (kernel,) * nd, (stride,) * nd, (padding,) * nd, (1,) * nd
    box = fused_conv._box_padding(padding, k, 1) is not None
    s = torch.randn(2, 3, *([7] * nd), dtype=torch.float64)
    out = fused_conv._window_sum(s, k, st, p, dil, box)
    v = torch.randn_like(out)
    t = fused_conv._window_sum_t(v, s.shape, k, st, p, dil, box)
    assert t.shape == s.shape
    assert_close((out * v).sum(), (s * t).sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_normalize_weight_and_its_backward_match_autograd_of_the_float64_reference(dtype, scale):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64) * scale).to(dtype)
    grad = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64).to(dtype)
    eps = 1e-12 * scale ** 2  # the same relative eps at every scale (scale^2 of 1e-30 underflows to 0: no eps)
    w64 = w.to(torch.float64).requires_grad_(True)
    ref = w64 / torch.sqrt(w64.square().flatten(1).sum(1) + eps).reshape(-1, 1, 1, 1)
    (ref_grad,) = torch.autograd.grad(ref, w64, grad.to(torch.float64))
    w_hat, w_scale = fused_conv.normalize_weight(w, eps)
    # float32 weights of ordinary size are normalized in float32; squares that overflow or underflow, in float64
    assert w_hat.dtype == dtype and w_scale.shape == (5,)
    assert w_scale.dtype == (torch.float32 if dtype == torch.float32 and scale == 1.0 else torch.float64)
    torch.testing.assert_close(w_hat.to(torch.float64), ref.detach(), rtol=0, atol=REF_ATOL[dtype])
    grad_w = fused_conv.normalize_weight_backward(grad, w, w_hat, w_scale)
    assert grad_w.dtype == dtype and torch.isfinite(grad_w).all()
    torch.testing.assert_close(grad_w.to(torch.float64) * scale, ref_grad * scale, rtol=0,
                               atol=REF_ATOL[dtype] * ref_grad.abs().max().item() * scale)


def test_normalize_weight_backward_falls_back_to_float64_where_the_float32_dot_overflows():
    w = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    grad = torch.tensor([[3e38, 3e38], [1.0, 2.0]])  # <w_hat, g> = 4.2e38 overflows float32, its true result does not
    w_hat, w_scale = fused_conv.normalize_weight(w, 1e-12)
    assert w_scale.dtype == torch.float32
    got = fused_conv.normalize_weight_backward(grad, w, w_hat, w_scale)
    w64 = w.to(torch.float64).requires_grad_(True)
    (ref,) = torch.autograd.grad(w64 / w64.norm(dim=1, keepdim=True), w64, grad.to(torch.float64))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.to(torch.float64), ref, rtol=1e-5, atol=0)
