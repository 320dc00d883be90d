"""Orthonormality penalty of SphereNet (official code: 2e-4 * 1/2 * ||W~^T W~ - I||_F^2 on every SphereConv)."""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_tensor


def orthonormal_penalty(weight: Tensor) -> Tensor:
    """||W~^T W~ - I||_F^2 with W~ the filters flattened to columns (one column per output unit).

    Works for conv weights (C_out, C_in/groups, *k) and linear weights (out, in). The caller picks the coefficient
    (officially 1e-4). Computed in float32 at least, also under autocast.

    Args:
        weight: a weight with the output units on dim 0.

    Returns:
        A 0-d tensor.
    """
    check_tensor("weight", weight)
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims (out, in, ...); got shape {tuple(weight.shape)}")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        w = weight.reshape(weight.shape[0], -1).to(dtype)  # (N, d): rows are the columns of W~
        gram = w @ w.t()  # (N, N) = W~^T W~
        eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
        return (gram - eye).pow(2).sum()
