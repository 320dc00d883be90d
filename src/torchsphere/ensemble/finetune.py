"""Fine-tuning a trained run on a downstream few-shot task, through torchsphere's training loop, and its small sweep.

Mustafa et al. (*Deep Ensembles for Low-Data Transfer Learning*, arXiv 2010.06866, 2020) fine-tune each pre-selected
model "with a small hyperparameter sweep" and choose on the downstream validation split; which values they swept is
not known to us (the paper's body was not available). torchsphere's choices, in the spirit of the VTAB fine-tuning
protocol (google-research/task_adaptation: SGD with momentum, a sweep of 4 points over learning rate and schedule
length) scaled down to a CPU:

- the architecture of the pool run (model, operator, head, norm, widths, BatchNorm momentum) with **all of its weights
  except the classifier** ``fc``, which is replaced by a fresh head of the same kind for the downstream classes
  (seeded by ``seed``), and everything trained ("full fine-tuning");
- SGD, momentum 0.9 (Nesterov), cosine learning-rate decay to 0 over the run, batch ``min(32, training examples)``,
  weight decay 5e-4 as in training (none on SphereConv filters), no label smoothing, the dataset's default
  augmentation (horizontal flips for Fashion-MNIST);
- a sweep is a list of (learning rate, steps) points, default :data:`DEFAULT_SWEEP`; each point is a separate run.

Each fine-tuning run is an ordinary run folder (``config.yaml``, ``metrics.csv``, ``summary.json``,
``model.safetensors``, ``checkpoint.pt``) trained by :func:`torchsphere.train.loop.setup` /
``train_one_epoch`` / ``finish`` with ``dataset="subset"``: a killed run resumes from its last checkpoint, exactly.
The run carves no validation split of its own: the task's validation examples are kept out of training and used only
by the caller, to choose the sweep point and the ensemble.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.subset import FewShotTask
from ..train import checkpoint as ckpt
from ..train.config import TrainConfig
from ..train.loop import CONFIG_FILE, DATA_FILE, finish, setup, train_one_epoch
from ..train import distributed as dist_utils

MODEL_FIELDS: tuple[str, ...] = ("model", "operator", "sigmoid_k", "head", "head_operator", "margin", "norm",
                                 "width_mult", "widths", "feature_dim", "bn_momentum")
CLASSIFIER_PREFIX = "fc."  # the ClassifierNet head, replaced for the new classes
MAX_BATCH = 32


@dataclass(frozen=True)
class SweepPoint:
    """One fine-tuning hyperparameter setting: SGD learning rate and number of steps."""

    lr: float
    steps: int

    def __post_init__(self) -> None:
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) \
                or self.lr <= 0:
            raise ValueError(f"sweep learning rate must be a number > 0; got {self.lr!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sweep steps must be an int >= 1; got {self.steps!r}")

    @property
    def label(self) -> str:
        return f"lr{self.lr:g}_steps{self.steps}"


DEFAULT_SWEEP: tuple[SweepPoint, ...] = (SweepPoint(0.01, 100), SweepPoint(0.001, 100))


def parse_sweep(text: str) -> list[SweepPoint]:
    """``"0.01:100,0.001:300"`` -> sweep points (LR:STEPS, comma-separated; duplicates refused).

    Raises:
        ValueError: a malformed entry, a non-positive value or a duplicate, with the entry named.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"sweep must be LR:STEPS entries separated by commas, e.g. 0.01:100,0.001:100; got {text!r}")
    points = []
    for entry in text.split(","):
        parts = entry.strip().split(":")
        try:
            if len(parts) != 2:
                raise ValueError
            lr, steps = float(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"sweep entry {entry.strip()!r} is not LR:STEPS (e.g. 0.01:100)") from None
        points.append(SweepPoint(lr, steps))
    if len(set(points)) != len(points):
        raise ValueError(f"sweep {text!r} repeats an entry")
    return points


def pool_config(run_dir: str | os.PathLike) -> tuple[TrainConfig, dict[str, Any]]:
    """The ``config.yaml`` and ``data.json`` of a finished run folder.

    Raises:
        FileNotFoundError: not a finished run folder (the missing file is named).
    """
    import json

    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, DATA_FILE, ckpt.MODEL_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} is not a finished run folder: {name} is missing")
    return TrainConfig.from_yaml(run_dir / CONFIG_FILE), json.loads((run_dir / DATA_FILE).read_text())


def check_compatible(run_dir: str | os.PathLike, info: dict[str, Any], task: FewShotTask) -> None:
    """Raises ValueError when the downstream images do not have the channels and size the run was trained on."""
    shape = (int(info["in_channels"]), *map(int, info["image_size"]))
    if shape != (task.in_channels, *task.image_size):
        raise ValueError(f"incompatible inputs: run {str(run_dir)!r} was trained on images of shape {shape} "
                         f"(channels, height, width); the downstream task has {(task.in_channels, *task.image_size)}")


def finetune_config(run_dir: str | os.PathLike, task: FewShotTask, point: SweepPoint, *, seed: int, output: str,
                    data_dir: str | None = None, limit_test: int | None = None, threads: int | None = 1,
                    device: str = "cpu") -> TrainConfig:
    """The :class:`TrainConfig` of one fine-tuning run (see the module docstring for the recipe)."""
    config, info = pool_config(run_dir)
    check_compatible(run_dir, info, task)
    n_train = int(task.train_y.numel())
    model_fields = {k: getattr(config, k) for k in MODEL_FIELDS}
    return TrainConfig(**model_fields, dataset="subset", data_dir=data_dir, dataset_kwargs=dict(task.dataset_kwargs),
                       val_fraction=0.0, limit_test=limit_test, steps=point.steps, batch_size=min(MAX_BATCH, n_train),
                       optimizer="sgd", lr=point.lr, momentum=0.9, lr_schedule="cosine", label_smoothing=0.0,
                       eval_every=point.steps, seed=seed, threads=threads, device=device, quiet=True, output=output)


def load_backbone(model: nn.Module, run_dir: str | os.PathLike, weights: str = ckpt.MODEL_FILE) -> None:
    """Copies every weight of ``run_dir`` except the classifier ``fc`` into ``model`` (in place: an optimizer built
    over ``model`` keeps its parameters).

    Raises:
        ValueError: the architectures differ (missing, unexpected or differently shaped tensors are named).
    """
    from safetensors.torch import load_file

    saved = {k: v for k, v in load_file(str(Path(run_dir) / weights)).items() if not k.startswith(CLASSIFIER_PREFIX)}
    own = model.state_dict()
    body = {k for k in own if not k.startswith(CLASSIFIER_PREFIX)}
    missing, unexpected = sorted(body - set(saved)), sorted(set(saved) - body)
    shapes = sorted(k for k in body & set(saved) if tuple(own[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"the weights of {str(run_dir)!r} do not fit the fine-tuning model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {shapes[:5]}")
    with torch.no_grad():
        for key in body:
            own[key].copy_(saved[key].to(own[key].dtype))


def predict_probs(model: nn.Module, x: Tensor, *, batch_size: int = 500) -> Tensor:
    """(N, classes) float64 softmax probabilities of ``model`` in eval mode (no labels reach the head)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out.append(model(x[start:start + batch_size].to(device)).double().softmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0, dtype=torch.float64)


@dataclass
class FinetuneResult:
    """What one fine-tuning run gives the ensemble: validation and test probabilities, and its summary."""

    val_probs: Tensor
    test_probs: Tensor
    summary: dict[str, Any]


def finetune(run_dir: str | os.PathLike, task: FewShotTask, point: SweepPoint, *, output: str | os.PathLike,
             seed: int = 0, data_dir: str | None = None, limit_test: int | None = None, threads: int | None = 1,
             device: str = "cpu") -> FinetuneResult:
    """Fine-tunes the model of ``run_dir`` on ``task`` at one sweep point into the run folder ``output`` (resumed
    when it holds a checkpoint); returns the final model's validation and test probabilities.

    Raises:
        FileNotFoundError: ``run_dir`` is not a finished run folder.
        ValueError: incompatible inputs or architectures; a folder holding a different configuration.
    """
    config = finetune_config(run_dir, task, point, seed=seed, output=str(output), data_dir=data_dir,
                             limit_test=limit_test, threads=threads, device=device)
    fresh = not (Path(output) / ckpt.STATE_FILE).is_file()
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    train_log = logging.getLogger("torchsphere.train")  # many short runs: keep their per-run lines out of the way
    previous_level = train_log.level
    train_log.setLevel(max(previous_level, logging.WARNING))
    try:
        run = setup(config.replace(resume=not fresh))
        try:
            if fresh:
                load_backbone(run.raw_model, run_dir)
            while run.state.step < run.total:
                train_one_epoch(run, run.state.step // run.per_epoch)
            summary = finish(run)
            return FinetuneResult(predict_probs(run.raw_model, task.val_x), predict_probs(run.raw_model, task.test_x),
                                  summary)
        finally:
            dist_utils.cleanup(run.info)
    finally:
        train_log.setLevel(previous_level)
        torch.set_num_threads(previous_threads)
