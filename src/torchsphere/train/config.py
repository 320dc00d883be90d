"""Typed training configuration: a dataclass with YAML round trip (as nanoGPT's config dataclass, timm's YAML).

A YAML file sets defaults, command-line flags override them, and the resolved configuration is written to
``config.yaml`` in the run folder, from which ``torchsphere evaluate`` / ``predict`` / ``--resume`` rebuild the run.

The defaults follow the official SphereNet protocol where it applies (wy1iu/SphereNet, Liu et al., NIPS 2017): Adam at
lr 1e-3, batch 128, weight decay 5e-4 except on SphereConv filters, label smoothing 0.01, orthonormality 1e-4 on the
sphere layers, lr / 10 at 34k and 54k of 64k iterations (expressed here as fractions of the budget when no milestones
are given).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..functional._checks import OPERATORS, check_choice
from ..models.factory import BN_STATS
from ..regularizers.model import METHODS

HEADS: tuple[str, ...] = ("softmax", "wsoftmax", "gasoftmax")
NORMS: tuple[str, ...] = ("bn", "spherenorm", "spherenorm+bn", "gn", "none")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
LR_SCHEDULES: tuple[str, ...] = ("multistep", "cosine", "constant")
REGULARIZERS: tuple[str, ...] = ("none", *METHODS)  # HypersphericalRegularizer methods
DEVICES: tuple[str, ...] = ("cpu", "cuda")
# official lr drops at 34k and 54k of 64k iterations, used when no milestones are given
OFFICIAL_MILESTONE_FRACTIONS: tuple[float, ...] = (34_000 / 64_000, 54_000 / 64_000)


@dataclass
class TrainConfig:
    """Everything a training run depends on; ``TrainConfig.from_yaml(run/config.yaml)`` rebuilds it."""

    # model
    model: str = "spherenet9"
    operator: str | None = None          # SphereConv operator; None keeps the model's default
    sigmoid_k: float | None = None        # k of the sigmoid / initial k of learnable_sigmoid (None: layer default)
    head: str = "softmax"                 # softmax | wsoftmax | gasoftmax
    head_operator: str | None = None      # operator of an angular head (None: cosine); not with softmax
    margin: float = 1.5                   # GA-Softmax margin m (multiplies the target angle; >= 1)
    anneal_lambda: bool = False           # A-Softmax lambda annealing (SphereFace) for the gasoftmax head
    detach_margin: bool = False           # margin in the forward value only (OpenSphere), gasoftmax head
    head_scale: float | None = None       # fixed logit scale s of an angular head (None: s = |x|)
    fc_norm: bool = False                 # the model's norm after fc6 (plain nets; unbounded SphereNet features)
    norm: str = "bn"                      # bn | spherenorm | spherenorm+bn | none
    width_mult: float = 1.0               # channel multiplier (official widths 128/192/256)
    widths: tuple[int, ...] | None = None  # stage widths before width_mult; None: the model's (MHE CNN-9: 64/128/256)
    feature_dim: int | None = None        # outputs of a plain net's fc6 (None: 256; 2 or 3 to plot the features)
    bn_momentum: float | None = None      # None: the bn_stats mode's (torch 0.1; official 0.001 = TF decay 0.999)
    bn_stats: str = "torch"               # torch (nn.BatchNorm2d) | official (zero-started EMA of biased moments)
    precise_bn: int = 0                   # batches re-estimating BN statistics before each evaluation (0: off)
    bn_shadow: tuple[str, ...] = ()       # extra BN statistics kept side by side, e.g. ("torch@0.1",); test_acc_*
    bn_drift: int = 0                     # window in steps for the drift of each BN layer's batch moments (0: off)
    train_eval_size: int = 1000           # fixed training images evaluated in eval mode (train_eval_acc; 0: off)
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_fraction: float = 0.1             # validation split carved from the training set (seeded)
    limit_train: int | None = None
    limit_test: int | None = None
    augment: str | None = None            # None: the dataset's default augmentation
    # budget
    epochs: int | None = None
    steps: int | None = None              # wins over epochs; official: 64,000 iterations
    batch_size: int = 128                 # the global batch (split over DDP ranks)
    # optimization
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9                 # SGD only
    nesterov: bool | None = None          # SGD only; None: Nesterov. The official MHE recipe: False (plain momentum)
    weight_decay: float = 5e-4            # coupled L2; none on sphere filters (official)
    decay_sphere_weights: bool = False
    lr_schedule: str = "multistep"
    milestones: tuple[int, ...] = ()      # steps; empty: 34/64 and 54/64 of the budget
    lr_gamma: float = 0.1
    label_smoothing: float = 0.01         # official epsilon
    official_loss: bool = False           # log(softmax + 1e-4) floor of the official loss.py
    # regularizers (added to the loss explicitly)
    regularizer: str = "none"
    reg_lambda_hidden: float | None = None  # None: the method's official default (regularizers.default_lambdas)
    reg_lambda_output: float | None = None
    reg_s: float | None = None            # MHE power s (None: the regularizer's default 2); MHE methods only
    orth: float = 0.0                     # orthonormality coefficient on sphere layers (official 1e-4)
    # evaluation, checkpoints, logging
    eval_every: int = 500                 # steps (official: 500)
    eval_batch_size: int = 500
    checkpoint_every: int = 0             # extra checkpoints every N steps (0: only at evaluations)
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None            # torch CPU threads for this run (None: torch's default)
    amp: bool = False
    compile: bool = False
    sync_bn: bool = False
    resume: bool = False
    quiet: bool = False
    output: str = "runs/default"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # extra build_dataset keywords (synthetic sizes)
    # collaborative training across sites (train/collaborative.py; Xu, Mi, Feng et al., arXiv 1810.06877)
    sites: int | None = None              # K sites, each on its own shard, averaged every round; None: plain training
    rounds: int | None = None             # R rounds: the budget with sites (each site trains rounds * local_epochs)
    local_epochs: int = 1                 # E passes over its own shard per site between two averagings
    site_partition: str = "iid"           # iid | label-shards | dirichlet (torchsphere.data.shards)
    shards_per_site: int = 2              # label-shards: label-sorted pieces per site
    dirichlet_alpha: float = 0.5          # dirichlet: concentration of the per-class site shares
    lr_cycle: str = "triangular"          # one cycle per round between lr_min and lr: triangular | cosine | constant
    lr_min: float | None = None           # low end of the cycle (None: lr / 10)
    avg_bn: str = "average"               # BatchNorm running statistics: average | recompute (on the sites' data)
    avg_optimizer: str = "average"        # optimizer state: average | reset (every round) | local (kept per site)
    # learning-curve protocol (torchsphere curves): train on one class-stratified disjoint partition of the pool left
    # after a validation split carved with the partition's seed; {"per_class": n, "index": i, "seed": s} or None
    partition: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.milestones = tuple(int(m) for m in self.milestones)
        if isinstance(self.bn_shadow, str):
            raise TypeError(f"bn_shadow must be a sequence of specs such as ['torch@0.1']; got the string "
                            f"{self.bn_shadow!r}")
        self.bn_shadow = tuple(self.bn_shadow)
        if self.widths is not None:
            self.widths = tuple(self.widths)
        self.validate()
        if self.regularizer == "none":  # canonical form: coefficients of an absent regularizer mean nothing
            self.reg_lambda_hidden = self.reg_lambda_output = self.reg_s = None

    def validate(self) -> None:
        """Raises ValueError/TypeError naming the field and the value received."""
        check_choice("head", self.head, HEADS)
        check_choice("norm", self.norm, NORMS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("regularizer", self.regularizer, REGULARIZERS)
        check_choice("device", self.device, DEVICES)
        check_choice("bn_stats", self.bn_stats, BN_STATS)
        from .bn_stats import spec_name

        names = [spec_name(spec) for spec in self.bn_shadow]  # raises on a malformed spec
        if len(set(names)) != len(names):
            raise ValueError(f"bn_shadow specs must be distinct; got {list(self.bn_shadow)!r}")
        for name in ("precise_bn", "train_eval_size", "bn_drift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
        if (self.precise_bn or self.bn_shadow or self.bn_drift) and self.norm in ("spherenorm", "gn", "none"):
            option = "precise_bn" if self.precise_bn else ("bn_shadow" if self.bn_shadow else "bn_drift")
            raise ValueError(f"{option} needs BatchNorm layers; got norm={self.norm!r}, which has none")
        if self.operator is not None:
            check_choice("operator", self.operator, OPERATORS)
        if self.head_operator is not None:
            check_choice("head_operator", self.head_operator, OPERATORS)
            if self.head == "softmax":
                raise ValueError(f"head_operator applies only to the angular heads 'wsoftmax' and 'gasoftmax'; got "
                                 f"head_operator={self.head_operator!r} with head='softmax'")
        for name in ("sigmoid_k", "reg_s"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < (0 if name == "reg_s" else 1e-300)):
                raise ValueError(f"{name} must be a number {'>= 0' if name == 'reg_s' else '> 0'} or None; "
                                 f"got {value!r}")
        if self.widths is not None and (not self.widths or any(
                isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in self.widths)):
            raise ValueError(f"widths must be positive integers; got {self.widths!r}")
        for name in ("lr", "batch_size", "eval_every", "eval_batch_size", "width_mult", "lr_gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be > 0; got {value!r}")
        for name in ("weight_decay", "reg_lambda_hidden", "reg_lambda_output", "orth", "momentum",
                     "checkpoint_every"):
            value = getattr(self, name)
            if value is None and name.startswith("reg_lambda"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")
        for name in ("epochs", "steps", "limit_train", "limit_test", "threads", "feature_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None; got {value!r}")
        if self.bn_momentum is not None and not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1]; got {self.bn_momentum!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1); got {self.label_smoothing!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction!r}")
        if self.margin < 1.0:
            raise ValueError(f"margin must be >= 1 (m multiplies the target angle); got {self.margin!r}")
        if any(m <= 0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing positive steps; got {self.milestones!r}")
        if self.anneal_lambda and self.head != "gasoftmax":
            raise ValueError(f"anneal_lambda needs head='gasoftmax'; got head={self.head!r}")
        if self.detach_margin and self.head != "gasoftmax":
            raise ValueError(f"detach_margin needs head='gasoftmax'; got head={self.head!r}")
        if self.detach_margin and self.anneal_lambda:
            raise ValueError("detach_margin and anneal_lambda are two alternative recipes for the margin; got both")
        for name in ("anneal_lambda", "detach_margin", "fc_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool; got {getattr(self, name)!r}")
        if self.head_scale is not None:
            if self.head == "softmax":
                raise ValueError(f"head_scale applies only to the angular heads 'wsoftmax' and 'gasoftmax'; got "
                                 f"head_scale={self.head_scale!r} with head='softmax'")
            if (isinstance(self.head_scale, bool) or not isinstance(self.head_scale, (int, float))
                    or not math.isfinite(self.head_scale) or self.head_scale <= 0):
                raise ValueError(f"head_scale must be a number > 0 or None; got {self.head_scale!r}")
        validate_sites(self)
        if self.partition is not None:
            from ..data.partitions import Partition

            self.partition = Partition.from_dict(self.partition).to_dict()
            if self.limit_train is not None:
                raise ValueError(f"limit_train and partition exclude each other (a partition is already a subset); "
                                 f"got limit_train={self.limit_train!r}, partition={self.partition!r}")

    # ---------------------------------------------------------------- (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON-safe values (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        out["widths"] = None if self.widths is None else list(self.widths)
        out["bn_shadow"] = list(self.bn_shadow)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Builds a config; unknown keys raise a TypeError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown TrainConfig keys {unknown}; known keys: {sorted(known)}")
        values = dict(values)
        for key in ("milestones", "widths", "bn_shadow"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        return cls.from_dict(load_yaml(path))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- collaborative training across sites
LR_CYCLES: tuple[str, ...] = ("triangular", "cosine", "constant")
AVG_BN: tuple[str, ...] = ("average", "recompute")
AVG_OPTIMIZER: tuple[str, ...] = ("average", "reset", "local")


def validate_sites(config: TrainConfig) -> None:
    """Checks the fields of training across sites (``sites`` ... ``avg_optimizer``); raises ValueError/TypeError."""
    from ..data.shards import PARTITIONS

    check_choice("site_partition", config.site_partition, PARTITIONS)
    check_choice("lr_cycle", config.lr_cycle, LR_CYCLES)
    check_choice("avg_bn", config.avg_bn, AVG_BN)
    check_choice("avg_optimizer", config.avg_optimizer, AVG_OPTIMIZER)
    for name in ("sites", "rounds", "local_epochs", "shards_per_site"):
        value = getattr(config, name)
        if value is None and name in ("sites", "rounds"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer{' or None' if name in ('sites', 'rounds') else ''}; "
                             f"got {value!r}")
    for name in ("dirichlet_alpha", "lr_min"):
        value = getattr(config, name)
        if value is None and name == "lr_min":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0{' or None' if name == 'lr_min' else ''}; "
                             f"got {value!r}")
    if config.lr_min is not None and config.lr_min > config.lr:
        raise ValueError(f"lr_min must not exceed lr (the cycle runs between lr_min and lr); got lr_min="
                         f"{config.lr_min!r} > lr={config.lr!r}")
    if config.sites is None:
        if config.rounds is not None:
            raise ValueError(f"rounds needs sites (training across sites); got rounds={config.rounds!r} with "
                             f"sites=None")
        return
    if config.rounds is None:
        raise ValueError(f"sites={config.sites} needs a budget in rounds (rounds * local_epochs epochs per site); "
                         f"got rounds=None")
    refused = dict(steps=config.steps is not None, epochs=config.epochs is not None,
                   milestones=bool(config.milestones), checkpoint_every=config.checkpoint_every != 0,
                   sync_bn=config.sync_bn, compile=config.compile, precise_bn=config.precise_bn != 0,
                   bn_shadow=bool(config.bn_shadow), bn_drift=config.bn_drift != 0)
    bad = [name for name, given in refused.items() if given]
    if bad:
        raise ValueError(f"with sites the budget is rounds * local_epochs, the lr follows lr_cycle, checkpoints "
                         f"are written at round ends and the BN statistics follow avg_bn: {', '.join(bad)} cannot be "
                         f"set (got "
                         + ", ".join(f"{name}={getattr(config, name)!r}" for name in bad) + ")")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML mapping; an empty file is an empty mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping; got {type(data).__name__}")
    return data


def config_defaults() -> dict[str, Any]:
    """The field defaults of :class:`TrainConfig` (for help texts)."""
    return TrainConfig().to_dict()
