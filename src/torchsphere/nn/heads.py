"""Angular classifier heads: W-Softmax, GA-Softmax, A-Softmax (with lambda annealing), ArcFace and CosFace.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189) for W-Softmax and GA-Softmax; Liu et al.,
*SphereFace*, CVPR 2017 (arXiv 1704.08063) for A-Softmax and its lambda annealing; Deng et al., *ArcFace*, CVPR 2019
(arXiv 1801.07698); Wang et al., *CosFace*, CVPR 2018 (arXiv 1801.09414). The formulas live in
:mod:`torchsphere.functional.margins`; this module holds the parameters.

The head is part of the model: ``logits = model(x, labels)`` and ``loss = F.cross_entropy(logits, labels,
ignore_index=-1)``. The margin is applied only when labels are given, so inference calls ``model(x)``.

Gradient convention: autograd through the normalizations (the weight and the feature are normalized functionally in
``forward``; no in-place renormalization of the weight), not the projected gradient of the Caffe SphereFace code.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional._checks import check_positive, check_tensor
from ..functional.conv import tail_dtype
from ..functional.margins import IGNORE_INDEX, angular_margin_logits, check_margin, check_nonnegative
from ..functional.norms import filter_norm_safe, safe_norm
from .sphere_conv import _SphereMixin


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


class AngularHead(_SphereMixin, nn.Module):
    """Classifier head returning angular logits s * g(theta_j), with a margin on the target class whenever labels
    are passed (in train and eval mode alike: ``head(x, y)`` applies it, ``head(x)`` does not -- so validation
    logits and losses should be computed without labels).

    For each class j, theta_j is the angle between the feature x and the class weight W_j, g the sphere operator
    and s = ||x|| (``scale=None``: the weight-normalized softmax keeps the feature norm) or a fixed ``scale``. With
    labels, the target logit becomes s * (lambda g(theta_y) + psi(theta_y)) / (1 + lambda), psi(theta) =
    g~(m theta + m2) - m3 (see :func:`torchsphere.functional.psi`):

    - ``margin=1`` (default): W-Softmax; ``margin > 1``: GA-Softmax; cosine with integer m: A-Softmax (SphereFace).
    - ``m2`` (radians) / ``m3``: ArcFace / CosFace additive margins, usually with a fixed ``scale`` (presets
      :meth:`sphereface`, :meth:`arcface`, :meth:`cosface`).

    Norms, cosines, acos and margins are computed in float32 (float64 stays float64) with autocast disabled, and the
    logits are returned in that dtype. The norms are overflow-safe (:func:`torchsphere.functional.norms.safe_norm`:
    a plain ``x.square().sum()`` overflows float32 for features of magnitude ~1e19), so logits and gradients stay
    finite and match float64 for feature magnitudes from 0 to 1e30 (tested). ``lambda_`` (A-Softmax annealing) is set
    explicitly by the training loop, typically from a :class:`LambdaSchedule`; there is no hidden step counter. It
    lives in a non-persistent buffer, so changing it neither enters the ``state_dict`` nor retriggers
    ``torch.compile``.

    Args:
        in_features: feature size D.
        num_classes: number of classes C >= 2; ``weight`` has shape (C, D), as ``nn.Linear`` (no bias).
        operator: ``"linear"``, ``"cosine"`` (default), ``"sigmoid"`` or ``"learnable_sigmoid"`` (one learned k per
            class in ``sigmoid_k_raw``, effective k = |k_raw| + 0.05, as :class:`~torchsphere.nn.SphereLinear`).
        margin: multiplicative angular margin m >= 1 on the target angle (real-valued, not truncated).
        m2: additive angular margin in radians (ArcFace), >= 0.
        m3: additive cosine margin (CosFace), >= 0.
        scale: None for s = ||x|| (computed as sqrt(||x||^2 + eps), so zero features give zero logits), or s > 0.
        sigmoid_k: k of ``"sigmoid"`` (default 0.3) or the initial effective k of ``"learnable_sigmoid"``
            (default 0.75, the official k_raw = 0.7).
        eps: added to the squared norms of x and of each W_j before the square root.
        detach_margin: OpenSphere's stable recipe: the margin changes the forward value only, the gradient is that of
            the unmargined logits (an annealing-free alternative to ``lambda_``).
        lambda_: initial A-Softmax annealing weight >= 0 (0: the plain margin).
        device, dtype: factory arguments of the parameters.
    """

    def __init__(self, in_features: int, num_classes: int, *, operator: str = "cosine", margin: float = 1.0,
                 m2: float = 0.0, m3: float = 0.0, scale: float | None = None, sigmoid_k: float | None = None,
                 eps: float = 1e-4, detach_margin: bool = False, lambda_: float = 0.0, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = _check_int("in_features", in_features, 1)
        self.num_classes = _check_int("num_classes", num_classes, 2)
        self.margin = check_margin(margin)
        self.m2 = check_nonnegative("m2", m2)
        self.m3 = check_nonnegative("m3", m3)
        self.scale = None if scale is None else check_positive("scale", scale)
        if not isinstance(detach_margin, bool):
            raise TypeError(f"detach_margin must be a bool; got {type(detach_margin).__name__} {detach_margin!r}")
        self.detach_margin = detach_margin
        self.weight = nn.Parameter(torch.empty((num_classes, in_features), **factory))
        self._init_sphere(operator, sigmoid_k, eps, num_classes, factory)
        self.register_buffer("_lambda", torch.zeros((), device=device, dtype=torch.float32), persistent=False)
        self.set_lambda(lambda_)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initializes ``weight`` as ``nn.Linear`` does (Kaiming uniform, a = sqrt(5)); the scale is irrelevant."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @classmethod
    def sphereface(cls, in_features: int, num_classes: int, margin: float = 4.0, **kwargs) -> AngularHead:
        """A-Softmax: cosine operator, multiplicative margin m (4 for faces), s = ||x||; pair with ``set_lambda``."""
        return cls(in_features, num_classes, operator="cosine", margin=margin, **kwargs)

    @classmethod
    def arcface(cls, in_features: int, num_classes: int, margin: float = 0.5, scale: float = 64.0,
                **kwargs) -> AngularHead:
        """ArcFace: s * cos(theta_y + margin), margin in radians (0.5 rad = 28.6 degrees), fixed scale."""
        return cls(in_features, num_classes, operator="cosine", m2=margin, scale=scale, **kwargs)

    @classmethod
    def cosface(cls, in_features: int, num_classes: int, margin: float = 0.35, scale: float = 64.0,
                **kwargs) -> AngularHead:
        """CosFace / AM-Softmax: s * (cos theta_y - margin), fixed scale."""
        return cls(in_features, num_classes, operator="cosine", m3=margin, scale=scale, **kwargs)

    @property
    def lambda_(self) -> float:
        """The A-Softmax annealing weight used for the next forward with labels."""
        return float(self._lambda)

    @lambda_.setter
    def lambda_(self, value: float | Tensor) -> None:
        self.set_lambda(value)

    def set_lambda(self, value: float | Tensor) -> None:
        """Sets the A-Softmax annealing weight lambda >= 0 (target logit (lambda s g + s psi) / (1 + lambda))."""
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"lambda_ must be a number or a one-element tensor; got shape {tuple(value.shape)}")
            value = value.item()
        value = check_nonnegative("lambda_", value)
        with torch.no_grad():
            self._lambda.fill_(value)

    def cosine(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """cos theta_j and sqrt(||x||^2 + eps) in the tail dtype: (N, C) and (N, 1). Call with autocast disabled."""
        dtype = tail_dtype(torch.promote_types(x.dtype, self.weight.dtype))
        x, w = x.to(dtype), self.weight.to(dtype)
        x_norm = safe_norm(x, 1, self.eps, keepdim=True)  # (N, 1), no overflow of x^2 (functional.norms)
        return F.linear(x, w) / filter_norm_safe(w, self.eps) / x_norm, x_norm  # (N, C), (N, 1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:  # (N, D), (N,) -> (N, C)
        check_tensor("x", x)
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"x must have shape (N, {self.in_features}); got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            cos, x_norm = self.cosine(x)
            k = self.effective_k() if self.operator in ("sigmoid", "learnable_sigmoid") else None
            return angular_margin_logits(
                cos, labels, operator=self.operator, sigmoid_k=k, margin=self.margin, m2=self.m2, m3=self.m3,
                scale=x_norm if self.scale is None else self.scale, lambda_=self._lambda,
                detach_margin=self.detach_margin)

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, num_classes={self.num_classes}, margin={self.margin}"
        if self.m2:
            s += f", m2={self.m2}"
        if self.m3:
            s += f", m3={self.m3}"
        s += f", scale={self.scale}"
        if self.detach_margin:
            s += ", detach_margin=True"
        return s + self._sphere_repr()


class GASoftmaxLoss(nn.Module):
    """GA-Softmax as a loss object that owns its :class:`AngularHead` (for pytorch-metric-learning-style code).

    ``loss = criterion(embeddings, labels)`` equals ``F.cross_entropy(head(embeddings, labels), labels,
    ignore_index=-1)``; ``get_logits(embeddings)`` gives margin-free logits for inference.

    Trade-off: the recommended place for the head is **inside the model** (``model(x, labels)`` returns logits), so
    that one optimizer, one ``state_dict`` and one DDP wrapper cover the class weights. A loss that owns parameters
    must itself be given to the optimizer (``list(model.parameters()) + list(criterion.parameters())``), saved and
    loaded beside the model, and wrapped in DDP separately or its weights drift apart across ranks (PML issues #710,
    #306). Use this class when the embedding network must stay classifier-free (metric learning, retrieval).

    Args:
        in_features: embedding size D.
        num_classes: number of classes C >= 2.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``, as ``F.cross_entropy``.
        label_smoothing: as ``F.cross_entropy`` (the official SphereNet uses 0.01).
        **head_options: keyword arguments of :class:`AngularHead` (``operator``, ``margin``, ``m2``, ``m3``,
            ``scale``, ``sigmoid_k``, ``eps``, ``detach_margin``, ``lambda_``, ``device``, ``dtype``); unknown names
            raise ``TypeError``.
    """

    def __init__(self, in_features: int, num_classes: int, *, reduction: str = "mean", label_smoothing: float = 0.0,
                 **head_options) -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")
        label_smoothing = check_nonnegative("label_smoothing", label_smoothing)
        if label_smoothing > 1:
            raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing!r}")
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.head = AngularHead(in_features, num_classes, **head_options)

    @property
    def weight(self) -> Tensor:
        """The class weights (C, D) of the owned head."""
        return self.head.weight

    def set_lambda(self, value: float | Tensor) -> None:
        """Sets the head's A-Softmax annealing weight."""
        self.head.set_lambda(value)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """Margin-free logits (N, C) for inference."""
        return self.head(embeddings)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if labels is None:
            raise ValueError("GASoftmaxLoss needs labels; use get_logits(embeddings) for inference")
        logits = self.head(embeddings, labels)  # (N, C), labels checked here
        return F.cross_entropy(logits, labels.long(), ignore_index=IGNORE_INDEX, reduction=self.reduction,
                               label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"


class LambdaSchedule:
    """A-Softmax annealing: lambda(it) = max(lambda_min, base * (1 + gamma * it)^(-power)).

    wy1iu/sphereface ``MarginInnerProduct`` (defaults base 1000, gamma 0.12, power 1, lambda_min 5). The training loop
    steps it explicitly and hands the value to the head; it is checkpointable through ``state_dict`` (plain numbers,
    safe for ``torch.load(weights_only=True)``)::

        schedule = LambdaSchedule()
        for x, y in loader:
            head.set_lambda(schedule.value)   # or model.head.lambda_ = schedule.value
            loss = F.cross_entropy(model(x, y), y, ignore_index=-1)
            ...
            schedule.step()

    Args:
        base, gamma, power, lambda_min: the formula's constants, all >= 0.
        iteration: the starting iteration (0 for a fresh run).
    """

    def __init__(self, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0, lambda_min: float = 5.0,
                 iteration: int = 0) -> None:
        self.base = check_nonnegative("base", base)
        self.gamma = check_nonnegative("gamma", gamma)
        self.power = check_nonnegative("power", power)
        self.lambda_min = check_nonnegative("lambda_min", lambda_min)
        self.iteration = _check_int("iteration", iteration, 0)

    def __call__(self, iteration: int | None = None) -> float:
        """lambda at ``iteration`` (default: the current iteration); does not step."""
        it = self.iteration if iteration is None else _check_int("iteration", iteration, 0)
        return max(self.lambda_min, self.base * (1.0 + self.gamma * it) ** (-self.power))

    @property
    def value(self) -> float:
        """lambda at the current iteration."""
        return self()

    def step(self) -> float:
        """Advances one iteration and returns the new lambda."""
        self.iteration += 1
        return self.value

    def state_dict(self) -> dict[str, float | int]:
        return {"base": self.base, "gamma": self.gamma, "power": self.power, "lambda_min": self.lambda_min,
                "iteration": self.iteration}

    def load_state_dict(self, state_dict: dict[str, float | int]) -> None:
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            raise ValueError(f"LambdaSchedule state_dict must have keys {sorted(expected)}; got {sorted(state_dict)}")
        self.__init__(**state_dict)

    def __repr__(self) -> str:
        return (f"LambdaSchedule(base={self.base}, gamma={self.gamma}, power={self.power}, "
                f"lambda_min={self.lambda_min}, iteration={self.iteration})")
