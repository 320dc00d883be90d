"""Modules of torchsphere: thin wrappers over :mod:`torchsphere.functional`."""
from .param_groups import param_groups
from .sphere_conv import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

__all__ = [
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
    "param_groups",
]
