"""SphereNorm: SphereConv with learnable rescaling, a convolution that normalizes itself per sample and location.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189) present SphereNorm as "hyperspherical
learning as a normalization method": SphereConv with learnable rescaling factors so that it can degrade to the
original convolution, usable with or without BatchNorm (official README of wy1iu/SphereNet). **The paper's exact
formula is not available in the reference material** (the official code has no SphereNorm module), so the
parameterization below is torchsphere's own design. For each output channel c:

    out_c = gamma_c * g(theta_c) * (||w_c|| * ||x_patch||)^rho_c + beta_c (+ bias_c)

- g(theta) is the SphereConv output for any operator (linear, cosine, sigmoid, learnable sigmoid), computed from the
  same eps-regularized norms as :func:`torchsphere.functional.sphere_conv2d`:
  ||w_c|| = sqrt(sum w_c^2 + eps), ||x_patch|| = sqrt(sum x_patch^2 + eps).
- gamma (init 1) and beta (init 0): learnable per-channel scale and shift.
- rho in [0, 1] (init 0): the learnable share of the magnitude kept, ``rho = clamp(rho_param, 0, 1)`` — a box
  constraint that reaches 0 and 1 exactly (a sigmoid could reach neither). The gradient passes at the bounds
  (``clamp`` is inclusive) and is zero beyond them; weight decay pulls a stray value back towards 0.
  ``magnitude=False`` drops rho (pure scale-invariant SphereConv with an affine).
- With the cosine operator, rho = 1, gamma = 1, beta = 0: g * ||w|| ||x|| = <w, x_patch>, the original convolution
  exactly (the eps terms cancel). At init (rho = 0, gamma = 1, beta = 0) the layer equals SphereConv.
- No batch statistics: every output depends on its own sample only, so train and eval modes and all batch sizes
  (1 included) give identical results.

Under autocast the main convolution runs in the autocast dtype; norms, cosines, the operator and the rescaling run in
float32 (an fp32 island). The norms are overflow-safe (:mod:`torchsphere.functional.norms`; a plain squared patch norm
overflows float32 for inputs of magnitude ~1e19): each location's channel sum is scaled by a power of two and the
window sum runs in float64 on the channel-reduced tensor, so float32 outputs match float64 from 0 to 1e30 (tested).
The layers subclass :class:`~torchsphere.nn.SphereConv2d` (and 1d/3d), so they keep the ``weight``/``bias`` names of
``nn.Conv2d`` and load its state_dict (reporting ``gamma``, ``beta``, ``rho`` missing).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.conv import _check_conv_args, tail_dtype
from ..functional.norms import filter_norm_safe, patch_norm_safe
from ..functional.operators import angular_activation
from .sphere_conv import SphereConv1d, SphereConv2d, SphereConv3d

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _sphere_norm(input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int, *,
                 operator: str, sigmoid_k, eps: float, gamma: Tensor, beta: Tensor, rho: Tensor | None) -> Tensor:
    """gamma g(theta) (||w|| ||x_patch||)^rho + beta (+ bias) for a batched input (N, C_in, *spatial)."""
    nd = weight.dim() - 2
    conv = _CONV[nd](input, weight, None, stride, padding, dilation, groups)  # (N, C_out, *out)
    with torch.autocast(device_type=input.device.type, enabled=False):
        dtype = tail_dtype(conv.dtype)
        x, w = input.to(dtype), weight.to(dtype)
        x_norm = patch_norm_safe(x, tuple(weight.shape[2:]), stride, padding, dilation, groups, eps)  # (N, G, *out)
        if groups > 1:  # (N, G, *out) -> (N, C_out, *out): each group's norm serves its C_out / G channels
            x_norm = x_norm.repeat_interleave(weight.shape[0] // groups, dim=1)
        channel = (1, -1, *([1] * nd))
        magnitude = filter_norm_safe(w, eps).reshape(channel) * x_norm  # (N, C_out or 1, *out) = ||w|| ||x_patch||
        out = angular_activation(conv.to(dtype) / magnitude, operator, sigmoid_k, dim=1)  # g(theta)
        if rho is not None:
            out = out * magnitude.pow(rho.to(dtype).clamp(0.0, 1.0).reshape(channel))
        out = gamma.to(dtype).reshape(channel) * out + beta.to(dtype).reshape(channel)
        if bias is not None:
            out = out + bias.to(dtype).reshape(channel)
    return out.to(conv.dtype)


class _SphereNormNd:
    """The rescaling state and forward shared by SphereNorm1d/2d/3d (placed before the SphereConv class in the MRO)."""

    _is_norm_layer = True  # param_groups: gamma, beta, rho (and bias) follow decay_norm; the weight stays undecayed

    def _init_norm(self, magnitude: bool, device, dtype) -> None:
        if not isinstance(magnitude, bool):
            raise TypeError(f"magnitude must be a bool; got {type(magnitude).__name__} {magnitude!r}")
        c_out = self.out_channels
        self.gamma = nn.Parameter(torch.ones(c_out, device=device, dtype=dtype))
        self.beta = nn.Parameter(torch.zeros(c_out, device=device, dtype=dtype))
        if magnitude:
            self.rho = nn.Parameter(torch.zeros(c_out, device=device, dtype=dtype))
        else:
            self.register_parameter("rho", None)

    def effective_rho(self) -> Tensor | None:
        """The magnitude exponent in use, clamp(rho, 0, 1) per channel (None when ``magnitude=False``)."""
        return None if self.rho is None else self.rho.clamp(0.0, 1.0)

    def forward(self, input: Tensor) -> Tensor:  # (N, C_in, *spatial) -> (N, C_out, *out)
        nd = self.weight.dim() - 2
        _check_conv_args(nd, input, self.weight, self.groups)
        unbatched = input.dim() == nd + 1
        if unbatched:
            input = input.unsqueeze(0)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        out = _sphere_norm(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                           operator=self.operator, sigmoid_k=self.effective_k(), eps=self.eps, gamma=self.gamma,
                           beta=self.beta, rho=self.rho)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", magnitude={self.rho is not None}"


class SphereNorm1d(_SphereNormNd, SphereConv1d):
    """SphereNorm as a drop-in ``nn.Conv1d``: gamma g(theta) (||w|| ||x_patch||)^rho + beta per output channel.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
            dtype: as :class:`~torchsphere.nn.SphereConv1d` (``bias`` default False, added after the rescaling).
        operator: ``"linear"``, ``"cosine"`` (default), ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of ``"sigmoid"`` (default 0.3), or the initial effective k of ``"learnable_sigmoid"``.
        eps: added to both squared norms before the square root (official 1e-4).
        magnitude: learn rho in [0, 1] (init 0); False keeps only gamma and beta.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 operator: str = "cosine", sigmoid_k: float | None = None, eps: float = 1e-4,
                 magnitude: bool = True) -> None:
        SphereConv1d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              padding_mode, device, dtype, operator=operator, sigmoid_k=sigmoid_k, eps=eps)
        self._init_norm(magnitude, device, dtype)


class SphereNorm2d(_SphereNormNd, SphereConv2d):
    """SphereNorm as a drop-in ``nn.Conv2d``; arguments as :class:`SphereNorm1d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 operator: str = "cosine", sigmoid_k: float | None = None, eps: float = 1e-4,
                 magnitude: bool = True) -> None:
        SphereConv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              padding_mode, device, dtype, operator=operator, sigmoid_k=sigmoid_k, eps=eps)
        self._init_norm(magnitude, device, dtype)


class SphereNorm3d(_SphereNormNd, SphereConv3d):
    """SphereNorm as a drop-in ``nn.Conv3d``; arguments as :class:`SphereNorm1d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 operator: str = "cosine", sigmoid_k: float | None = None, eps: float = 1e-4,
                 magnitude: bool = True) -> None:
        SphereConv3d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              padding_mode, device, dtype, operator=operator, sigmoid_k=sigmoid_k, eps=eps)
        self._init_norm(magnitude, device, dtype)
