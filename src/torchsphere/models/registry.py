"""Model registry: ``@register_model`` entrypoints, ``create_model(name, **overrides)``, ``list_models(pattern)``.

After torchvision's ``models/_api.py`` (a duplicate name is an error, not a silent overwrite) and timm's
``_registry.py`` (fnmatch patterns, tiny entrypoints). An entrypoint is a function ``entry(**overrides) -> nn.Module``
that merges a dict of architecture arguments with the user's overrides and calls one builder; the builder rejects
unknown overrides with a ``TypeError`` naming them.
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, TypeVar

from torch import nn

EntryFn = TypeVar("EntryFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: EntryFn | None = None, *, name: str | None = None) -> Any:
    """Registers a model entrypoint under ``name`` (default: the function's ``__name__``).

    Usable bare (``@register_model``) or with a name (``@register_model(name="x")``).

    Args:
        fn: the entrypoint, a callable ``(**overrides) -> nn.Module``.
        name: the registry key; defaults to ``fn.__name__``.

    Returns:
        ``fn`` unchanged (or a decorator when ``fn`` is None).

    Raises:
        ValueError: if the name is already registered or empty.
        TypeError: if ``fn`` is not callable.
    """

    def wrap(f: EntryFn) -> EntryFn:
        if not callable(f):
            raise TypeError(f"register_model expects a callable entrypoint; got {type(f).__name__} {f!r}")
        key = f.__name__ if name is None else name
        if not isinstance(key, str) or not key:
            raise ValueError(f"model name must be a non-empty str; got {key!r}")
        if key in _MODELS:
            raise ValueError(f"model {key!r} is already registered (by {_MODELS[key].__module__}."
                             f"{_MODELS[key].__qualname__}); choose another name")
        _MODELS[key] = f
        return f

    return wrap if fn is None else wrap(fn)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the fnmatch ``pattern`` (e.g. ``"sphere*"``, ``"cnn?"``)."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str; got {type(pattern).__name__} {pattern!r}")
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    """True if ``name`` is a registered model."""
    return isinstance(name, str) and name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The entrypoint registered under ``name``.

    Raises:
        ValueError: for an unknown name, listing the closest registered names.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str; got {type(name).__name__} {name!r}")
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"choose from {list_models()}"
        raise ValueError(f"unknown model {name!r}; {hint}")
    return _MODELS[name]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds the registered model ``name`` with ``overrides`` replacing its default arguments.

    Args:
        name: a name from :func:`list_models`.
        **overrides: architecture and layer choices accepted by the model's builder, e.g. ``operator="linear"``,
            ``norm="spherenorm"``, ``head="gasoftmax"``, ``margin=2.0``, ``num_classes=100``, ``width_mult=0.5``.

    Returns:
        The model, with a ``default_cfg`` dict describing the resolved configuration.

    Raises:
        ValueError: unknown model name (close matches are listed) or an invalid value.
        TypeError: an override the builder does not accept (named in the message).

    Example:
        >>> model = create_model("spherenet9", operator="sigmoid", num_classes=100)
    """
    return model_entrypoint(name)(**overrides)
