"""The SphereNet orthonormality penalty ||W~^T W~ - I||_F^2 (official wy1iu/SphereNet regularizer)."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from torchsphere.functional import orthonormal_penalty


def naive_penalty(weight: torch.Tensor) -> torch.Tensor:
    """Float64 double loop over the filters i, j: sum of (<w_i, w_j> - delta_ij)^2."""
    w = weight.double().reshape(weight.shape[0], -1)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(w.shape[0]):
        for j in range(w.shape[0]):
            total = total + (torch.dot(w[i], w[j]) - (1.0 if i == j else 0.0)) ** 2
    return total


@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (4, 2, 5), (3, 2, 2, 2, 2), (7, 5), (5, 20)])
def test_equals_naive_sum(shape):
    w = torch.randn(shape, dtype=torch.float64, device=DEVICE) * 0.5
    penalty = orthonormal_penalty(w)
    assert penalty.dim() == 0 and penalty.dtype == torch.float64
    torch.testing.assert_close(penalty, naive_penalty(w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(orthonormal_penalty(w.float()).double(), naive_penalty(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 4, 3, 3), (6, 10), (5, 2, 3)])
def test_zero_for_orthonormal_filters(shape):
    d = int(torch.tensor(shape[1:]).prod())
    q, _ = torch.linalg.qr(torch.randn(d, shape[0], dtype=torch.float64))  # (d, C_out), orthonormal columns
    w = q.t().reshape(shape)
    assert orthonormal_penalty(w).item() == pytest.approx(0.0, abs=1e-20)
    assert orthonormal_penalty(2 * w).item() == pytest.approx(shape[0] * 9.0, rel=1e-12)  # (4 - 1)^2 per column


def test_rank_deficient_target_unreachable():
    """27 rows < 128 columns (the official conv1_0): W~^T W~ has rank <= 27, the penalty stays >= 128 - 27."""
    q, _ = torch.linalg.qr(torch.randn(27, 27, dtype=torch.float64))
    w = torch.cat([q.t(), torch.zeros(101, 27, dtype=torch.float64)]).reshape(128, 3, 3, 3)
    assert orthonormal_penalty(w).item() == pytest.approx(101.0, rel=1e-12)
    assert orthonormal_penalty(torch.randn(128, 3, 3, 3, dtype=torch.float64)).item() >= 101.0


def test_gradient_and_autocast():
    w = torch.randn(4, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthonormal_penalty, (w,))
    w32 = torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = orthonormal_penalty(w32)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, orthonormal_penalty(w32))


def test_one_dim_weight_raises():
    with pytest.raises(ValueError, match=r"weight must have at least 2 dims \(out, in, ...\); got shape \(5,\)"):
        orthonormal_penalty(torch.randn(5))
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor; got list"):
        orthonormal_penalty([[1.0, 0.0]])
