"""Polynomial arccos, sine and cosine for the float32 SphereConv kernels.

``torch.acos``, ``torch.asin``, ``torch.sin`` and ``torch.cos`` cost several times a multiplication per element on
CPU, eager and in Inductor's vectorized loops alike (measured here, 3.2 M float32 elements on one core: ``acos``
7.0 ms, the polynomial below 2.8 ms, a plain multiplication 1.9 ms), and the fused SphereConv tail evaluates one of
them per output element in the forward and in the backward. The polynomials below are a handful of fused
multiply-adds and one square root, so the tail's cost stays near one pass over memory.

Accuracy (float32 evaluation, measured against float64 ``torch.acos`` / ``sin`` / ``cos`` on 2,000,001 evenly spaced
points of the domain; ``tests/test_fast_math.py`` asserts the bounds):

- :func:`acos_poly` on [-1, 1]: Abramowitz & Stegun, *Handbook of Mathematical Functions*, formula 4.4.46
  (acos |x| = sqrt(1 - |x|) P_7(|x|), |error| <= 2e-8 in exact arithmetic), reflected for x < 0. Largest absolute
  error in float32: ``ACOS_POLY_MAX_ERR`` = 5e-7 rad -- the order of float32's own rounding of pi (2.4e-7), and
  2,800 times smaller than the acos clamp's deviation at the ends of [-1, 1] (1.4e-3 rad, see
  :mod:`torchsphere.functional.operators`).
- :func:`sin_cos_half_pi` (sin(pi x / 2) and cos(pi x / 2) on [-1, 1]): the double-angle formulas with
  y = pi x / 4 in [-pi/4, pi/4], where the polynomials of Cephes' single-precision ``sinf`` / ``cosf`` hold. Largest absolute error in float32: ``SINCOS_POLY_MAX_ERR`` = 3e-7.

float64 never uses these: the kernels call the exact ``torch`` functions for float64 tensors, so every float64
reference test and gradcheck sees the exact math.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ACOS_POLY_MAX_ERR = 5e-7  # largest |acos_poly(x) - acos(x)| over [-1, 1] in float32 (tested)
SINCOS_POLY_MAX_ERR = 3e-7  # largest error of sin_half_pi / cos_half_pi over [-1, 1] in float32 (tested)

# Abramowitz & Stegun 4.4.46: acos(a) = sqrt(1 - a) * sum_i A[i] a^i for 0 <= a <= 1
_ACOS_A = (1.5707963050, -0.2145988016, 0.0889789874, -0.0501743046, 0.0308918810, -0.0170881256,
           0.0066700901, -0.0012624911)
# Cephes sinf / cosf on [-pi/4, pi/4]: sin y = y + y^3 S(y^2), cos y = 1 - y^2 / 2 + y^4 C(y^2)
_SIN_S = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)
_COS_C = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)


def _horner(x: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    out = x * coeffs[-1] + coeffs[-2]
    for c in reversed(coeffs[:-2]):
        out = out * x + c
    return out


def acos_poly(x: Tensor) -> Tensor:
    """arccos(x) for x in [-1, 1] (float32 kernels; see the module docstring for the error bound).

    Inputs outside [-1, 1] give NaN (sqrt of a negative), as ``torch.acos``; callers clamp first.
    """
    a = x.abs()
    r = torch.sqrt(1.0 - a) * _horner(a, _ACOS_A)
    return torch.where(x < 0, math.pi - r, r)


def _sin_small(y: Tensor) -> Tensor:  # |y| <= pi / 4
    y2 = y * y
    return y + y * y2 * _horner(y2, _SIN_S)


def _cos_small(y: Tensor) -> Tensor:  # |y| <= pi / 4
    y2 = y * y
    return 1.0 - 0.5 * y2 + y2 * y2 * _horner(y2, _COS_C)


def asin_poly(x: Tensor) -> Tensor:
    """arcsin(x) = pi/2 - acos(x) for x in [-1, 1], odd by construction (same polynomial and bound as
    :func:`acos_poly`)."""
    a = x.abs()
    v = math.pi / 2 - torch.sqrt(1.0 - a) * _horner(a, _ACOS_A)
    return torch.where(x < 0, -v, v)


def sin_cos_half_pi(x: Tensor) -> tuple[Tensor, Tensor]:
    """(sin(pi x / 2), cos(pi x / 2)) for x in [-1, 1] from one pair of polynomials: with y = pi x / 4 in
    [-pi/4, pi/4], sin 2y = 2 sin y cos y and cos 2y = (cos y - sin y)(cos y + sin y). The cosine is accurate to
    2.4e-7 absolute but only 1.5e-4 relative near x = +-1, where it vanishes; :func:`cos_half_pi` is accurate
    relative to its value there."""
    y = x * (math.pi / 4)
    sy, cy = _sin_small(y), _cos_small(y)
    return 2.0 * sy * cy, (cy - sy) * (cy + sy)


def sin_half_pi(x: Tensor) -> Tensor:
    """sin(pi x / 2) for x in [-1, 1] (see :func:`sin_cos_half_pi`)."""
    return sin_cos_half_pi(x)[0]


def cos_half_pi(x: Tensor) -> Tensor:
    """cos(pi x / 2) = sin(pi (1 - |x|) / 2) for x in [-1, 1]: accurate relative to its value near x = +-1, where it
    vanishes (1 - |x| is exact there)."""
    return sin_cos_half_pi(1.0 - x.abs())[0]
