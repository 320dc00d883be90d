"""The float32 polynomials of torchsphere.functional.fast_math against float64 torch, over their whole domain."""
from __future__ import annotations

import math

import pytest
import torch

from torchsphere.functional import fused
from torchsphere.functional.fast_math import (ACOS_POLY_MAX_ERR, SINCOS_POLY_MAX_ERR, acos_poly, asin_poly,
                                              cos_half_pi, sin_cos_half_pi, sin_half_pi)
from torchsphere.functional.operators import ACOS_EPS

X64 = torch.linspace(-1.0, 1.0, 2_000_001, dtype=torch.float64)
X32 = X64.float()
EXACT = X32.double()  # the float32 inputs, evaluated exactly


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want).abs().max().item()


def test_acos_and_asin_within_the_documented_bound():
    assert _max_err(acos_poly(X32), torch.acos(EXACT)) <= ACOS_POLY_MAX_ERR
    assert _max_err(asin_poly(X32), torch.asin(EXACT)) <= ACOS_POLY_MAX_ERR
    # far below the acos clamp's own deviation at the ends of [-1, 1]
    assert ACOS_POLY_MAX_ERR < (math.acos(1 - ACOS_EPS) - 0.0) / 1000
    assert acos_poly(torch.tensor([1.0, -1.0, 0.0])).tolist() == pytest.approx([0.0, math.pi, math.pi / 2], abs=1e-7)


def test_asin_is_odd_and_acos_reflects():
    torch.testing.assert_close(asin_poly(-X32), -asin_poly(X32), rtol=0, atol=0)
    torch.testing.assert_close(acos_poly(-X32), math.pi - acos_poly(X32), rtol=0, atol=2.5e-7)


def test_sin_cos_within_the_documented_bound():
    want_s, want_c = torch.sin(math.pi / 2 * EXACT), torch.cos(math.pi / 2 * EXACT)
    s, c = sin_cos_half_pi(X32)
    assert _max_err(s, want_s) <= SINCOS_POLY_MAX_ERR and _max_err(c, want_c) <= SINCOS_POLY_MAX_ERR
    assert _max_err(sin_half_pi(X32), want_s) <= SINCOS_POLY_MAX_ERR
    assert _max_err(cos_half_pi(X32), want_c) <= SINCOS_POLY_MAX_ERR


def test_cos_half_pi_is_relatively_accurate_where_it_vanishes():
    """The from-output backward divides by sin(theta) = cos(pi g / 2) down to theta ~ 1.4e-3 (the acos clamp)."""
    want = torch.cos(math.pi / 2 * EXACT)
    keep = want.abs() > 1e-3
    rel = ((cos_half_pi(X32).double() - want) / want)[keep].abs().max().item()
    assert rel < 1e-6


def test_outside_the_domain_is_nan_as_torch():
    assert torch.isnan(acos_poly(torch.tensor([1.5, -1.5]))).all()


def _all_polynomials(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (acos_poly(x), asin_poly(x), *sin_cos_half_pi(x), cos_half_pi(x))


def test_bounds_hold_in_the_compiled_kernels_with_fused_multiply_adds():
    """The library compiles its kernels with floating-point contraction (``fused.KERNEL_OPTIONS``): each multiply-add
    becomes one fused multiply-add, rounded once. The bounds hold for that arithmetic too (Inductor's C++ code)."""
    assert fused.KERNEL_OPTIONS["cpp.enable_floating_point_contract_flag"] == "fast"
    acos_, asin_, sin_, cos_, cos_rel = fused.compile_kernel(_all_polynomials)(X32)
    assert _max_err(acos_, torch.acos(EXACT)) <= ACOS_POLY_MAX_ERR
    assert _max_err(asin_, torch.asin(EXACT)) <= ACOS_POLY_MAX_ERR
    want_s, want_c = torch.sin(math.pi / 2 * EXACT), torch.cos(math.pi / 2 * EXACT)
    assert max(_max_err(sin_, want_s), _max_err(cos_, want_c), _max_err(cos_rel, want_c)) <= SINCOS_POLY_MAX_ERR
    keep = want_c.abs() > 1e-3
    assert ((cos_rel.double() - want_c) / want_c)[keep].abs().max().item() < 1e-6
