"""Angular margins on cosine logits: GA-Softmax, A-Softmax (SphereFace), ArcFace and CosFace in one formula.

For a sample with cosines cos theta_j to every class weight, label y, operator g (linear, cosine, sigmoid, learnable
sigmoid; see :mod:`torchsphere.functional.operators`) and scale s, the logits are

    logit_j = s * g(theta_j)                                         for j != y, and without labels
    logit_y = s * (lambda * g(theta_y) + psi(theta_y)) / (1 + lambda)
    psi(theta) = g~(m1 * theta + m2) - m3

- GA-Softmax (Liu et al., *Deep Hyperspherical Learning*, NIPS 2017, arXiv 1711.03189): m1 = m >= 1 multiplies the
  target angle inside g, m2 = m3 = 0, s = ||x|| (weight-normalized softmax, "W-Softmax", when m = 1).
- A-Softmax (Liu et al., *SphereFace*, CVPR 2017, arXiv 1704.08063): the cosine operator with integer m, s = ||x||, and
  the annealing weight lambda (wy1iu/sphereface ``MarginInnerProduct``; lambda = 0 is the plain margin).
- ArcFace (Deng et al., CVPR 2019, arXiv 1801.07698): m2 > 0, additive angular margin, fixed s.
- CosFace / AM-Softmax (Wang et al., CVPR 2018, arXiv 1801.09414): m3 > 0, additive cosine margin, fixed s.
  All margins are in **radians** (pytorch-metric-learning's ArcFace takes degrees).

g~ is g extended to angles beyond pi so that psi stays monotonically decreasing on [0, pi] for every real m1 >= 1:

- cosine: SphereFace's extension g~(phi) = (-1)^k cos(phi) - 2k for phi in [k pi, (k+1) pi], computed as
  cos(phi - k pi) - 2k with k = floor(phi / pi). It is continuous (both pieces equal 1 - 2k at phi = k pi) and
  decreasing, for integer and non-integer m alike (m is not truncated). The same extension covers ArcFace's
  theta + m2 > pi (a continuous alternative to the ``cos theta - m sin m`` fallback of insightface/PML).
- linear: g~(phi) = 1 - 2 phi / pi, strictly decreasing on the whole real line, so no extension is needed.
- sigmoid: g~(phi) = tanh((pi/2 - phi) / (2k)) / tanh(pi / (4k)), strictly decreasing on the whole real line (it
  saturates towards -coth(pi / (4k)) for large phi, so psi stays bounded, unlike the cosine extension).

Numerical hazards, named: theta = ``safe_acos(cos)`` (clamped, finite gradient at cos = +-1); everything runs in
float32 or wider with autocast disabled (an fp32 island); the exp sum is left to ``F.cross_entropy``; the cosines
and a feature-norm scale s = ||x|| should come from overflow-safe norms (:mod:`torchsphere.functional.norms`, as
:class:`~torchsphere.nn.AngularHead` computes them): the margins themselves only multiply by s, finite up to 3e38. The "detached
margin" (ydwen/opensphere) adds the margin as a constant,
logit_y = s g(theta_y) + stopgrad(margin logit - s g(theta_y)): the forward value is the margin logit, the gradient is
that of the unmargined logit (no acos, no cos(m theta) slope), the scale s included.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_operator, check_positive, check_sigmoid_k, check_tensor
from .conv import tail_dtype
from .operators import DEFAULT_SIGMOID_K, angular_activation, safe_acos, sigmoid_of_angle

IGNORE_INDEX = -1  # label value that carries no margin (insightface convention); pass it to F.cross_entropy too


def check_margin(margin: object) -> float:
    """Returns the multiplicative margin m as a float if it is a finite real number >= 1, else raises."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
        raise TypeError(f"margin must be a real number >= 1; got {type(margin).__name__} {margin!r}")
    if not math.isfinite(float(margin)) or float(margin) < 1.0:
        raise ValueError(f"margin (multiplicative angular margin m) must be a finite number >= 1; got {margin!r}")
    return float(margin)


def check_nonnegative(name: str, value: object) -> float:
    """Returns ``value`` as a float if it is a finite real number >= 0, else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0; got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


def check_labels(labels: object, num_samples: int, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Checks class labels: an integer tensor of shape (N,) with values in [0, num_classes) or ``ignore_index``.

    The range check reads the values (one host synchronisation on an accelerator); it is skipped while
    ``torch.compile`` traces, where data-dependent control flow is not allowed.
    """
    check_tensor("labels", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (torch.long); got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != num_samples:
        raise ValueError(f"labels must have shape ({num_samples},), one class index per sample; "
                         f"got shape {tuple(labels.shape)}")
    if not torch.compiler.is_compiling() and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise ValueError(f"labels must lie in [0, {num_classes - 1}] (or be {ignore_index} to ignore a sample); "
                             f"got {value}")
    return labels


def extended_operator(phi: Tensor, operator: str = "cosine", sigmoid_k: float | Tensor | None = None) -> Tensor:
    """g~(phi): the operator g of an angle phi >= 0, extended beyond pi so that it keeps decreasing.

    Args:
        phi: angles in radians, any shape (typically m1 * theta + m2).
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of the sigmoid operators: a number > 0 or a tensor broadcastable to ``phi`` (for example
            the effective k of each sample's target class). Defaults to 0.3 for ``"sigmoid"``.

    Returns:
        A tensor shaped like ``phi``; on [0, pi] it equals g(phi).
    """
    check_operator(operator)
    if operator == "cosine":
        k = torch.floor(phi / math.pi).detach()  # piecewise constant: no gradient through the branch index
        return torch.cos(phi - k * math.pi) - 2.0 * k  # = (-1)^k cos(phi) - 2k
    if operator == "linear":
        return 1.0 - (2.0 / math.pi) * phi
    if sigmoid_k is None:
        if operator == "learnable_sigmoid":
            raise ValueError("operator 'learnable_sigmoid' needs sigmoid_k (the learned, effective k); got None")
        sigmoid_k = DEFAULT_SIGMOID_K
    return sigmoid_of_angle(phi, check_sigmoid_k(sigmoid_k))


def psi(theta: Tensor, m: float = 1.0, operator: str = "cosine", sigmoid_k: float | Tensor | None = None, *,
        m2: float = 0.0, m3: float = 0.0) -> Tensor:
    """The monotone target function psi(theta) = g~(m theta + m2) - m3 of the margin losses.

    For the cosine operator and m2 = m3 = 0 this is SphereFace's psi(theta) = (-1)^k cos(m theta) - 2k on
    [k pi / m, (k+1) pi / m]. Decreasing on [0, pi] for every operator and every real m >= 1 (see the module
    docstring); psi(theta) <= g(theta), with equality for m = 1, m2 = m3 = 0.

    Args:
        theta: angles in [0, pi] (radians), any shape.
        m: multiplicative angular margin, a real number >= 1 (not truncated to an integer).
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of the sigmoid operators, a number or a tensor broadcastable to ``theta``.
        m2: additive angular margin in radians (ArcFace), >= 0.
        m3: additive cosine margin (CosFace), >= 0.

    Returns:
        A tensor shaped like ``theta``.
    """
    check_tensor("theta", theta)
    m = check_margin(m)
    m2 = check_nonnegative("m2", m2)
    m3 = check_nonnegative("m3", m3)
    phi = theta * m + m2 if m != 1.0 else theta + m2
    out = extended_operator(phi, operator, sigmoid_k)
    return out - m3 if m3 else out


def _target_k(sigmoid_k: float | Tensor | None, index: Tensor, num_classes: int) -> float | Tensor | None:
    """The sigmoid k of each sample's target class: a per-class (C,) tensor is gathered, anything else passes."""
    if isinstance(sigmoid_k, Tensor) and sigmoid_k.dim() == 1 and sigmoid_k.numel() == num_classes > 1:
        return sigmoid_k[index]  # (N,)
    if isinstance(sigmoid_k, Tensor) and sigmoid_k.numel() == 1:
        return sigmoid_k.reshape(())
    return sigmoid_k


def _scale_tensor(scale: float | Tensor, n: int, dtype: torch.dtype) -> float | Tensor:
    if isinstance(scale, Tensor):
        if scale.dim() == 0:
            return scale.to(dtype)
        if scale.numel() != n or scale.dim() > 2 or (scale.dim() == 2 and scale.shape[1] != 1):
            raise ValueError(f"scale tensor must be 0-d, (N,) or (N, 1) with N={n}; got shape {tuple(scale.shape)}")
        return scale.to(dtype).reshape(n, 1)
    return check_positive("scale", scale)


def angular_margin_logits(cos: Tensor, labels: Tensor | None = None, *, operator: str = "cosine",
                          sigmoid_k: float | Tensor | None = None, margin: float = 1.0, m2: float = 0.0,
                          m3: float = 0.0, scale: float | Tensor = 1.0, lambda_: float | Tensor = 0.0,
                          detach_margin: bool = False, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Margin logits from cosine logits: s g(theta_j), and s (lambda g(theta_y) + psi(theta_y)) / (1 + lambda) on y.

    Composes with any head that produces cosines (insightface convention). See the module docstring for the
    formula and the presets (W-Softmax, GA-Softmax, A-Softmax, ArcFace, CosFace).

    Args:
        cos: (N, C) cosines between each sample and each class weight.
        labels: (N,) integer class indices, or None (inference: no margin at all). Rows whose label is
            ``ignore_index`` carry no margin.
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        sigmoid_k: k of the sigmoid operators: a number, or a (C,) tensor with one effective k per class.
        margin: multiplicative angular margin m1 >= 1 (GA-Softmax / A-Softmax), real-valued.
        m2: additive angular margin in radians (ArcFace), >= 0.
        m3: additive cosine margin (CosFace), >= 0.
        scale: s, a number > 0 or a (N,) / (N, 1) tensor such as the feature norms ||x|| (W-Softmax).
        lambda_: A-Softmax annealing weight >= 0 (a number or a 0-d tensor); 0 is the plain margin.
        detach_margin: add the margin as a constant: same forward value, gradient of the unmargined logits.
        ignore_index: the label value of samples without a target.

    Returns:
        (N, C) logits in float32 (float64 for float64 input), ready for
        ``F.cross_entropy(logits, labels, ignore_index=ignore_index)``.
    """
    check_tensor("cos", cos)
    if cos.dim() != 2 or not cos.is_floating_point():
        raise ValueError(f"cos must be a floating (N, num_classes) tensor; got dtype {cos.dtype}, "
                         f"shape {tuple(cos.shape)}")
    n, num_classes = cos.shape
    margin = check_margin(margin)
    m2 = check_nonnegative("m2", m2)
    m3 = check_nonnegative("m3", m3)
    if not isinstance(lambda_, Tensor):
        lambda_ = check_nonnegative("lambda_", lambda_)
    if not isinstance(detach_margin, bool):
        raise TypeError(f"detach_margin must be a bool; got {type(detach_margin).__name__} {detach_margin!r}")
    if labels is not None:
        check_labels(labels, n, num_classes, ignore_index)
    dtype = tail_dtype(cos.dtype)
    with torch.autocast(device_type=cos.device.type, enabled=False):
        c = cos.to(dtype)
        s = _scale_tensor(scale, n, dtype)
        if isinstance(sigmoid_k, Tensor):
            sigmoid_k = sigmoid_k.to(dtype)
        base = angular_activation(c, operator, sigmoid_k, dim=-1)  # (N, C) = g(theta_j)
        if labels is None or (margin == 1.0 and m2 == 0.0 and m3 == 0.0):
            return s * base
        index = labels.long().clamp(min=0)  # ignored rows read class 0, then get no margin
        g_y = base.gather(1, index[:, None]).squeeze(1)  # (N,)
        theta_y = safe_acos(c.gather(1, index[:, None]).squeeze(1))  # (N,)
        target = psi(theta_y, margin, operator, _target_k(sigmoid_k, index, num_classes), m2=m2, m3=m3)
        if isinstance(lambda_, Tensor) or lambda_ > 0:
            lam = lambda_.to(dtype) if isinstance(lambda_, Tensor) else lambda_
            # (lam g + psi) / (1 + lam), written so that a huge or infinite lam gives g instead of inf / inf
            target = g_y + (target - g_y) / (1.0 + lam)
        mask = F.one_hot(index, num_classes).bool() & (labels != ignore_index)[:, None]  # (N, C)
        out = s * torch.where(mask, target[:, None], base)
        if detach_margin:  # value of the margin logits, gradient of the plain ones (scale included)
            plain = s * base
            out = plain + (out - plain).detach()
        return out


margin_logits = angular_margin_logits  # the short name; the same function
