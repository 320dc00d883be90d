"""Conversion of any PyTorch model to hyperspherical layers and back.

Follows the pattern of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: walk the children, build each replacement
with the same hyperparameters, carry the parameters over, keep the training mode, return the (possibly new) root.
SphereConv: Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189).

The replacement **shares** the original ``weight`` and ``bias`` ``nn.Parameter`` objects (no copy), so device,
dtype, ``requires_grad`` and any optimizer built over the old parameters carry over; a learnable-sigmoid k is the
only new parameter -- it is in no optimizer built before the conversion, and the converted model's state dict has
``*.sigmoid_k_raw`` entries that the plain model's does not (a warning says so). Forward/backward hooks registered on
a replaced layer are not carried over. A name or pattern in ``include`` / ``exclude`` that matches no layer is
reported with a warning (a typo would otherwise convert what it meant to keep).
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Iterable, Union

from torch import nn

from ..functional._checks import check_bool, check_operator, check_positive
from ..nn.sphere_conv import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]
"""Which layers a conversion touches: qualified module names or fnmatch patterns (a layer matches when its own
name or the name of any module containing it matches), or a predicate ``(name, module) -> bool`` on the layer."""

_CONV_TO_SPHERE: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: SphereConv1d, nn.Conv2d: SphereConv2d, nn.Conv3d: SphereConv3d}
_LINEAR_TO_SPHERE: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: SphereLinear}
_SPHERE_TO_PLAIN: dict[type[nn.Module], type[nn.Module]] = {
    SphereConv1d: nn.Conv1d, SphereConv2d: nn.Conv2d, SphereConv3d: nn.Conv3d, SphereLinear: nn.Linear}


def _matcher(arg: str, selector: Selector) -> Callable[[str, nn.Module], bool] | None:
    if selector is None:
        return None
    if callable(selector) and not isinstance(selector, str):
        return selector
    patterns = (selector,) if isinstance(selector, str) else selector
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise TypeError(f"{arg} must be None, a module name or pattern, a list of them, or a callable "
                        f"(name, module) -> bool; got {type(selector).__name__} {selector!r}") from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise TypeError(f"{arg} patterns must be str; got {bad!r}")

    def match(name: str, module: nn.Module) -> bool:
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # "a", "a.b", "a.b.c"
        return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)

    match.patterns = patterns  # type: ignore[attr-defined]
    return match


def _warn_unmatched(model: nn.Module, arg: str, matcher) -> None:
    """Warns about the ``include``/``exclude`` patterns that match no module name of ``model``."""
    patterns = getattr(matcher, "patterns", ())
    names = [n for n, _ in model.named_modules() if n]
    prefixes = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in prefixes)]
    if unmatched:
        warnings.warn(f"{arg} patterns {unmatched} match no module of the model (module names look like "
                      f"{names[:4]}); check the spelling", UserWarning, stacklevel=3)


def _replace(root: nn.Module, mapping: dict[type[nn.Module], type[nn.Module]], include, exclude,
             build: Callable[[nn.Module, type[nn.Module]], nn.Module]) -> nn.Module:
    memo: dict[int, nn.Module] = {}  # a layer shared by several parents gets one replacement

    def visit(module: nn.Module, name: str) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        target = mapping.get(type(module))  # exact types: subclasses (StdConv2d, parametrized layers) are kept
        if target is not None and (include is None or include(name, module)) and not (
                exclude is not None and exclude(name, module)):
            new = build(module, target)
            new.train(module.training)
            if hasattr(module, "qconfig"):
                new.qconfig = module.qconfig
            memo[id(module)] = new
            return new
        memo[id(module)] = module
        for child_name, child in list(module._modules.items()):  # not named_children(): it hides repeats
            if child is None:
                continue
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    return visit(root, "")


def _share_params(old: nn.Module, new: nn.Module) -> nn.Module:
    new.weight = old.weight
    new.bias = old.bias
    return new


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def convert_to_sphere(model: nn.Module, operator: str = "cosine", *, include: Selector = None,
                      exclude: Selector = None, convert_linear: bool = False, sigmoid_k: float | None = None,
                      eps: float = 1e-4, memory_efficient: bool = False) -> nn.Module:
    """Replaces every ``nn.Conv1d/2d/3d`` (and optionally ``nn.Linear``) of ``model`` by its sphere equivalent.

    Each replacement has the same hyperparameters (channels, kernel size, stride, padding, padding_mode,
    dilation, groups, bias) and shares the original ``weight``/``bias`` Parameters, hence the same device, dtype
    and ``requires_grad``; the training mode is kept. Only layers of exactly these types are converted: subclasses
    with their own forward (timm's ``StdConv2d``, parametrized layers, ``MultiheadAttention``'s projection) and
    layers that already are sphere layers are left alone, so converting twice equals converting once (a second
    call with another operator changes nothing; :func:`revert_from_sphere` first).

    Args:
        model: any module; converted in place, and a root that is itself a conv/linear layer is replaced.
        operator: ``"linear"``, ``"cosine"``, ``"sigmoid"`` or ``"learnable_sigmoid"``.
        include: convert only these layers (names, fnmatch patterns such as ``"layer*"``, or a predicate
            ``(name, module) -> bool``); None: all.
        exclude: skip these layers, e.g. the stem and shortcuts, ``["conv1", "*.downsample.*"]``. A pattern that
            matches no module name gives a warning.
        convert_linear: also convert ``nn.Linear`` to :class:`~torchsphere.nn.SphereLinear`.
        sigmoid_k: k of ``"sigmoid"`` (default 0.3) / initial effective k of ``"learnable_sigmoid"`` (0.75).
        eps: added to both squared norms inside the square roots (official 1e-4).
        memory_efficient: the sphere layers save their output for the backward instead of an extra full-size
            tensor (:class:`~torchsphere.nn.SphereConv2d`). Safe when no in-place op touches a convolution's output
            directly (conv -> BatchNorm -> ``ReLU(inplace=True)``, as in torchvision's and timm's ResNets, is
            fine); otherwise the backward raises autograd's in-place error, with a note naming this option.
            Default False.

    With ``operator="learnable_sigmoid"`` every converted layer gets a new parameter ``k``: build the optimizer
    after the conversion (one built before misses k), and note that the state dict gains ``*.sigmoid_k_raw`` keys,
    so it loads into the converted model, not into the plain one (:func:`revert_from_sphere` drops k). A warning
    says so.

    Returns:
        The converted model (the same object unless ``model`` itself was replaced).

    Example:
        timm is an optional extra (``pip install "torchsphere[timm]"``); its ``resnet18`` uses plain
        ``nn.Conv2d`` layers with torchvision's names. Keep the stem and the 1x1 shortcuts plain, as the
        official SphereResNet does; the classifier ``fc`` is an ``nn.Linear`` and stays plain by default::

            import timm
            from torchsphere import convert_to_sphere, revert_from_sphere

            model = timm.create_model("resnet18", pretrained=True, num_classes=10)
            model = convert_to_sphere(model, "linear", exclude=["conv1", "*.downsample.*"])
            ...  # fine-tune
            model = revert_from_sphere(model)  # plain convolutions holding the same weights again

    Raises:
        TypeError: ``model`` is not a module, or ``include``/``exclude`` are of the wrong type.
        ValueError: unknown operator, or ``sigmoid_k``/``eps`` invalid.
    """
    _check_model(model)
    check_operator(operator)
    check_positive("eps", eps)
    if sigmoid_k is not None:
        check_positive("sigmoid_k", sigmoid_k)
        if operator not in ("sigmoid", "learnable_sigmoid"):
            raise ValueError(f"sigmoid_k applies only to operator 'sigmoid' or 'learnable_sigmoid'; got "
                             f"sigmoid_k={sigmoid_k!r} with operator={operator!r}")
    if not isinstance(convert_linear, bool):
        raise TypeError(f"convert_linear must be a bool; got {type(convert_linear).__name__} {convert_linear!r}")
    mapping = {**_CONV_TO_SPHERE, **(_LINEAR_TO_SPHERE if convert_linear else {})}
    sphere = dict(operator=operator, sigmoid_k=sigmoid_k, eps=eps,
                  memory_efficient=check_bool("memory_efficient", memory_efficient))

    def build(old: nn.Module, target: type[nn.Module]) -> nn.Module:
        factory = dict(device=old.weight.device, dtype=old.weight.dtype)
        if isinstance(old, nn.Linear):
            new = target(old.in_features, old.out_features, old.bias is not None, **factory, **sphere)
        else:
            new = target(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                         old.groups, old.bias is not None, old.padding_mode, **factory, **sphere)
        return _share_params(old, new)

    include_m, exclude_m = _matcher("include", include), _matcher("exclude", exclude)
    _warn_unmatched(model, "include", include_m)
    _warn_unmatched(model, "exclude", exclude_m)
    before = {id(p) for p in model.parameters()}
    out = _replace(model, mapping, include_m, exclude_m, build)
    new = [n for n, p in out.named_parameters() if id(p) not in before]
    if new:
        warnings.warn(f"convert_to_sphere(operator={operator!r}) added {len(new)} learnable parameter(s) "
                      f"({', '.join(new[:3])}{', ...' if len(new) > 3 else ''}): build the optimizer after the "
                      f"conversion, and load this state dict into a converted model (the plain one has no k)",
                      UserWarning, stacklevel=2)
    return out


def revert_from_sphere(model: nn.Module, *, include: Selector = None, exclude: Selector = None) -> nn.Module:
    """Turns ``SphereConv1d/2d/3d`` and ``SphereLinear`` layers back into ``nn.Conv1d/2d/3d`` / ``nn.Linear``.

    The plain layers share the sphere layers' ``weight``/``bias`` Parameters, so a model converted with
    :func:`convert_to_sphere` and reverted computes exactly what it computed before. A learnable sigmoid k is
    dropped. ``SphereNorm`` layers (whose learnable rescaling has no plain counterpart) and other subclasses are
    left alone.

    Args:
        model: any module; reverted in place (a root that is itself a sphere layer is replaced).
        include: revert only these layers (names, fnmatch patterns or a predicate, as in
            :func:`convert_to_sphere`).
        exclude: keep these layers spherical.

    Returns:
        The reverted model.
    """
    _check_model(model)

    def build(old: nn.Module, target: type[nn.Module]) -> nn.Module:
        factory = dict(device=old.weight.device, dtype=old.weight.dtype)
        if isinstance(old, nn.Linear):
            new = target(old.in_features, old.out_features, old.bias is not None, **factory)
        else:
            new = target(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                         old.groups, old.bias is not None, old.padding_mode, **factory)
        return _share_params(old, new)

    return _replace(model, _SPHERE_TO_PLAIN, _matcher("include", include), _matcher("exclude", exclude), build)
