"""Plain (non-residual) nets: the paper's SphereNet-N and its CNN-N baseline in one class.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189); official SphereNet-9 / CNN-9 of
wy1iu/SphereNet (``spherenet.py``, ``baseline/baseline_cnn.py``):

    3 stages x [3x3 conv -> norm -> ReLU] x n, 2x2 max-pool after each stage (widths 128 / 192 / 256)
    -> fc6: a conv whose kernel covers the remaining map (4x4 for 32x32 input, 3x3 for 28x28), 256 outputs,
       no ReLU, no BatchNorm by default (the official HEAD; ``fc_norm=True`` is the logged 2018-03 commit)
    -> classifier ``fc`` (the official bias-free 1x1 "score" conv = a bias-free linear layer, or an angular head).

SphereNet-9 and CNN-9 differ only in ``conv_layer`` (SphereConv2d vs nn.Conv2d). Official parameter count of the
9-layer net: 3,859,712 (fc6 without BN, the default here), 3,860,224 with ``fc_norm=True``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .factory import (DEFAULT_BN_MOMENTUM, OFFICIAL_BN_EPS, ClassifierNet, build_model, check_count,
                      he_normal_init, per_stage, scale_widths)
from .registry import register_model


class ConvNormAct(nn.Sequential):
    """conv(3x3, padding 1) -> norm -> ReLU, with children named ``conv``, ``norm``, ``act``."""

    def __init__(self, in_channels: int, out_channels: int, conv_layer: Callable[..., nn.Module],
                 norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv = conv_layer(in_channels, out_channels, 3, padding=1)
        self.norm = norm_layer(out_channels)
        self.act = nn.ReLU()


def _spatial(input_size: object, num_stages: int) -> tuple[int, int]:
    size = (input_size, input_size) if not isinstance(input_size, (tuple, list)) else tuple(input_size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (height, width); got {input_size!r}")
    size = tuple(check_count("input_size", s, minimum=2 ** num_stages) for s in size)
    return size  # type: ignore[return-value]


class PlainNet(ClassifierNet):
    """SphereNet-N / CNN-N: stages of 3x3 conv -> norm -> ReLU with 2x2 max-pooling, fc6, classifier.

    Args:
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for CIFAR, 1 for MNIST-like data).
        input_size: input height and width (an int or a pair); fixes the fc6 kernel, input_size // 2**stages.
        layers_per_stage: conv layers per stage, an int or one int per stage (official 3: SphereNet-9).
        widths: output channels of each stage (official (128, 192, 256)); the number of stages is ``len(widths)``.
        width_mult: multiplies every stage width (rounded, at least 1); fc6 keeps ``feature_dim``.
        feature_dim: outputs of fc6, the features fed to the classifier (official 256; 2 or 3 to plot features).
        fc_norm: apply ``norm_layer`` after fc6 (official HEAD: False).
        conv_layer: type of every convolution including fc6, ``nn.Conv2d``-like (e.g. ``SphereConv2d``).
        norm_layer: ``(num_features) -> module`` after each convolution (``nn.Identity`` for none).
        head_layer: ``(in_features, num_classes) -> module``, the classifier ``fc``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, input_size: int | Sequence[int] = 32,
                 layers_per_stage: int | Sequence[int] = 3, widths: Sequence[int] = (128, 192, 256),
                 width_mult: float = 1.0, feature_dim: int = 256, fc_norm: bool = False,
                 conv_layer: Callable[..., nn.Module] = partial(nn.Conv2d, bias=False),
                 norm_layer: Callable[[int], nn.Module] = partial(nn.BatchNorm2d, eps=OFFICIAL_BN_EPS,
                                                                  momentum=DEFAULT_BN_MOMENTUM),
                 head_layer: Callable[[int, int], nn.Module] = partial(nn.Linear, bias=False)) -> None:
        super().__init__(head_layer)
        widths = scale_widths(widths, width_mult)
        depths = per_stage("layers_per_stage", layers_per_stage, len(widths))
        self.input_size = _spatial(input_size, len(widths))
        self.num_features = check_count("feature_dim", feature_dim)
        if not isinstance(fc_norm, bool):
            raise TypeError(f"fc_norm must be a bool; got {type(fc_norm).__name__} {fc_norm!r}")
        channels = check_count("in_channels", in_channels)
        stages = []
        for width, depth in zip(widths, depths):
            stages.append(nn.Sequential(*(ConvNormAct(channels if i == 0 else width, width, conv_layer, norm_layer)
                                          for i in range(depth))))
            channels = width
        self.stages = nn.ModuleList(stages)
        self.pool = nn.MaxPool2d(2, 2)
        fc_kernel = tuple(s // 2 ** len(widths) for s in self.input_size)  # 4x4 for 32x32, 3x3 for 28x28
        self.fc6 = conv_layer(channels, self.num_features, fc_kernel)  # VALID: one output position
        self.fc6_norm = norm_layer(self.num_features) if fc_norm else nn.Identity()
        self.reset_classifier(check_count("num_classes", num_classes))
        he_normal_init(self)

    def forward_features(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, feature_dim)
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.input_size:
            hint = (f"; build it for this size with create_model(..., input_size={tuple(x.shape[-2:])}) (fc6 covers "
                    f"the last feature map, so its kernel depends on the input size)" if x.dim() == 4 else "")
            raise ValueError(f"PlainNet built for input (N, C, {self.input_size[0]}, {self.input_size[1]}) "
                             f"(input_size={self.input_size}); got shape {tuple(x.shape)}{hint}")
        for stage in self.stages:
            x = self.pool(stage(x))  # (N, width, H / 2, W / 2)
        x = self.fc6_norm(self.fc6(x))  # (N, feature_dim, 1, 1); no ReLU, as the official fc6
        return torch.flatten(x, 1)


def _plain(name: str, arch: dict, overrides: dict) -> PlainNet:
    return build_model(PlainNet, name, arch, overrides)  # type: ignore[return-value]


# SphereNet-N / CNN-N: N = 3 x layers_per_stage conv layers (fc6 and the classifier not counted, as "9" in the
# official SphereNet-9). The deep variants are the trainability experiments of the paper's section on deep plain nets.

@register_model
def spherenet9(**kwargs) -> PlainNet:
    """Official SphereNet-9 (cosine SphereConv, BN eps 1e-3, softmax head, fc6 without BN); ``bn_stats="official"``
    gives the official BN statistics (zero-started EMA, decay 0.999)."""
    return _plain("spherenet9", dict(operator="cosine", layers_per_stage=3), kwargs)


@register_model
def cnn9(**kwargs) -> PlainNet:
    """Official CNN-9 baseline: SphereNet-9 with plain bias-free convolutions."""
    return _plain("cnn9", dict(operator="conv", layers_per_stage=3), kwargs)


@register_model
def spherenet18(**kwargs) -> PlainNet:
    """SphereNet-18: 6 cosine SphereConv layers per stage."""
    return _plain("spherenet18", dict(operator="cosine", layers_per_stage=6), kwargs)


@register_model
def cnn18(**kwargs) -> PlainNet:
    """CNN-18: 6 plain conv layers per stage."""
    return _plain("cnn18", dict(operator="conv", layers_per_stage=6), kwargs)


@register_model
def spherenet30(**kwargs) -> PlainNet:
    """SphereNet-30: 10 cosine SphereConv layers per stage."""
    return _plain("spherenet30", dict(operator="cosine", layers_per_stage=10), kwargs)


@register_model
def cnn30(**kwargs) -> PlainNet:
    """CNN-30: 10 plain conv layers per stage."""
    return _plain("cnn30", dict(operator="conv", layers_per_stage=10), kwargs)


@register_model
def spherenet45(**kwargs) -> PlainNet:
    """SphereNet-45: 15 cosine SphereConv layers per stage."""
    return _plain("spherenet45", dict(operator="cosine", layers_per_stage=15), kwargs)


@register_model
def cnn45(**kwargs) -> PlainNet:
    """CNN-45: 15 plain conv layers per stage."""
    return _plain("cnn45", dict(operator="conv", layers_per_stage=15), kwargs)


@register_model
def spherenet60(**kwargs) -> PlainNet:
    """SphereNet-60: 20 cosine SphereConv layers per stage."""
    return _plain("spherenet60", dict(operator="cosine", layers_per_stage=20), kwargs)


@register_model
def cnn60(**kwargs) -> PlainNet:
    """CNN-60: 20 plain conv layers per stage."""
    return _plain("cnn60", dict(operator="conv", layers_per_stage=20), kwargs)


@register_model
def spherenet69(**kwargs) -> PlainNet:
    """SphereNet-69: 23 cosine SphereConv layers per stage."""
    return _plain("spherenet69", dict(operator="cosine", layers_per_stage=23), kwargs)


@register_model
def cnn69(**kwargs) -> PlainNet:
    """CNN-69: 23 plain conv layers per stage."""
    return _plain("cnn69", dict(operator="conv", layers_per_stage=23), kwargs)
