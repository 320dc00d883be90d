"""Checks made before a run trains: contradictory or ignored settings, the resolved configuration, the start banner.

A mistake in the configuration should cost a message and exit code 2 before any step, not a traceback after the
data is loaded, and a setting that would change nothing must not be accepted in silence. :func:`check_config` looks
at a :class:`TrainConfig` alone (device, budget, augmentation name, and the model built on PyTorch's ``meta``
device, so that every model-level error appears without allocating the weights); :func:`check_given` looks at the
settings a user wrote (flags, YAML keys), which is the only way to tell "left at the default" from "set and ignored";
:func:`setup_warnings` names the settings that make sense only with data or DDP in hand.

``augment=None`` means the dataset's own augmentation (:func:`torchsphere.data.default_augment`);
:func:`resolve_augment` replaces it by that name, so ``config.yaml`` records what actually ran.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from .config import TrainConfig

# settings that matter only together with another one: (field, applies when, what it needs)
_DEPENDENT = (
    ("margin", lambda c: c.head == "gasoftmax", "head 'gasoftmax'"),
    ("anneal_lambda", lambda c: c.head == "gasoftmax", "head 'gasoftmax'"),
    ("momentum", lambda c: c.optimizer == "sgd", "optimizer 'sgd'"),
    ("nesterov", lambda c: c.optimizer == "sgd", "optimizer 'sgd'"),
    ("milestones", lambda c: c.lr_schedule == "multistep", "lr_schedule 'multistep'"),
    ("lr_gamma", lambda c: c.lr_schedule == "multistep", "lr_schedule 'multistep'"),
    ("reg_lambda_hidden", lambda c: c.regularizer != "none", "a regularizer (--regularizer)"),
    ("reg_lambda_output", lambda c: c.regularizer != "none", "a regularizer (--regularizer)"),
    ("reg_s", lambda c: c.regularizer.startswith("mhe"), "an MHE regularizer (mhe, mhe_half, mhe_angular, ...)"),
    ("decay_sphere_weights", lambda c: c.weight_decay > 0, "weight_decay > 0"),
)


def flag(name: str) -> str:
    """The command-line spelling of a config field: ``reg_s`` -> ``--reg-s``."""
    return "--" + name.replace("_", "-")


def resolve_augment(config: TrainConfig) -> TrainConfig:
    """``config`` with ``augment`` set to the dataset's default when it is None (what the run trains with)."""
    if config.augment is not None:
        return config
    from ..data import default_augment

    return config.replace(augment=default_augment(config.dataset))


def resolved(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict (e.g. a saved ``config.yaml``) with ``augment`` resolved, for comparing two runs."""
    out = dict(values)
    if out.get("augment") is None and out.get("dataset") is not None:
        from ..data import default_augment, list_datasets

        if out["dataset"] in list_datasets():
            out["augment"] = default_augment(out["dataset"])
    return out


def config_diff(now: TrainConfig, saved: Mapping[str, Any], free: Iterable[str] = ()) -> list[str]:
    """``"field: saved -> now"`` for every field (but those in ``free``) in which two configurations differ."""
    a, b = resolved(saved), resolved(now.to_dict())
    free = set(free)
    return [f"{k}: {a.get(k)!r} -> {b[k]!r}" for k in b if k not in free and b[k] != a.get(k)]


def check_config(config: TrainConfig) -> None:
    """Raises ValueError/TypeError for a configuration that cannot run, before anything is loaded.

    Checks the budget, the augmentation name, and every model choice (by building the model on the ``meta``
    device: a CNN given a SphereConv operator, ``sigmoid_k`` with another operator, ``feature_dim`` on a ResNet,
    ``widths`` with the wrong number of stages, ...). Properties of this machine are :func:`check_device`'s.
    """
    import torch

    if config.steps is None and config.epochs is None:
        raise ValueError("no training budget: give --steps N or --epochs N (steps / epochs in a YAML config)")
    if config.augment is not None:
        from ..data import list_augments

        if config.augment not in list_augments():
            close = difflib.get_close_matches(config.augment, list_augments(), n=3, cutoff=0.5)
            raise ValueError(f"unknown augment {config.augment!r}; " + (f"did you mean {', '.join(close)}? "
                             if close else "") + f"choose from {', '.join(list_augments())}")
    from .builders import build_model

    with torch.device("meta"):  # no memory, no initialization cost; shapes and choices are checked as for real
        try:
            build_model(config, 2, 1)
        except TypeError as exc:
            raise TypeError(f"model {config.model!r}: {exc}") from None


def check_device(config: TrainConfig) -> None:
    """Raises ValueError when the configured device is not available on this machine."""
    import torch

    if config.device == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise ValueError(f"device 'cuda' was requested but torch.cuda.is_available() is False ({why}); use "
                         f"--device cpu")


def check_given(given: Mapping[str, Any], config: TrainConfig) -> None:
    """Raises ValueError naming each setting in ``given`` (what the user wrote) that ``config`` would ignore.

    Args:
        given: the fields set explicitly (command-line flags, YAML keys), with their values.
        config: the resolved configuration.
    """
    problems = [f"{flag(name)} {given[name]!r} needs {needs} (got {_context(name, config)})"
                for name, applies, needs in _DEPENDENT if name in given and given[name] is not None
                and not applies(config)]
    if problems:
        raise ValueError("settings that would be ignored: " + "; ".join(problems))


def _context(name: str, config: TrainConfig) -> str:
    key = {"margin": "head", "anneal_lambda": "head", "momentum": "optimizer", "nesterov": "optimizer",
           "milestones": "lr_schedule", "lr_gamma": "lr_schedule", "decay_sphere_weights": "weight_decay"}.get(
        name, "regularizer")
    return f"{key}={getattr(config, key)!r}"


def setup_warnings(config: TrainConfig, total_steps: int, distributed: bool) -> list[str]:
    """Settings that do nothing in this run, known once the budget and the process group are: one line each."""
    lines = []
    if config.sync_bn and not distributed:
        lines.append("--sync-bn has no effect without DDP (start with torchrun --nproc_per_node=N); BatchNorm "
                     "statistics stay per process")
    late = [m for m in config.milestones if m >= total_steps]
    if late and config.lr_schedule == "multistep":
        lines.append(f"--milestones {list(late)} at or beyond the budget of {total_steps} steps: the learning rate "
                     f"never drops there")
    return lines


def banner(run: Any) -> str:
    """The start line(s) of a run: model, parameters, data (source and sizes), augmentation, device, threads."""
    import torch

    from .builders import count_parameters

    cfg, data = run.config, run.data
    threads = torch.get_num_threads()
    operator = cfg.operator or (getattr(run.raw_model, "default_cfg", {}) or {}).get("operator", "?")
    h, w = data.image_size
    action = f"resuming at step {run.state.step}/{run.total}" if run.state.step else f"training {run.total} steps"
    return (f"{cfg.model} (operator {operator}, norm {cfg.norm}, head {cfg.head}, width_mult {cfg.width_mult:g}): "
            f"{count_parameters(run.raw_model):,} parameters\n"
            f"data {data.name} from {getattr(data, 'source', '?')}: train {data.train_y.numel():,} / val "
            f"{data.val_y.numel():,} / test {data.test_y.numel():,} images of {data.in_channels}x{h}x{w}, "
            f"{data.num_classes} classes; augment {cfg.augment}\n"
            f"{action} of batch {cfg.batch_size} ({run.per_epoch} steps per epoch) on {run.device} "
            f"(world size {run.info.world_size}, {threads} thread{'s' if threads != 1 else ''}) -> {cfg.output}")
