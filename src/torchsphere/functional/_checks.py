"""Argument guards shared by the functional core: real exceptions naming the parameter and the value received."""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

OPERATORS: tuple[str, ...] = ("linear", "cosine", "sigmoid", "learnable_sigmoid")


def check_choice(name: str, value: object, choices: tuple[str, ...], what: str | None = None) -> str:
    """Returns ``value`` if it is one of ``choices``; else a TypeError/ValueError naming ``name`` and the value."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}; got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"unknown {what or name} {value!r}; choose from {list(choices)}")
    return value


def check_operator(operator: object) -> str:
    """Returns ``operator`` if it names a sphere operator, else raises."""
    return check_choice("operator", operator, OPERATORS, what="sphere operator")


def check_positive(name: str, value: object) -> float:
    """Returns ``value`` as a float if it is a finite real number > 0, else raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number; got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_sigmoid_k(sigmoid_k: object) -> float | Tensor:
    """Accepts a positive number or a tensor (a learned k, positive by construction)."""
    if isinstance(sigmoid_k, Tensor):
        if not sigmoid_k.is_floating_point():
            raise TypeError(f"sigmoid_k tensor must be floating point; got dtype {sigmoid_k.dtype}")
        return sigmoid_k
    if sigmoid_k is None:
        raise ValueError("sigmoid_k is required for the sigmoid operators; got None")
    return check_positive("sigmoid_k", sigmoid_k)


def check_bool(name: str, value: object) -> bool:
    """Returns ``value`` if it is a bool, else a TypeError naming ``name`` and the value."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return value


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value
