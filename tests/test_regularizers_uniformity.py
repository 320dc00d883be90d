"""Hyperspherical uniformity regularizers against naive float64 references (concatenated half-space forms)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import REF_ATOL, assert_close
from test_regularizers_energy import _cos, clustered, random_orthogonal, simplex
from torchsphere.regularizers import init_pole, mgd, mhc, mhp, mhs, pole_step, r_mhp

EPS = 1e-4


def _rows(w: torch.Tensor, half_space: bool) -> torch.Tensor:
    w = w.reshape(w.shape[0], -1).double()
    return torch.cat([w, -w]) if half_space else w


def naive_mhs(w: torch.Tensor, half_space: bool = False) -> float:
    """Official rule: minimum over the nonzero squared distances 2 - 2c of pairs i < j; all ties summed."""
    w = _rows(w, half_space)
    d = [2 - 2 * _cos(w[i], w[j]) for i in range(len(w)) for j in range(i + 1, len(w))]
    m = min(x for x in d if x != 0)
    return -sum(x for x in d if x == m)


def naive_mgd(w: torch.Tensor, half_space: bool = False, bandwidth: float = 1.0) -> float:
    w = _rows(w, half_space)
    n = len(w)
    k = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            k[i, j] = math.exp(-(2 - 2 * _cos(w[i], w[j])) / bandwidth)
    return -torch.logdet(k + 1e-6 * torch.eye(n, dtype=torch.float64)).item()


def naive_pole_terms(w: torch.Tensor, v: torch.Tensor, half_space: bool = False) -> list[float]:
    """Squared distances 2 - 2 cos(v, w_i) over the (concatenated) neurons, for one pole."""
    return [2 - 2 * _cos(v.double(), x) for x in _rows(w, half_space)]


def naive_mhp(w, v, half_space=False) -> float:
    d = naive_pole_terms(w, v, half_space)
    return -sum(1 / x for x in d) / len(d)


def naive_mhc(w, v, half_space=False, gamma=10.0) -> float:
    d = naive_pole_terms(w, v, half_space)
    return -math.log(sum(math.exp(-gamma * x) for x in d) / len(d)) / gamma


def _close(got: torch.Tensor, expected: float) -> None:
    assert abs(got.item() - expected) <= REF_ATOL[torch.float64] * max(1.0, abs(expected)), (got.item(), expected)


@pytest.mark.parametrize("half_space", [False, True])
def test_mhs_matches_naive_and_closed_form(half_space, device):
    w = torch.randn(8, 2, 3, dtype=torch.float64)
    got = mhs(w.to(device), half_space=half_space)
    _close(got, naive_mhs(w, half_space))
    flat = w.reshape(8, -1)
    c = (flat @ flat.t()) / (flat.square().sum(1) + EPS).sqrt().outer((flat.square().sum(1) + EPS).sqrt())
    cmax = c.triu(1).abs().max() if half_space else c[torch.triu_indices(8, 8, 1).unbind()].max()
    _close(got, (-2 if half_space else -1) * (2 - 2 * cmax.item()))


def test_mhs_sums_exact_ties():
    w = torch.eye(4, dtype=torch.float64)  # all 6 pairs at squared distance 2 - 2c, c = 0
    _close(mhs(w), naive_mhs(w))
    assert mhs(w).item() == pytest.approx(-12.0)


@pytest.mark.parametrize("chunk_size", [1, 2, 3])
@pytest.mark.parametrize("half_space", [False, True])
def test_mhs_chunked_equals_dense(chunk_size, half_space, device):
    w0 = torch.randn(7, 4, dtype=torch.float64, device=device)
    out = []
    for chunk in (None, chunk_size):
        w = w0.clone().requires_grad_()
        e = mhs(w, half_space=half_space, chunk_size=chunk)
        e.backward()
        out.append((e.detach(), w.grad))
    assert_close(out[1][0], out[0][0])
    assert_close(out[1][1], out[0][1])
    assert (out[0][1].abs().sum(1) > 0).sum() == 2  # the subgradient reaches only the closest pair


@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("bandwidth", [1.0, 0.5])
def test_mgd_matches_naive_concatenated_logdet(half_space, bandwidth, device):
    w = torch.randn(6, 5, dtype=torch.float64)
    got = mgd(w.to(device), half_space=half_space, bandwidth=bandwidth)
    _close(got, naive_mgd(w, half_space, bandwidth))
    if half_space:  # the block form equals the function on the concatenated neurons
        assert_close(got, mgd(torch.cat([w, -w]).to(device), bandwidth=bandwidth))


@pytest.mark.parametrize("normalize", [False, True])
def test_r_mhp_matches_naive(normalize, device):
    w = torch.randn(6, 3, 2, dtype=torch.float64)
    rows = w.reshape(6, -1)
    if normalize:
        rows = rows / (rows.square().sum(1, keepdim=True) + EPS).sqrt()
    _close(r_mhp(w.to(device), normalize=normalize), rows.sum(0).norm().item())


@pytest.mark.parametrize("half_space", [False, True])
def test_mhp_mhc_match_naive_and_concatenated(half_space, device):
    w = torch.randn(7, 4, dtype=torch.float64)
    poles = torch.randn(3, 4, dtype=torch.float64)
    got_p = mhp(w.to(device), poles.to(device), half_space=half_space)
    got_c = mhc(w.to(device), poles.to(device), half_space=half_space)
    _close(got_p, sum(naive_mhp(w, v, half_space) for v in poles) / 3)
    _close(got_c, sum(naive_mhc(w, v, half_space) for v in poles) / 3)
    _close(mhp(w.to(device), poles[0].to(device), half_space=half_space), naive_mhp(w, poles[0], half_space))
    if half_space:
        cat = torch.cat([w, -w]).to(device)
        assert_close(got_p, mhp(cat, poles.to(device)))
        assert_close(got_c, mhc(cat, poles.to(device)))


def _all(w: torch.Tensor, v: torch.Tensor, half: bool, eps: float) -> torch.Tensor:
    return torch.stack([mhs(w, half_space=half, eps=eps), mgd(w, half_space=half, eps=eps),
                        mhp(w, v, half_space=half, eps=eps), mhc(w, v, half_space=half, eps=eps),
                        r_mhp(w, normalize=True, eps=eps)])


@pytest.mark.parametrize("half_space", [False, True])
def test_invariant_to_rotation_and_positive_rescaling(half_space, device):
    w = torch.randn(6, 5, dtype=torch.float64)
    v = torch.randn(2, 5, dtype=torch.float64)
    q = random_orthogonal(5)
    scale = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1
    ref = _all(w.to(device), v.to(device), half_space, 1e-14)
    assert_close(_all((w @ q).to(device), (v @ q).to(device), half_space, 1e-14), ref)
    assert_close(_all((w * scale).to(device), (3 * v).to(device), half_space, 1e-14), ref)
    assert_close(r_mhp((w @ q).to(device)), r_mhp(w.to(device)))  # raw form: rotation only


def _pole_extremes(w: torch.Tensor, device) -> tuple[float, float]:
    """min over poles of the MHP potential T and max over poles of the MHC soft covering term (random search)."""
    poles = torch.cat([torch.randn(300, w.shape[1], dtype=torch.float64).to(device), -w, w, -w.sum(0, keepdim=True)])
    t_p = torch.stack([-mhp(w, v) for v in poles.split(1)])
    t_c = torch.stack([mhc(w, v) for v in poles.split(1)])
    return t_p.min().item(), t_c.max().item()


def test_evenly_spread_points_are_more_uniform(device):
    d = 5
    spread = [torch.eye(d, dtype=torch.float64, device=device), simplex(d).to(device)]
    near = clustered(d, d).to(device)
    for even in spread:
        for half in (False, True):
            assert mhs(even, half_space=half) < mhs(near, half_space=half)
            assert mgd(even, half_space=half) < mgd(near, half_space=half)
        assert r_mhp(even, normalize=True) < r_mhp(near, normalize=True)
        # min-max values: polarization min_v T is larger, covering max_v T smaller, for spread points
        (p_even, c_even), (p_near, c_near) = _pole_extremes(even, device), _pole_extremes(near, device)
        assert -p_even < -p_near and c_even < c_near
    assert r_mhp(simplex(d).to(device), normalize=True) < 1e-12


def test_identical_neurons_give_finite_values_and_gradients(device):
    row = torch.randn(1, 12) * 100.0
    w = torch.cat([row, row, torch.randn(3, 12)]).to(device).requires_grad_()
    pole = row.clone().to(device).requires_grad_()  # a pole exactly on two neurons
    for half in (False, True):
        for term in (mhs(w, half_space=half), mgd(w, half_space=half), mhp(w, pole, half_space=half),
                     mhc(w, pole, half_space=half), r_mhp(w), r_mhp(w, normalize=True)):
            w.grad, pole.grad = None, None
            term.backward()
            assert torch.isfinite(term)
            assert torch.isfinite(w.grad).all()
            assert pole.grad is None or torch.isfinite(pole.grad).all()
    zero_sum = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], device=device, requires_grad=True)
    r_mhp(zero_sum).backward()
    assert torch.isfinite(zero_sum.grad).all()


@pytest.mark.parametrize("seed", range(2))
def test_gradcheck_float64(seed, device):
    torch.manual_seed(seed)
    w = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.randn(2, 4, dtype=torch.float64, device=device, requires_grad=True)
    for half in (False, True):
        assert torch.autograd.gradcheck(lambda x: mhs(x, half_space=half), (w,))
        assert torch.autograd.gradcheck(lambda x: mgd(x, half_space=half, bandwidth=0.7), (w,))
        assert torch.autograd.gradcheck(lambda x, p: mhp(x, p, half_space=half), (w, v))
        assert torch.autograd.gradcheck(lambda x, p: mhc(x, p, half_space=half, gamma=3.0), (w, v))
    assert torch.autograd.gradcheck(lambda x: r_mhp(x, normalize=True), (w,))
    assert torch.autograd.gradcheck(r_mhp, (w,))


def test_float32_under_autocast(device):
    w, v = torch.randn(16, 8, device=device), torch.randn(1, 8, device=device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        terms = [mhs(w, half_space=True), mgd(w, half_space=True), mhp(w, v), mhc(w, v), r_mhp(w)]
    assert all(t.dtype == torch.float32 for t in terms)


@pytest.mark.parametrize("fn", [mhp, mhc])
def test_pole_step_optimizes_poles_only(fn, device):
    w = clustered(6, 4).float().to(device).requires_grad_()
    pole = init_pole(4, device=device)
    opt = torch.optim.SGD([pole], lr=0.1, momentum=0.9)
    before = -fn(w, pole).item()  # the pole objective
    start = pole.detach().clone()
    after = pole_step(fn, [w], [pole], opt, steps=30, coefficients=1.0, weight_decay=0.0)
    assert w.grad is None  # the weights are detached
    assert not torch.equal(pole.detach(), start)
    assert after.item() < before  # MHP: lower potential at the pole; MHC: larger distance to the nearest neuron


def test_bad_input_raises_clear_errors(device):
    w = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match=r"N >= 2 neurons"):
        mhs(w[:1])
    with pytest.raises(ValueError, match="non-finite"):
        mgd(torch.full((3, 2), float("nan"), device=device))
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0; got -1"):
        mgd(w, bandwidth=-1)
    with pytest.raises(ValueError, match="jitter must be a finite number > 0; got 0"):
        mgd(w, jitter=0)
    with pytest.raises(ValueError, match=r"pole must have shape \(d,\) or \(P, d\) with d = 3.*\(2, 4\)"):
        mhp(w, torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="pole has non-finite"):
        mhc(w, torch.tensor([1.0, float("inf"), 0.0], device=device))
    with pytest.raises(TypeError, match="pole must be a floating-point tensor"):
        mhc(w, torch.ones(3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="gamma must be a finite number > 0; got 0"):
        mhc(w, torch.randn(3, device=device), gamma=0)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1 or None; got -2"):
        mhs(w, chunk_size=-2)
    pole = init_pole(3, device=device)
    opt = torch.optim.SGD([pole], lr=0.1)
    with pytest.raises(ValueError, match="fn must be torchsphere.regularizers.mhp or mhc; got 'mgd'"):
        pole_step(mgd, [w], [pole], opt)
    with pytest.raises(ValueError, match="need one pole per weight"):
        pole_step(mhp, [w, w], [pole], opt)
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        pole_step(mhp, [w], [pole], opt, steps=0)
    with pytest.raises(ValueError, match="num_poles must be an int >= 1; got 0"):
        init_pole(3, 0)
