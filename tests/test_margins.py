"""Tests of torchsphere.functional.margins: psi, the extended operators and angular_margin_logits."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close
from torchsphere.functional import angular_activation, angular_margin_logits, margin_logits, psi
from torchsphere.functional.margins import extended_operator

OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
MARGINS = (1.0, 1.5, 2.0, 2.5, 4.0, 7.3)  # integer and non-integer m


# ---------------------------------------------------------------- slow per-sample references (python floats, float64)
def ref_g(phi: float, operator: str, k: float) -> float:
    """g extended beyond pi, written the slow way: SphereFace's piecewise psi, SphereNet's original sigmoid form."""
    if operator == "linear":
        return 1.0 - 2.0 * phi / math.pi
    if operator == "cosine":
        piece = 0
        while not (piece * math.pi <= phi < (piece + 1) * math.pi):  # find the piece by walking, no floor
            piece += 1 if phi >= (piece + 1) * math.pi else -1
        return (-1) ** piece * math.cos(phi) - 2 * piece
    e = math.exp(-math.pi / (2 * k))
    t = math.exp(phi / k - math.pi / (2 * k))
    return (1 + e) / (1 - e) * (1 - t) / (1 + t)  # official SphereNet form, not the tanh one of the library


def ref_margin_logits(cos, labels, *, operator, ks, margin, m2=0.0, m3=0.0, scales, lam=0.0):
    """Per-sample, per-class loops over python floats."""
    out = []
    for i, row in enumerate(cos):
        out_row = []
        for j, c in enumerate(row):
            theta = math.acos(min(max(c, -1.0 + 1e-6), 1.0 - 1e-6))
            g = c if operator == "cosine" else ref_g(theta, operator, ks[j])
            value = g
            if labels is not None and labels[i] == j:
                target = ref_g(margin * theta + m2, operator, ks[j]) - m3
                value = (lam * g + target) / (1 + lam)
            out_row.append(scales[i] * value)
        out.append(out_row)
    return torch.tensor(out, dtype=torch.float64)


def _cosines(n: int = 6, c: int = 5, dtype=torch.float64) -> torch.Tensor:
    return torch.empty(n, c, dtype=dtype).uniform_(-0.98, 0.98)


def _k_for(operator: str, c: int):
    if operator == "learnable_sigmoid":
        return torch.linspace(0.1, 0.9, c, dtype=torch.float64)  # one effective k per class
    return 0.3 if operator == "sigmoid" else None


def _k_list(k, c):
    if isinstance(k, torch.Tensor):
        return k.tolist()
    return [0.3 if k is None else k] * c


# ---------------------------------------------------------------- psi
@pytest.mark.parametrize("m", MARGINS)
def test_psi_cosine_is_sphereface_piecewise(m):
    theta = torch.linspace(0, math.pi, 181, dtype=torch.float64)
    expected = []
    for t in theta.tolist():
        piece = min(int(m * t / math.pi), math.ceil(m) - 1)  # theta in [piece pi/m, (piece+1) pi/m]
        expected.append((-1) ** piece * math.cos(m * t) - 2 * piece)
    assert_close(psi(theta, m, "cosine"), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("m", MARGINS)
@pytest.mark.parametrize("m2,m3", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.35), (0.3, 0.2)])
def test_psi_monotone_decreasing_below_g(operator, m, m2, m3):
    theta = torch.linspace(0, math.pi, 2001, dtype=torch.float64)
    k = 0.3 if operator != "learnable_sigmoid" else torch.tensor(0.5, dtype=torch.float64)
    values = psi(theta, m, operator, k, m2=m2, m3=m3)
    diff = values.diff()
    assert bool((diff <= 0).all()), f"psi increases somewhere: max step {diff.max().item()}"
    if operator in ("linear", "cosine"):
        assert bool((diff < 0).all())  # strictly decreasing
    else:  # strictly decreasing until the tanh saturates in float64
        assert bool((diff[values[1:] > values.min() + 1e-9] < 0).all())
    # continuous: no jump larger than the steepest slope allows (cosine |psi'| <= m, sigmoid |g'| <= 1/(2k tanh))
    slope = m * max(1.0, 2 / math.pi, 1 / (2 * 0.3 * math.tanh(math.pi / 1.2)))
    assert diff.abs().max().item() <= slope * (theta[1] - theta[0]).item() * 1.01
    g = extended_operator(theta, operator, k)  # = g(theta) on [0, pi], without acos clamping
    assert bool((values <= g + 1e-12).all())


@pytest.mark.parametrize("operator", OPERATORS)
def test_psi_with_m1_is_the_operator(operator):
    theta = torch.linspace(0.01, math.pi - 0.01, 50, dtype=torch.float64)  # inside safe_acos's clamp
    k = torch.tensor(0.4, dtype=torch.float64) if operator == "learnable_sigmoid" else 0.3
    assert_close(psi(theta, 1.0, operator, k), angular_activation(torch.cos(theta), operator, k, dim=-1))


@pytest.mark.parametrize("operator", ("linear", "cosine", "sigmoid"))
def test_extended_operator_matches_slow_reference_beyond_pi(operator):
    phi = torch.linspace(0, 5 * math.pi, 97, dtype=torch.float64)
    expected = torch.tensor([ref_g(p, operator, 0.3) for p in phi.tolist()], dtype=torch.float64)
    assert_close(extended_operator(phi, operator, 0.3), expected)


# ---------------------------------------------------------------- angular_margin_logits vs the slow reference
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2,m3", [(1.0, 0.0, 0.0), (2.0, 0.0, 0.0), (2.5, 0.0, 0.0), (4.0, 0.0, 0.0),
                                          (1.0, 0.5, 0.0), (1.0, 0.0, 0.35), (1.35, 0.25, 0.1)])
@pytest.mark.parametrize("scale", ("one", "fixed", "per_sample"))
def test_margin_logits_match_reference(operator, margin, m2, m3, scale):
    cos = _cosines()
    n, c = cos.shape
    labels = torch.tensor([0, 4, 2, -1, 3, 1])
    k = _k_for(operator, c)
    s = {"one": 1.0, "fixed": 30.0, "per_sample": torch.rand(n, dtype=torch.float64) * 5 + 0.1}[scale]
    scales = s.tolist() if isinstance(s, torch.Tensor) else [s] * n
    out = angular_margin_logits(cos, labels, operator=operator, sigmoid_k=k, margin=margin, m2=m2, m3=m3, scale=s)
    expected = ref_margin_logits(cos.tolist(), labels.tolist(), operator=operator, ks=_k_list(k, c), margin=margin,
                                 m2=m2, m3=m3, scales=scales)
    assert out.dtype == torch.float64
    assert_close(out, expected)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("lam", (0.5, 5.0, 1000.0))
def test_annealed_target_matches_reference(operator, lam):
    cos = _cosines()
    labels = torch.tensor([0, 4, 2, 1, 3, 1])
    k = _k_for(operator, cos.shape[1])
    out = angular_margin_logits(cos, labels, operator=operator, sigmoid_k=k, margin=3.0, scale=2.0, lambda_=lam)
    expected = ref_margin_logits(cos.tolist(), labels.tolist(), operator=operator, ks=_k_list(k, cos.shape[1]),
                                 margin=3.0, scales=[2.0] * 6, lam=lam)
    assert_close(out, expected)
    tensor_lam = angular_margin_logits(cos, labels, operator=operator, sigmoid_k=k, margin=3.0, scale=2.0,
                                       lambda_=torch.tensor(lam, dtype=torch.float64))
    assert_close(tensor_lam, out)


def test_margin_logits_is_the_same_function():
    assert margin_logits is angular_margin_logits


@pytest.mark.parametrize("operator", OPERATORS)
def test_no_margin_without_labels_and_for_ignored_rows(operator):
    cos = _cosines()
    k = _k_for(operator, cos.shape[1])
    plain = angular_margin_logits(cos, None, operator=operator, sigmoid_k=k, scale=3.0)
    assert_close(angular_margin_logits(cos, None, operator=operator, sigmoid_k=k, margin=4.0, m2=0.3, m3=0.2,
                                       scale=3.0), plain)
    assert_close(plain, 3.0 * angular_activation(cos, operator, k, dim=-1))
    labels = torch.full((cos.shape[0],), -1)
    assert_close(angular_margin_logits(cos, labels, operator=operator, sigmoid_k=k, margin=4.0, scale=3.0), plain)
    labels[2] = 1
    out = angular_margin_logits(cos, labels, operator=operator, sigmoid_k=k, margin=4.0, scale=3.0)
    changed = (out != plain).nonzero().tolist()
    assert changed == [[2, 1]]
    assert out[2, 1] < plain[2, 1]


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2,m3", [(2.5, 0.0, 0.0), (4.0, 0.0, 0.0), (1.0, 0.5, 0.0), (1.5, 0.2, 0.3)])
@pytest.mark.parametrize("seed", range(2))
def test_gradcheck_float64(operator, margin, m2, m3, seed):
    torch.manual_seed(seed)
    cos = _cosines().requires_grad_()
    scale = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    labels = torch.tensor([0, 4, 2, -1, 3, 1])
    k = _k_for(operator, 5)
    inputs = [cos, scale]
    if isinstance(k, torch.Tensor):
        k = k.clone().requires_grad_()
        inputs.append(k)

    def fn(c, s, *kk):
        return angular_margin_logits(c, labels, operator=operator, sigmoid_k=kk[0] if kk else k, margin=margin,
                                     m2=m2, m3=m3, scale=s, lambda_=0.7)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2,m3", [(4.0, 0.0, 0.0), (1.7, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.35)])
def test_detached_margin_same_value_unmargined_gradient(operator, margin, m2, m3):
    cos = _cosines()
    labels = torch.tensor([0, 4, 2, -1, 3, 1])
    k = _k_for(operator, 5)
    scale = torch.rand(6, dtype=torch.float64) + 0.5
    weights = torch.randn(6, 5, dtype=torch.float64)

    def run(detach, with_labels=True):
        c, s = cos.clone().requires_grad_(), scale.clone().requires_grad_()
        out = angular_margin_logits(c, labels if with_labels else None, operator=operator, sigmoid_k=k,
                                    margin=margin, m2=m2, m3=m3, scale=s, lambda_=2.0, detach_margin=detach)
        (out * weights).sum().backward()
        return out.detach(), c.grad, s.grad

    value, _, _ = run(False)
    detached_value, grad_c, grad_s = run(True)
    _, plain_grad_c, plain_grad_s = run(False, with_labels=False)
    assert_close(detached_value, value)
    assert_close(grad_c, plain_grad_c)
    assert_close(grad_s, plain_grad_s)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2", [(4.0, 0.0), (1000.0, 0.0), (2.5, 0.5), (1.0, 3.0)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_finite_at_cos_plus_minus_one_and_large_margins(operator, margin, m2, dtype, device):
    cos = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [1.0, 1.0, -1.0]], dtype=dtype, device=device)
    cos.requires_grad_()
    labels = torch.tensor([0, 0, 2], device=device)
    k = _k_for(operator, 3)
    if isinstance(k, torch.Tensor):
        k = k.to(device, dtype)
    out = angular_margin_logits(cos, labels, operator=operator, sigmoid_k=k, margin=margin, m2=m2, scale=64.0)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_half_cosines_computed_in_float32(dtype, device):
    cos = _cosines(dtype=torch.float32).to(device)
    labels = torch.tensor([0, 4, 2, -1, 3, 1], device=device)
    out = angular_margin_logits(cos.to(dtype), labels, margin=4.0, scale=16.0)
    assert out.dtype == torch.float32
    ref = angular_margin_logits(cos.to(dtype).float(), labels, margin=4.0, scale=16.0)
    assert_close(out, ref)
    with torch.autocast(device.type, dtype=dtype):
        auto = angular_margin_logits(cos, labels, margin=4.0, scale=16.0)
    assert auto.dtype == torch.float32
    assert_close(auto, angular_margin_logits(cos, labels, margin=4.0, scale=16.0))


# ---------------------------------------------------------------- additive forms, explicitly
def test_arcface_and_cosface_forms():
    cos = torch.empty(6, 5, dtype=torch.float64).uniform_(-0.5, 0.9)  # theta + 0.5 < pi: no extension involved
    labels = torch.tensor([0, 4, 2, 1, 3, 1])
    rows = torch.arange(6)
    arc = angular_margin_logits(cos, labels, m2=0.5, scale=64.0)
    assert_close(arc[rows, labels], 64.0 * torch.cos(torch.acos(cos[rows, labels]) + 0.5))
    cosface = angular_margin_logits(cos, labels, m3=0.35, scale=64.0)
    assert_close(cosface[rows, labels], 64.0 * (cos[rows, labels] - 0.35))
    other = torch.ones_like(cos, dtype=torch.bool)
    other[rows, labels] = False
    assert_close(arc[other], 64.0 * cos[other])
    assert_close(cosface[other], 64.0 * cos[other])


# ---------------------------------------------------------------- bad input
def test_bad_margins_and_scale_raise():
    cos, labels = _cosines(), torch.tensor([0, 4, 2, -1, 3, 1])
    with pytest.raises(ValueError, match="margin .*>= 1; got 0.5"):
        angular_margin_logits(cos, labels, margin=0.5)
    with pytest.raises(ValueError, match="margin .*got nan"):
        angular_margin_logits(cos, labels, margin=float("nan"))
    with pytest.raises(TypeError, match="margin must be a real number"):
        angular_margin_logits(cos, labels, margin="4")
    with pytest.raises(ValueError, match="m2 must be a finite number >= 0; got -0.1"):
        angular_margin_logits(cos, labels, m2=-0.1)
    with pytest.raises(ValueError, match="m3 must be a finite number >= 0; got -1"):
        angular_margin_logits(cos, labels, m3=-1)
    with pytest.raises(ValueError, match="scale must be a finite number > 0; got 0"):
        angular_margin_logits(cos, labels, scale=0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0; got -2.0"):
        angular_margin_logits(cos, labels, scale=-2.0)
    with pytest.raises(ValueError, match="scale tensor must be"):
        angular_margin_logits(cos, labels, scale=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="lambda_ must be a finite number >= 0; got -1.0"):
        angular_margin_logits(cos, labels, margin=2.0, lambda_=-1.0)
    with pytest.raises(ValueError, match="unknown sphere operator 'tanh'"):
        angular_margin_logits(cos, labels, operator="tanh")
    with pytest.raises(ValueError, match="cos must be a floating"):
        angular_margin_logits(cos[0], labels)
    with pytest.raises(TypeError, match="detach_margin must be a bool"):
        angular_margin_logits(cos, labels, detach_margin=1)
    with pytest.raises(ValueError, match="margin .*>= 1; got 0.9"):
        psi(torch.zeros(3), 0.9)


def test_bad_labels_raise():
    cos = _cosines()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\].*got 5"):
        angular_margin_logits(cos, torch.tensor([0, 5, 2, 1, 3, 1]), margin=2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\].*got -2"):
        angular_margin_logits(cos, torch.tensor([0, 1, 2, -2, 3, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\).*got shape \(6, 1\)"):
        angular_margin_logits(cos, torch.zeros(6, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\).*got shape \(5,\)"):
        angular_margin_logits(cos, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer tensor.*torch.float32"):
        angular_margin_logits(cos, torch.zeros(6))
    with pytest.raises(TypeError, match="labels must be a torch.Tensor; got list"):
        angular_margin_logits(cos, [0, 1, 2, 3, 4, 0])
    # int32 labels are fine
    angular_margin_logits(cos, torch.tensor([0, 1, 2, 3, 4, 0], dtype=torch.int32), margin=2.0)
