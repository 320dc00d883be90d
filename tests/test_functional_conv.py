"""SphereConv functional core against a slow, obviously-correct float64 reference.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). The reference extracts every input patch
explicitly (``Tensor.unfold`` along each spatial dim, then a dilation stride), computes

    cos = <w, x_patch> / (sqrt(|w|^2 + eps) * sqrt(|x_patch|^2 + eps))

per group and applies g by the original SphereNet formulas (the exp form of the sigmoid), never through the library's
operator functions. One tester subclass per operator (torchvision ``RoIOpTester`` pattern, STYLE practice 10).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import AUTOCAST_ATOL, DEVICE, REF_ATOL

from torchsphere.functional import sphere_conv1d, sphere_conv2d, sphere_conv3d, sphere_linear
from torchsphere.functional.fused import IMPLS

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

SPHERE_CONV = {1: sphere_conv1d, 2: sphere_conv2d, 3: sphere_conv3d}
CLAMP = 1e-6  # the documented clamp of safe_acos; matters only for |cos| > 1 - 1e-6 (never reached below)


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    """Every test that takes ``impl`` runs on the fused default path and on the plain eager composition."""
    return request.param


# ------------------------------------------------------------------------------------------------ naive reference
def _tuple(v, nd: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _pads(padding, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    """(before, after) zero padding per spatial dim, as F.convNd resolves ints, tuples, 'valid' and 'same'."""
    nd = len(kernel)
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":  # total d (k - 1), the odd extra element after (PyTorch convention)
        return [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    return [(p, p) for p in _tuple(padding, nd)]


def g_linear(theta, k=None):
    return 1.0 - 2.0 * theta / math.pi


def g_cosine(theta, k=None):
    return torch.cos(theta)


def g_sigmoid(theta, k):
    """The paper's exp form of the sigmoid operator (wy1iu/SphereNet), not the library's tanh form:

    g = [(1 + e^{-pi/2k}) / (1 - e^{-pi/2k})] (1 - e^{theta/k - pi/2k}) / (1 + e^{theta/k - pi/2k}).
    """
    a = torch.exp(torch.as_tensor(-math.pi / (2 * k), dtype=theta.dtype))
    e = torch.exp(theta / k - math.pi / (2 * k))
    return (1 + a) / (1 - a) * (1 - e) / (1 + e)


def reference_sphere_conv(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, *, g=g_cosine, k=None,
                          eps=1e-4):
    """Float64 SphereConv for any nd by explicit patch extraction; k a number or a (C_out,) tensor."""
    nd = w.dim() - 2
    x, w = x.double(), w.double()
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    kernel = tuple(w.shape[2:])
    stride, dilation = _tuple(stride, nd), _tuple(dilation, nd)
    pads = _pads(padding, kernel, dilation)
    x = F.pad(x, [p for pair in reversed(pads) for p in pair])  # zeros
    for i in range(nd):  # (N, C, *out, *span)
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    x = x[(Ellipsis, *[slice(None, None, d) for d in dilation])]  # (N, C, *out, *kernel)
    n, c_in = x.shape[:2]
    out_sp = x.shape[2:2 + nd]
    c_out, cg = w.shape[0], c_in // groups
    # (N, *out, G, Cg * prod(kernel))
    patches = x.reshape(n, groups, cg, *out_sp, *kernel)
    patches = patches.permute(0, *range(3, 3 + nd), 1, 2, *range(3 + nd, 3 + 2 * nd)).reshape(n, *out_sp, groups, -1)
    filters = w.reshape(groups, c_out // groups, -1)  # (G, C_out/G, Cg * prod(kernel))
    dot = torch.einsum("n...gd,god->n...go", patches, filters)
    p_norm = torch.sqrt((patches ** 2).sum(-1, keepdim=True) + eps)  # (N, *out, G, 1)
    f_norm = torch.sqrt((filters ** 2).sum(-1) + eps)  # (G, C_out/G)
    cos = (dot / p_norm / f_norm).reshape(n, *out_sp, c_out).movedim(-1, 1)  # (N, C_out, *out)
    theta = torch.acos(cos.clamp(-1 + CLAMP, 1 - CLAMP))
    if isinstance(k, torch.Tensor):
        k = k.double().reshape(1, -1, *([1] * nd))
    out = g(theta, k)
    if bias is not None:
        out = out + bias.double().reshape(1, -1, *([1] * nd))
    return out.squeeze(0) if unbatched else out

# ------------------------------------------------------------------------------------------------ configurations
# (nd, c_in, c_out, kernel, spatial, stride, padding, dilation, groups)
CONFIGS = [
    (1, 3, 4, 3, (11,), 1, 0, 1, 1),
    (1, 4, 6, 3, (12,), 2, 1, 1, 2),
    (1, 3, 5, 3, (10,), 1, "same", 2, 1),
    (1, 4, 4, 2, (9,), (3,), (2,), (2,), 4),
    (1, 2, 3, 4, (10,), 1, "valid", 1, 1),
    (2, 3, 4, 3, (7, 8), 1, 1, 1, 1),
    (2, 4, 6, (3, 2), (8, 7), (2, 1), (1, 0), 1, 2),
    (2, 3, 4, (2, 3), (7, 6), 1, "same", (2, 1), 1),
    (2, 4, 8, 3, (9, 9), 2, 2, 2, 4),
    (2, 6, 6, 3, (6, 7), 1, "valid", 1, 3),
    (3, 2, 3, 3, (5, 5, 5), 1, 1, 1, 1),
    (3, 4, 4, (2, 3, 3), (5, 6, 6), (1, 2, 2), (0, 1, 1), 1, 2),
    (3, 2, 4, 2, (4, 5, 4), 1, "same", 1, 1),
    (3, 3, 3, 2, (6, 6, 6), 2, "valid", 2, 3),
]
# small shapes for gradcheck (its numerical Jacobian costs one forward per input element)
GRADCHECK_CONFIGS = {
    1: (1, 2, 4, 3, (6,), 2, 1, 1, 2),
    2: (2, 2, 4, (2, 3), (4, 5), (2, 1), (1, 0), 1, 2),
    3: (3, 2, 2, 2, (2, 3, 3), 1, (1, 0, 1), 1, 1),
}
CONFIG_IDS = [f"{c[0]}d-s{c[5]}-p{c[6]}-d{c[7]}-g{c[8]}" for c in CONFIGS]


def make_case(cfg, dtype, bias=False):
    nd, c_in, c_out, kernel, spatial, *_ = cfg
    groups = cfg[8]
    x = torch.randn(2, c_in, *spatial, dtype=torch.float64)
    w = torch.randn(c_out, c_in // groups, *_tuple(kernel, nd), dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64) if bias else None
    to = dict(device=DEVICE, dtype=dtype)
    return x.to(**to), w.to(**to), (b.to(**to) if bias else None)


# ------------------------------------------------------------------------------------------------ abstract tester
class SphereOpTester:
    """Shared tests; subclasses set ``operator``, ``g`` (reference formula) and ``make_k(c_out)``."""

    operator: str
    g = staticmethod(g_cosine)

    def make_k(self, c_out: int):
        return 0.3

    def k_on(self, c_out: int, dtype=torch.float64, grad: bool = False):
        """make_k on the test device; a tensor k optionally requires grad (the learned k)."""
        k = self.make_k(c_out)
        if not isinstance(k, torch.Tensor):
            return k
        return k.to(DEVICE, dtype).requires_grad_(grad)

    def run(self, x, w, b, cfg, k, impl="fused", **kw):
        nd, *_, stride, padding, dilation, groups = cfg
        return SPHERE_CONV[nd](x, w, b, stride, padding, dilation, groups, operator=self.operator, sigmoid_k=k,
                               impl=impl, **kw)

    def expected(self, x, w, b, cfg, k, eps=1e-4):
        *_, stride, padding, dilation, groups = cfg
        return reference_sphere_conv(x, w, b, stride, padding, dilation, groups, g=self.g, k=k, eps=eps)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
    @pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
    def test_against_reference(self, cfg, dtype, impl):
        x, w, _ = make_case(cfg, dtype)
        k = self.k_on(w.shape[0], dtype)
        out = self.run(x, w, None, cfg, k, impl)
        ref = self.expected(x, w, None, cfg, k)
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=REF_ATOL[dtype])

    @pytest.mark.parametrize("cfg", [CONFIGS[1], CONFIGS[6], CONFIGS[11]], ids=["1d", "2d", "3d"])
    def test_bias_added_after_g(self, cfg, impl):
        x, w, b = make_case(cfg, torch.float64, bias=True)
        k = self.k_on(w.shape[0])
        out = self.run(x, w, b, cfg, k, impl)
        torch.testing.assert_close(out, self.expected(x, w, b, cfg, k), rtol=0, atol=REF_ATOL[torch.float64])
        no_bias = self.run(x, w, None, cfg, k)
        torch.testing.assert_close(out - no_bias, b.reshape(1, -1, *([1] * cfg[0])).expand_as(out), rtol=0,
                                   atol=1e-12)

    @pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[5], CONFIGS[10]], ids=["1d", "2d", "3d"])
    def test_unbatched(self, cfg):
        x, w, _ = make_case(cfg, torch.float64)
        k = self.k_on(w.shape[0])
        out = self.run(x[0], w, None, cfg, k)
        assert out.dim() == cfg[0] + 1
        torch.testing.assert_close(out, self.run(x[:1], w, None, cfg, k)[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(out, self.expected(x[0], w, None, cfg, k), rtol=0, atol=REF_ATOL[torch.float64])

    @pytest.mark.parametrize("seed", range(3))
    @pytest.mark.parametrize("nd", [1, 2, 3])
    def test_gradcheck(self, nd, seed, impl):
        torch.manual_seed(seed)
        cfg = GRADCHECK_CONFIGS[nd]
        x, w, b = make_case(cfg, torch.float64, bias=True)
        k = self.k_on(w.shape[0], grad=True)
        inputs = [x.requires_grad_(), w.requires_grad_(), b.requires_grad_()]
        if isinstance(k, torch.Tensor):
            inputs.append(k)

        def fn(x, w, b, *k_):
            return self.run(x, w, b, cfg, k_[0] if k_ else k, impl)

        assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4)

    @pytest.mark.parametrize("nd", [1, 2, 3])
    def test_scale_invariance_and_range(self, nd):
        cfg = {1: CONFIGS[1], 2: CONFIGS[8], 3: CONFIGS[11]}[nd]
        x, w, _ = make_case(cfg, torch.float64)
        k = self.k_on(w.shape[0])
        out = self.run(x, w, None, cfg, k, eps=1e-12)
        for sx, sw in [(7.5, 1.0), (1.0, 0.1), (20.0, 0.25)]:
            scaled = self.run(sx * x, sw * w, None, cfg, k, eps=1e-12)
            torch.testing.assert_close(scaled, out, rtol=0, atol=1e-10)
        assert out.abs().max() <= 1.0
        big = self.run(1e3 * x, w, None, cfg, k)  # default eps, large input: still within [-1, 1]
        assert big.abs().max() <= 1.0

    @pytest.mark.parametrize("nd", [1, 2, 3])
    def test_zero_input_is_zero_with_finite_gradients(self, nd, impl):
        cfg = {1: CONFIGS[1], 2: CONFIGS[6], 3: CONFIGS[11]}[nd]
        x, w, _ = make_case(cfg, torch.float64)
        x = torch.zeros_like(x).requires_grad_()
        w.requires_grad_()
        k = self.k_on(w.shape[0], grad=True)
        out = self.run(x, w, None, cfg, k, impl)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-12)
        out.sum().backward()
        grads = [x.grad, w.grad] + ([k.grad] if isinstance(k, torch.Tensor) else [])
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)

    @pytest.mark.parametrize("eps", [1e-4, 1e-30])
    @pytest.mark.parametrize("nd", [1, 2, 3])
    def test_patch_equal_to_kernel_has_finite_gradients(self, nd, eps, impl):
        """Input = kernel (one output position): cos = 1 (exactly, with eps = 1e-30), gradients stay finite."""
        c_out, c_in, kernel = 3, 2, (3,) * nd
        x = torch.randn(1, c_in, *kernel, dtype=torch.float64, device=DEVICE)
        w = torch.cat([x, -x, torch.randn_like(x)]).requires_grad_()  # filters 0 / 1: cos = +1 / -1
        x.requires_grad_()
        k = self.k_on(c_out, grad=True)
        out = SPHERE_CONV[nd](x, w, operator=self.operator, sigmoid_k=k, eps=eps, impl=impl)
        assert out.shape == (1, c_out, *([1] * nd))
        # g(theta ~ 0) ~ 1 and g(theta ~ pi) ~ -1; eps = 1e-4 alone moves theta by ~sqrt(2 eps / |x|^2)
        torch.testing.assert_close(out[0, :2].flatten(), torch.tensor([1.0, -1.0], dtype=out.dtype),
                                   rtol=0, atol=1e-2)
        out.sum().backward()
        grads = [x.grad, w.grad] + ([k.grad] if isinstance(k, torch.Tensor) else [])
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


class TestLinearOperator(SphereOpTester):
    operator = "linear"
    g = staticmethod(g_linear)


class TestCosineOperator(SphereOpTester):
    operator = "cosine"
    g = staticmethod(g_cosine)


class TestSigmoidOperator(SphereOpTester):
    operator = "sigmoid"
    g = staticmethod(g_sigmoid)


class TestLearnableSigmoidOperator(SphereOpTester):
    """Per-output-channel k tensor (the learned, effective k), gradient with respect to k included."""

    operator = "learnable_sigmoid"
    g = staticmethod(g_sigmoid)

    def make_k(self, c_out):
        return torch.linspace(0.15, 1.2, c_out, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ specifics
def test_sigmoid_accepts_per_channel_k_tensor():
    cfg = CONFIGS[6]
    x, w, _ = make_case(cfg, torch.float64)
    k = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 1.1], dtype=torch.float64)
    out = sphere_conv2d(x, w, None, (2, 1), (1, 0), 1, 2, operator="sigmoid", sigmoid_k=k)
    ref = reference_sphere_conv(x, w, None, (2, 1), (1, 0), 1, 2, g=g_sigmoid, k=k)
    torch.testing.assert_close(out, ref, rtol=0, atol=REF_ATOL[torch.float64])
    scalar = sphere_conv2d(x, w, None, (2, 1), (1, 0), 1, 2, operator="sigmoid", sigmoid_k=torch.tensor(0.3))
    torch.testing.assert_close(scalar, sphere_conv2d(x, w, None, (2, 1), (1, 0), 1, 2, operator="sigmoid"))


def test_all_zero_patch_gives_zero_among_nonzero_patches():
    """Zero padding regions and zero patches give cos = 0 and g = 0, as in the official code."""
    x = torch.zeros(1, 2, 9, 9, dtype=torch.float64)
    x[:, :, :3, :3] = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    for operator in ("linear", "cosine", "sigmoid"):
        out = sphere_conv2d(x, w, padding=1, operator=operator)
        torch.testing.assert_close(out[..., 5:, 5:], torch.zeros_like(out[..., 5:, 5:]), rtol=0, atol=1e-12)
        assert out[..., :3, :3].abs().min() > 0


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sphere_linear_against_reference(operator, dtype, impl):
    """sphere_linear is the 1x1, full-patch SphereConv: same reference on a (N, in, 1) input."""
    x = torch.randn(5, 7, dtype=torch.float64)
    w = torch.randn(4, 7, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    k = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64) if operator == "learnable_sigmoid" else 0.3
    g = {"linear": g_linear, "cosine": g_cosine}.get(operator, g_sigmoid)
    to = dict(device=DEVICE, dtype=dtype)
    kd = k.to(**to) if isinstance(k, torch.Tensor) else k
    out = sphere_linear(x.to(**to), w.to(**to), b.to(**to), operator=operator, sigmoid_k=kd, impl=impl)
    ref = reference_sphere_conv(x.unsqueeze(-1), w.unsqueeze(-1), b, g=g, k=k).squeeze(-1)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=REF_ATOL[dtype])
    x3 = torch.randn(2, 3, 7, dtype=torch.float64)  # any leading dims
    out3 = sphere_linear(x3, w, operator=operator, sigmoid_k=k, impl=impl)
    torch.testing.assert_close(out3[1, 2], sphere_linear(x3[1, 2], w, operator=operator, sigmoid_k=k, impl=impl))


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
def test_sphere_linear_gradcheck(operator, impl):
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        k = torch.rand(4, dtype=torch.float64).add(0.2).requires_grad_()

        def fn(x, w, k):
            return sphere_linear(x, w, operator=operator, sigmoid_k=k, impl=impl)

        assert torch.autograd.gradcheck(fn, (x, w, k), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
def test_reference_impl_gradgradcheck(operator):
    """The plain eager composition (impl='reference') supports double backward, e.g. for gradient penalties."""
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    k = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, k: sphere_conv2d(x, w, padding=1, operator=operator, sigmoid_k=k, impl="reference"), (x, w, k))


@pytest.mark.parametrize("operator", ["linear", "cosine", "learnable_sigmoid"])
def test_memory_format_and_strides_do_not_matter(operator, impl):
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    k = torch.linspace(0.2, 0.9, 6, dtype=torch.float64)
    out = sphere_conv2d(x, w, None, 1, 1, 1, 2, operator=operator, sigmoid_k=k, impl=impl)
    cl = sphere_conv2d(x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last), None, 1, 1,
                       1, 2, operator=operator, sigmoid_k=k, impl=impl)
    torch.testing.assert_close(cl, out, rtol=0, atol=1e-12)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous
    torch.testing.assert_close(sphere_conv2d(xt, w, None, 1, 1, 1, 2, operator=operator, sigmoid_k=k, impl=impl),
                               out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_bf16_autocast_cpu_stays_finite_and_close(nd):
    """Under CPU bf16 autocast the conv runs in bf16, the norms and g in fp32; the result has the conv's dtype."""
    cfg = {1: CONFIGS[1], 2: CONFIGS[6], 3: CONFIGS[11]}[nd]
    x, w, _ = make_case(cfg, torch.float32)
    *_, stride, padding, dilation, groups = cfg
    fn = SPHERE_CONV[nd]
    for operator in ("linear", "cosine", "sigmoid"):
        ref = fn(x, w, None, stride, padding, dilation, groups, operator=operator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, w, None, stride, padding, dilation, groups, operator=operator)
        assert out.dtype == torch.bfloat16  # the dtype autocast gives the convolution
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=AUTOCAST_ATOL)

# ------------------------------------------------------------------------------------------------ errors
X2, W2 = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3)


def test_unknown_operator_raises():
    with pytest.raises(ValueError, match=r"unknown sphere operator 'cosin'; choose from \['linear', 'cosine'"):
        sphere_conv2d(X2, W2, operator="cosin")
    with pytest.raises(ValueError, match=r"unknown sphere operator 'relu'"):
        sphere_linear(torch.randn(2, 3), torch.randn(4, 3), operator="relu")


def test_non_str_operator_raises():
    with pytest.raises(TypeError, match=r"operator must be a str.*got NoneType None"):
        sphere_conv2d(X2, W2, operator=None)


@pytest.mark.parametrize("value", [0, -0.3, float("nan")])
def test_nonpositive_sigmoid_k_raises(value):
    with pytest.raises(ValueError, match=r"sigmoid_k must be a finite number > 0; got"):
        sphere_conv2d(X2, W2, operator="sigmoid", sigmoid_k=value)


@pytest.mark.parametrize("value", ["0.3", True, [0.3]])
def test_non_number_sigmoid_k_raises(value):
    with pytest.raises(TypeError, match=r"sigmoid_k must be a positive real number; got"):
        sphere_conv2d(X2, W2, operator="sigmoid", sigmoid_k=value)


def test_integer_sigmoid_k_tensor_raises():
    with pytest.raises(TypeError, match=r"sigmoid_k tensor must be floating point; got dtype torch.int64"):
        sphere_conv2d(X2, W2, operator="learnable_sigmoid", sigmoid_k=torch.ones(6, dtype=torch.long))


@pytest.mark.parametrize("value", [0.0, -1e-4])
def test_nonpositive_eps_raises(value):
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0; got"):
        sphere_conv2d(X2, W2, eps=value)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0; got"):
        sphere_linear(torch.randn(2, 3), torch.randn(4, 3), eps=value)


def test_wrong_weight_dims_raises():
    with pytest.raises(ValueError, match=r"weight of sphere_conv2d must have 4 dims .* got shape \(6, 4, 3\)"):
        sphere_conv2d(X2, W2[..., 0])
    with pytest.raises(ValueError, match=r"weight of sphere_conv1d must have 3 dims"):
        sphere_conv1d(X2[..., 0], W2)
    with pytest.raises(ValueError, match=r"weight must be 2-d \(out_features, in_features\); got shape \(4,\)"):
        sphere_linear(torch.randn(2, 3), torch.randn(4))


def test_wrong_input_dims_raises():
    with pytest.raises(ValueError, match=r"input of sphere_conv2d must have 4 dims .* or 3 .* got shape \(5, 5\)"):
        sphere_conv2d(X2[0, 0], W2)
    with pytest.raises(ValueError, match=r"input of sphere_conv3d must have 5 dims .* got shape \(1, 1, 4, 5, 5, 1\)"):
        sphere_conv3d(X2[None, ..., None], torch.randn(6, 4, 3, 3, 3))


def test_channel_mismatch_raises():
    with pytest.raises(ValueError, match=r"input has 4 channels but weight expects 6"):
        sphere_conv2d(X2, torch.randn(6, 3, 3, 3), groups=2)
    with pytest.raises(ValueError, match=r"input's last dim must be in_features=3; got shape \(2, 5\)"):
        sphere_linear(torch.randn(2, 5), torch.randn(4, 3))


def test_groups_not_dividing_raises():
    with pytest.raises(ValueError, match=r"groups=4 must divide the 6 output channels"):
        sphere_conv2d(X2, torch.randn(6, 1, 3, 3), groups=4)
    with pytest.raises(ValueError, match=r"groups must be an int >= 1; got 0"):
        sphere_conv2d(X2, W2, groups=0)


def test_non_tensor_input_raises():
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor; got list"):
        sphere_conv2d([[1.0]], W2)
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor; got ndarray"):
        sphere_conv2d(X2, W2.numpy())


def test_sigmoid_k_tensor_of_wrong_size_raises():
    with pytest.raises(ValueError, match=r"sigmoid_k has 4 values but the output has 6 channels along dim 1"):
        sphere_conv2d(X2, W2, operator="learnable_sigmoid", sigmoid_k=torch.full((4,), 0.5))
    with pytest.raises(ValueError, match=r"sigmoid_k tensor must be 0-d or 1-d .* got shape \(6, 1\)"):
        sphere_conv2d(X2, W2, operator="sigmoid", sigmoid_k=torch.full((6, 1), 0.5))


def test_learnable_sigmoid_without_k_raises():
    with pytest.raises(ValueError, match=r"sigmoid_k is required|learnable_sigmoid' needs sigmoid_k"):
        sphere_conv2d(X2, W2, operator="learnable_sigmoid", sigmoid_k=None)
    with pytest.raises(ValueError, match=r"sigmoid_k is required|learnable_sigmoid' needs sigmoid_k"):
        sphere_linear(torch.randn(2, 3), torch.randn(4, 3), operator="learnable_sigmoid", sigmoid_k=None)
