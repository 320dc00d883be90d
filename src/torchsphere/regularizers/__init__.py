"""Hyperspherical regularizers: MHE (Liu et al., NeurIPS 2018), hyperspherical uniformity (Liu et al., AISTATS
2021) and orthonormality, as functions of one weight and as a model-level :class:`HypersphericalRegularizer`."""
from .energy import hyperspherical_energy, stochastic_energy
from .model import METHODS, HypersphericalRegularizer, PoleConfig, default_lambdas
from .uniformity import init_pole, mgd, mhc, mhp, mhs, pole_step, r_mhp

__all__ = [
    "METHODS",
    "HypersphericalRegularizer",
    "PoleConfig",
    "default_lambdas",
    "hyperspherical_energy",
    "init_pole",
    "mgd",
    "mhc",
    "mhp",
    "mhs",
    "pole_step",
    "r_mhp",
    "stochastic_energy",
]
