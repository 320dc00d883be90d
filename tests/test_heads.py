"""Tests of torchsphere.nn.heads: AngularHead, GASoftmaxLoss and LambdaSchedule."""
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import ArcFaceLoss, CosFaceLoss, SphereFaceLoss

from conftest import AUTOCAST_ATOL, assert_close
from torchsphere.nn import AngularHead, GASoftmaxLoss, LambdaSchedule

OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
MARGINS = [  # (margin, m2, m3): W-Softmax, GA-Softmax integer and non-integer m, ArcFace, CosFace, combined
    (1.0, 0.0, 0.0), (2.0, 0.0, 0.0), (2.5, 0.0, 0.0), (4.0, 0.0, 0.0), (1.0, 0.4, 0.0), (1.0, 0.0, 0.3),
    (1.5, 0.2, 0.1),
]
TINY_EPS = 1e-30  # with it the eps-regularized norms equal the exact norms in float64 (for PML comparisons)


# ---------------------------------------------------------------- the slow per-sample reference (python floats)
def _g(phi: float, operator: str, k: float) -> float:
    if operator == "linear":
        return 1.0 - 2.0 * phi / math.pi
    if operator == "cosine":
        piece = math.floor(phi / math.pi)
        return (-1) ** piece * math.cos(phi) - 2 * piece
    e = math.exp(-math.pi / (2 * k))
    t = math.exp(phi / k - math.pi / (2 * k))
    return (1 + e) / (1 - e) * (1 - t) / (1 + t)


def reference_logits(head: AngularHead, x: torch.Tensor, labels, lam: float = 0.0) -> torch.Tensor:
    """logit_ij = s_i g(theta_ij), target (lam s g + s psi) / (1 + lam), with loops over samples and classes."""
    w = head.weight.detach().double().tolist()
    ks = (head.effective_k().detach().double().tolist() if head.operator == "learnable_sigmoid"
          else [head.sigmoid_k] * head.num_classes)
    out = []
    for i, xi in enumerate(x.detach().double().tolist()):
        x_norm = math.sqrt(sum(v * v for v in xi) + head.eps)
        s = x_norm if head.scale is None else head.scale
        row = []
        for j, wj in enumerate(w):
            w_norm = math.sqrt(sum(v * v for v in wj) + head.eps)
            cos = sum(a * b for a, b in zip(xi, wj)) / (x_norm * w_norm)
            theta = math.acos(cos)
            g = cos if head.operator == "cosine" else _g(theta, head.operator, ks[j])
            if labels is not None and int(labels[i]) == j:
                target = _g(head.margin * theta + head.m2, head.operator, ks[j]) - head.m3
                g = (lam * g + target) / (1 + lam)
            row.append(s * g)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def _head(operator="cosine", margin=1.0, m2=0.0, m3=0.0, scale=None, d=7, c=5, **kw) -> AngularHead:
    head = AngularHead(d, c, operator=operator, margin=margin, m2=m2, m3=m3, scale=scale, dtype=torch.float64, **kw)
    if operator == "learnable_sigmoid":
        with torch.no_grad():
            head.sigmoid_k_raw.copy_(torch.linspace(-0.6, 0.8, c))  # distinct per-class k, a negative raw included
    return head


def _data(n=6, d=7, c=5, dtype=torch.float64):
    return torch.randn(n, d, dtype=dtype) * 2, torch.tensor([0, 4, 2, 1, 3, 1])[:n] % c


# ---------------------------------------------------------------- against the reference
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2,m3", MARGINS)
@pytest.mark.parametrize("scale", (None, 8.0))
def test_head_matches_per_sample_reference(operator, margin, m2, m3, scale, device):
    head = _head(operator, margin, m2, m3, scale).to(device)
    x, y = _data()
    out = head(x.to(device), y.to(device))
    assert out.shape == (6, 5) and out.dtype == torch.float64 and out.device == device
    assert_close(out.cpu(), reference_logits(head, x, y))
    assert_close(head(x.to(device)).cpu(), reference_logits(head, x, None))  # inference: no margin


@pytest.mark.parametrize("operator", OPERATORS)
def test_head_annealed_matches_reference(operator):
    head = _head(operator, margin=3.0)
    x, y = _data()
    head.set_lambda(5.0)
    assert_close(head(x, y), reference_logits(head, x, y, lam=5.0))
    head.lambda_ = 0.5  # the attribute form
    assert head.lambda_ == 0.5
    assert_close(head(x, y), reference_logits(head, x, y, lam=0.5))


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2,m3", [(2.5, 0.0, 0.0), (1.0, 0.4, 0.0), (1.5, 0.2, 0.1)])
@pytest.mark.parametrize("scale", (None, 8.0))
def test_head_gradcheck_float64(operator, margin, m2, m3, scale):
    head = _head(operator, margin, m2, m3, scale, lambda_=0.5)
    x, y = _data(n=4)
    params = {name: p.detach().clone().requires_grad_() for name, p in head.named_parameters()}
    names = list(params)

    def fn(x, *tensors):
        return torch.func.functional_call(head, dict(zip(names, tensors)), (x, y))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), *params.values()))


# ---------------------------------------------------------------- reductions and invariances
@pytest.mark.parametrize("operator", OPERATORS)
def test_margin_one_is_w_softmax(operator):
    head = _head(operator)
    x, y = _data()
    assert_close(head(x, y), head(x))
    if operator == "cosine":  # ||x|| cos theta_j = <x, W_j> / ||W_j||: the weight-normalized softmax
        w_hat = head.weight / torch.sqrt(head.weight.square().sum(1, keepdim=True) + head.eps)
        assert_close(head(x, y), x @ w_hat.t())


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin", (1.0, 4.0))
def test_scale_none_multiplies_by_feature_norm(operator, margin):
    free, fixed = _head(operator, margin, eps=TINY_EPS), _head(operator, margin, scale=1.0, eps=TINY_EPS)
    fixed.load_state_dict(free.state_dict())
    x, y = _data()
    assert_close(free(x, y), x.norm(dim=1, keepdim=True) * fixed(x, y))
    assert_close(free(3.0 * x, y), 3.0 * free(x, y))  # logits grow with ||x||; fixed scale: invariant
    assert_close(fixed(3.0 * x, y), fixed(x, y))


@pytest.mark.parametrize("operator", OPERATORS)
def test_no_margin_without_labels(operator):
    plain, margined = _head(operator), _head(operator, margin=4.0, m2=0.3, m3=0.2)
    margined.load_state_dict(plain.state_dict())
    x, y = _data()
    assert_close(margined(x), plain(x))
    differs = margined(x, y) != plain(x)
    assert differs.sum() == 6 and differs[torch.arange(6), y].all()  # exactly the target logits change


def test_ignored_labels_carry_no_margin():
    head = _head(margin=4.0)
    x, _ = _data()
    y = torch.tensor([0, -1, 2, -1, 3, 1])
    out, plain = head(x, y), head(x)
    assert_close(out[1], plain[1])
    assert_close(out[3], plain[3])
    loss = GASoftmaxLoss(7, 5, margin=4.0, dtype=torch.float64)
    loss.head.load_state_dict(head.state_dict())
    kept = y != -1
    assert_close(loss(x, y), F.cross_entropy(out[kept], y[kept]))


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2,m3", [(4.0, 0.0, 0.0), (1.7, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.35)])
@pytest.mark.parametrize("scale", (None, 16.0))
def test_detached_margin_same_value_gradient_of_unmargined_logits(operator, margin, m2, m3, scale, device):
    detached = _head(operator, margin, m2, m3, scale, detach_margin=True).to(device)
    normal = _head(operator, margin, m2, m3, scale).to(device)
    normal.load_state_dict(detached.state_dict())
    x, y = (t.to(device) for t in _data())
    probe = torch.randn(6, 5, dtype=torch.float64).to(device)

    def grads(head, labels):
        xg = x.clone().requires_grad_()
        out = head(xg, labels)
        params = list(head.parameters())
        return out.detach(), torch.autograd.grad((out * probe).sum(), [xg, *params])

    value_d, grads_d = grads(detached, y)
    value_n, _ = grads(normal, y)
    _, grads_plain = grads(normal, None)
    assert_close(value_d, value_n)
    for got, expected in zip(grads_d, grads_plain):
        assert_close(got, expected)


# ---------------------------------------------------------------- cross-checks with pytorch-metric-learning
def _pml_data(n=12, d=8, c=6, dtype=torch.float64, max_angle=None):
    x = torch.randn(n, d, dtype=dtype) * 3
    y = torch.arange(n) % c
    head_weight = torch.randn(c, d, dtype=dtype)
    if max_angle is not None:  # pull each feature towards its class so that theta_y < max_angle (PML's fallback off)
        x = head_weight[y] / head_weight[y].norm(dim=1, keepdim=True) * 3 + 0.5 * x / 3
    return x, y, head_weight


def _compare_with_pml(head: AngularHead, pml_loss, x, y, rtol):
    with torch.no_grad():
        pml_loss.W.copy_(head.weight.detach().t())  # PML stores W as (embedding, classes)
    ours = F.cross_entropy(head(x, y), y)
    theirs = pml_loss(x, y)
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=0)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(head.weight.grad, pml_loss.W.grad.t(), rtol=rtol * 10, atol=rtol)
    torch.testing.assert_close(head(x), pml_loss.get_logits(x), rtol=rtol, atol=rtol)


@pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # raised inside PML's binomials
@pytest.mark.parametrize("m", (1, 2, 3, 4))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_sphereface_equals_pml(m, dtype):
    x, y, w = _pml_data(dtype=dtype)
    head = AngularHead(8, 6, margin=m, eps=TINY_EPS, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(w)
    pml = SphereFaceLoss(num_classes=6, embedding_size=8, margin=m, scale=1).to(dtype)
    _compare_with_pml(head, pml, x, y, rtol=1e-5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_arcface_and_cosface_equal_pml(dtype):
    x, y, w = _pml_data(dtype=dtype, max_angle=math.pi - 0.5)
    arc = AngularHead.arcface(8, 6, margin=0.5, scale=64.0, eps=TINY_EPS, dtype=dtype)
    with torch.no_grad():
        arc.weight.copy_(w)
    _compare_with_pml(arc, ArcFaceLoss(6, 8, margin=math.degrees(0.5), scale=64).to(dtype), x, y, rtol=1e-5)
    cos = AngularHead.cosface(8, 6, margin=0.35, scale=64.0, eps=TINY_EPS, dtype=dtype)
    with torch.no_grad():
        cos.weight.copy_(w)
    _compare_with_pml(cos, CosFaceLoss(6, 8, margin=0.35, scale=64).to(dtype), x, y, rtol=1e-5)


def test_presets():
    sphere, arc, cos = AngularHead.sphereface(4, 3), AngularHead.arcface(4, 3), AngularHead.cosface(4, 3)
    assert (sphere.operator, sphere.margin, sphere.scale) == ("cosine", 4.0, None)
    assert (arc.m2, arc.m3, arc.margin, arc.scale) == (0.5, 0.0, 1.0, 64.0)
    assert (cos.m2, cos.m3, cos.scale) == (0.0, 0.35, 64.0)
    assert "m2=0.5" in repr(arc) and "scale=64.0" in repr(arc)


# ---------------------------------------------------------------- numerical safety
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("margin,m2", [(4.0, 0.0), (1000.0, 0.0), (1.0, 0.5), (2.5, 3.0)])
@pytest.mark.parametrize("scale", (None, 64.0))
def test_finite_at_extremes(operator, margin, m2, scale, device):
    head = AngularHead(4, 3, operator=operator, margin=margin, m2=m2, scale=scale, eps=1e-30).to(device)
    w = head.weight.detach()
    x = torch.stack([w[0] * 5, -w[1] * 5, torch.zeros_like(w[0]), w[2] * 1e-3])  # cos = 1, -1, zero feature
    x.requires_grad_()
    y = torch.tensor([0, 1, 2, 2], device=device)
    out = head(x, y)
    loss = F.cross_entropy(out, y)
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    if scale is None:
        assert out[2].abs().max() < 1e-6  # zero feature: logits ~ sqrt(eps) * psi


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_autocast_runs_in_float32(operator, dtype, device):
    head = AngularHead(16, 10, operator=operator, margin=4.0).to(device)
    x = torch.randn(8, 16).to(device).requires_grad_()
    y = torch.arange(8, device=device)
    reference = head(x, y)
    with torch.autocast(device.type, dtype=dtype):
        features = torch.nn.functional.linear(x, torch.eye(16, device=device))  # low precision, as a backbone emits
        assert features.dtype == dtype
        out = head(features, y)
        loss = F.cross_entropy(out, y)
    assert out.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    # the only error left is the rounding of the features to the half type
    assert_close(out / x.detach().norm(dim=1, keepdim=True), reference / x.detach().norm(dim=1, keepdim=True),
                 atol=AUTOCAST_ATOL, rtol=0)
    half_input = head(x.detach().to(dtype), y)  # half features without autocast
    assert half_input.dtype == torch.float32 and torch.isfinite(half_input).all()


# ---------------------------------------------------------------- state, learnable k, lambda
def test_state_dict_and_learnable_k():
    assert set(AngularHead(4, 3).state_dict()) == {"weight"}
    head = AngularHead(4, 3, operator="learnable_sigmoid", margin=2.0)
    assert set(head.state_dict()) == {"weight", "sigmoid_k_raw"}
    assert head.sigmoid_k_raw.shape == (3,)
    torch.testing.assert_close(head.effective_k(), torch.full((3,), 0.75))  # official k_raw init 0.7, + 0.05
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(head(x, y), y).backward()
    assert head.sigmoid_k_raw.grad is not None and torch.isfinite(head.sigmoid_k_raw.grad).all()
    assert (head.sigmoid_k_raw.grad != 0).all()
    assert AngularHead(4, 3, operator="learnable_sigmoid", sigmoid_k=0.3).effective_k()[0].item() == pytest.approx(0.3)


def test_lambda_is_not_state_and_validated():
    head = AngularHead(4, 3, margin=4.0, lambda_=1000.0)
    assert head.lambda_ == 1000.0
    assert "weight" in head.state_dict() and len(head.state_dict()) == 1
    head.set_lambda(torch.tensor(5.0))
    assert head.lambda_ == 5.0
    with pytest.raises(ValueError, match="lambda_ must be a finite number >= 0; got -1"):
        head.set_lambda(-1)
    with pytest.raises(ValueError, match="lambda_ must be a finite number >= 0; got inf"):
        head.lambda_ = float("inf")
    with pytest.raises(ValueError, match="one-element tensor"):
        head.set_lambda(torch.ones(2))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    head.set_lambda(1e8)  # huge lambda: the target logit tends to the unmargined one
    assert_close(head(x, y), head(x), atol=1e-5, rtol=1e-5)
    half = AngularHead(4, 3, margin=4.0, lambda_=1e8).half()  # lambda overflows to inf in the float16 buffer
    assert torch.isinf(half._lambda)
    assert torch.isfinite(half(x.half(), y)).all()


def test_lambda_schedule_values_and_state_dict_round_trip():
    schedule = LambdaSchedule()
    assert (schedule.base, schedule.gamma, schedule.power, schedule.lambda_min) == (1000.0, 0.12, 1.0, 5.0)
    assert schedule.value == 1000.0
    assert schedule.step() == pytest.approx(1000.0 / 1.12)
    assert schedule(10) == pytest.approx(1000.0 / 2.2)
    assert schedule(1658) > 5.0 and schedule(1659) == 5.0  # 1000 / (1 + 0.12 it) reaches lambda_min at 1658.3
    for it in (0, 1, 7, 100, 1657, 10**6):
        assert schedule(it) == pytest.approx(max(5.0, 1000.0 * (1 + 0.12 * it) ** -1.0))
    assert schedule(10**6) == 5.0
    values = [schedule.step() for _ in range(5)]
    assert values == sorted(values, reverse=True)
    buffer = io.BytesIO()
    torch.save({"schedule": schedule.state_dict()}, buffer)
    buffer.seek(0)
    restored = LambdaSchedule(base=1.0, lambda_min=0.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True)["schedule"])
    assert restored.state_dict() == schedule.state_dict() and restored.iteration == 6
    assert restored.step() == schedule.step()
    custom = LambdaSchedule(base=1500, gamma=0.1, power=2, lambda_min=0)
    assert custom(3) == pytest.approx(1500 * 1.3 ** -2)
    with pytest.raises(ValueError, match="state_dict must have keys"):
        restored.load_state_dict({"base": 1.0})
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0; got -0.1"):
        LambdaSchedule(gamma=-0.1)
    with pytest.raises(ValueError, match="iteration must be an int >= 0; got -1"):
        schedule(-1)


def test_schedule_drives_the_head():
    head, schedule = AngularHead(4, 3, margin=4.0), LambdaSchedule(iteration=20)
    head.set_lambda(schedule.value)
    assert head.lambda_ == pytest.approx(1000.0 / 3.4, rel=1e-6)


# ---------------------------------------------------------------- GASoftmaxLoss
def test_ga_softmax_loss_wraps_the_head():
    loss = GASoftmaxLoss(7, 5, operator="linear", margin=1.5, scale=8.0, label_smoothing=0.01, dtype=torch.float64)
    x, y = _data()
    expected = F.cross_entropy(loss.head(x, y), y, label_smoothing=0.01)
    assert_close(loss(x, y), expected)
    assert_close(loss.get_logits(x), loss.head(x))
    assert loss.weight is loss.head.weight
    loss.set_lambda(3.0)
    assert loss.head.lambda_ == 3.0
    per_sample = GASoftmaxLoss(7, 5, reduction="none")(x.float(), y)
    assert per_sample.shape == (6,)
    with pytest.raises(TypeError, match="unexpected keyword argument 'margn'"):
        GASoftmaxLoss(7, 5, margn=2.0)
    with pytest.raises(ValueError, match="reduction must be"):
        GASoftmaxLoss(7, 5, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        GASoftmaxLoss(7, 5, label_smoothing=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        loss(x, None)


# ---------------------------------------------------------------- bad input
def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="margin .*>= 1; got 0.5"):
        AngularHead(4, 3, margin=0.5)
    with pytest.raises(ValueError, match="num_classes must be an int >= 2; got 1"):
        AngularHead(4, 1)
    with pytest.raises(TypeError, match="num_classes must be an int >= 2; got float 3.0"):
        AngularHead(4, 3.0)
    with pytest.raises(ValueError, match="in_features must be an int >= 1; got 0"):
        AngularHead(0, 3)
    with pytest.raises(ValueError, match="scale must be a finite number > 0; got 0"):
        AngularHead(4, 3, scale=0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0; got -1.0"):
        AngularHead(4, 3, scale=-1.0)
    with pytest.raises(ValueError, match="m2 must be a finite number >= 0; got -0.5"):
        AngularHead(4, 3, m2=-0.5)
    with pytest.raises(ValueError, match="unknown sphere operator 'relu'"):
        AngularHead(4, 3, operator="relu")
    with pytest.raises(TypeError, match="detach_margin must be a bool"):
        AngularHead(4, 3, detach_margin="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bias'"):
        AngularHead(4, 3, bias=True)


def test_bad_forward_input_raises():
    head = AngularHead(4, 3, margin=2.0)
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*got 3"):
        head(x, torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\].*got -5"):
        head(x, torch.tensor([0, 1, 2, -5, 0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\).*got shape \(5, 3\)"):
        head(x, F.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3))
    with pytest.raises(TypeError, match="labels must be an integer tensor.*torch.float32"):
        head(x, torch.zeros(5))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4\); got shape \(5, 3\)"):
        head(torch.randn(5, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        head(x.tolist())


# ---------------------------------------------------------------- compile
def test_torch_compile_fullgraph_matches_eager():
    head = AngularHead(8, 4, margin=2.5, lambda_=3.0)
    x, y = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, -1, 1])
    compiled = torch.compile(head, backend="eager", fullgraph=True)
    assert_close(compiled(x, y), head(x, y))
    head.set_lambda(7.0)  # a buffer: takes effect in the compiled module without retracing
    assert_close(compiled(x, y), head(x, y))
