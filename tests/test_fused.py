"""The fused SphereConv path against the eager reference composition and finite differences.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). ``impl="fused"`` (the default) must give
the same values and gradients as ``impl="reference"``: float64 to 1e-10, float32 to 1e-5 (``REF_ATOL``), in both
saving modes (``memory_efficient=False``: z saved; True: the output saved and g inverted), with the same clamp
semantics at cos = +-1, finite results at zero patches, an fp32 island under autocast, and it must trace
under ``torch.compile(fullgraph=True)`` and ``torch.export``.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import AUTOCAST_ATOL, DEVICE, REF_ATOL, SAVE_OUTPUT_GRAD_RTOL_OF_MAX
from torch import nn

from torchsphere.functional import angular_activation, sphere_conv1d, sphere_conv2d, sphere_conv3d, sphere_linear
from torchsphere.functional import fused
from torchsphere.functional.conv import patch_norm_sq
from torchsphere.functional import fused_conv
from torchsphere.functional.fused import SphereTail, check_impl, check_memory_efficient, patch_rnorm
from torchsphere.functional.operators import ACOS_EPS, learnable_k
from torchsphere.nn import SphereConv2d, SphereLinear

OPS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
MODES = pytest.mark.parametrize("mem", [False, True], ids=["save-z", "save-output"])  # memory_efficient
TAILS = pytest.mark.parametrize("tail", fused.SAVES)  # SphereTail's save modes


def _z(z: torch.Tensor, save: str) -> torch.Tensor:
    """z for SphereTail: a fresh copy when the tail writes into it (a leaf cannot be modified in place)."""
    return z.clone() if save == "output-inplace" else z
CONV = {1: sphere_conv1d, 2: sphere_conv2d, 3: sphere_conv3d}
# (nd, C_in, C_out, spatial, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (1, 4, 6, (9,), 3, 2, 1, 1, 1),
    (2, 4, 6, (7, 6), 3, 1, 1, 1, 2),
    (2, 3, 5, (8, 8), (3, 2), (2, 1), (1, 0), 2, 1),
    (2, 4, 4, (6, 6), 3, 1, "same", 1, 4),
    (3, 2, 4, (4, 5, 4), 2, 1, "valid", 1, 1),
]


def _k(op: str, k_raw: torch.Tensor) -> float | torch.Tensor | None:
    return learnable_k(k_raw) if op == "learnable_sigmoid" else 0.3


def _conv_inputs(case, dtype, bias: bool):
    nd, c_in, c_out, spatial, kernel, stride, padding, dilation, groups = case
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * nd
    x = torch.randn(2, c_in, *spatial, dtype=dtype).to(DEVICE).requires_grad_()
    w = torch.randn(c_out, c_in // groups, *ks, dtype=dtype).to(DEVICE).requires_grad_()
    b = torch.randn(c_out, dtype=dtype).to(DEVICE).requires_grad_() if bias else None
    k_raw = (0.2 + torch.rand(c_out, dtype=dtype)).to(DEVICE).requires_grad_()
    return x, w, b, k_raw, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _values_and_grads(fn, leaves):
    out = fn()
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).to(out.device)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out, grads


@MODES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}d-g{c[-1]}-p{c[6]}")
def test_fused_conv_matches_reference(case, op, dtype, mem):
    x, w, b, k_raw, kw = _conv_inputs(case, dtype, bias=case[-1] > 1)
    leaves = [t for t in (x, w, b, k_raw) if t is not None]
    results = [_values_and_grads(lambda: CONV[case[0]](x, w, b, **kw, operator=op, sigmoid_k=_k(op, k_raw),
                                                       impl=impl, memory_efficient=me), leaves)
               for impl, me in (("fused", mem), ("reference", False))]
    (out_f, grads_f), (out_r, grads_r) = results
    atol = REF_ATOL[dtype]
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=atol)
    for leaf, g_f, g_r in zip(leaves, grads_f, grads_r):
        if leaf is k_raw and op != "learnable_sigmoid":
            assert g_f is None and g_r is None
            continue
        scale = max(1.0, g_r.abs().max().item())  # weight gradients grow with 1/|w|; compare relative to it
        torch.testing.assert_close(g_f, g_r, rtol=0, atol=atol * scale)


@MODES
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("op", OPS)
def test_fused_linear_matches_reference(op, dtype, mem):
    x = torch.randn(3, 2, 7, dtype=dtype).to(DEVICE).requires_grad_()
    w = torch.randn(5, 7, dtype=dtype).to(DEVICE).requires_grad_()
    b = torch.randn(5, dtype=dtype).to(DEVICE).requires_grad_()
    k_raw = (0.2 + torch.rand(5, dtype=dtype)).to(DEVICE).requires_grad_()
    leaves = [x, w, b, k_raw] if op == "learnable_sigmoid" else [x, w, b]
    (out_f, grads_f), (out_r, grads_r) = [
        _values_and_grads(lambda: sphere_linear(x, w, b, operator=op, sigmoid_k=_k(op, k_raw), impl=impl,
                                                memory_efficient=me), leaves)
        for impl, me in (("fused", mem), ("reference", False))]
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=REF_ATOL[dtype])
    for g_f, g_r in zip(grads_f, grads_r):
        torch.testing.assert_close(g_f, g_r, rtol=0, atol=REF_ATOL[dtype] * max(1.0, g_r.abs().max().item()))


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_patch_rnorm_matches_ones_convolution(nd):
    """The sum-pool shortcut (and its ones-convolution fallback) equals conv.patch_norm_sq in float64."""
    x = torch.randn(2, 4, *([6] * nd), dtype=torch.float64).to(DEVICE).requires_grad_()
    for kernel, stride, padding, dilation, groups in [(3, 1, 1, 1, 1), (3, 2, 1, 1, 2), (2, 1, "valid", 1, 1),
                                                      (3, 1, "same", 1, 4), (2, 1, "same", 1, 1),
                                                      (3, 1, 2, 1, 1), (3, 1, 1, 2, 2)]:
        ks = (kernel,) * nd
        got = patch_rnorm(x, ks, stride, padding, dilation, groups, 1e-4)
        want = torch.rsqrt(patch_norm_sq(x, ks, stride, padding, dilation, groups) + 1e-4)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        (g_got,), (g_want,) = (torch.autograd.grad(t.sum(), (x,)) for t in (got, want))
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 3])
def test_gradcheck_channel_square_sum(groups):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fused.ChannelSquareSum.apply(x, groups), (x,))
    want = x.detach().square().reshape(2, groups, 6 // groups, 3, 4).sum(2)
    torch.testing.assert_close(fused.ChannelSquareSum.apply(x, groups), want, rtol=0, atol=1e-12)


@TAILS
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_sphere_tail(op, seed, tail):
    """The autograd.Function itself, every input differentiable (z, r, a per-channel k, a bias)."""
    gen = torch.Generator().manual_seed(seed)
    r = (0.5 + torch.rand(2, 1, 2, 3, generator=gen, dtype=torch.float64)).to(DEVICE)
    cos = (1.6 * torch.rand(2, 3, 2, 3, generator=gen, dtype=torch.float64) - 0.8).to(DEVICE)  # |c| <= 0.8
    z = (cos / r).requires_grad_()
    r.requires_grad_()
    bias = torch.randn(1, 3, 1, 1, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_()
    k = (0.1 + torch.rand(1, 3, 1, 1, generator=gen, dtype=torch.float64)).to(DEVICE).requires_grad_()
    if op == "learnable_sigmoid":
        fn, inputs = (lambda z, r, k, b: SphereTail.apply(_z(z, tail), r, k, b, op, tail)), (z, r, k, bias)
    else:
        fn, inputs = (lambda z, r, b: SphereTail.apply(_z(z, tail), r, 0.3, b, op, tail)), (z, r, bias)
    assert torch.autograd.gradcheck(fn, inputs)


@MODES
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_fused_conv2d_and_linear(op, mem):
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64).to(DEVICE).requires_grad_()
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64).to(DEVICE).requires_grad_()
    k_raw = (0.2 + torch.rand(4, dtype=torch.float64)).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, k_raw: sphere_conv2d(x, w, None, 2, 1, 1, 2, operator=op, sigmoid_k=_k(op, k_raw),
                                          memory_efficient=mem),
        (x, w, k_raw))
    v = torch.randn(3, 5, dtype=torch.float64).to(DEVICE).requires_grad_()
    u = torch.randn(4, 5, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, u, k_raw: sphere_linear(v, u, operator=op, sigmoid_k=_k(op, k_raw),
                                                                      memory_efficient=mem), (v, u, k_raw))


@TAILS
def test_sigmoid_k_scalar_tensor_gets_gradient(tail):
    z = torch.randn(2, 3, 4, dtype=torch.float64).to(DEVICE).requires_grad_()
    r = torch.full((2, 1, 4), 0.4, dtype=torch.float64).to(DEVICE)
    k = torch.tensor(0.4, dtype=torch.float64).to(DEVICE).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, k: SphereTail.apply(_z(z, tail), r, k, None, "learnable_sigmoid", tail),
                                    (z, k))


@TAILS
@pytest.mark.parametrize("op", OPS)
def test_clamp_semantics_at_cos_pm1(op, tail):
    """cos = +-1 and beyond: the same finite values and (zero outside the clamp) gradients as safe_acos.

    Saving the output, a cosine exactly at the clamp bound +-(1 - ACOS_EPS) cannot be told from one beyond it (g is
    the same), so its gradient is 0 there where the reference passes it (closed interval); everywhere else equal.
    """
    cos = torch.tensor([[-1.5, -1.0, -1.0 + ACOS_EPS, -0.3, 0.0, 0.7, 1.0 - ACOS_EPS, 1.0, 1.0 + 1e-9]],
                       dtype=torch.float64).to(DEVICE)
    r = torch.full((1, 1), 2.0, dtype=torch.float64).to(DEVICE)
    k_raw = torch.tensor([0.4], dtype=torch.float64).to(DEVICE).requires_grad_()
    z_f = (cos / r).requires_grad_()
    z_r = z_f.detach().clone().requires_grad_()
    out_f = SphereTail.apply(_z(z_f, tail), r, _k(op, k_raw).reshape(1, 1) if op == "learnable_sigmoid" else 0.3,
                             None, op, tail)
    out_r = angular_activation(z_r * r, op, _k(op, k_raw), dim=0)
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-12)
    out_f.sum().backward()
    out_r.sum().backward()
    assert torch.isfinite(z_f.grad).all()
    at_bound = [2, 6] if tail != "z" and op != "cosine" else []
    keep = [i for i in range(cos.shape[1]) if i not in at_bound]
    torch.testing.assert_close(z_f.grad[:, keep], z_r.grad[:, keep], rtol=1e-9, atol=1e-9)
    assert (z_f.grad[:, at_bound] == 0).all()
    if op != "cosine":
        assert z_f.grad[0, 0] == 0 and z_f.grad[0, -1] == 0  # outside the clamp range


@pytest.mark.parametrize("op, k", [("linear", None), ("cosine", None), ("sigmoid", 0.05), ("sigmoid", 0.1),
                                   ("sigmoid", 0.3), ("sigmoid", 1.0)])
def test_save_output_float32_gradient_precision(op, k):
    """float32 dg/dc from the inverted output, over every cosine in [-1, 1], against the float64 gradient."""
    c = torch.linspace(-1.0, 1.0, 20001).reshape(1, -1).to(DEVICE)
    r = torch.ones(1, 1).to(DEVICE)

    def grad(dtype: torch.dtype, save_output: bool) -> torch.Tensor:
        z = c.to(dtype).requires_grad_()
        SphereTail.apply(z, r.to(dtype), k, None, op, "output" if save_output else "z").sum().backward()
        return z.grad.double()

    truth = grad(torch.float64, False)
    inside = c.double().abs() < 1.0 - ACOS_EPS - 1e-7  # the bound itself may count as outside (see above)
    err = (grad(torch.float32, True) - truth)[inside].abs().max().item()
    assert err <= SAVE_OUTPUT_GRAD_RTOL_OF_MAX * truth.abs().max().item()
    assert torch.isfinite(grad(torch.float32, True)).all()


@MODES
@pytest.mark.parametrize("op", OPS)
def test_cos_one_patch_and_zero_input_finite(op, mem):
    """A patch equal to the kernel (cos ~ 1) and an all-zero input: finite outputs and gradients, as the reference."""
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64).to(DEVICE)
    x = w[:1].clone().requires_grad_()  # (1, 2, 3, 3): one patch, identical to filter 0
    w.requires_grad_()
    k_raw = torch.full((3,), 0.3, dtype=torch.float64).to(DEVICE).requires_grad_()
    for inp in (x, torch.zeros(2, 2, 5, 5, dtype=torch.float64).to(DEVICE).requires_grad_()):
        outs = []
        for impl, me in (("fused", mem), ("reference", False)):
            out = sphere_conv2d(inp, w, padding=1, operator=op, sigmoid_k=_k(op, k_raw), impl=impl,
                                memory_efficient=me)
            grads = torch.autograd.grad(out.sum(), (inp, w))
            assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
            outs.append((out, grads))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-10)
        for g_f, g_r in zip(outs[0][1], outs[1][1]):
            torch.testing.assert_close(g_f, g_r, rtol=1e-8, atol=1e-8)


@MODES
@pytest.mark.parametrize("op", OPS)
def test_autocast_bf16_fp32_island(op, mem):
    layer = SphereConv2d(3, 4, 3, padding=1, operator=op, memory_efficient=mem).to(DEVICE)
    x = torch.randn(2, 3, 6, 6).to(DEVICE)
    with torch.autocast(device_type=DEVICE.type, dtype=torch.bfloat16):
        out = layer(x)
        ref = sphere_conv2d(x, layer.weight, padding=1, operator=op, sigmoid_k=layer.effective_k(),
                            impl="reference")
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), layer(x), rtol=0, atol=AUTOCAST_ATOL)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=AUTOCAST_ATOL)
    (grad_w,) = torch.autograd.grad(out.float().sum(), (layer.weight,))
    assert torch.isfinite(grad_w).all() and grad_w.dtype == torch.float32


def test_fused_saves_less_than_reference():
    """The fused node keeps one full-size tensor (c) plus the small r; the reference keeps several."""
    x = torch.randn(4, 8, 10, 10).to(DEVICE)
    w = torch.randn(16, 8, 3, 3).to(DEVICE).requires_grad_()
    full = 4 * 16 * 10 * 10 * 4  # bytes of one (N, C_out, H, W) float32 tensor

    def saved_bytes(impl: str, op: str) -> int:
        total = []
        pack = lambda t: total.append(t.numel() * t.element_size()) or t  # noqa: E731
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            sphere_conv2d(x, w, padding=1, operator=op, impl=impl)
        return sum(total)

    for op in ("linear", "sigmoid"):
        fused, ref = saved_bytes("fused", op), saved_bytes("reference", op)
        assert fused < 1.5 * full + x.numel() * 4 * 2  # c, r, the input of the two convolutions
        assert fused < ref


def test_memory_efficient_shares_the_saved_output_with_batchnorm():
    """conv -> BatchNorm: saving the output, the pair keeps no full-size tensor beyond a plain conv + BN pair."""
    x = torch.randn(4, 8, 10, 10).to(DEVICE)
    full = 4 * 16 * 10 * 10 * 4  # bytes of one (N, C_out, H, W) float32 tensor
    r_bytes, w_bytes = 4 * 10 * 10 * 4, 16 * 8 * 3 * 3 * 4

    def saved_bytes(conv: nn.Module) -> int:
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        net = nn.Sequential(conv, nn.BatchNorm2d(16)).to(DEVICE)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x)
        return sum(storages.values())

    plain = saved_bytes(nn.Conv2d(8, 16, 3, padding=1, bias=False))
    for op in OPS:
        default = saved_bytes(SphereConv2d(8, 16, 3, padding=1, operator=op))
        efficient = saved_bytes(SphereConv2d(8, 16, 3, padding=1, operator=op, memory_efficient=True))
        assert default >= plain + full  # z on top of what the plain pair keeps
        # beyond the plain pair: r (N, 1, H, W), the normalized weight w / |w| and a few scalars, no full tensor
        assert efficient - plain <= r_bytes + w_bytes + 1024 < full


def test_memory_efficient_errors_and_inplace():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="memory_efficient=True needs impl='fused'.*got impl='reference'"):
        sphere_conv2d(x, w, impl="reference", memory_efficient=True)
    with pytest.raises(TypeError, match="memory_efficient must be a bool; got int 1"):
        sphere_linear(torch.randn(2, 3), torch.randn(4, 3), memory_efficient=1)
    with pytest.raises(TypeError, match="memory_efficient must be a bool; got str 'yes'"):
        SphereConv2d(2, 3, 3, memory_efficient="yes")
    assert check_memory_efficient("fused", True) == "fused"
    with pytest.raises(ValueError, match=r"unknown save 'input'; choose from \['z', 'output', 'output-inplace'\]"):
        SphereTail.apply(torch.randn(2, 3), torch.ones(2, 1), None, None, "cosine", "input")
    layer = SphereConv2d(2, 3, 3, operator="linear", memory_efficient=True).to(DEVICE)
    assert "memory_efficient=True" in repr(layer)
    out = layer(torch.randn(2, 2, 5, 5).to(DEVICE).requires_grad_()).relu_()  # modifies the saved output
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_inplace_op_after_layer_and_no_double_backward():
    """The output is not saved, so an in-place ReLU after the layer is legal; double backward is not supported."""
    layer = SphereConv2d(2, 3, 3, operator="linear").to(DEVICE)
    x = torch.randn(2, 2, 5, 5).to(DEVICE).requires_grad_()
    out = layer(x).relu_()
    (g,) = torch.autograd.grad(out.sum(), (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_torch_func_grad_matches_reference():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64).to(DEVICE)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64).to(DEVICE)
    k = torch.full((4,), 0.4, dtype=torch.float64).to(DEVICE)

    def loss(w, impl):
        return sphere_conv2d(x, w, padding=1, operator="learnable_sigmoid", sigmoid_k=k, impl=impl).sin().sum()

    torch.testing.assert_close(torch.func.grad(loss)(w, "fused"), torch.func.grad(loss)(w, "reference"),
                               rtol=0, atol=1e-10)


def test_compile_fullgraph_and_export(monkeypatch):
    """Inside an outer trace the eager kernels are traced (with COMPILE_MIN_NUMEL=0: no nested compile either)."""
    net = nn.Sequential(SphereConv2d(3, 4, 3, padding=1, operator="learnable_sigmoid", memory_efficient=True),
                        nn.BatchNorm2d(4), nn.ReLU(), SphereConv2d(4, 4, 3, operator="linear", bias=True),
                        nn.Flatten(), SphereLinear(16, 5, operator="sigmoid", memory_efficient=True)).to(DEVICE)
    x = torch.randn(2, 3, 4, 4).to(DEVICE)
    out = net(x)
    grads = torch.autograd.grad(out.sum(), list(net.parameters()))
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_COMPILED", {})
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c.sum(), list(net.parameters()))
    torch.testing.assert_close(out_c, out)
    for a, b in zip(grads_c, grads):
        torch.testing.assert_close(a, b)
    net.eval()
    with monkeypatch.context() as m:
        m.setattr(fused, "COMPILE_MIN_NUMEL", 1 << 30)
        out_eval = net(x)
    exported = torch.export.export(net, (x,))
    torch.testing.assert_close(exported.module()(x), out_eval)
    assert not fused._COMPILED  # the kernels were traced into the outer graphs, never compiled on their own


@pytest.mark.parametrize("layer", [
    SphereConv2d(3, 4, 3, padding=1, operator="linear", memory_efficient=True, dtype=torch.float64),
    SphereLinear(12, 4, operator="sigmoid", memory_efficient=True, dtype=torch.float64),
], ids=["conv", "linear"])
def test_memory_efficient_layers_save_z_inside_a_trace(layer, monkeypatch):
    """Inside torch.compile / torch.export the compiler chooses what the backward keeps, so the layers save z there
    (no inversion of g): an in-place op on the output is then legal, and the gradients are the save-z ones."""
    layer = layer.to(DEVICE)
    shape = (2, 3, 6, 6) if isinstance(layer, SphereConv2d) else (5, 12)
    x = torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="memory_efficient=True"):
        layer(x).relu_().sum().backward()  # eager: the saved output was modified in place
    assert fused.saves_output(True) and not fused.saves_output(False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fused.saves_output(True)
    (grad_traced,) = torch.autograd.grad(layer(x).relu_().sum(), x)
    monkeypatch.undo()
    layer.memory_efficient = False
    (grad_z,) = torch.autograd.grad(layer(x).relu().sum(), x)
    torch.testing.assert_close(grad_traced, grad_z, rtol=0, atol=REF_ATOL[torch.float64])


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_kernels_match_eager(backend, monkeypatch):
    """The compiled pointwise kernels (used for large tails) equal the eager ones; inductor for one operator only."""
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "compile_kernel", functools.partial(fused.compile_kernel, backend=backend))
    ops = ("learnable_sigmoid",) if backend == "inductor" else OPS
    for op, mem in [(op, mem) for op in ops for mem in (False, True)]:
        for shape in [(2, 6, 5, 5), (3, 6, 4, 7)][:2 if op == "learnable_sigmoid" else 1]:  # dynamic shapes
            x = torch.randn(shape[0], 4, *shape[2:]).to(DEVICE).requires_grad_()
            w = torch.randn(shape[1], 4, 3, 3).to(DEVICE).requires_grad_()
            k_raw = (0.2 + torch.rand(shape[1])).to(DEVICE).requires_grad_()
            b = torch.randn(shape[1]).to(DEVICE).requires_grad_()
            (out_f, g_f), (out_r, g_r) = [_values_and_grads(
                lambda: sphere_conv2d(x, w, b, padding=1, operator=op, sigmoid_k=_k(op, k_raw), impl=impl,
                                      memory_efficient=me),
                [x, w, k_raw, b] if op == "learnable_sigmoid" else [x, w, b])
                for impl, me in (("fused", mem), ("reference", False))]
            torch.testing.assert_close(out_f, out_r, rtol=0, atol=REF_ATOL[torch.float32])
            for a, e in zip(g_f, g_r):
                torch.testing.assert_close(a, e, rtol=0, atol=REF_ATOL[torch.float32] * max(1.0, e.abs().max().item()))
    assert not fused._COMPILED.get("failed") and len(fused._COMPILED) >= 4  # the compiled kernels ran


def test_backward_workspace_is_reused_across_layers_and_gives_the_reference_gradients(monkeypatch):
    """On CPU the compiled backward writes dL/dz into per-thread buffers, one per shape, and sums dL/dr's terms in
    the same loop: layers of one shape share the buffer, in turn, within one backward, and the gradients stay the
    reference ones (float64, including a depthwise layer, whose dL/dr terms need no channel sum, and a grouped one)."""
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "compile_kernel", functools.partial(fused.compile_kernel, backend="eager"))
    fused.clear_workspace()

    torch.manual_seed(0)
    layers = [SphereConv2d(3, 4, 3, padding=1, operator="linear", memory_efficient=True),
              SphereConv2d(4, 4, 3, padding=1, operator="sigmoid"),
              SphereConv2d(4, 4, 3, padding=1, groups=4, operator="cosine", memory_efficient=True),
              SphereConv2d(4, 4, 3, padding=1, groups=2, operator="linear"),
              SphereConv2d(4, 4, 3, padding=1, operator="learnable_sigmoid")]
    model = nn.Sequential(*layers).double()

    def forward(x, impl):
        for layer in layers:
            x = sphere_conv2d(x, layer.weight, None, 1, 1, 1, layer.groups, operator=layer.operator,
                              sigmoid_k=layer.effective_k(), impl=impl,
                              memory_efficient=layer.memory_efficient and impl == "fused")
        return x

    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    params = [x, *model.parameters()]
    grads = {}
    for impl in ("fused", "reference"):
        for _ in range(2):  # the second backward reuses the buffers of the first
            grads[impl] = torch.autograd.grad(forward(x, impl).square().sum(), params)
    for a, e in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, e, rtol=0, atol=REF_ATOL[torch.float64])
    assert any(key[0] == "backward_pointwise_into" for key in fused._COMPILED)  # linear's two-kernel backward
    assert set(fused._WORKSPACE.buffers) == {((2, 4, 6, 6), torch.float64, torch.device("cpu")),
                                             ((2, 4, 1, 6, 6), torch.float64, torch.device("cpu")),
                                             ((2, 2, 2, 6, 6), torch.float64, torch.device("cpu"))}


def test_grad_r_from_grad_z_is_the_channel_sum_and_zero_where_r_is_zero():
    """dL/dr from dL/dz = dL/dc * r equals sum(dL/dc * z) (float64), and is 0, not NaN, where r underflowed to 0."""
    torch.manual_seed(0)
    gc, z = torch.randn(2, 5, 3, 4, dtype=torch.float64), torch.randn(2, 5, 3, 4, dtype=torch.float64)
    r = torch.rand(2, 1, 3, 4, dtype=torch.float64) + 0.1
    r[0, 0, 1, 2] = 0.0
    got = fused.grad_r_from_grad_z(gc * r, z, r)
    want = (gc * z).sum(1, keepdim=True)
    want[0, 0, 1, 2] = 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=REF_ATOL[torch.float64])


def test_backward_workspace_keeps_a_bounded_number_of_shapes():
    fused.clear_workspace()
    for n in range(1, fused.WORKSPACE_SHAPES + 3):
        assert fused._workspace(torch.empty(n, 3)).shape == (n, 3)
    kept = [key[0][0] for key in fused._WORKSPACE.buffers]
    assert kept == list(range(3, fused.WORKSPACE_SHAPES + 3))  # the least recently used were dropped
    assert fused._workspace(torch.empty(5, 3)).data_ptr() == fused._workspace(torch.empty(5, 3)).data_ptr()
    fused.clear_workspace()
    assert not fused._WORKSPACE.buffers


def test_kernel_signatures_never_reach_the_recompile_limit(monkeypatch):
    """Every (operator, geometry, dtype) signature compiles its own copy of a kernel: a long-lived process with more
    signatures than Dynamo's recompile limit keeps its compiled kernels (instead of falling back to eager)."""
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "compile_kernel", functools.partial(fused.compile_kernel, backend="eager"))
    limit = torch._dynamo.config.recompile_limit
    cases = [(op, stride, padding) for op in ("cosine", "linear") for stride in (1, 2, 3) for padding in (0, 1, 2)]
    assert len(cases) // 2 > limit
    for op, stride, padding in cases:
        x = torch.randn(2, 4, 6, 6).to(DEVICE).requires_grad_()
        w = torch.randn(6, 4, 3, 3).to(DEVICE).requires_grad_()
        k = _k(op, (0.2 + torch.rand(6)).to(DEVICE))
        out = sphere_conv2d(x, w, stride=stride, padding=padding, operator=op, sigmoid_k=k)
        out.sum().backward()
    assert not fused._COMPILED.get("failed")
    assert len({key[1] for key in fused._COMPILED if key[0] == "patch_rnorm"}) > limit  # one per geometry


def test_kernels_compile_with_fused_multiply_adds_and_their_own_options(monkeypatch):
    """Inductor compiles every kernel with floating-point contraction ("fast": a * b + c as one fused multiply-add,
    PyTorch's default being "off"); a kernel's own options are added to that, and override it; other backends get
    no options."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs["options"]) or fn)
    fused.compile_kernel(fused.tail_forward)
    fused.compile_kernel(fused.tail_forward, options={"realize_opcount_threshold": 7})
    fused.compile_kernel(fused.tail_forward, options={"cpp.enable_floating_point_contract_flag": "off"})
    fused.compile_kernel(fused.tail_forward, backend="aot_eager")
    contract = {"cpp.enable_floating_point_contract_flag": "fast"}
    assert fused.KERNEL_OPTIONS == contract
    assert seen == [contract, {**contract, "realize_opcount_threshold": 7},
                    {"cpp.enable_floating_point_contract_flag": "off"}, None]


def test_float_arguments_compile_as_constants_up_to_a_bound(monkeypatch):
    """Each sigmoid k compiles its own copy of a kernel with k (and the module's float constants) as constants of
    the graph, for ``FLOAT_SPECIALIZATIONS`` values; further values share one copy that takes them as inputs.
    Every copy gives the reference output, and Dynamo's ``specialize_float`` is restored after each call."""
    if not fused._CAN_SPECIALIZE_FLOATS:
        pytest.skip("this PyTorch has no torch._dynamo.config.specialize_float: it compiles floats as constants")
    inputs = []  # the number of graph inputs of each compiled forward kernel, in compilation order
    compile_kernel = fused.compile_kernel

    def recording(fn, **options):
        def backend(gm, example_inputs):
            if fn is fused.tail_forward:
                inputs.append(sum(node.op == "placeholder" for node in gm.graph.nodes))
            return gm.forward
        return compile_kernel(fn, backend=backend, **options)

    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "compile_kernel", recording)
    before = torch._dynamo.config.specialize_float
    x = torch.randn(2, 3, 5, 5).to(DEVICE)
    w = torch.randn(4, 3, 3, 3).to(DEVICE).requires_grad_()  # a gradient: the compiled kernels run
    ks = [0.1 + 0.05 * i for i in range(fused.FLOAT_SPECIALIZATIONS + 3)]
    for k in ks:
        out = sphere_conv2d(x, w, operator="sigmoid", sigmoid_k=k)
        torch.testing.assert_close(out, sphere_conv2d(x, w, operator="sigmoid", sigmoid_k=k, impl="reference"),
                                   rtol=0, atol=REF_ATOL[torch.float32])
        assert torch._dynamo.config.specialize_float == before
    (copies,) = [copies for key, copies in fused._COMPILED.items() if key[0] == "forward"]
    assert set(copies) == {(k,) for k in ks[:fused.FLOAT_SPECIALIZATIONS]} | {None}
    assert len(inputs) == fused.FLOAT_SPECIALIZATIONS + 1  # the shared copy compiled once for the last 3 values
    assert len(set(inputs[:-1])) == 1 and inputs[-1] > inputs[0]  # only the shared copy takes k as an input
    # learnable_sigmoid's backward from the output (measured slower with constants) takes the shared copy
    layer = SphereConv2d(3, 4, 3, operator="learnable_sigmoid", memory_efficient=True).to(DEVICE)
    layer(x.requires_grad_()).sum().backward()
    if DEVICE.type == "cpu":  # the CPU training path's kernel
        (copies,) = [copies for key, copies in fused._COMPILED.items() if key[0] == "backward_from_output_into"]
        assert set(copies) == {None}


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "compile_kernel", lambda fn, **options: broken)
    x, w = torch.randn(2, 3, 5, 5).to(DEVICE), torch.randn(4, 3, 3, 3).to(DEVICE).requires_grad_()
    with pytest.warns(RuntimeWarning, match="compiling the fused SphereConv tail failed"):
        out = sphere_conv2d(x, w, operator="linear")
    torch.testing.assert_close(out, sphere_conv2d(x, w, operator="linear", impl="reference"))
    out.sum().backward()  # the backward uses the eager kernel now, without another warning
    assert fused._COMPILED["failed"] and torch.isfinite(w.grad).all()


def test_impl_errors():
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown impl 'eager'"):
        sphere_conv2d(x, w, impl="eager")
    with pytest.raises(TypeError, match="impl must be a str.*got int 1"):
        sphere_linear(torch.randn(2, 3), torch.randn(4, 3), impl=1)
    assert check_impl("reference") == "reference"
    with pytest.raises(ValueError, match="sigmoid_k is required.*got None"):
        sphere_conv2d(x, w, operator="learnable_sigmoid", sigmoid_k=None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", OPS)
def test_fused_matches_reference_on_cuda(op):
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).cuda().requires_grad_()
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64).cuda().requires_grad_()
    k_raw = torch.full((6,), 0.4, dtype=torch.float64).cuda().requires_grad_()
    (out_f, g_f), (out_r, g_r) = [
        _values_and_grads(lambda: sphere_conv2d(x, w, padding=1, operator=op, sigmoid_k=_k(op, k_raw), impl=impl),
                          [x, w]) for impl in ("fused", "reference")]
    torch.testing.assert_close(out_f, out_r, rtol=0, atol=1e-10)
    for a, b in zip(g_f, g_r):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * max(1.0, b.abs().max().item()))
    assert math.isfinite(out_f.sum().item())
