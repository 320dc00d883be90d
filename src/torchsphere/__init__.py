"""torchsphere: hyperspherical learning for PyTorch.

Implements *Deep Hyperspherical Learning* (W. Liu et al., NIPS 2017, arXiv 1711.03189) — SphereConv, SphereNet,
GA-Softmax, SphereNorm — and its sibling methods (MHE, hyperspherical uniformity, orthonormality).
"""
from . import functional, nn
from .functional import (angular_activation, orthonormal_penalty, sphere_conv1d, sphere_conv2d, sphere_conv3d,
                         sphere_linear)
from .nn import (AngularHead, GASoftmaxLoss, LambdaSchedule, SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear,
                 SphereNorm1d, SphereNorm2d, SphereNorm3d)

from . import regularizers
from .regularizers import HypersphericalRegularizer, hyperspherical_energy

from . import models
from .models import convert_to_sphere, revert_from_sphere

__version__ = "0.1.0"

__all__ = [
    "AngularHead",
    "GASoftmaxLoss",
    "HypersphericalRegularizer",
    "LambdaSchedule",
    "SphereConv1d",
    "SphereConv2d",
    "SphereConv3d",
    "SphereLinear",
    "SphereNorm1d",
    "SphereNorm2d",
    "SphereNorm3d",
    "__version__",
    "angular_activation",
    "convert_to_sphere",
    "functional",
    "hyperspherical_energy",
    "models",
    "nn",
    "orthonormal_penalty",
    "regularizers",
    "revert_from_sphere",
    "sphere_conv1d",
    "sphere_conv2d",
    "sphere_conv3d",
    "sphere_linear",
]
