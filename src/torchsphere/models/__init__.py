"""Model zoo of torchsphere: a registry, one class per family, and conversion of any model to sphere layers.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). ``create_model("spherenet9")`` builds the
official SphereNet-9, ``create_model("cnn9")`` its CNN baseline; every entry accepts overrides such as
``operator``, ``norm``, ``head``, ``margin``, ``num_classes``, ``in_channels``, ``width_mult``.
"""
from .convert import convert_to_sphere, revert_from_sphere
from .factory import CONV_CHOICES, HEADS, NORMS, ClassifierNet, LayerConfig, he_normal_init
from .plain import PlainNet
from .registry import create_model, is_model, list_models, model_entrypoint, register_model
from .resnet import BasicBlock, ResNet

__all__ = [
    "CONV_CHOICES",
    "HEADS",
    "NORMS",
    "BasicBlock",
    "ClassifierNet",
    "LayerConfig",
    "PlainNet",
    "ResNet",
    "convert_to_sphere",
    "create_model",
    "he_normal_init",
    "is_model",
    "list_models",
    "model_entrypoint",
    "register_model",
    "revert_from_sphere",
]
