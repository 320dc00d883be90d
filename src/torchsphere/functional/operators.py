"""Angular operators g(theta) of SphereConv (Liu et al., *Deep Hyperspherical Learning*, NIPS 2017, arXiv 1711.03189).

Each operator maps the cosine of the angle theta between a filter and an input patch to g(theta), decreasing on
[0, pi] with g(0) = 1, g(pi/2) = 0, g(pi) = -1 (formulas as implemented in wy1iu/SphereNet):

- ``linear``:  g = 1 - 2 theta / pi
- ``cosine``:  g = cos theta (no arccos at all)
- ``sigmoid``: g = [(1 + e^{-pi/2k}) / (1 - e^{-pi/2k})] [(1 - e^{theta/k - pi/2k}) / (1 + e^{theta/k - pi/2k})]
  computed in the equivalent, numerically stable form tanh((pi/2 - theta) / (2k)) / tanh(pi / (4k)).
- ``learnable_sigmoid``: the sigmoid operator with a learned k (one per output channel; the layer supplies it).

Numerical hazard: d/dc acos(c) = -1/sqrt(1 - c^2) is infinite at c = +-1, and float rounding can push a computed
cosine to exactly +-1 (the official code calls acos unclamped). ``safe_acos`` clamps to [-1 + ACOS_EPS, 1 - ACOS_EPS]
first; the clamp is a documented deviation from the official code of at most ~1.4e-3 rad in theta at the very ends.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_operator, check_sigmoid_k

ACOS_EPS = 1e-6  # clamp margin before acos: keeps the acos gradient finite (|grad| <= 1/sqrt(2e-6) ~ 707)
DEFAULT_SIGMOID_K = 0.3  # official k of the fixed sigmoid operator
LEARNABLE_K_MIN = 0.05  # effective k = |k_raw| + 0.05 for the learnable SphereConv (official code)
LEARNABLE_K_RAW_INIT = 0.7  # official initial k_raw


def safe_acos(cos: Tensor, eps: float = ACOS_EPS) -> Tensor:
    """arccos of ``cos`` clamped to [-1 + eps, 1 - eps]: finite value and gradient everywhere, cos = +-1 included."""
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


def learnable_k(k_raw: Tensor) -> Tensor:
    """Effective k of the learnable SphereConv: |k_raw| + 0.05 (positive by reparameterization, official code)."""
    return k_raw.abs() + LEARNABLE_K_MIN


def _broadcast_k(k: float | Tensor, cos: Tensor, dim: int) -> float | Tensor:
    if not isinstance(k, Tensor) or k.dim() == 0:
        return k
    if k.dim() != 1:
        raise ValueError(f"sigmoid_k tensor must be 0-d or 1-d (one k per output channel); got shape {tuple(k.shape)}")
    dim = dim % cos.dim()
    if k.numel() not in (1, cos.shape[dim]):
        raise ValueError(
            f"sigmoid_k has {k.numel()} values but the output has {cos.shape[dim]} channels along dim {dim}"
        )
    shape = [1] * cos.dim()
    shape[dim] = k.numel()
    return k.reshape(shape)


def sigmoid_of_angle(theta: Tensor, k: float | Tensor) -> Tensor:
    """The SphereNet sigmoid operator of an angle, tanh((pi/2 - theta)/(2k)) / tanh(pi/(4k))."""
    if isinstance(k, Tensor):
        return torch.tanh((math.pi / 2 - theta) / (2 * k)) / torch.tanh(math.pi / (4 * k))
    return torch.tanh((math.pi / 2 - theta) / (2 * k)) / math.tanh(math.pi / (4 * k))


def angular_activation(cos: Tensor, operator: str = "cosine", sigmoid_k: float | Tensor | None = None, *,
                       dim: int = 1) -> Tensor:
    """Applies the sphere operator g to cosines.

    Args:
        cos: cosines in [-1, 1], any shape.
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of the sigmoid operators: a number > 0, a 0-d tensor, or a 1-d tensor with one (effective) k
            per channel, broadcast along ``dim``. Defaults to 0.3 (official) for ``"sigmoid"``; required (the
            effective k, e.g. ``learnable_k(k_raw)``) for ``"learnable_sigmoid"``.
        dim: the channel dimension along which a 1-d ``sigmoid_k`` is broadcast (1 for conv outputs, -1 for linear).

    Returns:
        g(theta) with the shape of ``cos``, in [-1, 1].
    """
    check_operator(operator)
    if operator == "cosine":
        return cos
    if operator == "linear":
        return 1.0 - (2.0 / math.pi) * safe_acos(cos)
    if sigmoid_k is None:
        if operator == "learnable_sigmoid":
            raise ValueError("operator 'learnable_sigmoid' needs sigmoid_k (the learned, effective k); got None")
        sigmoid_k = DEFAULT_SIGMOID_K
    k = _broadcast_k(check_sigmoid_k(sigmoid_k), cos, dim)
    return sigmoid_of_angle(safe_acos(cos), k)
