"""Model-level hyperspherical regularizer: walks a model, returns one scalar that the training step adds explicitly.

    reg = HypersphericalRegularizer(model, "mhe_half")
    loss = F.cross_entropy(model(x), y) + reg()      # no side channels: the term is returned, not collected
    reg.pole_step()                                  # MHP / MHC only: the inner pole steps (a no-op otherwise)
    reg(labels=y)                                    # MHE on a large head: batch-class estimate for the output layer

Layers: every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (the torchsphere sphere layers subclass them) and every
classifier head with its own 2-D ``weight`` parameter whose class name ends in ``Head`` (e.g.
:class:`torchsphere.nn.AngularHead`). Transposed convolutions are not included. The **output layer** is the module
named by ``output=``, else the last linear-like layer (``nn.Linear`` or a head) in registration order; all other
layers are hidden. A model whose classifier is a convolution (the official CNN-9 ``score`` is a 1x1 conv) must name
it with ``output=``. ``include`` / ``exclude`` are glob patterns over qualified module names (``fnmatch``).
Layers with fewer than 2 neurons are skipped (pairwise methods are undefined there), except for ``"orthonormal"``.

Defaults per method (lambda_hidden, lambda_output; half-space applies to hidden layers only, never to the output
layer, as in the official code):

=======================  ====================  ==========  ======================================================
method                   (lambda_h, lambda_o)  half-space  source
=======================  ====================  ==========  ======================================================
mhe (any s)              (0.1, 1)              no          wy1iu/MHE logs; the released code says (1, 10) (*)
mhe_angular, s < 1       (0.1, 1)              no          as above (a0)
mhe_angular, s >= 1      (0.01, 0.1)           no          logs; released code (0.1, 1) (a1, a2)
mhe_half                 (1, 10)               yes         released code = logs
mhe_angular_half, s < 1  (1, 10)               yes         released code = logs (a0)
mhe_angular_half, s >= 1 (0.1, 1)              yes         released code = logs (a1, a2)
mhs                      (0.1, 1)              yes         wy1iu/Sphere-Uniformity
mhp                      (1, 10)               yes         wy1iu/Sphere-Uniformity (+ poles)
mhc                      (0.01, 0.1)           yes         wy1iu/Sphere-Uniformity (+ poles, gamma 10)
mgd                      (0.01, 0.1)           yes         wy1iu/Sphere-Uniformity
r_mhp                    (0.01, 0.1)           n/a         wy1iu/Sphere-Uniformity (raw weights)
orthonormal              (1e-4, 0)             n/a         wy1iu/SphereNet: 2e-4 * 1/2 ||W^T W - I||^2, not score
=======================  ====================  ==========  ======================================================

``mhe`` with ``half_space=True`` takes the half-space coefficients.

(*) The full-space MHE logs of wy1iu/MHE imply coefficients 10x smaller than the released ``train.py``; the
half-space logs match the released code. The default MHE power is s = 2 (the best released run, half_mhe_2).
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import torch
from torch import Tensor, nn

from ..functional._checks import check_positive
from ..functional.orthonormal import orthonormal_penalty
from .energy import check_chunk_size, check_s, hyperspherical_energy, stochastic_energy
from .uniformity import MHC_GAMMA, POLE_STEPS, POLE_WEIGHT_DECAY, init_pole, mgd, mhc, mhp, mhs, pole_step, r_mhp

METHODS: tuple[str, ...] = ("mhe", "mhe_half", "mhe_angular", "mhe_angular_half", "mhs", "mgd", "r_mhp", "mhp",
                            "mhc", "orthonormal")
_MHE = ("mhe", "mhe_half", "mhe_angular", "mhe_angular_half")
_HALF_DEFAULT = {"mhe": False, "mhe_half": True, "mhe_angular": False, "mhe_angular_half": True, "mhs": True,
                 "mgd": True, "mhp": True, "mhc": True}  # methods absent here have no half-space form
_LAMBDAS = {"mhs": (0.1, 1.0), "mhp": (1.0, 10.0), "mhc": (0.01, 0.1), "mgd": (0.01, 0.1), "r_mhp": (0.01, 0.1),
            "orthonormal": (1e-4, 0.0)}
DEFAULT_S = 2.0


def default_lambdas(method: str, s: float = DEFAULT_S, half_space: bool | None = None) -> tuple[float, float]:
    """(lambda_hidden, lambda_output) of the official code / logs for ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown regularizer method {method!r}; choose from {list(METHODS)}")
    if method not in _MHE:
        return _LAMBDAS[method]
    half = _HALF_DEFAULT[method] if half_space is None else half_space
    small = "angular" in method and s >= 1  # a1, a2: 10x smaller than s = 0, 1, 2 and a0
    base = (1.0, 10.0) if half else (0.1, 1.0)
    return (base[0] / 10, base[1] / 10) if small else base


@dataclass(frozen=True)
class PoleConfig:
    """Inner optimization of the MHP / MHC poles (official: 10 momentum-SGD steps per network step).

    Attributes:
        steps: pole steps per :meth:`HypersphericalRegularizer.pole_step` call.
        lr: pole learning rate (official: the network's, 0.1 with the same decay; attach a scheduler to
            ``pole_optimizer`` to follow it).
        momentum: SGD momentum of the pole optimizer.
        weight_decay: L2 on the poles, wd * ||v||^2 / 2.
        num_poles: poles per layer (official 1).
    """

    steps: int = POLE_STEPS
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = POLE_WEIGHT_DECAY
    num_poles: int = 1


class Layer(NamedTuple):
    """One regularized layer: its qualified name, the module, ``"hidden"`` or ``"output"``, and its coefficient."""

    name: str
    module: nn.Module
    role: str
    coefficient: float


def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def _is_linear_like(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    w = m._parameters.get("weight")
    return type(m).__name__.endswith("Head") and isinstance(w, Tensor) and w.dim() == 2


def _patterns(name: str, value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    pats = [value] if isinstance(value, str) else list(value)
    if not pats or not all(isinstance(p, str) for p in pats):
        raise TypeError(f"{name} must be a glob pattern or a non-empty iterable of patterns; got {value!r}")
    return pats


def _check_lambda(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


class HypersphericalRegularizer(nn.Module):
    """Sum of a hyperspherical regularizer over a model's layers: lambda_h * sum_hidden + lambda_o * output.

    The poles of MHP / MHC are created on the device of each layer's weight and are the regularizer's only
    parameters (``state_dict`` holds them); move them with ``reg.to(device)`` when the model moves.

    Args:
        model: any module (held by reference, not registered: the regularizer's parameters are only its poles).
        method: one of ``METHODS`` (see the module docstring for each default).
        lambda_hidden: coefficient of every hidden layer's term (per-layer terms are summed, as officially).
        lambda_output: coefficient of the output layer's term.
        s: MHE power (default 2); MHE methods only.
        half_space: virtual neurons -w_i on hidden layers (default per method); never on the output layer.
        include: glob pattern(s); only matching layers are regularized.
        exclude: glob pattern(s); matching layers are skipped.
        output: qualified name of the output (classifier) layer; default the last linear-like layer.
        eps: added to every squared norm before the square root (official 1e-4).
        chunk_size: rows per block of the pairwise methods (see :func:`hyperspherical_energy`).
        gamma: MHC soft-min temperature (default 10); MHC only.
        poles: the pole optimization of MHP / MHC (default :class:`PoleConfig`).

    Raises:
        ValueError: unknown method, a pattern or ``output`` matching no layer, or options that do not apply.
    """

    def __init__(self, model: nn.Module, method: str = "mhe", *, lambda_hidden: float | None = None,
                 lambda_output: float | None = None, s: float | None = None, half_space: bool | None = None,
                 include: str | Iterable[str] | None = None, exclude: str | Iterable[str] | None = None,
                 output: str | None = None, eps: float = 1e-4, chunk_size: int | None = None,
                 gamma: float | None = None, poles: PoleConfig | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
        if method not in METHODS:
            raise ValueError(f"unknown regularizer method {method!r}; choose from {list(METHODS)}")
        if s is not None and method not in _MHE:
            raise ValueError(f"s applies to the MHE methods {list(_MHE)} only; got s={s!r} with method={method!r}")
        if gamma is not None and method != "mhc":
            raise ValueError(f"gamma applies to method 'mhc' only; got gamma={gamma!r} with method={method!r}")
        if poles is not None and method not in ("mhp", "mhc"):
            raise ValueError(f"poles applies to methods 'mhp' and 'mhc' only; got method={method!r}")
        if half_space is not None:
            if method not in _HALF_DEFAULT:
                raise ValueError(f"method {method!r} has no half-space form; got half_space={half_space!r}")
            if method.endswith("_half") and not half_space:
                raise ValueError(f"method {method!r} is half-space; got half_space={half_space!r}")
        self.method = method
        self.s = check_s(DEFAULT_S if s is None else s)
        self.angular = "angular" in method
        self.half_space = bool(_HALF_DEFAULT.get(method, False) if half_space is None else half_space)
        lam_h, lam_o = default_lambdas(method, self.s, self.half_space)
        self.lambda_hidden = _check_lambda("lambda_hidden", lam_h if lambda_hidden is None else lambda_hidden)
        self.lambda_output = _check_lambda("lambda_output", lam_o if lambda_output is None else lambda_output)
        self.eps = check_positive("eps", eps)
        self.chunk_size = check_chunk_size(chunk_size)
        self.gamma = check_positive("gamma", MHC_GAMMA if gamma is None else gamma)
        self.pole_config = PoleConfig() if poles is None else poles
        self.layers: list[Layer] = self._find_layers(model, _patterns("include", include),
                                                     _patterns("exclude", exclude), output)
        self.poles = nn.ParameterList()
        self.pole_optimizer: torch.optim.Optimizer | None = None
        if method in ("mhp", "mhc"):
            cfg = self.pole_config
            for layer in self.layers:
                w = layer.module.weight
                self.poles.append(init_pole(w[0].numel(), cfg.num_poles, device=w.device))
            if len(self.poles):
                self.pole_optimizer = torch.optim.SGD(self.poles.parameters(), lr=cfg.lr, momentum=cfg.momentum)

    def _find_layers(self, model: nn.Module, include: list[str] | None, exclude: list[str] | None,
                     output: str | None) -> list[Layer]:
        modules = dict(model.named_modules())
        candidates = [name for name, m in modules.items() if _is_conv(m) or _is_linear_like(m)]
        if output is not None:
            if output not in modules:
                raise ValueError(f"output={output!r} names no module of the model")
            w = modules[output]._parameters.get("weight")
            if not isinstance(w, Tensor) or w.dim() < 2:
                raise ValueError(f"output={output!r} has no weight parameter of shape (N, ...) with >= 2 dims")
            if output not in candidates:
                candidates.append(output)
        else:
            linear = [name for name in candidates if _is_linear_like(modules[name])]
            output = linear[-1] if linear else None
        for kind, pats, keep in (("include", include, True), ("exclude", exclude, False)):
            if pats is None:
                continue
            for p in pats:
                if not any(fnmatch.fnmatchcase(name, p) for name in candidates):
                    raise ValueError(f"{kind} pattern {p!r} matches no conv / linear / head layer; layers: "
                                     f"{candidates}")
            candidates = [n for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in pats) == keep]
        layers, seen, skipped = [], set(), []
        for name in candidates:
            module = modules[name]
            w = module.weight
            if id(w) in seen:  # shared weights count once
                continue
            seen.add(id(w))
            if w.shape[0] < 2 and self.method != "orthonormal":
                skipped.append(name)
                continue
            role = "output" if name == output else "hidden"
            layers.append(Layer(name, module, role, self.lambda_output if role == "output" else self.lambda_hidden))
        if skipped:
            warnings.warn(f"HypersphericalRegularizer skips layers with fewer than 2 neurons: {skipped}", stacklevel=3)
        return layers

    @property
    def hidden_layers(self) -> list[str]:
        """Qualified names of the regularized hidden layers."""
        return [layer.name for layer in self.layers if layer.role == "hidden"]

    @property
    def output_layer(self) -> str | None:
        """Qualified name of the regularized output layer, or None."""
        return next((layer.name for layer in self.layers if layer.role == "output"), None)

    @property
    def has_poles(self) -> bool:
        """True for MHP / MHC (min-max methods whose poles :meth:`pole_step` optimizes)."""
        return self.pole_optimizer is not None

    def _half(self, layer: Layer) -> bool:
        return self.half_space and layer.role == "hidden"

    def layer_term(self, index: int, labels: Tensor | None = None) -> Tensor:
        """The term of ``self.layers[index]`` without its coefficient (``labels``: see :meth:`forward`)."""
        layer, w = self.layers[index], self.layers[index].module.weight
        m, half = self.method, self._half(layer)
        if m in _MHE and labels is not None and layer.role == "output":
            return stochastic_energy(w, self.s, labels=labels, angular=self.angular, eps=self.eps,
                                     chunk_size=self.chunk_size)
        if m in _MHE:
            return hyperspherical_energy(w, self.s, angular=self.angular, half_space=half, eps=self.eps,
                                         chunk_size=self.chunk_size)
        if m == "mhs":
            return mhs(w, half_space=half, eps=self.eps, chunk_size=self.chunk_size)
        if m == "mgd":
            return mgd(w, half_space=half, eps=self.eps)
        if m == "r_mhp":
            return r_mhp(w, eps=self.eps)
        if m == "mhp":
            return mhp(w, self.poles[index].detach(), half_space=half, eps=self.eps)
        if m == "mhc":
            return mhc(w, self.poles[index].detach(), gamma=self.gamma, half_space=half, eps=self.eps)
        return orthonormal_penalty(w)

    def forward(self, labels: Tensor | None = None) -> Tensor:
        """lambda_h * sum of the hidden terms + lambda_o * the output term (0-d; the poles are held fixed).

        Args:
            labels: MHE methods only: the batch's class labels. The output-layer energy is then the SphereFace+-style
                estimate over the pairs touching the classes present in the batch (:func:`stochastic_energy`),
                O(batch classes x N x d) instead of O(N^2 d) for large classifier heads.
        """
        if isinstance(labels, nn.Module):
            raise TypeError(f"HypersphericalRegularizer walks the model it was built on: call it as reg() (or "
                            f"reg(labels) for the MHE methods), not reg(model); got a {type(labels).__name__} for "
                            f"labels")
        if labels is not None and self.method not in _MHE:
            raise ValueError(f"labels apply to the MHE methods {list(_MHE)} only; got method={self.method!r}")
        total = None
        for i, layer in enumerate(self.layers):
            if layer.coefficient == 0:
                continue
            term = layer.coefficient * self.layer_term(i, labels)
            total = term if total is None else total + term
        if total is None:
            device = self.layers[0].module.weight.device if self.layers else None
            return torch.zeros((), device=device)
        return total

    def pole_step(self) -> Tensor | None:
        """Runs the inner pole steps (MHP / MHC) on the detached weights; returns the pole objective, else None."""
        if self.pole_optimizer is None:
            return None
        idx = [i for i, layer in enumerate(self.layers) if layer.coefficient != 0]
        if not idx:
            return None
        cfg = self.pole_config
        kwargs = {"gamma": self.gamma} if self.method == "mhc" else {}
        return pole_step(mhp if self.method == "mhp" else mhc, [self.layers[i].module.weight for i in idx],
                         [self.poles[i] for i in idx], self.pole_optimizer, steps=cfg.steps,
                         coefficients=[self.layers[i].coefficient for i in idx],
                         half_space=[self._half(self.layers[i]) for i in idx], weight_decay=cfg.weight_decay,
                         eps=self.eps, **kwargs)

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, lambda_hidden={self.lambda_hidden}, lambda_output={self.lambda_output}, "
                f"half_space={self.half_space}, hidden={len(self.hidden_layers)}, output={self.output_layer!r}")
