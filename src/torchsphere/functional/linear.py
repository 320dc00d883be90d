"""Fully connected SphereConv: g(theta) between each weight row and the input vector (Liu et al., NIPS 2017)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_operator, check_positive, check_sigmoid_k, check_tensor
from .conv import tail_dtype
from .fused import SphereTail, check_memory_efficient, sigmoid_k_for, tail_save
from .norms import filter_norm_safe, safe_norm, safe_rnorm
from .operators import DEFAULT_SIGMOID_K, _broadcast_k, angular_activation


def linear_cosine(lin: Tensor, input: Tensor, weight: Tensor, eps: float = 1e-4) -> Tensor:
    """cos theta from a raw ``F.linear(input, weight)`` output (*, out), in the tail dtype."""
    dtype = tail_dtype(lin.dtype)
    x_norm = safe_norm(input.to(dtype), -1, eps, keepdim=True)  # (*, 1), overflow-safe (functional.norms)
    return lin.to(dtype) / x_norm / filter_norm_safe(weight.to(dtype), eps)  # (*, out)


def sphere_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, operator: str = "cosine",
                  sigmoid_k: float | Tensor | None = DEFAULT_SIGMOID_K, eps: float = 1e-4,
                  impl: str = "fused", memory_efficient: bool = False) -> Tensor:
    """g(theta(W_j, x)) (+ bias) for every output unit j.

    Args:
        input: (*, in_features).
        weight: (out_features, in_features).
        bias: optional (out_features,), added after g.
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of the sigmoid operators (a number, or an (out_features,) tensor of effective k).
        eps: added to both squared norms before the square root. Both norms are overflow-safe
            (:mod:`torchsphere.functional.norms`): float32 inputs of magnitude 0 to 1e30 (tested) give the float64
            result.
        impl: ``"fused"`` (default: the filter norm folded into the weight, one analytic-backward autograd node; no
            double backward) or ``"reference"`` (the plain eager composition; supports double backward).
        memory_efficient: save the output instead of the normalized product (as :func:`~.conv.sphere_conv1d`).

    Returns:
        (*, out_features) in [-1, 1] before the bias.
    """
    check_tensor("input", input)
    check_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-d (out_features, in_features); got shape {tuple(weight.shape)}")
    if input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dim must be in_features={weight.shape[1]}; got shape {tuple(input.shape)}")
    check_operator(operator)
    eps = check_positive("eps", eps)
    if operator in ("sigmoid", "learnable_sigmoid"):
        check_sigmoid_k(sigmoid_k)
    if check_memory_efficient(impl, memory_efficient) == "fused":
        w = weight.to(tail_dtype(weight.dtype))
        w_hat = (w / filter_norm_safe(w, eps).unsqueeze(1)).to(weight.dtype)  # linear(x, w/|w|) = linear(x, w)/|w|
        z = F.linear(input, w_hat)  # (*, out)
        with torch.autocast(device_type=input.device.type, enabled=False):
            dtype = tail_dtype(z.dtype)
            r = safe_rnorm(input.to(dtype), -1, eps, keepdim=True)  # (*, 1), overflow-safe
            k = _broadcast_k(sigmoid_k_for(operator, sigmoid_k), z, -1)
            b = None if bias is None else bias.to(dtype)
            zt = z.to(dtype)
            out = SphereTail.apply(zt, r, k, b, operator, tail_save(memory_efficient, zt))
        return out.to(z.dtype)
    lin = F.linear(input, weight)  # (*, out)
    with torch.autocast(device_type=input.device.type, enabled=False):
        cos = linear_cosine(lin, input, weight, eps)
        out = angular_activation(cos, operator, sigmoid_k, dim=-1)
        if bias is not None:
            out = out + bias.to(out.dtype)
    return out.to(lin.dtype)
