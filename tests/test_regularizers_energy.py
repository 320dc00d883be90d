"""MHE energies (torchsphere.regularizers.energy) against naive float64 double loops, plus their properties."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import REF_ATOL, assert_close
from torchsphere.regularizers import hyperspherical_energy, stochastic_energy

EPS = 1e-4


def _cos(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> float:
    return float(a @ b) / math.sqrt((float(a @ a) + eps) * (float(b @ b) + eps))


def _term(c: float, s: float, angular: bool) -> float:
    if angular:
        t = math.acos(c) / math.pi + 1e-4
        return -math.log(t) if s == 0 else t ** (-s)
    d2 = 2 - 2 * c
    return -math.log(d2) if s == 0 else d2 ** (-s / 2)


def naive_energy(w: torch.Tensor, s: float, angular: bool = False, half_space: bool = False,
                 reduction: str = "mean") -> float:
    """The official definition: concatenate [W; -W] for half-space, mean of the term over pairs i < j."""
    w = w.reshape(w.shape[0], -1).double()
    if half_space:
        w = torch.cat([w, -w])
    n, total, count = w.shape[0], 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            total += _term(_cos(w[i], w[j]), s, angular)
            count += 1
    return total / count if reduction == "mean" else total


def random_orthogonal(d: int, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def simplex(n: int) -> torch.Tensor:
    """n points of a regular simplex (pairwise cosine -1/(n-1)), as rows in R^n."""
    e = torch.eye(n, dtype=torch.float64)
    return e - e.mean(0, keepdim=True)


def clustered(n: int, d: int, spread: float = 0.1) -> torch.Tensor:
    base = torch.zeros(d, dtype=torch.float64)
    base[0] = 1.0
    return base + spread * torch.randn(n, d, dtype=torch.float64)


@pytest.mark.parametrize("s", [0, 1, 2, 0.5, 3.7])
@pytest.mark.parametrize("angular", [False, True])
@pytest.mark.parametrize("half_space", [False, True])
def test_matches_naive_double_loop(s, angular, half_space, device):
    w = torch.randn(7, 3, 2, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        got = hyperspherical_energy(w.to(device), s, angular=angular, half_space=half_space, reduction=reduction)
        expected = naive_energy(w, s, angular, half_space, reduction)
        assert got.dtype == torch.float64
        assert abs(got.item() - expected) <= REF_ATOL[torch.float64] * max(1.0, abs(expected))


def test_float32_matches_float64_reference(device):
    w = torch.randn(20, 9)
    got = hyperspherical_energy(w.to(device), 1)
    assert got.dtype == torch.float32
    assert abs(got.item() - naive_energy(w, 1)) <= REF_ATOL[torch.float32]


def test_half_space_equals_concatenated_neurons(device):
    w = torch.randn(9, 4, 3, dtype=torch.float64, device=device)
    cat = torch.cat([w, -w])
    for s in (0, 1, 2):
        for angular in (False, True):
            assert_close(hyperspherical_energy(w, s, angular=angular, half_space=True),
                         hyperspherical_energy(cat, s, angular=angular))


def test_paper_kernel_is_half_the_code_log_term(device):
    w = torch.randn(6, 5, dtype=torch.float64, device=device)
    code = hyperspherical_energy(w, 0)
    paper = hyperspherical_energy(w, 0, paper_kernel=True)
    assert_close(paper, code / 2)
    # only the Euclidean s = 0 term differs
    assert_close(hyperspherical_energy(w, 2, paper_kernel=True), hyperspherical_energy(w, 2))


@pytest.mark.parametrize("chunk_size", [1, 3, 5])
@pytest.mark.parametrize("half_space", [False, True])
def test_chunked_equals_exact_value_and_gradient(chunk_size, half_space, device):
    w0 = torch.randn(11, 6, dtype=torch.float64, device=device)
    results = []
    for chunk in (None, chunk_size):
        w = w0.clone().requires_grad_()
        e = hyperspherical_energy(w, 1, angular=True, half_space=half_space, chunk_size=chunk)
        e.backward()
        results.append((e.detach(), w.grad))
    assert_close(results[1][0], results[0][0])
    assert_close(results[1][1], results[0][1])


def test_stochastic_all_rows_is_exact(device):
    w = torch.randn(10, 5, dtype=torch.float64, device=device)
    for half in (False, True):
        exact = hyperspherical_energy(w, 2, half_space=half)
        assert_close(stochastic_energy(w, 2, labels=torch.arange(10).repeat(3), half_space=half), exact)
        assert_close(stochastic_energy(w, 2, num_rows=10, half_space=half, chunk_size=3), exact)


@pytest.mark.parametrize("half_space", [False, True])
def test_stochastic_mean_over_draws_approaches_exact(half_space, device):
    w = torch.randn(12, 4, dtype=torch.float64, device=device)
    exact = hyperspherical_energy(w, 0, half_space=half_space).item()
    gen = torch.Generator(device=device).manual_seed(1)
    draws = torch.stack([stochastic_energy(w, 0, num_rows=3, generator=gen, half_space=half_space)
                         for _ in range(3000)])
    stderr = draws.std().item() / math.sqrt(draws.numel())
    assert abs(draws.mean().item() - exact) < 4 * stderr + 1e-12
    assert draws.std().item() > 0  # the draws do differ


def test_stochastic_gradient_reaches_all_neurons(device):
    w = torch.randn(8, 3, dtype=torch.float64, device=device, requires_grad=True)
    stochastic_energy(w, 1, labels=torch.tensor([2, 5, 5])).backward()
    assert torch.isfinite(w.grad).all() and (w.grad.abs().sum(1) > 0).all()


@pytest.mark.parametrize("angular", [False, True])
@pytest.mark.parametrize("half_space", [False, True])
def test_invariant_to_rotation_and_positive_rescaling(angular, half_space, device):
    w = torch.randn(8, 5, dtype=torch.float64)
    q = random_orthogonal(5)
    scale = torch.rand(8, 1, dtype=torch.float64) * 10 + 0.1
    kw = dict(angular=angular, half_space=half_space, eps=1e-14)
    e = hyperspherical_energy(w.to(device), 1, **kw)
    assert_close(hyperspherical_energy((w @ q).to(device), 1, **kw), e)
    assert_close(hyperspherical_energy((w * scale).to(device), 1, **kw), e)


@pytest.mark.parametrize("s", [0, 1, 2])
@pytest.mark.parametrize("angular", [False, True])
@pytest.mark.parametrize("half_space", [False, True])
def test_evenly_spread_points_have_lower_energy(s, angular, half_space, device):
    kw = dict(angular=angular, half_space=half_space)
    ortho = hyperspherical_energy(torch.eye(6, dtype=torch.float64, device=device), s, **kw)
    simp = hyperspherical_energy(simplex(6).to(device), s, **kw)
    near = hyperspherical_energy(clustered(6, 6).to(device), s, **kw)
    assert ortho < near and simp < near
    if not half_space:  # the simplex is the minimum-energy configuration of n points in full space
        assert simp < ortho


@pytest.mark.parametrize("s", [0, 1, 2, 0.5])
@pytest.mark.parametrize("angular", [False, True])
@pytest.mark.parametrize("half_space", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_identical_neurons_give_finite_values_and_gradients(s, angular, half_space, chunk_size, device):
    row = torch.randn(1, 16) * 100.0  # large norm: the eps-regularized cosine rounds to exactly 1 in float32
    w = torch.cat([row, row, row, torch.randn(2, 16)]).to(device).requires_grad_()
    e = hyperspherical_energy(w, s, angular=angular, half_space=half_space, chunk_size=chunk_size)
    e.backward()
    assert torch.isfinite(e) and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("s", [0, 1, 2.5])
@pytest.mark.parametrize("angular", [False, True])
def test_gradcheck_float64(seed, s, angular, device):
    torch.manual_seed(seed)
    w = torch.randn(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    for half, chunk in ((False, None), (True, None), (True, 2)):
        assert torch.autograd.gradcheck(
            lambda x: hyperspherical_energy(x, s, angular=angular, half_space=half, chunk_size=chunk), (w,))
    assert torch.autograd.gradcheck(lambda x: stochastic_energy(x, s, labels=torch.tensor([0, 3]), angular=angular),
                                    (w,))


def test_float32_under_autocast(device):
    w = torch.randn(16, 8, device=device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        e = hyperspherical_energy(w, 2)
    assert e.dtype == torch.float32
    assert_close(e, hyperspherical_energy(w, 2))


def test_magnitudes_at_he_init_match_the_official_logs(device):
    # mhe logs (reference section 1.4): a 100 x 256 output layer at He init gives about -0.69 (s=0), 0.71 (s=1),
    # 0.50 (s=2), 0.69 (a0), 2.0 (a1), 4.0 (a2): random high-dimensional neurons are nearly orthogonal.
    w = torch.randn(100, 256, device=device) * math.sqrt(2 / 256)
    expected = {(0, False): -0.69, (1, False): 0.71, (2, False): 0.50, (0, True): 0.69, (1, True): 2.0,
                (2, True): 4.0}
    for (s, angular), value in expected.items():
        got = hyperspherical_energy(w, s, angular=angular).item()
        assert abs(got - value) < 0.02 * max(1.0, abs(value)), (s, angular, got)


def test_bad_input_raises_clear_errors(device):
    w = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match=r"s must be a finite number >= 0; got -1"):
        hyperspherical_energy(w, -1)
    with pytest.raises(ValueError, match="s must be a finite number"):
        hyperspherical_energy(w, float("nan"))
    with pytest.raises(TypeError, match="s must be a real number"):
        hyperspherical_energy(w, True)
    with pytest.raises(ValueError, match=r"N >= 2 neurons.*got shape \(1, 3\)"):
        hyperspherical_energy(w[:1])
    with pytest.raises(ValueError, match=r"at least 2 dims; got shape \(3,\)"):
        hyperspherical_energy(w[0])
    with pytest.raises(ValueError, match="non-finite"):
        hyperspherical_energy(torch.tensor([[1.0, float("nan")], [0.0, 1.0]], device=device))
    with pytest.raises(ValueError, match="non-finite"):
        hyperspherical_energy(torch.tensor([[1.0, float("inf")], [0.0, 1.0]], device=device))
    with pytest.raises(TypeError, match="floating-point.*int64"):
        hyperspherical_energy(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        hyperspherical_energy([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="unknown reduction 'max'"):
        hyperspherical_energy(w, reduction="max")
    with pytest.raises(ValueError, match="eps must be a finite number > 0; got 0"):
        hyperspherical_energy(w, eps=0)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1 or None; got 0"):
        hyperspherical_energy(w, chunk_size=0)
    with pytest.raises(ValueError, match="exactly one of labels and num_rows"):
        stochastic_energy(w)
    with pytest.raises(ValueError, match="exactly one of labels and num_rows"):
        stochastic_energy(w, labels=torch.tensor([0]), num_rows=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\); got min 0, max 4"):
        stochastic_energy(w, labels=torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        stochastic_energy(w, labels=torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"num_rows must be an int in \[1, 4\]; got 0"):
        stochastic_energy(w, num_rows=0)
