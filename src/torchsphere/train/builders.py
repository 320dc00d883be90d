"""From a :class:`TrainConfig` to the objects of a run: data, model, optimizer, schedules, regularizer, loss.

The path of one training step (docs/architecture.md): config -> ``data.build_dataset`` -> tensors on the device ->
``models.create_model`` (head inside the model) -> ``logits = model(x, labels)`` -> cross-entropy + regularizer, added
explicitly -> optimizer / schedules step.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.orthonormal import orthonormal_penalty
from ..nn.param_groups import param_groups
from ..nn.sphere_conv import SPHERE_LAYERS
from .config import OFFICIAL_MILESTONE_FRACTIONS, TrainConfig

PROB_FLOOR = 1e-4  # official loss.py: log(softmax(z) + 1e-4)


def build_data(config: TrainConfig):
    """``torchsphere.data.build_dataset`` with the config's split settings (validation split seeded by ``seed``)."""
    from ..data import build_dataset

    if config.partition is not None:  # learning curves: validation carved with the partition seed, then the subset
        from ..data.partitions import Partition, apply_partition

        partition = Partition.from_dict(config.partition)
        data = build_dataset(config.dataset, config.data_dir, val_fraction=config.val_fraction, seed=partition.seed,
                             limit_test=config.limit_test, **config.dataset_kwargs)
        return apply_partition(data, partition)
    return build_dataset(config.dataset, config.data_dir, val_fraction=config.val_fraction, seed=config.seed,
                         limit_train=config.limit_train, limit_test=config.limit_test, **config.dataset_kwargs)


def model_overrides(config: TrainConfig, num_classes: int, in_channels: int) -> dict[str, Any]:
    """The keyword overrides that ``create_model`` receives for this config."""
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_channels=in_channels, norm=config.norm,
                                  head=config.head, width_mult=config.width_mult)
    if config.head == "gasoftmax":
        kwargs["margin"] = config.margin
        if config.detach_margin:
            kwargs["detach_margin"] = True
    if config.fc_norm:
        kwargs["fc_norm"] = True
    if config.operator is not None:
        kwargs["operator"] = config.operator
    optional = {"sigmoid_k": config.sigmoid_k, "head_operator": config.head_operator,
                "feature_dim": config.feature_dim, "widths": config.widths,
                "head_scale": config.head_scale}
    kwargs.update({key: value for key, value in optional.items() if value is not None})
    if config.bn_momentum is not None:
        kwargs["bn_momentum"] = config.bn_momentum
    if config.bn_stats != "torch":
        kwargs["bn_stats"] = config.bn_stats
    return kwargs


def build_model(config: TrainConfig, num_classes: int, in_channels: int,
                image_size: tuple[int, int] | None = None) -> nn.Module:
    """``models.create_model`` for the config; ``image_size`` reaches models that need it (plain nets size fc6 by
    it) and is left out for those that do not take it (ResNets pool globally)."""
    from ..models import create_model

    kwargs = model_overrides(config, num_classes, in_channels)
    if image_size is not None:
        try:
            return create_model(config.model, **kwargs, input_size=tuple(image_size))
        except TypeError as exc:
            if "input_size" not in str(exc):
                raise
    return create_model(config.model, **kwargs)


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """``steps`` when given, else ``epochs * steps_per_epoch``."""
    if config.steps is not None:
        return config.steps
    if config.epochs is None:
        raise ValueError("give a budget: steps or epochs (both are None)")
    return config.epochs * steps_per_epoch


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD over ``param_groups`` (official: no weight decay on SphereConv filters)."""
    groups = param_groups(model, config.weight_decay, decay_sphere_weights=config.decay_sphere_weights)
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov is not False and config.momentum > 0)


def resolved_milestones(config: TrainConfig, steps: int) -> list[int]:
    """The config's milestones, or the official 34k/64k and 54k/64k fractions of ``steps``."""
    if config.milestones:
        return list(config.milestones)
    return [max(1, round(f * steps)) for f in OFFICIAL_MILESTONE_FRACTIONS]


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer,
                    steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step lr scheduler: multistep (lr x gamma at each milestone), cosine to 0 over ``steps``, constant."""
    if config.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, resolved_milestones(config, steps), config.lr_gamma)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def build_regularizer(config: TrainConfig, model: nn.Module):
    """``HypersphericalRegularizer`` for ``config.regularizer`` (None for "none")."""
    if config.regularizer == "none":
        return None
    from ..regularizers import HypersphericalRegularizer

    return HypersphericalRegularizer(model, method=config.regularizer, lambda_hidden=config.reg_lambda_hidden,
                                     lambda_output=config.reg_lambda_output, s=config.reg_s)


def build_lambda_schedule(config: TrainConfig, model: nn.Module):
    """(A-Softmax lambda schedule, the head it drives) when ``anneal_lambda``; else (None, None)."""
    if not config.anneal_lambda:
        return None, None
    from ..nn import AngularHead, LambdaSchedule

    heads = [m for m in model.modules() if isinstance(m, AngularHead)]
    if not heads:
        raise ValueError(f"anneal_lambda needs an AngularHead in the model; model {config.model!r} has none")
    return LambdaSchedule(), heads[-1]


def set_head_lambda(head: nn.Module, value: float) -> None:
    """Sets the A-Softmax lambda on the head explicitly (no hidden counter in forward)."""
    if hasattr(head, "set_lambda"):
        head.set_lambda(value)
    else:
        head.lambda_ = value


def orth_penalty(model: nn.Module) -> Tensor:
    """Sum of ``orthonormal_penalty`` over the sphere layers' weights (official: times 1e-4 in the loss)."""
    terms = [orthonormal_penalty(m.weight) for m in model.modules() if isinstance(m, SPHERE_LAYERS)]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def floored_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                          floor: float = PROB_FLOOR) -> Tensor:
    """The official SphereNet loss: smoothed cross-entropy on log(softmax(z) + floor), batch mean.

    The floor caps each log-probability at log(floor) (about -9.2), which is why the official "fit" loss plateaus
    near 0.07 (the training logs of wy1iu/SphereNet). Computed in float32 at least.
    """
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1)
    log_p = torch.log(probs + floor)  # (N, K)
    smooth = torch.full_like(log_p, label_smoothing / num_classes)
    smooth.scatter_add_(1, target[:, None], torch.full_like(log_p[:, :1], 1.0 - label_smoothing))
    return -(smooth * log_p).sum(dim=1).mean()


def classification_loss(config: TrainConfig, logits: Tensor, target: Tensor) -> Tensor:
    if config.official_loss:
        return floored_cross_entropy(logits, target, config.label_smoothing)
    return F.cross_entropy(logits.float(), target, label_smoothing=config.label_smoothing)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPU, float16 on CUDA (with a GradScaler)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), e.g. (seed, epoch) for the data order."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The data order of ``epoch``: a function of (seed, epoch) only, so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(num_samples, generator=generator)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    if num_samples < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_samples} training samples")
    return num_samples // batch_size


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
