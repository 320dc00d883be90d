"""How the choice strings of a model (operator, norm, head) become layer types, and the shared model builder.

The architectures (:class:`~torchsphere.models.PlainNet`, :class:`~torchsphere.models.ResNet`) take layer *types*
(``conv_layer``, ``norm_layer``, ``head_layer``); this module maps the closed vocabularies below onto them, so a
SphereNet and its CNN baseline differ by one string (closed string choices mapped onto injected layer types, as
timm's layer factories do).

- operator: ``"conv"`` (a plain bias-free ``nn.Conv2d``, the CNN baseline) or a SphereConv operator ``"linear"``,
  ``"cosine"``, ``"sigmoid"``, ``"learnable_sigmoid"`` (Liu et al., *Deep Hyperspherical Learning*, NIPS 2017,
  arXiv 1711.03189).
- norm: ``"bn"`` (BatchNorm, official eps 1e-3), ``"spherenorm"`` (the convolutions become
  :class:`torchsphere.nn.SphereNorm2d`, no BatchNorm), ``"spherenorm+bn"`` (both), ``"gn"`` (GroupNorm, Wu & He,
  *Group Normalization*, ECCV 2018, arXiv 1803.08494: ``GN_GROUPS`` = 8 groups of channels per layer, PyTorch's eps
  1e-5, learnable per-channel gamma / beta; no batch statistics, the usual small-batch alternative to BatchNorm) or
  ``"none"``.
- bn_stats: how BatchNorm keeps its test-time statistics. ``"torch"`` (``nn.BatchNorm2d``: running_mean 0,
  running_var 1, EMA of the unbiased batch variance; default momentum 0.1, PyTorch's) or ``"official"``
  (:class:`torchsphere.nn.OfficialBatchNorm2d`: the official code's zero-started EMA shadows of the biased batch
  moments, default decay 0.999, i.e. momentum 0.001). The official momentum 0.001 with PyTorch's statistics leaves
  the running variance far too large for thousands of steps (a SphereConv output has a variance far below the
  initial 1), so neither official value is the default.
- head: ``"softmax"`` (a plain ``nn.Linear``, bias-free by default: the official score layer), ``"wsoftmax"``
  (weight-normalized softmax: :class:`torchsphere.nn.AngularHead` with margin 1) or ``"gasoftmax"`` (generalized
  angular softmax: an AngularHead with a margin > 1, which must be given).
- head_bias: ``True`` gives the ``"softmax"`` classifier a bias (torchvision's ``fc``; the registry's ``resnet18`` /
  ``resnet34`` default to it). The angular heads compare directions and have no bias.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Callable

from torch import nn

from ..functional._checks import OPERATORS, check_bool, check_choice, check_operator
from ..nn.heads import AngularHead
from ..nn.official_bn import OfficialBatchNorm2d
from ..nn.sphere_conv import SphereConv2d
from ..nn.sphere_norm import SphereNorm2d

CONV_CHOICES: tuple[str, ...] = ("conv", *OPERATORS)
NORMS: tuple[str, ...] = ("bn", "spherenorm", "spherenorm+bn", "gn", "none")
# GroupNorm: 8 groups (Wu & He 2018, Table 3: G = 8 ... 32 are within 0.5% top-1 of each other on ImageNet). 8 divides
# the stage widths of the plain nets (128/192/256) at width_mult 1/8 (16/24/32), 1/4 (32/48/64) and above, not at
# 1/16 (8/12/16), and those of the CIFAR ResNets (96/192/384) at 1/12 and above, not at 1/8 (12/24/48); a width it
# does not divide is an error naming it, never a silently different group count.
GN_GROUPS = 8
GN_EPS = 1e-5  # PyTorch's and Wu & He's
HEADS: tuple[str, ...] = ("softmax", "wsoftmax", "gasoftmax")
OFFICIAL_BN_EPS = 1e-3  # wy1iu/SphereNet custom BN
OFFICIAL_BN_MOMENTUM = 1e-3  # PyTorch momentum of the official EMA decay 0.999
DEFAULT_BN_MOMENTUM = 0.1  # PyTorch's default: statistics of the last few dozen batches
BN_STATS: tuple[str, ...] = ("torch", "official")
# bn_momentum=None resolves to the default of the statistics mode
BN_MOMENTUM_DEFAULTS: dict[str, float] = {"torch": DEFAULT_BN_MOMENTUM, "official": OFFICIAL_BN_MOMENTUM}

# arguments of the architecture classes that are layer types: filled from a LayerConfig (or left at the class
# default, such as ResNet's plain shortcut), never registry overrides and never part of ``default_cfg``
LAYER_TYPE_SUFFIX = "_layer"


def _optional_positive(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number or None; got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


@dataclass(frozen=True)
class LayerConfig:
    """The layer choices of a model, validated on construction.

    Attributes:
        operator: ``"conv"`` for the CNN baseline, else the SphereConv operator of every sphere convolution.
        sigmoid_k: k of ``"sigmoid"`` / initial k of ``"learnable_sigmoid"`` (None: the layer default, 0.3 / 0.75).
        norm: ``"bn"``, ``"spherenorm"``, ``"spherenorm+bn"``, ``"gn"`` (GroupNorm, ``GN_GROUPS`` groups) or
            ``"none"``.
        bn_eps: BatchNorm eps (official 1e-3).
        bn_stats: ``"torch"`` (``nn.BatchNorm2d``) or ``"official"`` (:class:`~torchsphere.nn.OfficialBatchNorm2d`).
        bn_momentum: BatchNorm momentum in PyTorch's convention (1 - decay); None: 0.1 for ``"torch"``, the official
            0.001 (decay 0.999) for ``"official"``.
        head: ``"softmax"``, ``"wsoftmax"`` or ``"gasoftmax"``.
        head_operator: operator of an angular head (None: ``"cosine"``); not allowed with ``"softmax"``.
        margin: angular margin m of ``"gasoftmax"`` (required, > 1); None or 1 for ``"wsoftmax"``.
        head_scale: fixed logit scale s of an angular head (None: s = |x|); not allowed with ``"softmax"``.
        detach_margin: the angular head's margin changes the forward value only (OpenSphere's annealing-free
            recipe, :class:`~torchsphere.nn.AngularHead`); needs ``"gasoftmax"``.
        head_bias: whether the ``"softmax"`` classifier has a bias (default False, the official bias-free score
            layer; True for torchvision's ``fc``); not allowed with the angular heads.
    """

    operator: str = "cosine"
    sigmoid_k: float | None = None
    norm: str = "bn"
    bn_eps: float = OFFICIAL_BN_EPS
    bn_stats: str = "torch"
    bn_momentum: float | None = None
    head: str = "softmax"
    head_operator: str | None = None
    margin: float | None = None
    head_scale: float | None = None
    detach_margin: bool = False
    head_bias: bool = False

    def __post_init__(self) -> None:
        check_choice("operator", self.operator, CONV_CHOICES)
        check_choice("norm", self.norm, NORMS)
        check_choice("head", self.head, HEADS)
        _optional_positive("sigmoid_k", self.sigmoid_k)
        if self.sigmoid_k is not None and self.operator not in ("sigmoid", "learnable_sigmoid"):
            raise ValueError(f"sigmoid_k applies only to operator 'sigmoid' or 'learnable_sigmoid'; got "
                             f"sigmoid_k={self.sigmoid_k!r} with operator={self.operator!r}")
        if self.norm.startswith("spherenorm") and self.operator == "conv":
            raise ValueError(f"norm={self.norm!r} turns the convolutions into SphereNorm2d and needs a sphere "
                             f"operator {list(OPERATORS)}; got operator='conv'")
        _optional_positive("bn_eps", self.bn_eps)
        check_choice("bn_stats", self.bn_stats, BN_STATS)
        _optional_positive("bn_momentum", self.bn_momentum)
        if self.bn_momentum is not None and self.bn_momentum > 1:
            raise ValueError(f"bn_momentum must be in (0, 1]; got {self.bn_momentum!r}")
        if self.bn_eps is None:
            raise ValueError("bn_eps must be a number > 0; got None")
        self._check_head()

    def _check_head(self) -> None:
        check_bool("head_bias", self.head_bias)
        check_bool("detach_margin", self.detach_margin)
        if self.detach_margin and self.head != "gasoftmax":
            raise ValueError(f"detach_margin applies only to head='gasoftmax' (a margin to detach); got "
                             f"detach_margin=True with head={self.head!r}")
        if self.head_bias and self.head != "softmax":
            raise ValueError(f"head_bias applies only to head='softmax' (a linear classifier); the angular head "
                             f"{self.head!r} has no bias; got head_bias=True with head={self.head!r}")
        if self.head == "softmax":
            for key in ("head_operator", "margin", "head_scale"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies only to the angular heads 'wsoftmax' and 'gasoftmax'; got "
                                     f"{key}={getattr(self, key)!r} with head='softmax'")
            return
        if self.head_operator is not None:
            check_operator(self.head_operator)
        _optional_positive("head_scale", self.head_scale)
        _optional_positive("margin", self.margin)
        if self.head == "wsoftmax" and self.margin not in (None, 1, 1.0):
            raise ValueError(f"head='wsoftmax' has margin 1; got margin={self.margin!r} (use head='gasoftmax')")
        if self.head == "gasoftmax" and (self.margin is None or self.margin <= 1):
            raise ValueError(f"head='gasoftmax' needs a margin > 1 (e.g. margin=4, SphereFace's A-Softmax); "
                             f"got margin={self.margin!r}")

    def conv_layer(self) -> Callable[..., nn.Module]:
        """A callable with ``nn.Conv2d``'s signature building the model's (sphere) convolutions, bias-free."""
        if self.operator == "conv":
            return partial(nn.Conv2d, bias=False)
        if self.norm.startswith("spherenorm"):
            return partial(SphereNorm2d, operator=self.operator, sigmoid_k=self.sigmoid_k)
        # the architectures apply no in-place op to a convolution's output, so the layers may save their output
        # (no full-size saved tensor beyond the CNN's when BatchNorm or ReLU follows; docs/benchmarks.md)
        return partial(SphereConv2d, operator=self.operator, sigmoid_k=self.sigmoid_k, memory_efficient=True)

    def norm_layer(self) -> Callable[[int], nn.Module]:
        """A callable ``(num_features) -> module`` for the normalization after each convolution."""
        if self.norm in ("bn", "spherenorm+bn"):
            bn = OfficialBatchNorm2d if self.bn_stats == "official" else nn.BatchNorm2d
            return partial(bn, eps=self.bn_eps, momentum=self.resolved_bn_momentum)
        if self.norm == "gn":
            return group_norm
        return nn.Identity  # accepts and ignores num_features

    @property
    def resolved_bn_momentum(self) -> float:
        """``bn_momentum``, or the default of the ``bn_stats`` mode when it is None."""
        return BN_MOMENTUM_DEFAULTS[self.bn_stats] if self.bn_momentum is None else float(self.bn_momentum)

    def head_layer(self) -> Callable[[int, int], nn.Module]:
        """A callable ``(in_features, num_classes) -> module`` for the classifier."""
        if self.head == "softmax":
            return partial(nn.Linear, bias=self.head_bias)
        margin = 1.0 if self.head == "wsoftmax" else float(self.margin)
        return partial(AngularHead, operator=self.head_operator or "cosine", margin=margin, scale=self.head_scale,
                       detach_margin=self.detach_margin)


def group_norm(num_channels: int, num_groups: int = GN_GROUPS) -> nn.GroupNorm:
    """``nn.GroupNorm(num_groups, num_channels, eps=GN_EPS)``, the ``norm="gn"`` layer (Wu & He, ECCV 2018).

    Raises:
        ValueError: if ``num_groups`` does not divide ``num_channels``, naming both and the nearest widths that work.
    """
    num_channels = check_count("num_channels", num_channels)
    num_groups = check_count("num_groups", num_groups)
    if num_channels % num_groups:
        low = max(num_groups, num_channels - num_channels % num_groups)
        raise ValueError(f"norm='gn' splits each layer's channels into {num_groups} groups; a layer has "
                         f"{num_channels} channels, which {num_groups} does not divide (e.g. {low} or "
                         f"{low + num_groups} would). Choose widths / width_mult whose stage widths are multiples "
                         f"of {num_groups}")
    return nn.GroupNorm(num_groups, num_channels, eps=GN_EPS)


LAYER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LayerConfig))


def build_model(cls: type[nn.Module], name: str, arch: dict[str, Any], overrides: dict[str, Any]) -> nn.Module:
    """Builds ``cls`` from a registry entry's architecture arguments merged with user overrides.

    Overrides win over ``arch``. Keys of :class:`LayerConfig` become layer types; every other key must be an
    argument of ``cls`` other than the layer types.

    Args:
        cls: the architecture class (``PlainNet`` or ``ResNet``).
        name: the registry name, recorded in ``model.default_cfg["architecture"]``.
        arch: the entry's defaults.
        overrides: the user's keyword arguments.

    Returns:
        The model with ``model.default_cfg``: the architecture name, every architecture argument (defaults
        included) and every layer choice.

    Raises:
        TypeError: for overrides that neither ``cls`` nor :class:`LayerConfig` accepts, named in the message.
    """
    signature = inspect.signature(cls)
    arch_names = [p for p in signature.parameters if not p.endswith(LAYER_TYPE_SUFFIX)]
    allowed = set(arch_names) | set(LAYER_FIELDS)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise TypeError(f"{name}: unexpected keyword argument(s) {unknown}; accepted: {sorted(allowed)}")
    _check_family(name, signature, arch, overrides)
    merged = {**arch, **overrides}
    layers = LayerConfig(**{k: merged.pop(k) for k in LAYER_FIELDS if k in merged})
    model = cls(**merged, conv_layer=layers.conv_layer(), norm_layer=layers.norm_layer(),
                head_layer=layers.head_layer())
    bound = signature.bind_partial(**merged)
    bound.apply_defaults()
    arch_cfg = {k: v for k, v in bound.arguments.items() if k in arch_names}
    model.default_cfg = {"architecture": name, **arch_cfg, **asdict(layers)}
    return model


def _check_family(name: str, signature: inspect.Signature, arch: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Overrides that would silently turn a registry entry into another model are errors.

    - ``operator`` may not turn a plain entry (``cnn9``, ``resnet32``: operator ``"conv"``) into a SphereNet, nor a
      sphere entry into a plain CNN: a baseline must stay a baseline, so that a comparison compares what it names.
    - ``widths`` with another number of stages than the entry's, without ``layers_per_stage``, would build a net of
      another depth under the same name (a 2-stage "spherenet9").
    """
    base = arch.get("operator", "cosine")
    wanted = overrides.get("operator")
    if wanted is not None and isinstance(wanted, str) and (base == "conv") != (wanted == "conv"):
        if base == "conv":
            raise ValueError(f"{name} is a plain CNN baseline (operator 'conv'); operator={wanted!r} would turn it "
                             f"into a SphereNet while it is still called {name!r}. Use the sphere model of the "
                             f"family (e.g. spherenet9, sphere_resnet32) for SphereConv layers")
        raise ValueError(f"{name} is a sphere model; operator='conv' would turn it into a plain CNN while it is "
                         f"still called {name!r}. Use the plain model of the family (e.g. cnn9, resnet32)")
    if "widths" in overrides and "layers_per_stage" not in overrides and "widths" in signature.parameters:
        default = arch.get("widths", signature.parameters["widths"].default)
        widths = overrides["widths"]
        if not isinstance(widths, numbers.Integral) and hasattr(widths, "__len__") and len(widths) and \
                default is not inspect.Parameter.empty and len(tuple(widths)) != len(tuple(default)):
            raise ValueError(f"{name} has {len(tuple(default))} stages; widths needs {len(tuple(default))} entries, "
                             f"got {tuple(widths)!r}. For a net with {len(tuple(widths))} stages give "
                             f"layers_per_stage too")


def check_count(name: str, value: object, minimum: int = 1) -> int:
    """Returns ``value`` if it is an int >= ``minimum``, else raises naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return int(value)


def per_stage(name: str, value: object, num_stages: int) -> tuple[int, ...]:
    """An int (the same for every stage) or a sequence of ``num_stages`` ints >= 1, as a tuple."""
    values = (value,) * num_stages if isinstance(value, numbers.Integral) else tuple(value)
    if len(values) != num_stages:
        raise ValueError(f"{name} needs one entry per stage ({num_stages}); got {value!r}")
    return tuple(check_count(name, v) for v in values)


def scale_widths(widths: object, width_mult: float) -> tuple[int, ...]:
    """round(w * width_mult) per stage, at least 1 channel."""
    if isinstance(widths, numbers.Integral) or not len(tuple(widths)):
        raise ValueError(f"widths must be a non-empty sequence of ints; got {widths!r}")
    widths = tuple(check_count("widths", w) for w in widths)
    _optional_positive("width_mult", width_mult)
    if width_mult is None:
        raise ValueError("width_mult must be a number > 0; got None")
    return tuple(max(1, round(w * width_mult)) for w in widths)


def he_normal_init(model: nn.Module) -> None:
    """The official initialization (wy1iu/SphereNet): every conv / fc / score weight from N(0, 2 / fan_in)
    (He et al., 2015; not truncated), biases 0, BatchNorm gamma 1 and beta 0.

    Angular heads whose ``weight`` is (num_classes, in_features) get the same normal draw; other parameters
    (learnable sigmoid k, SphereNorm scale/shift/rho) keep their layers' own initialization.
    """
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, nn.modules.batchnorm._NormBase):
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or (
                isinstance(weight, nn.Parameter) and weight.dim() == 2 and _takes_labels(m)):
            nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")  # std = sqrt(2 / fan_in)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)


def _takes_labels(head: nn.Module) -> bool:
    """True if ``head.forward`` accepts ``labels`` (an angular head applying a margin in training)."""
    try:
        return "labels" in inspect.signature(head.forward).parameters
    except (TypeError, ValueError):
        return False


class ClassifierNet(nn.Module):
    """The interface shared by the model families: features -> head, with a replaceable classifier ``fc``.

    Subclasses build their trunk, define ``forward_features(x) -> (N, num_features)``, set ``num_features`` and
    call :meth:`reset_classifier`. ``forward(x, labels)`` = ``forward_head(forward_features(x), labels)``.
    """

    num_features: int
    num_classes: int

    def __init__(self, head_layer: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        self.head_layer = head_layer
        self._head_takes_labels = False

    def forward_head(self, features, labels=None):
        """Logits (N, num_classes). ``labels`` (N,) reach an angular head (the margin); a plain linear head
        ignores them."""
        if self._head_takes_labels:
            return self.fc(features, labels)
        return self.fc(features)

    def forward(self, x, labels=None):  # (N, C, H, W), (N,) -> (N, num_classes)
        return self.forward_head(self.forward_features(x), labels)

    def get_classifier(self) -> nn.Module:
        """The classifier layer ``fc``."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier by a freshly initialized one of the same kind with ``num_classes`` outputs."""
        self.num_classes = check_count("num_classes", num_classes)
        ref = next((p for p in self.parameters()), None)
        fc = self.head_layer(self.num_features, self.num_classes)
        if ref is not None:
            fc = fc.to(device=ref.device, dtype=ref.dtype)
        he_normal_init(fc)
        self.fc = fc
        self._head_takes_labels = _takes_labels(fc)
        if hasattr(self, "default_cfg"):
            self.default_cfg["num_classes"] = self.num_classes
