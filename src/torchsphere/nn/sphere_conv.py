"""SphereConv layers: drop-in ``nn.Conv1d/2d/3d`` and ``nn.Linear`` whose output depends only on angles.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). The layers keep the ``weight``/``bias``
names and shapes of their PyTorch parents, so ``load_state_dict`` from a plain convolution works; the learnable
SphereConv adds one parameter, ``sigmoid_k_raw`` (one k per output channel, effective k = |k_raw| + 0.05).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional._checks import check_bool, check_operator, check_positive
from ..functional.conv import sphere_conv1d, sphere_conv2d, sphere_conv3d
from ..functional.linear import sphere_linear
from ..functional.operators import DEFAULT_SIGMOID_K, LEARNABLE_K_MIN, LEARNABLE_K_RAW_INIT, learnable_k



class _SphereMixin:
    """Shared state of the sphere layers: the operator, k (fixed or learnable) and eps."""

    operator: str
    eps: float
    memory_efficient: bool = False  # class default: modules pickled before the attribute existed still run

    def _init_sphere(self, operator: str, sigmoid_k: float | None, eps: float, num_out: int, factory: dict,
                     memory_efficient: bool = False) -> None:
        self.operator = check_operator(operator)
        self.eps = check_positive("eps", eps)
        self.memory_efficient = check_bool("memory_efficient", memory_efficient)
        if operator == "learnable_sigmoid":
            # sigmoid_k is the initial *effective* k; the official raw init is 0.7 (effective 0.75).
            k0 = LEARNABLE_K_RAW_INIT + LEARNABLE_K_MIN if sigmoid_k is None else check_positive("sigmoid_k", sigmoid_k)
            if k0 <= LEARNABLE_K_MIN:
                raise ValueError(f"sigmoid_k (initial effective k) must be > {LEARNABLE_K_MIN} for "
                                 f"'learnable_sigmoid'; got {sigmoid_k!r}")
            self.sigmoid_k = None
            self.sigmoid_k_raw = nn.Parameter(torch.full((num_out,), k0 - LEARNABLE_K_MIN, **factory))
        else:
            self.sigmoid_k = check_positive("sigmoid_k", DEFAULT_SIGMOID_K if sigmoid_k is None else sigmoid_k)
            self.register_parameter("sigmoid_k_raw", None)

    def effective_k(self) -> float | Tensor:
        """k used by the sigmoid operators: the fixed number, or |k_raw| + 0.05 per output channel."""
        if self.sigmoid_k_raw is not None:
            return learnable_k(self.sigmoid_k_raw)
        return self.sigmoid_k

    def _sphere_repr(self) -> str:
        s = f", operator={self.operator!r}"
        if self.operator == "sigmoid":
            s += f", sigmoid_k={self.sigmoid_k}"
        if self.eps != 1e-4:
            s += f", eps={self.eps}"
        if self.memory_efficient:
            s += ", memory_efficient=True"
        return s


class _SphereConvNd(_SphereMixin):
    _fn: Callable[..., Tensor]

    def forward(self, input: Tensor) -> Tensor:  # (N, C_in, *spatial) -> (N, C_out, *out)
        padding = self.padding
        if self.padding_mode != "zeros":
            # as nn.ConvNd._conv_forward: pad with the mode, then a zero-padding-free convolution
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return type(self)._fn(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                              operator=self.operator, sigmoid_k=self.effective_k(), eps=self.eps,
                              memory_efficient=self.memory_efficient)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_repr()


def _conv_init(self, parent, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
               padding_mode, device, dtype, operator, sigmoid_k, eps, memory_efficient) -> None:
    parent.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                    padding_mode, device, dtype)
    self._init_sphere(operator, sigmoid_k, eps, out_channels, {"device": device, "dtype": dtype}, memory_efficient)


class SphereConv1d(_SphereConvNd, nn.Conv1d):
    """``nn.Conv1d`` computing g(theta) between each filter and each input patch.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode, device, dtype:
            as ``nn.Conv1d``.
        bias: default False (the official SphereNet has no conv bias); the bias is added after g.
        operator: ``"linear"``, ``"cosine"`` (default), ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of ``"sigmoid"`` (default 0.3), or the initial effective k of ``"learnable_sigmoid"``
            (default 0.75, i.e. the official k_raw = 0.7).
        eps: added to both squared norms before the square root (official 1e-4).
        memory_efficient: save the output instead of the normalized convolution for the backward (default False).
            When the next layer saves the output anyway (BatchNorm, a non-in-place ReLU), the layer then keeps no
            full-size tensor beyond a plain convolution's; an in-place op on the output (``ReLU(inplace=True)``
            right after the layer) makes the backward raise. The models of :mod:`torchsphere.models` set it.
    """

    _fn = staticmethod(sphere_conv1d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 operator: str = "cosine", sigmoid_k: float | None = None, eps: float = 1e-4,
                 memory_efficient: bool = False) -> None:
        _conv_init(self, nn.Conv1d, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                   padding_mode, device, dtype, operator, sigmoid_k, eps, memory_efficient)


class SphereConv2d(_SphereConvNd, nn.Conv2d):
    """``nn.Conv2d`` computing g(theta) between each filter and each input patch; arguments as :class:`SphereConv1d`."""

    _fn = staticmethod(sphere_conv2d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 operator: str = "cosine", sigmoid_k: float | None = None, eps: float = 1e-4,
                 memory_efficient: bool = False) -> None:
        _conv_init(self, nn.Conv2d, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                   padding_mode, device, dtype, operator, sigmoid_k, eps, memory_efficient)


class SphereConv3d(_SphereConvNd, nn.Conv3d):
    """``nn.Conv3d`` computing g(theta) between each filter and each input patch; arguments as :class:`SphereConv1d`."""

    _fn = staticmethod(sphere_conv3d)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", device=None, dtype=None, *,
                 operator: str = "cosine", sigmoid_k: float | None = None, eps: float = 1e-4,
                 memory_efficient: bool = False) -> None:
        _conv_init(self, nn.Conv3d, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                   padding_mode, device, dtype, operator, sigmoid_k, eps, memory_efficient)


class SphereLinear(_SphereMixin, nn.Linear):
    """``nn.Linear`` computing g(theta) between each weight row and the input.

    Args:
        in_features, out_features, device, dtype: as ``nn.Linear``.
        bias: default False; added after g.
        operator, sigmoid_k, eps, memory_efficient: as :class:`SphereConv1d`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None, *,
                 operator: str = "cosine", sigmoid_k: float | None = None, eps: float = 1e-4,
                 memory_efficient: bool = False) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_sphere(operator, sigmoid_k, eps, out_features, {"device": device, "dtype": dtype},
                          memory_efficient)

    def forward(self, input: Tensor) -> Tensor:  # (*, in) -> (*, out)
        return sphere_linear(input, self.weight, self.bias, operator=self.operator, sigmoid_k=self.effective_k(),
                             eps=self.eps, memory_efficient=self.memory_efficient)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._sphere_repr()


SPHERE_LAYERS: tuple[type[nn.Module], ...] = (SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear)
