"""Overflow-safe norms: every operator, head, margin, SphereNorm and regularizer at input scales 0 .. 1e30.

For each scale s, a float32 layer runs on s * x and must give finite outputs and finite input / parameter gradients
that match the same layer run in float64 on the float64-cast input (same eps), within the float32 tolerances of
``conftest.py``, the absolute tolerance taken relative to each quantity's scale: its largest float64 value (logits
scale with ||x||, SphereNorm's magnitude with ||x||^rho, weight gradients with s), or its natural scale where that is
larger (g in [-1, 1]; see :func:`assert_matches_float64`). A plain ``x.square().sum()`` overflows float32 at
s ~ 1e19. The SphereConv cases at s >= 1e20 are expected failures until its fused path uses overflow-safe patch norms.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import DEVICE, SAVE_OUTPUT_GRAD_RTOL_OF_MAX, TOL, assert_close
from torchsphere.functional import (angular_margin_logits, patch_norm_sq, sphere_conv1d, sphere_conv2d, sphere_conv3d,
                                    sphere_linear)
from torchsphere.functional.fused_conv import patch_rnorm_pair_kernel
from torchsphere.functional.norms import (channel_square_sum_safe, filter_norm_safe, patch_norm_safe, safe_norm,
                                          safe_normalize, safe_rnorm)
from torchsphere.nn import AngularHead, SphereConv2d, SphereNorm1d, SphereNorm2d, SphereNorm3d
from torchsphere.regularizers import hyperspherical_energy, mgd, mhc, mhp, mhs, r_mhp
from torchsphere.regularizers.energy import stochastic_energy

SCALES = (0.0, 1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30)
OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
EPS = 1e-4


def assert_matches_float64(name: str, actual: Tensor, expected: Tensor, floor: float = 0.0,
                           atol: float | None = None) -> None:
    """float32 ``actual`` is finite and equals float64 ``expected`` within the float32 tolerances of conftest.py,
    the absolute one relative to the quantity's scale: max(max |expected|, ``floor``).

    ``floor`` is the quantity's natural scale where it does not shrink with the input: e.g. g(theta) lies in [-1, 1]
    whatever s, and at s << sqrt(eps) the cosines are ~s / sqrt(eps), where float32 ``acos`` keeps g only to its
    absolute precision (~6e-8), so g's share of a quantity is compared with the scale it has at O(1) cosines.
    """
    assert actual.dtype == torch.float32, f"{name}: dtype {actual.dtype}"
    actual, expected = actual.detach(), expected.detach()
    assert bool(torch.isfinite(actual).all()), f"{name}: non-finite float32 values {actual}"
    assert bool(torch.isfinite(expected).all()), f"{name}: non-finite float64 reference"
    scale = max(float(expected.abs().max()), floor)
    if scale == 0.0:
        assert bool((actual == 0).all()), f"{name}: expected exactly 0, got max |.| {float(actual.abs().max())}"
        return
    rtol, default_atol = TOL[torch.float32]
    torch.testing.assert_close(actual.double() / scale, expected / scale, rtol=rtol,
                               atol=default_atol if atol is None else atol, msg=lambda m: f"{name}: {m}")


def _upstream(shape) -> Tensor:
    """A fixed positive upstream gradient dL/d(out) in [0.5, 1.5]. With random signs, parameter gradients (sums over
    the batch and positions) can cancel by orders of magnitude, and float32 rounding of the terms with them: measured
    1000x for SphereNorm's gamma at rho = 1, a 1e-4 relative error that is the summation's, not the norms'."""
    return 0.5 + torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _leaves(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to(dtype).requires_grad_(True) for k, v in tensors.items()}


def _check_fn(fn, inputs: dict[str, Tensor], floors: dict[str, float] | None = None,
              atol_grad: float | None = None) -> None:
    """fn(**inputs) in float32 and in float64 (on the float64-cast float32 inputs): values and every gradient.

    ``floors``: natural scales by name ("output", "grad <input>"), see :func:`assert_matches_float64`.
    """
    floors = floors or {}
    x32 = _leaves({k: v.float().to(DEVICE) for k, v in inputs.items()}, torch.float32)
    x64 = _leaves(x32, torch.float64)
    out32, out64 = fn(**x32), fn(**x64)
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    g = _upstream(out64.shape).to(DEVICE)
    (out32 * g.float()).sum().backward()
    (out64 * g).sum().backward()
    assert_matches_float64("output", out32, out64, floors.get("output", 0.0))
    for k in x32:
        assert x32[k].grad is not None, f"no gradient for {k}"
        assert_matches_float64(f"grad {k}", x32[k].grad, x64[k].grad, floors.get(f"grad {k}", 0.0), atol_grad)


def _check_module(module: nn.Module, x: Tensor, *args, floors: dict[str, float] | None = None,
                  atol_grad: float | None = None) -> None:
    """A float32 module and its float64 copy on s x (float32, then cast): output, input and parameter gradients."""
    floors = floors or {}
    m32 = module.float().to(DEVICE)
    m64 = copy.deepcopy(m32).double()
    x32 = x.float().to(DEVICE).requires_grad_(True)
    args = tuple(a.to(DEVICE) for a in args)
    x64 = x32.detach().double().requires_grad_(True)
    out32, out64 = m32(x32, *args), m64(x64, *args)
    g = _upstream(out64.shape).to(DEVICE)
    (out32 * g.float()).sum().backward()
    (out64 * g).sum().backward()
    assert_matches_float64("output", out32, out64, floors.get("output", 0.0))
    assert_matches_float64("grad input", x32.grad, x64.grad, floors.get("grad input", 0.0), atol_grad)
    params64 = dict(m64.named_parameters())
    for name, p in m32.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert_matches_float64(f"grad {name}", p.grad, params64[name].grad, floors.get(f"grad {name}", 0.0),
                               atol_grad)


def _x(shape, scale: float) -> Tensor:
    return torch.randn(shape, dtype=torch.float64) * scale


# --- the norms themselves -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES + (1e37,))
def test_safe_norm_matches_float64(scale):
    x = _x((5, 33), scale)
    x[1] = 0.0  # a zero row: the eps result sqrt(eps), with a finite gradient
    _check_fn(lambda x: safe_norm(x, 1, EPS), {"x": x})
    if scale <= 1e30:  # 1 / ||x|| has the gradient -x / ||x||^3, below float32's range at s = 1e20: scaled, as z * r
        _check_fn(lambda x: safe_rnorm(x, 1, EPS) * max(scale, 1.0), {"x": x})
    _check_fn(lambda x: safe_normalize(x, 1, EPS), {"x": x})
    _check_fn(lambda x: safe_norm(x, 1, 0.0), {"x": x})  # eps = 0: the zero row gets gradient 0, not NaN


def test_safe_norm_is_the_plain_formula_where_that_does_not_overflow():
    """Power-of-two scaling is exact: bitwise the plain sqrt(sum x^2 + eps), in float64 and in float32."""
    for dtype in (torch.float64, torch.float32):
        for scale in (1e-3, 1.0, 1e3, 1e8):
            x = _x((7, 64), scale).to(dtype)
            x[0] = 0.0
            plain = torch.sqrt(x.square().sum(1) + EPS)
            assert torch.equal(safe_norm(x, 1, EPS), plain)
            assert torch.equal(safe_rnorm(x, 1, EPS), torch.rsqrt(x.square().sum(1) + EPS))
            w = x.reshape(7, 4, 4, 4)
            assert torch.equal(filter_norm_safe(w, EPS), torch.sqrt(w.square().flatten(1).sum(1) + EPS))
            assert torch.equal(safe_norm(x, 1, 0.0), torch.linalg.vector_norm(x, dim=1))


@pytest.mark.parametrize("fn", (safe_norm, safe_rnorm, safe_normalize), ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", (1e-3, 1.0, 1e5))
def test_safe_norms_gradcheck_and_double_backward(fn, scale):
    """The analytic backward is the derivative of the formula, and itself differentiable (float64, several seeds)."""
    for seed in range(3):
        torch.manual_seed(seed)
        x = (scale * torch.randn(3, 5, dtype=torch.float64)).requires_grad_(True)
        f = (lambda t: fn(t, 1, EPS))
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


def test_channel_square_sum_gradcheck_and_double_backward():
    """float32 input, float64 sums: the analytic backward against finite differences of a float64 evaluation."""
    x = torch.randn(2, 4, 3, 3)
    for scale in (1e-3, 1.0, 1e20):
        x32 = (scale * x).requires_grad_(True)
        x64 = x32.detach().double().requires_grad_(True)
        g = _upstream((2, 2, 3, 3))
        (channel_square_sum_safe(x32, 2) * g).sum().backward()
        (x64.reshape(2, 2, 2, 3, 3).square().sum(2) * g).sum().backward()
        assert_matches_float64("grad", x32.grad, x64.grad)
        # double backward: dS/dx = 2 x g, so d/dx of sum(dS/dx) = 2 g (on each channel of the group)
        first, = torch.autograd.grad((channel_square_sum_safe(x32, 2) * g).sum(), x32, create_graph=True)
        second, = torch.autograd.grad(first.sum(), x32)
        assert_close(second, 2.0 * g.repeat_interleave(2, dim=1), dtype=torch.float32)


def test_safe_norm_zero_gradient_is_finite():
    x = torch.zeros(3, 8, requires_grad=True)
    (safe_norm(x, 1, EPS).sum() + safe_norm(x, 1, 0.0).sum() + safe_rnorm(x, 1, EPS).sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(safe_norm(torch.zeros(2, 4), 1, EPS), torch.full((2,), math.sqrt(EPS)))


def test_safe_norm_rejects_negative_eps():
    with pytest.raises(ValueError, match=r"eps must be >= 0; got -1\.0"):
        safe_norm(torch.ones(2, 3), 1, -1.0)
    with pytest.raises(ValueError, match=r"eps must be > 0; got 0\.0"):
        safe_rnorm(torch.ones(2, 3), 1, 0.0)


def test_patch_norm_handles_mixed_magnitudes_in_one_sample():
    """Per-location scales: a patch of 1e-3 entries beside 1e30 ones keeps its own norm (no shared-scale underflow)."""
    x = torch.full((1, 3, 1, 8), 1e-3, dtype=torch.float64)
    x[..., :2] = 1e30
    n64 = torch.sqrt(F.conv2d(x.square().sum(1, keepdim=True), torch.ones(1, 1, 1, 3, dtype=torch.float64)) + EPS)
    n32 = patch_norm_safe(x.float(), (1, 3), eps=EPS)
    assert_close(n32.double() / n64, torch.ones_like(n64), dtype=torch.float32)
    assert channel_square_sum_safe(x.float()).dtype == torch.float64


# --- SphereConv1d/2d/3d: the fused one-node path and the reference composition ------------------------------------

CONV_FN = {1: sphere_conv1d, 2: sphere_conv2d, 3: sphere_conv3d}
SPATIAL = {1: (9,), 2: (5, 5), 3: (4, 4, 4)}
CONV_VARIANTS = (("fused", False), ("fused", True), ("reference", False))


def _g_floors(out_shape: tuple[int, ...], channel_dim: int) -> dict[str, float]:
    """g is O(1) at every input scale, and so is dg/dk: k's gradient is a sum of O(1) terms weighted by the upstream
    gradient over every position of its channel (N * positions terms), hence that sum's scale."""
    g = _upstream(out_shape)
    per_channel = g.movedim(channel_dim, 0).reshape(out_shape[channel_dim], -1).sum(1)
    return {"output": 1.0, "grad k": float(per_channel.max())}


def _conv_cases() -> list:
    return [pytest.param(impl, me, s, id=f"{impl}-{me}-{s}") for impl, me in CONV_VARIANTS for s in SCALES]


@pytest.mark.parametrize("impl,memory_efficient,scale", _conv_cases())
@pytest.mark.parametrize("groups", (1, 2))
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("nd", (1, 2, 3))
def test_sphere_conv_at_scale(nd, operator, groups, impl, memory_efficient, scale):
    c_in, c_out = 4, 4
    inputs = {"x": _x((2, c_in, *SPATIAL[nd]), scale), "w": torch.randn(c_out, c_in // groups, *([3] * nd)),
              "b": 0.1 * torch.randn(c_out)}
    if operator == "learnable_sigmoid":
        inputs["k"] = 0.3 + torch.rand(c_out)

    def fn(x, w, b, k=None):
        return CONV_FN[nd](x, w, b, 1, 1, 1, groups, operator=operator, sigmoid_k=0.3 if k is None else k, eps=EPS,
                           impl=impl, memory_efficient=memory_efficient)
    _check_fn(fn, inputs, _g_floors((2, c_out, *SPATIAL[nd]), 1),
              atol_grad=SAVE_OUTPUT_GRAD_RTOL_OF_MAX if memory_efficient else None)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("nd", (1, 2, 3))
def test_sphere_conv_at_scale_inside_a_trace(nd, operator, scale, monkeypatch):
    """Inside torch.compile / torch.export the patch norm cannot branch on data: on CPU its float32 squares come
    with a scaled copy for the overflowed ones (``patch_rnorm_pair_kernel``), still as exact as float64; dL/dr is
    summed from dL/dz there."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    test_sphere_conv_at_scale(nd, operator, 2, "fused", True, scale)


@pytest.mark.parametrize("scale", SCALES + (3e38,))
def test_patch_rnorm_pair_kernel_matches_float64(scale):
    """Beside the scaled inputs, mixed magnitudes: windows of 1e-3 entries next to 1e30 ones keep their own norm."""
    x = _x((2, 6, 5, 7), scale).clamp(-3.4e38, 3.4e38).float()
    x[1, :, :, :2] = 1e30
    x[1, :, :, 2:] = 1e-3
    args = ((3, 3), (1, 1), (1, 1), (1, 1), 2, True)
    r = patch_rnorm_pair_kernel(x, *args, EPS)
    x64 = x.double()
    r64 = torch.rsqrt(F.avg_pool2d(x64.square().reshape(2, 2, 3, 5, 7).sum(2), 3, 1, 1, False, True, 1) + EPS)
    assert r.dtype == torch.float32 and bool(torch.isfinite(r).all())
    torch.testing.assert_close(r.double() / r64, torch.ones_like(r64), rtol=TOL[torch.float32][0], atol=0.0)


def test_sphere_conv_compiled_with_inductor_at_scale_1e30():
    """The compiled layer (Inductor, CPU: float32 squares and their scaled copy) against the eager one (float64
    squares where float32 overflowed), on inputs of scale 1 and 1e30 (the same graph: no branch on data)."""
    torch.manual_seed(0)
    layer = SphereConv2d(3, 8, 3, padding=1, operator="linear")
    compiled = torch.compile(layer, fullgraph=True)
    for scale in (1.0, 1e30):
        x = (scale * torch.randn(4, 3, 8, 8)).requires_grad_(True)
        out, out_c = layer(x), compiled(x)
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        (grad_c,) = torch.autograd.grad(out_c.square().sum(), x)
        assert bool(torch.isfinite(out_c).all()) and bool(torch.isfinite(grad_c).all())
        assert_close(out_c, out)
        assert_close(grad_c / grad.abs().max(), grad / grad.abs().max())
    torch._dynamo.reset()


# --- SphereLinear -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("impl,memory_efficient", CONV_VARIANTS)
@pytest.mark.parametrize("operator", OPERATORS)
def test_sphere_linear_at_scale(operator, impl, memory_efficient, scale):
    inputs = {"x": _x((3, 2, 24), scale), "w": torch.randn(6, 24), "b": 0.1 * torch.randn(6)}
    inputs["x"][0, 1] = 0.0  # a zero feature row
    if operator == "learnable_sigmoid":
        inputs["k"] = 0.3 + torch.rand(6)

    def fn(x, w, b, k=None):
        return sphere_linear(x, w, b, operator=operator, sigmoid_k=0.3 if k is None else k, eps=EPS, impl=impl,
                             memory_efficient=memory_efficient)
    _check_fn(fn, inputs, _g_floors((3, 2, 6), -1),
              atol_grad=SAVE_OUTPUT_GRAD_RTOL_OF_MAX if memory_efficient else None)


# --- AngularHead and every margin ---------------------------------------------------------------------------------

HEADS = {
    "w-softmax": {},
    "ga-softmax m=2": {"margin": 2.0},
    "ga-softmax m=1.5": {"margin": 1.5},
    "a-softmax m=4 lambda=5": {"margin": 4.0, "lambda_": 5.0},
    "arcface m2=0.5 s=64": {"m2": 0.5, "scale": 64.0},
    "cosface m3=0.35 s=64": {"m3": 0.35, "scale": 64.0},
    "detach_margin m=3": {"margin": 3.0, "detach_margin": True},
}


# without labels every margin gives the w-softmax logits: one label-free case
HEAD_CASES = [pytest.param(True, h, id=h) for h in sorted(HEADS)] + [pytest.param(False, "w-softmax", id="no labels")]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("with_labels,head", HEAD_CASES)
@pytest.mark.parametrize("operator", OPERATORS)
def test_angular_head_at_scale(operator, with_labels, head, scale):
    module = AngularHead(16, 5, operator=operator, eps=EPS, **HEADS[head])
    x = _x((6, 16), scale)
    x[2] = 0.0  # a zero feature: zero logits (s = ||x||) and a finite gradient
    labels = torch.tensor([0, 3, 1, -1, 4, 2])  # -1: ignored, no margin
    # the logit scale s: sqrt(||x||^2 + eps) of the largest row (float64), or the fixed scale
    s = HEADS[head].get("scale") or float(torch.sqrt(x.float().double().square().sum(1) + EPS).max())
    floors = {"output": s, "grad sigmoid_k_raw": s * _g_floors((6, 5), 1)["grad k"]}
    _check_module(module, x, *((labels,) if with_labels else ()), floors=floors)


def test_angular_head_overflow_regression():
    """The reported case: features of magnitude 1e19 used to give NaN logits and gradients."""
    head = AngularHead(512, 10, margin=2.0, device=DEVICE)
    x = (torch.randn(4, 512) * 1e19).to(DEVICE).requires_grad_(True)
    logits = head(x, torch.tensor([0, 1, 2, 3], device=DEVICE))
    logits.sum().backward()
    assert bool(torch.isfinite(logits).all()) and bool(torch.isfinite(x.grad).all())
    norm = torch.linalg.vector_norm(x.detach().double(), dim=1)
    assert float(logits.detach().double().abs().max(1).values.div(norm).max()) <= 1.0 + 1e-5


# --- SphereNorm ---------------------------------------------------------------------------------------------------

NORM = {1: SphereNorm1d, 2: SphereNorm2d, 3: SphereNorm3d}


def _sphere_norm_floors(module: nn.Module, x: Tensor) -> dict[str, float]:
    """The scales of g's share of each SphereNorm quantity, in float64: gamma g T + beta with T = (||w|| ||x_p||)^rho.

    Where g ~ 0 (s << sqrt(eps)) float32 g has its absolute error only, so g's terms count at |g| = 1 (bounds of
    dT/dw = rho T w / ||w||^2 and dT/dx = rho T x / ||x_p||^2, each input entry in at most prod(kernel) patches).
    """
    m = copy.deepcopy(module).double().requires_grad_(False)
    x = x.float().double()
    nd, c_out = m.weight.dim() - 2, m.out_channels
    n = patch_norm_safe(x, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, m.eps)  # (N, G, *out)
    n = n.repeat_interleave(c_out // m.groups, dim=1)  # (N, C_out, *out)
    channel = (1, -1, *([1] * nd))
    w_norm = filter_norm_safe(m.weight, m.eps).reshape(channel)
    mag = w_norm * n
    rho = m.rho.clamp(0.0, 1.0).reshape(channel)
    t = mag.pow(rho)
    gt = m.gamma.abs().reshape(channel) * t * _upstream(t.shape)
    dims = [0, *range(2, nd + 2)]
    return {"output": float((t * m.gamma.abs().reshape(channel)).max()) + 1.0,
            "grad gamma": float((t * _upstream(t.shape)).sum(dims).max()),
            "grad rho": float((gt * mag.log().abs()).sum(dims).max()),
            "grad weight": float((gt * rho / w_norm).sum(dims).max()),
            "grad input": float((gt * rho / n).sum(1).max()) * math.prod(m.kernel_size),
            "grad sigmoid_k_raw": float(gt.sum(dims).max())}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("groups", (1, 2))
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("nd", (1, 2, 3))
def test_sphere_norm_at_scale(nd, operator, groups, scale):
    module = NORM[nd](4, 4, 3, padding=1, groups=groups, bias=True, operator=operator, eps=EPS)
    with torch.no_grad():  # away from the init: rho inside (0, 1), gamma and beta non-trivial
        module.rho.copy_(torch.tensor([0.0, 0.3, 0.6, 1.0]))
        module.gamma.copy_(1.0 + 0.2 * torch.randn(4))
        module.beta.copy_(0.1 * torch.randn(4))
        module.bias.copy_(0.1 * torch.randn(4))
    x = _x((2, 4, *SPATIAL[nd]), scale)
    _check_module(module, x, floors=_sphere_norm_floors(module, x))


# --- regularizers (on weights at every scale) ----------------------------------------------------------------------

REGULARIZERS = {
    "mhe s=0": lambda w: hyperspherical_energy(w, 0.0),
    "mhe s=2 half-space": lambda w: hyperspherical_energy(w, 2.0, half_space=True),
    "a-mhe s=1": lambda w: hyperspherical_energy(w, 1.0, angular=True),
    "stochastic mhe": lambda w: stochastic_energy(w, 1.0, labels=torch.tensor([0, 2, 5], device=w.device)),
    "mhs": lambda w: mhs(w),
    "mgd": lambda w: mgd(w),
    "r_mhp raw": lambda w: r_mhp(w),
    "r_mhp normalized": lambda w: r_mhp(w, normalize=True),
    "mhp": lambda w: mhp(w, torch.ones(1, 12, dtype=w.dtype, device=w.device)),
    "mhc": lambda w: mhc(w, torch.ones(2, 12, dtype=w.dtype, device=w.device)),
}


# At s <= 1e-10 the eps-normalized neurons have norms <= 1e-8: all pairwise squared distances are 2 within float32
# rounding. MHS sums every pair at the minimum (a tie of all pairs in float32, of one pair in float64) and MGD's
# kernel matrix is then rank one plus the 1e-6 jitter (condition ~1e7): both are discontinuous or ill-conditioned
# there whatever the norms, so only finiteness is checked.
DEGENERATE = {"mhs": 1e-10, "mgd": 1e-10}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_regularizer_at_scale(name, scale):
    w = _x((7, 3, 2, 2), scale)
    if scale <= DEGENERATE.get(name, -1.0):
        w32 = w.float().to(DEVICE).requires_grad_(True)
        value = REGULARIZERS[name](w32)
        value.backward()
        assert bool(torch.isfinite(value)) and bool(torch.isfinite(w32.grad).all())
        return
    _check_fn(lambda w: REGULARIZERS[name](w), {"w": w})


# --- float64 stays exact ------------------------------------------------------------------------------------------

def test_float64_results_are_the_plain_formula_bitwise():
    """The scaled norms change nothing in float64: head logits, sphere_linear and SphereNorm's patch norm are bitwise
    those of the plain sqrt(sum x^2 + eps) formulas."""
    x = 3.0 * torch.randn(6, 16, dtype=torch.float64)
    x[1] = 0.0
    labels = torch.tensor([0, 3, 1, -1, 4, 2])
    head = AngularHead(16, 5, margin=2.0, lambda_=1.0, dtype=torch.float64)
    w = head.weight.detach()
    x_norm = torch.sqrt(x.square().sum(1, keepdim=True) + head.eps)
    cos = F.linear(x, w) / torch.sqrt(w.square().sum(1) + head.eps) / x_norm
    plain = angular_margin_logits(cos, labels, margin=2.0, scale=x_norm, lambda_=1.0)
    assert torch.equal(head(x, labels).detach(), plain)
    lin = sphere_linear(x, w, operator="cosine", eps=EPS, impl="reference")
    assert torch.equal(lin, F.linear(x, w) / torch.sqrt(x.square().sum(1, keepdim=True) + EPS)
                       / torch.sqrt(w.square().sum(1) + EPS))
    xc = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for groups in (1, 2):
        plain_norm = torch.sqrt(patch_norm_sq(xc, (3, 3), 1, 1, 1, groups) + EPS)
        assert torch.equal(patch_norm_safe(xc, (3, 3), 1, 1, 1, groups, EPS), plain_norm)
