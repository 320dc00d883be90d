"""SphereConv: convolution that depends only on the angle between each filter and each input patch.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). As implemented in wy1iu/SphereNet:

    cos theta = <w, x_patch> / (sqrt(||w||^2 + eps) * sqrt(||x_patch||^2 + eps)),   out = g(theta) (+ bias)

The patch norm is computed without unfold: the squared input, summed over the input channels of each group, is
convolved with an all-ones kernel using the main convolution's stride, padding, dilation and groups (zero padding
contributes 0, exactly as in the main convolution). An all-zero patch gives cos theta = 0 and g = 0.

Under ``torch.autocast`` the main convolution runs in the autocast dtype; the patch norm, the filter norm, the
division and the operator run in float32 (an fp32 island) and the result is returned in the convolution's dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_operator, check_positive, check_sigmoid_k, check_tensor
from .fused import SphereTail, check_memory_efficient, patch_rnorm, sigmoid_k_for, tail_save
from .fused_conv import sphere_conv_fn
from .norms import filter_norm_safe, patch_norm_safe
from .operators import DEFAULT_SIGMOID_K, _broadcast_k, angular_activation

_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def tail_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the fp32 island: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _check_conv_args(nd: int, input: Tensor, weight: Tensor, groups: int) -> None:
    check_tensor("input", input)
    check_tensor("weight", weight)
    if weight.dim() != nd + 2:
        raise ValueError(f"weight of sphere_conv{nd}d must have {nd + 2} dims (C_out, C_in/groups, *kernel); "
                         f"got shape {tuple(weight.shape)}")
    if input.dim() not in (nd + 1, nd + 2):
        raise ValueError(f"input of sphere_conv{nd}d must have {nd + 2} dims (N, C_in, *spatial) or {nd + 1} "
                         f"(unbatched); got shape {tuple(input.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1; got {groups!r}")
    if weight.shape[0] % groups:
        raise ValueError(f"groups={groups} must divide the {weight.shape[0]} output channels")
    c_in = input.shape[-nd - 1]
    if c_in != weight.shape[1] * groups:
        raise ValueError(f"input has {c_in} channels but weight expects {weight.shape[1] * groups} "
                         f"(weight.shape[1]={weight.shape[1]} x groups={groups})")


def patch_norm_sq(input: Tensor, kernel_size: tuple[int, ...], stride=1, padding=0, dilation=1,
                  groups: int = 1) -> Tensor:
    """Squared L2 norm of every input patch seen by a convolution, per group.

    Args:
        input: (N, C_in, *spatial).
        kernel_size: the spatial kernel size of the main convolution.
        stride, padding, dilation, groups: as given to the main convolution (zero padding).

    Returns:
        (N, groups, *out_spatial): sum of x^2 over each group's channels and the kernel window.
    """
    nd = len(kernel_size)
    n, c_in = input.shape[:2]
    sq = input.square()
    if groups == 1:
        sq = sq.sum(1, keepdim=True)  # (N, 1, *spatial)
    else:
        sq = sq.reshape(n, groups, c_in // groups, *input.shape[2:]).sum(2)  # (N, G, *spatial)
    ones = torch.ones((groups, 1, *kernel_size), dtype=sq.dtype, device=sq.device)
    return _CONV[nd](sq, ones, None, stride, padding, dilation, groups)


def filter_norm(weight: Tensor, eps: float) -> Tensor:
    """sqrt(||w||^2 + eps) per output unit, shape (C_out,)."""
    return torch.sqrt(weight.square().flatten(1).sum(1) + eps)


def sphere_cosine(conv: Tensor, input: Tensor, weight: Tensor, stride=1, padding=0, dilation=1, groups: int = 1,
                  eps: float = 1e-4) -> Tensor:
    """cos theta from a raw (bias-free) convolution output ``conv`` (N, C_out, *out), in the tail dtype."""
    nd = weight.dim() - 2
    dtype = tail_dtype(conv.dtype)
    x, w = input.to(dtype), weight.to(dtype)
    # overflow-safe (torchsphere.functional.norms): the plain formula for float64, scaled sums below
    x_norm = patch_norm_safe(x, tuple(weight.shape[2:]), stride, padding, dilation, groups, eps)
    w_norm = filter_norm_safe(w, eps).reshape(1, -1, *([1] * nd))  # (1, C_out, 1, ...)
    cos = conv.to(dtype) / w_norm
    if groups == 1:
        return cos / x_norm  # (N, C_out, *out) / (N, 1, *out)
    n, c_out = cos.shape[:2]
    out_sp = cos.shape[2:]
    return (cos.reshape(n, groups, c_out // groups, *out_sp) / x_norm.unsqueeze(2)).reshape(n, c_out, *out_sp)


def _sphere_conv_fused(nd: int, input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                       groups: int, operator: str, sigmoid_k, eps: float, memory_efficient: bool) -> Tensor:
    """The default path: filter norm folded into the weight, then one :class:`~.fused.SphereTail` node."""
    dtype = tail_dtype(weight.dtype)
    w = weight.to(dtype)
    w_hat = (w / filter_norm(w, eps).reshape(-1, *([1] * (nd + 1)))).to(weight.dtype)  # conv(x, w/|w|) = conv/|w|
    z = _CONV[nd](input, w_hat, None, stride, padding, dilation, groups)  # (N, C_out, *out)
    with torch.autocast(device_type=input.device.type, enabled=False):
        dtype = tail_dtype(z.dtype)
        r = patch_rnorm(input.to(dtype), tuple(weight.shape[2:]), stride, padding, dilation, groups,
                        eps)  # (N, G, *out)
        k = _broadcast_k(sigmoid_k_for(operator, sigmoid_k), z, 1)
        n, c_out, *out_sp = z.shape
        # (N, G, C_out/G, *out): r broadcasts over C_out/G; with one group z keeps its shape (no view)
        grouped = (n, groups, c_out // groups, *out_sp) if groups > 1 else (n, c_out, *out_sp)
        r = r.unsqueeze(2) if groups > 1 else r
        channel = (1, *grouped[1:-nd], *([1] * nd))
        k = k.reshape(channel) if isinstance(k, Tensor) and k.numel() > 1 else k
        b = None if bias is None else bias.to(dtype).reshape(channel)
        zt = z.to(dtype).reshape(grouped)
        out = SphereTail.apply(zt, r, k, b, operator, tail_save(memory_efficient, zt)).reshape(z.shape)
    return out.to(z.dtype)


def _sphere_conv(nd: int, input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
                 groups: int, operator: str, sigmoid_k, eps: float, impl: str, memory_efficient: bool) -> Tensor:
    _check_conv_args(nd, input, weight, groups)
    check_operator(operator)
    eps = check_positive("eps", eps)
    if operator in ("sigmoid", "learnable_sigmoid"):
        check_sigmoid_k(sigmoid_k)
    unbatched = input.dim() == nd + 1
    if unbatched:
        input = input.unsqueeze(0)
    if check_memory_efficient(impl, memory_efficient) == "fused":
        k = sigmoid_k_for(operator, sigmoid_k)
        if isinstance(k, Tensor) and k.dim() > 1:
            raise ValueError(f"sigmoid_k tensor must be 0-d or 1-d (one k per output channel); got shape "
                             f"{tuple(k.shape)}")
        if isinstance(k, Tensor) and k.dim() == 1 and k.numel() not in (1, weight.shape[0]):
            raise ValueError(f"sigmoid_k has {k.numel()} values but the output has {weight.shape[0]} channels "
                             "along dim 1")
        out = sphere_conv_fn(nd, input, weight, bias, stride, padding, dilation, groups, operator, k, eps,
                             memory_efficient)
        if out is not None:
            return out.squeeze(0) if unbatched else out
        out = _sphere_conv_fused(nd, input, weight, bias, stride, padding, dilation, groups, operator, sigmoid_k, eps,
                                 memory_efficient)
        return out.squeeze(0) if unbatched else out
    conv = _CONV[nd](input, weight, None, stride, padding, dilation, groups)  # (N, C_out, *out)
    with torch.autocast(device_type=input.device.type, enabled=False):
        cos = sphere_cosine(conv, input, weight, stride, padding, dilation, groups, eps)
        out = angular_activation(cos, operator, sigmoid_k, dim=1)
        if bias is not None:
            out = out + bias.to(out.dtype).reshape(1, -1, *([1] * nd))
    out = out.to(conv.dtype)
    return out.squeeze(0) if unbatched else out


def sphere_conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, *, operator: str = "cosine",
                  sigmoid_k: float | Tensor | None = DEFAULT_SIGMOID_K,
                  eps: float = 1e-4, impl: str = "fused", memory_efficient: bool = False) -> Tensor:
    """1-D SphereConv: g(theta(w, x_patch)) (+ bias). Arguments as ``F.conv1d`` plus the operator.

    Args:
        input: (N, C_in, L) or (C_in, L).
        weight: (C_out, C_in / groups, k).
        bias: optional (C_out,), added after g.
        stride, padding, dilation, groups: as ``F.conv1d`` (padding also 'same' or 'valid').
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of the sigmoid operators (a number, or a (C_out,) tensor of effective k).
        eps: added to both squared norms before the square root (official 1e-4).
        impl: ``"fused"`` (default; the filter norm folded into the weight and one analytic-backward autograd node,
            see :mod:`torchsphere.functional.fused`; no double backward) or ``"reference"`` (the plain eager
            composition, the reference the tests compare against; supports double backward).
        memory_efficient: with ``impl="fused"``, save the output instead of the normalized convolution and invert
            g in the backward: no extra full-size saved tensor when the next layer (BatchNorm, ...) saves the
            output anyway, but an in-place op on the output then makes the backward raise (see
            :mod:`torchsphere.functional.fused`, item 5). Inside ``torch.compile`` z is saved either way and the
            compiler plans the memory. Default False.
    """
    return _sphere_conv(1, input, weight, bias, stride, padding, dilation, groups, operator, sigmoid_k, eps,
                        impl, memory_efficient)


def sphere_conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, *, operator: str = "cosine",
                  sigmoid_k: float | Tensor | None = DEFAULT_SIGMOID_K,
                  eps: float = 1e-4, impl: str = "fused", memory_efficient: bool = False) -> Tensor:
    """2-D SphereConv; see :func:`sphere_conv1d`. input (N, C_in, H, W), weight (C_out, C_in / groups, kh, kw)."""
    return _sphere_conv(2, input, weight, bias, stride, padding, dilation, groups, operator, sigmoid_k, eps,
                        impl, memory_efficient)


def sphere_conv3d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, *, operator: str = "cosine",
                  sigmoid_k: float | Tensor | None = DEFAULT_SIGMOID_K,
                  eps: float = 1e-4, impl: str = "fused", memory_efficient: bool = False) -> Tensor:
    """3-D SphereConv; see :func:`sphere_conv1d`.

    input (N, C_in, D, H, W), weight (C_out, C_in / groups, kd, kh, kw).
    """
    return _sphere_conv(3, input, weight, bias, stride, padding, dilation, groups, operator, sigmoid_k, eps,
                        impl, memory_efficient)
