"""Optimizer parameter groups following the official SphereNet recipe (wy1iu/SphereNet).

Official: SphereConv filters get no weight decay (only the orthonormality penalty); the learnable k has none either;
score layer, plain (shortcut) convolutions and BatchNorm gamma/beta are L2-decayed with 5e-4.
"""
from __future__ import annotations

from torch import nn

from .sphere_conv import SPHERE_LAYERS

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float = 5e-4, *, decay_sphere_weights: bool = False,
                 decay_norm: bool = True, decay_bias: bool = True) -> list[dict]:
    """Splits ``model``'s trainable parameters into a decayed and a non-decayed group.

    Args:
        model: any module.
        weight_decay: the coefficient of the decayed group.
        decay_sphere_weights: decay the weights of sphere layers (official: False; they are scale-invariant).
        decay_norm: decay normalization-layer affine parameters (official: True; a switch for modern recipes).
        decay_bias: decay biases.

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]``, ready for
        any ``torch.optim`` optimizer. Learnable sigmoid k (``sigmoid_k_raw``) is never decayed.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay!r}")
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if name == "sigmoid_k_raw":
                keep = False
            elif isinstance(module, SPHERE_LAYERS) and name == "weight":
                keep = decay_sphere_weights
            elif isinstance(module, _NORM_TYPES) or getattr(module, "_is_norm_layer", False):
                keep = decay_norm
            elif name == "bias":
                keep = decay_bias
            else:
                keep = True
            (decay if keep else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
