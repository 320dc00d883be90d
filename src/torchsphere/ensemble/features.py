"""Penultimate-layer features of trained models: what the k-NN ranking of a model pool looks at.

The features are the input of the classifier, the "pre-logits" of the VTAB tooling (google-research/task_adaptation,
``--finetune_layer pre_logits``) and of timm (``forward_head(x, pre_logits=True)``). Per model family:

- torchsphere's plain nets (SphereNet-N, CNN-N): the output of ``fc6`` (after ``fc6_norm`` when it has one), flattened;
- torchsphere's ResNets (SphereResNet-N, ResNet-N): the global average pool ``avgpool``, flattened;
- any other ``nn.Module`` (a torchvision or timm model, a model passed through ``convert_to_sphere``): the input of
  its classifier, by default the last ``nn.Linear`` (``SphereLinear`` included) in module order, captured by a
  forward pre-hook; ``layer=`` names another module. A model with ``forward_features`` and ``fc`` (the
  torchsphere ``ClassifierNet`` interface) is read through ``forward_features``.

Features are computed in eval mode (BatchNorm running statistics), without gradients, in float32, batch by batch; the
model's train/eval mode is restored afterwards.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

DEFAULT_BATCH = 500


def _classifier_interface(model: nn.Module) -> bool:
    return callable(getattr(model, "forward_features", None)) and isinstance(getattr(model, "fc", None), nn.Module)


def feature_layer(model: nn.Module) -> str:
    """The name of the layer whose output (or, for a foreign model, whose classifier's input) is the feature vector.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: a foreign model without any ``nn.Linear`` (pass ``layer=`` to :func:`extract_features`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    from ..models.plain import PlainNet
    from ..models.resnet import ResNet

    if isinstance(model, PlainNet):
        return "fc6_norm" if not isinstance(model.fc6_norm, nn.Identity) else "fc6"
    if isinstance(model, ResNet):
        return "avgpool"
    if _classifier_interface(model):
        return "forward_features"
    return f"input of {_last_linear(model)}"


def _last_linear(model: nn.Module) -> str:
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to read the features from; pass "
                         "layer='<module name>' (the features are that module's input)")
    return names[-1]


def extract_features(model: nn.Module, x: Tensor, *, layer: str | None = None,
                     batch_size: int = DEFAULT_BATCH) -> Tensor:
    """(N, D) float32 penultimate features of ``model`` on images ``x`` (N, C, H, W) (see the module docstring).

    Args:
        model: a trained model; torchsphere model families are read through ``forward_features``.
        x: the inputs, normalized as for training; moved batch by batch to the model's device.
        layer: the module whose *input* is the feature vector (a foreign model's classifier); default as described.
        batch_size: images per forward pass.

    Raises:
        TypeError: ``model`` is not a module or ``x`` not a tensor.
        ValueError: an unknown ``layer``, no classifier found, or inputs the model rejects (shape, channels).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor of images (N, C, H, W); got {type(x).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        raise ValueError(f"layer {layer!r} is not a module of {type(model).__name__}; modules are e.g. "
                         f"{[n for n in modules if n][-5:]}")
    use_interface = layer is None and _classifier_interface(model)
    target = None if use_interface else modules[layer if layer is not None else _last_linear(model)]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(torch.flatten(args[0], 1).float().cpu())

    was_training = model.training
    model.eval()
    outputs = []
    handle = target.register_forward_pre_hook(hook) if target is not None else None
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size].to(device)
                try:
                    if use_interface:
                        outputs.append(torch.flatten(model.forward_features(xb), 1).float().cpu())
                    else:
                        model(xb)
                except RuntimeError as exc:  # e.g. a channel mismatch inside a convolution
                    raise ValueError(f"{type(model).__name__} cannot take inputs of shape {tuple(xb.shape)[1:]}: "
                                     f"{exc}") from exc
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    if use_interface:
        return torch.cat(outputs) if outputs else torch.empty(0, 0)
    if len(captured) != (x.shape[0] + batch_size - 1) // batch_size:
        raise ValueError(f"layer {layer or _last_linear(model)!r} was not called exactly once per forward pass")
    return torch.cat(captured) if captured else torch.empty(0, 0)
