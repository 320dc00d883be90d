"""Residual nets: the official CIFAR SphereResNet-32 / ResNet-32 and ImageNet-style ResNet-18/34, one class.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189); official ``sphere_resnet/`` of
wy1iu/SphereNet; He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016 (arXiv 1512.03385).

- Basic post-activation ("v1") unit: conv3x3 (stride s) -> norm -> ReLU -> conv3x3 -> norm, plus the shortcut,
  then ReLU. The shortcut is the identity when the shape is kept, else a **plain** bias-free 1x1 conv (stride s)
  -> norm, also in the SphereNets (official: no SphereConv and no orthonormality on the shortcut).
- ``stem="cifar"``: 3x3 conv -> norm -> ReLU at full resolution (SphereResNet-32: widths 96 / 192 / 384, 5 units
  per stage, ~16.70 M parameters). ``stem="imagenet"``: 7x7 stride-2 conv -> norm -> ReLU -> 3x3 stride-2 max-pool.
- Global average pooling (the official 8x8 pool for 32x32 input), then the classifier ``fc``.

**torchvision-exact ResNet-18/34.** ``resnet18()`` and ``resnet34()`` are torchvision's ``resnet18`` /
``resnet34`` (``torchvision/models/resnet.py`` of pytorch/vision): the same module names (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.bn2``, ``layer2.0.downsample.0``, ``layer2.0.downsample.1``, ``fc``), the same state
dict -- every key, shape and buffer (``running_mean``, ``running_var``, ``num_batches_tracked``) in the same order,
``fc`` with its bias -- and the same function: 7x7 stride-2 stem without bias, BatchNorm eps 1e-5 and momentum 0.1,
3x3 stride-2 max-pool (padding 1), the projection shortcut conv1x1 (stride s, no bias) + BatchNorm in the first unit
of stages 2-4, global average pooling and ``fc = nn.Linear(512, num_classes)``. So a torchvision state dict loads
with ``strict=True``, and the loaded model computes torchvision's logits, in training mode too (batch statistics
and the running-statistics update)::

    model = create_model("resnet18")
    model.load_state_dict(torch.load("resnet18.pth", weights_only=True), strict=True)

Nothing in the computation differs. Two construction details do, and neither matters once a state dict is loaded:
the ReLUs are not in place (same values), and the initialization is torchsphere's for every model (convolutions and
``fc`` He-normal with fan_in, biases 0, BatchNorm 1 / 0; torchvision draws its convolutions with fan_out and keeps
``nn.Linear``'s default uniform draw for ``fc``), so that a baseline and its SphereNet start alike. Overrides leave
torchvision's layout where they must: ``num_classes``, ``in_channels`` and ``width_mult`` change shapes only,
``norm="none"`` drops the BatchNorms, ``head_bias=False`` drops ``fc.bias`` and ``head="wsoftmax"`` / ``"gasoftmax"``
replace ``fc`` by an angular head (no bias).

``sphere_resnet18`` / ``sphere_resnet34`` keep the official bias-free score layer: their key set is torchvision's
without ``fc.bias``. A torchvision state dict loads into them with ``strict=False`` (``unexpected_keys`` is exactly
``["fc.bias"]``; the SphereConv layers take the plain convolution weights as they are), or with ``strict=True`` into
``create_model("sphere_resnet18", head_bias=True)``, which has torchvision's key set exactly.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .factory import (DEFAULT_BN_MOMENTUM, OFFICIAL_BN_EPS, ClassifierNet, build_model, check_count,
                      he_normal_init, per_stage, scale_widths)
from .registry import register_model

STEMS: tuple[str, ...] = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Post-activation basic residual unit with torchvision's child names (conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[[int], nn.Module], shortcut_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.conv1 = conv_layer(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = norm_layer(out_channels)
        self.conv2 = conv_layer(out_channels, out_channels, 3, padding=1)
        self.bn2 = norm_layer(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(shortcut_layer(in_channels, out_channels, 1, stride=stride, bias=False),
                                            norm_layer(out_channels))

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H / s, W / s)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(ClassifierNet):
    """ResNet of basic units; SphereResNet when ``conv_layer`` is a SphereConv (the shortcut stays plain).

    Args:
        num_classes: outputs of the classifier.
        in_channels: input channels.
        layers_per_stage: basic units per stage, an int or one int per stage (ResNet-32: 5; ResNet-18: 2).
        widths: channels of each stage; the stem has ``widths[0]`` channels. Stage 1 keeps the resolution, every
            later stage halves it in its first unit.
        width_mult: multiplies every width (rounded, at least 1).
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7 stride-2 conv and 3x3 stride-2 max-pool).
        conv_layer: type of the stem and the 3x3 convolutions, ``nn.Conv2d``-like (e.g. ``SphereConv2d``).
        norm_layer: ``(num_features) -> module`` after each convolution.
        head_layer: ``(in_features, num_classes) -> module``, the classifier ``fc``.
        shortcut_layer: type of the 1x1 projection shortcuts (official: a plain ``nn.Conv2d``), built bias-free.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, layers_per_stage: int | Sequence[int] = 5,
                 widths: Sequence[int] = (96, 192, 384), width_mult: float = 1.0, stem: str = "cifar",
                 conv_layer: Callable[..., nn.Module] = partial(nn.Conv2d, bias=False),
                 norm_layer: Callable[[int], nn.Module] = partial(nn.BatchNorm2d, eps=OFFICIAL_BN_EPS,
                                                                  momentum=DEFAULT_BN_MOMENTUM),
                 head_layer: Callable[[int, int], nn.Module] = partial(nn.Linear, bias=False),
                 shortcut_layer: Callable[..., nn.Module] = nn.Conv2d) -> None:
        super().__init__(head_layer)
        widths = scale_widths(widths, width_mult)
        depths = per_stage("layers_per_stage", layers_per_stage, len(widths))
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose from {list(STEMS)}")
        in_channels = check_count("in_channels", in_channels)
        if stem == "cifar":
            self.conv1 = conv_layer(in_channels, widths[0], 3, padding=1)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = conv_layer(in_channels, widths[0], 7, stride=2, padding=3)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = norm_layer(widths[0])
        self.relu = nn.ReLU()
        self.num_stages = len(widths)
        channels = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            units = [BasicBlock(channels if j == 0 else width, width, 2 if (i > 0 and j == 0) else 1, conv_layer,
                                norm_layer, shortcut_layer) for j in range(depth)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
            channels = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = channels
        self.reset_classifier(check_count("num_classes", num_classes))
        he_normal_init(self)

    def stages(self) -> list[nn.Module]:
        """The residual stages ``layer1``, ``layer2``, ... in order."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_features(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, widths[-1])
        if x.dim() != 4:
            raise ValueError(f"ResNet expects input (N, C, H, W); got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return torch.flatten(self.avgpool(x), 1)  # (N, C)


def _resnet(name: str, arch: dict, overrides: dict) -> ResNet:
    return build_model(ResNet, name, arch, overrides)  # type: ignore[return-value]


def _torchvision_fc(overrides: dict) -> dict:
    """torchvision's classifier has a bias; an angular head chosen by the user has none (and ``head_bias=True``
    beside it is an error, raised by the layer config)."""
    return {"head_bias": True} if overrides.get("head", "softmax") == "softmax" else {}


_CIFAR32 = dict(layers_per_stage=5, widths=(96, 192, 384), stem="cifar", num_classes=10)
# ImageNet-style entries use torchvision's BatchNorm settings (eps 1e-5, momentum 0.1); override to taste
_IMAGENET = dict(widths=(64, 128, 256, 512), stem="imagenet", num_classes=1000, bn_eps=1e-5, bn_momentum=0.1)


@register_model
def sphere_resnet32(**kwargs) -> ResNet:
    """Official CIFAR SphereResNet-32: linear SphereConv, widths 96/192/384, 5 units per stage."""
    return _resnet("sphere_resnet32", dict(_CIFAR32, operator="linear"), kwargs)


@register_model
def resnet32(**kwargs) -> ResNet:
    """Official CIFAR ResNet-32 baseline (96/192/384 wide): SphereResNet-32 with plain convolutions."""
    return _resnet("resnet32", dict(_CIFAR32, operator="conv"), kwargs)


@register_model
def sphere_resnet18(**kwargs) -> ResNet:
    """ImageNet-style SphereResNet-18 (torchvision layout), linear SphereConv as the official SphereResNet; the
    official bias-free score layer (torchvision's key set without ``fc.bias``)."""
    return _resnet("sphere_resnet18", dict(_IMAGENET, layers_per_stage=(2, 2, 2, 2), operator="linear"), kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    """torchvision's ResNet-18: its state dict loads with ``strict=True`` (``fc`` has a bias; see the module notes)."""
    arch = dict(_IMAGENET, layers_per_stage=(2, 2, 2, 2), operator="conv", **_torchvision_fc(kwargs))
    return _resnet("resnet18", arch, kwargs)


@register_model
def sphere_resnet34(**kwargs) -> ResNet:
    """ImageNet-style SphereResNet-34 (torchvision layout), linear SphereConv; the official bias-free score layer
    (torchvision's key set without ``fc.bias``)."""
    return _resnet("sphere_resnet34", dict(_IMAGENET, layers_per_stage=(3, 4, 6, 3), operator="linear"), kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """torchvision's ResNet-34: its state dict loads with ``strict=True`` (``fc`` has a bias; see the module notes)."""
    arch = dict(_IMAGENET, layers_per_stage=(3, 4, 6, 3), operator="conv", **_torchvision_fc(kwargs))
    return _resnet("resnet34", arch, kwargs)
