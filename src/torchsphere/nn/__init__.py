"""Modules of torchsphere: thin wrappers over :mod:`torchsphere.functional`."""
from .heads import AngularHead, GASoftmaxLoss, LambdaSchedule
from .official_bn import OfficialBatchNorm2d
from .param_groups import param_groups
from .sphere_conv import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear
from .sphere_norm import SphereNorm1d, SphereNorm2d, SphereNorm3d

__all__ = [
    "AngularHead",
    "GASoftmaxLoss",
    "LambdaSchedule",
    "OfficialBatchNorm2d",
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
    "SphereNorm1d",
    "SphereNorm2d",
    "SphereNorm3d",
    "param_groups",
]
