"""BatchNorm with the test-time statistics of the official SphereNet code (wy1iu/SphereNet, TensorFlow 1.x).

The official ``_batch_norm`` normalizes a training batch with its own moments, ``tf.nn.moments(x, [0, 1, 2])``
(the *biased* variance, over batch and space), and keeps the test-time statistics as
``tf.train.ExponentialMovingAverage(decay=0.999)`` shadows of ``batch_mean`` and ``batch_var``. Because those are
tensors, not variables, TF 1.x starts their shadows at **zero** (``zero_debias=False``)::

    shadow_0 = 0,   shadow_t = decay * shadow_{t-1} + (1 - decay) * moment_t

so after t updates the moving variance is (1 - decay^t) of the recent batch variances (63% at t = 1,000 with
decay 0.999, 86% at 2,000), and inference computes ``(x - mean_avg) / sqrt(var_avg + eps)`` with eps 1e-3.

PyTorch's ``nn.BatchNorm2d(momentum=0.001)`` is not the same thing: its ``running_var`` starts at **1** and
accumulates the *unbiased* batch variance. For a layer whose input variance is far below 1 (a SphereConv output lies
in [-1, 1]) PyTorch's running variance stays far too large for thousands of steps; the official one is too *small*
early on instead. :class:`OfficialBatchNorm2d` reproduces the official semantics exactly; ``momentum`` keeps
PyTorch's convention (``momentum = 1 - decay``) so the two are interchangeable in ``norm_layer`` factories.

``momentum=None`` gives an equal-weight (cumulative) average of the biased batch moments, as PyTorch's BatchNorm does
with ``momentum=None``; ``torch.optim.swa_utils.update_bn`` relies on it for precise BN statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OFFICIAL_BN_DECAY = 0.999  # tf.train.ExponentialMovingAverage(0.999) in wy1iu/SphereNet
OFFICIAL_BN_EPS = 1e-3


class OfficialBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose running statistics are zero-started EMA shadows of the biased batch moments.

    Training mode normalizes with the batch's own (biased) moments, exactly like ``nn.BatchNorm2d``; only the
    running statistics differ. The buffers keep PyTorch's names (``running_mean``, ``running_var``,
    ``num_batches_tracked``), so state dicts load into ``nn.BatchNorm2d`` and back.

    Args:
        num_features: channels C of an (N, C, H, W) input.
        eps: added to the variance (official 1e-3).
        momentum: 1 - decay of the moving averages (official 0.001, i.e. decay 0.999); None for the cumulative
            (equal-weight) average.
        affine: learnable gamma and beta, as in ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, eps: float = OFFICIAL_BN_EPS, momentum: float | None = 1 - OFFICIAL_BN_DECAY,
                 affine: bool = True, device=None, dtype=None) -> None:
        if momentum is not None and not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1] or None; got {momentum!r}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
                         device=device, dtype=dtype)

    def reset_running_stats(self) -> None:
        """Zero shadows, as TF 1.x creates them for tensors (not PyTorch's running_var = 1)."""
        self.running_mean.zero_()
        self.running_var.zero_()
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, C, H, W)
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # the batch's own moments, exactly as nn.BatchNorm2d normalizes (same kernel, same gradient); the kernel's
        # saved mean and 1/sqrt(var + eps) give the biased moments of tf.nn.moments without a second pass. Hazard:
        # var = invstd^-2 - eps cancels when var << eps (relative error ~1e-7 * eps / var for a float32 invstd); it
        # is formed in float64 so that no rounding is added, and clamped at 0.
        y, mean, invstd = torch.native_batch_norm(x, self.weight, self.bias, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            var = (invstd.double().pow(-2) - self.eps).clamp_min(0.0)
            self.num_batches_tracked.add_(1)
            rate = 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), rate)  # += (1 - decay)(m - shadow)
            self.running_var.lerp_(var.to(self.running_var.dtype), rate)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + ", stats=official (zero-started EMA of biased moments)"
