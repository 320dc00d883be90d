"""The flags of a training run and their types, shared by the subcommands of ``torchsphere`` (torchsphere.cli).

Every :class:`~torchsphere.train.TrainConfig` field has a flag whose default is suppressed, so that only the flags
given override a YAML file or a preset; :func:`train_config` layers them (run folder on ``--resume``, ``--config``
file, flags) and validates the result, reporting errors through ``parser.error`` (exit code 2).
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from typing import Any

from ..functional._checks import OPERATORS
from ..models.factory import BN_STATS
from ..train.config import (DEVICES, HEADS, LR_SCHEDULES, NORMS, OPTIMIZERS, REGULARIZERS, TrainConfig,
                            config_defaults, load_yaml)

DEFAULTS = config_defaults()


def number(kind: type, *, minimum: float, strict: bool) -> Any:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{'n integer' if kind is int else ' number'}, got {text!r}")
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


POS_INT, POS_FLOAT = number(int, minimum=0, strict=True), number(float, minimum=0, strict=True)
NONNEG_INT, NONNEG_FLOAT = number(int, minimum=0, strict=False), number(float, minimum=0, strict=False)


def fraction(text: str) -> float:
    value = NONNEG_FLOAT(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def str_list(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def partition(text: str) -> dict[str, int]:
    values = int_list(text)
    if not 1 <= len(values) <= 3 or values[0] < 1 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected PER_CLASS[,INDEX[,SEED]] with PER_CLASS >= 1, got {text!r}")
    return dict(zip(("per_class", "index", "seed"), values))


def flag(group, name: str, help: str) -> None:
    group.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=f"{help} (default: {DEFAULTS[name[2:].replace('-', '_')]})")


def add_model_list_arguments(parser: argparse.ArgumentParser) -> None:
    """``--models M1,M2`` and ``--operators OP1,OP2`` of the commands that build configurations from models."""
    parser.add_argument("--models", type=str_list, metavar="M1,M2",
                        help="models to compare (the first is the baseline)")
    parser.add_argument("--operators", type=str_list, metavar="OP1,OP2",
                        help=f"operators for the *sphere* models, from {list(OPERATORS)}")


def check_model_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every model of ``--models`` registered and every operator of ``--operators`` known, else ``parser.error``."""
    for model in args.models:
        check_names({"model": model}, parser)
    for op in args.operators or []:
        if op not in OPERATORS:
            parser.error(f"unknown operator {op!r}; choose from {list(OPERATORS)}")


def add_train_arguments(parser: argparse.ArgumentParser, *, for_compare: bool = False,
                        for_curves: bool = False) -> None:
    """The TrainConfig flags. Defaults are suppressed so that only the flags given override the YAML/preset.

    ``for_curves`` leaves out the flags that ``torchsphere curves`` sets for every run (the partition, the subset)."""
    S = argparse.SUPPRESS

    def d(key: str) -> str:
        return f"(default: {DEFAULTS[key]})"

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=S, metavar="NAME", help=f"registered model, e.g. cnn9, spherenet9, "
                   f"sphere_resnet32 (`torchsphere train --list-models`) {d('model')}")
    g.add_argument("--operator", default=S, choices=OPERATORS, help="SphereConv operator (default: the model's own)")
    g.add_argument("--sigmoid-k", type=POS_FLOAT, default=S, metavar="K",
                   help="k of the sigmoid operator / initial k of learnable_sigmoid (default: the layer's, 0.3 / 0.75)")
    g.add_argument("--head", default=S, choices=HEADS, help=f"classifier head {d('head')}")
    g.add_argument("--margin", type=number(float, minimum=1, strict=False), default=S,
                   help=f"GA-Softmax margin m >= 1 on the target angle (head gasoftmax) {d('margin')}")
    flag(g, "--anneal-lambda", "A-Softmax lambda annealing for the gasoftmax head (SphereFace schedule)")
    flag(g, "--detach-margin", "the gasoftmax margin changes the forward value only, the gradient is the "
          "unmargined one (OpenSphere's annealing-free recipe)")
    g.add_argument("--head-scale", type=POS_FLOAT, default=S, metavar="S",
                   help="fixed logit scale s of the angular head, as ArcFace/CosFace (default: s = |x|)")
    flag(g, "--fc-norm", "the model's normalization after fc6 (plain nets; SphereNet features become unbounded)")
    g.add_argument("--head-operator", default=S, choices=OPERATORS,
                   help="operator of the angular head (wsoftmax / gasoftmax; default: cosine)")
    g.add_argument("--norm", default=S, choices=NORMS, help=f"normalization after each conv {d('norm')}")
    g.add_argument("--bn-momentum", type=number(float, minimum=0, strict=True), default=S, metavar="M",
                   help="BatchNorm momentum, PyTorch convention = 1 - decay (default: 0.1 with --bn-stats torch, "
                   "the official 0.001 with --bn-stats official)")
    g.add_argument("--bn-stats", default=S, choices=BN_STATS,
                   help="how BatchNorm keeps its test-time statistics: torch (nn.BatchNorm2d: EMA from mean 0 / var 1 "
                   "of the unbiased batch variance) or official (the official code's zero-started EMA of the biased "
                   f"batch moments, decay 0.999) {d('bn_stats')}")
    g.add_argument("--precise-bn", type=NONNEG_INT, default=S, metavar="N",
                   help="re-estimate the BN statistics on N training batches before each evaluation and before "
                   "saving the final model (equal-weight average; 0: off) (default: 0)")
    g.add_argument("--bn-shadow", type=str_list, default=S, metavar="SPEC,...",
                   help="extra BN statistics kept side by side and evaluated on the test set as test_acc_NAME, e.g. "
                   "official,torch@0.1 (they never change training)")
    g.add_argument("--bn-drift", type=NONNEG_INT, default=S, metavar="STEPS",
                   help="log the relative change of each BN layer's mean batch moments from one window of STEPS "
                   "training steps to the next, to bn_drift.csv (0: off) (default: 0)")
    g.add_argument("--width-mult", type=POS_FLOAT, default=S, metavar="F",
                   help=f"channel multiplier {d('width_mult')}")
    g.add_argument("--widths", type=int_list, default=S, metavar="W1,W2,W3",
                   help="stage widths before --width-mult (default: the model's; MHE CNN-9: 64,128,256)")
    g.add_argument("--feature-dim", type=POS_INT, default=S, metavar="D",
                   help="outputs of a plain net's fc6, fed to the classifier (default 256; 2 to plot the features)")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=S, metavar="NAME", help=f"fashion-mnist, mnist, cifar10, cifar100, digits, "
                   f"imagefolder, synthetic {d('dataset')}")
    g.add_argument("--data-dir", default=S, metavar="DIR", help="folder searched first for the dataset files, then "
                   "$TORCHSPHERE_DATA, then system folders")
    g.add_argument("--val-fraction", type=fraction, default=S, metavar="F",
                   help=f"validation split carved from the training set, used for model selection {d('val_fraction')}")
    if not for_curves:
        g.add_argument("--limit-train", type=POS_INT, default=S, metavar="N",
                       help="use a seeded subset of N training images")
    g.add_argument("--limit-test", type=POS_INT, default=S, metavar="N", help="use a fixed subset of N test images")
    g.add_argument("--augment", default=S, metavar="NAME", help="batch augmentation: none, flip, crop_flip, cifar10+, "
                   "... (default: the dataset's own)")
    if not for_curves:
        g.add_argument("--partition", type=partition, default=S, metavar="N[,I[,S]]",
                       help="train on partition I (default 0) of N examples per class of the pool left after a "
                       "validation split carved with seed S (default 0): the protocol of `torchsphere curves`")

    g = parser.add_argument_group("budget and optimization")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=POS_INT, default=S, metavar="N",
                        help="training epochs (a budget is required: --epochs or --steps)")
    budget.add_argument("--steps", type=POS_INT, default=S, metavar="N",
                        help="training steps (official: 64000; a budget is required: --steps or --epochs)")
    g.add_argument("--batch-size", type=POS_INT, default=S, metavar="N",
                   help=f"global batch size, split over DDP ranks {d('batch_size')}")
    g.add_argument("--optimizer", default=S, choices=OPTIMIZERS, help=f"{d('optimizer')}")
    g.add_argument("--lr", type=POS_FLOAT, default=S, help=f"learning rate {d('lr')}")
    g.add_argument("--momentum", type=NONNEG_FLOAT, default=S, help=f"SGD momentum {d('momentum')}")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S,
                   help="Nesterov momentum for SGD (default: on; --no-nesterov: plain momentum, as the MHE recipe)")
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=S, metavar="WD",
                   help=f"coupled L2; none on SphereConv filters (official) {d('weight_decay')}")
    flag(g, "--decay-sphere-weights", "also decay SphereConv filters")
    g.add_argument("--lr-schedule", default=S, choices=LR_SCHEDULES, help=f"per-step schedule {d('lr_schedule')}")
    g.add_argument("--milestones", type=int_list, default=S, metavar="S1,S2",
                   help="multistep drop steps (default: 34/64 and 54/64 of the budget, as the official 34k/54k/64k)")
    g.add_argument("--lr-gamma", type=POS_FLOAT, default=S, help=f"multistep factor {d('lr_gamma')}")
    g.add_argument("--label-smoothing", type=fraction, default=S, metavar="EPS", help=f"{d('label_smoothing')}")
    flag(g, "--official-loss", "the official log(softmax + 1e-4) floored loss")

    g = parser.add_argument_group("regularizers (added to the loss explicitly)")
    g.add_argument("--regularizer", default=S, choices=REGULARIZERS, help=f"{d('regularizer')}")
    g.add_argument("--reg-lambda-hidden", type=NONNEG_FLOAT, default=S, metavar="L",
                   help="weight on hidden layers (default: the method's official value)")
    g.add_argument("--reg-lambda-output", type=NONNEG_FLOAT, default=S, metavar="L",
                   help="weight on the classifier (default: the method's official value)")
    g.add_argument("--reg-s", type=NONNEG_FLOAT, default=S, metavar="S",
                   help="MHE power s (0: log energy; default: the regularizer's, 2); MHE methods only")
    g.add_argument("--orth", type=NONNEG_FLOAT, default=S, metavar="C",
                   help=f"orthonormality penalty on sphere layers (official 1e-4) {d('orth')}")

    g = parser.add_argument_group(
        "training across sites", "K sites each train on their own shard; after every round of E local epochs (one "
        "learning-rate cycle) their models are averaged, weighted by shard size (Xu, Mi, Feng et al., arXiv "
        "1810.06877). One process simulates the K sites; under `torchrun --nproc_per_node=K` each process is one "
        "site. The budget is --rounds (not --steps/--epochs); --batch-size is per site. See docs/collaborative.md.")
    g.add_argument("--sites", type=POS_INT, default=S, metavar="K", help="number of sites (default: none, plain "
                   "training)")
    g.add_argument("--rounds", type=POS_INT, default=S, metavar="R", help="averaging rounds (required with --sites)")
    g.add_argument("--local-epochs", type=POS_INT, default=S, metavar="E",
                   help=f"passes over its own shard per site between averagings {d('local_epochs')}")
    g.add_argument("--site-partition", default=S, choices=("iid", "label-shards", "dirichlet"),
                   help=f"how the training split is cut into the sites' shards {d('site_partition')}")
    g.add_argument("--shards-per-site", type=POS_INT, default=S, metavar="S",
                   help=f"label-shards: label-sorted pieces per site {d('shards_per_site')}")
    g.add_argument("--dirichlet-alpha", type=POS_FLOAT, default=S, metavar="A",
                   help=f"dirichlet: label-skew concentration, small = more skewed {d('dirichlet_alpha')}")
    g.add_argument("--lr-cycle", default=S, choices=("triangular", "cosine", "constant"),
                   help="learning rate over each round, between --lr-min and --lr: triangular (low-high-low, "
                   f"Smith's CLR), cosine (restart high, anneal low) or constant {d('lr_cycle')}")
    g.add_argument("--lr-min", type=POS_FLOAT, default=S, metavar="LR", help="low end of the cycle (default: lr/10)")
    g.add_argument("--avg-bn", default=S, choices=("average", "recompute"),
                   help="BatchNorm running statistics after averaging: the weighted mean of the sites', or "
                   f"recomputed over all sites' data with the averaged model {d('avg_bn')}")
    g.add_argument("--avg-optimizer", default=S, choices=("average", "reset", "local"),
                   help="optimizer state (moments, momentum) after averaging: weighted mean, fresh every round, or "
                   f"kept per site {d('avg_optimizer')}")

    g = parser.add_argument_group("evaluation, checkpoints, runtime")
    g.add_argument("--eval-every", type=POS_INT, default=S, metavar="STEPS", help=f"{d('eval_every')}")
    g.add_argument("--eval-batch-size", type=POS_INT, default=S, metavar="N", help=f"{d('eval_batch_size')}")
    g.add_argument("--train-eval-size", type=NONNEG_INT, default=S, metavar="N",
                   help="fixed training images evaluated in eval mode at each evaluation (train_eval_acc; 0: off) "
                   f"{d('train_eval_size')}")
    g.add_argument("--checkpoint-every", type=NONNEG_INT, default=S, metavar="STEPS",
                   help="extra checkpoints between evaluations (0: at evaluations only)")
    if not for_compare:
        g.add_argument("--seed", type=NONNEG_INT, default=S, help=f"{d('seed')}")
    g.add_argument("--device", default=S, choices=DEVICES, help=f"{d('device')}")
    g.add_argument("--threads", type=POS_INT, default=S, metavar="N", help="torch CPU threads (default: torch's)")
    flag(g, "--amp", "autocast (bfloat16 on CPU, float16 + GradScaler on CUDA)")
    flag(g, "--compile", "torch.compile the model")
    flag(g, "--sync-bn", "SyncBatchNorm under DDP")
    g.add_argument("--quiet", action="store_true", default=S, help="log lines instead of a progress bar")
    if not for_compare:
        flag(g, "--resume", "continue the run in --output from its checkpoint; its config.yaml supplies every "
              "setting, flags given with it may change only --device, --threads, --quiet, --data-dir, "
              "--eval-batch-size, --checkpoint-every")
        parser.add_argument("--config", metavar="YAML", help="YAML file of TrainConfig fields used as defaults")
        parser.add_argument("--list-models", action="store_true", help="print the registered models and exit")


NOT_CONFIG = {"command", "_parser", "_argv", "config", "list_models", "preset", "models", "operators", "seeds",
               "thresholds"}
# errors of a configuration found while a run is set up (before its first step): a message and exit code 2
SETUP_ERRORS = (ValueError, TypeError, OSError)


def train_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    """YAML defaults (``--config``) overridden by the flags given; validated, errors via ``parser.error``.

    With ``--resume`` the run folder's own ``config.yaml`` comes first, so ``--output DIR --resume`` alone resumes
    a run; what is given besides overrides it (and the resume refuses changes to the run itself).
    """
    from ..train.preflight import check_given

    values: dict[str, Any] = {}
    flags = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG}
    if "output" not in flags:
        parser.error("the following arguments are required: --output")
    saved = os.path.join(flags["output"], "config.yaml")
    if flags.get("resume") and os.path.isfile(saved):
        try:
            values.update(load_yaml(saved))
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    given: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            given.update(load_yaml(args.config))
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    given.update(flags)
    values.update(given)
    check_names(values, parser)
    try:
        config = TrainConfig.from_dict(values)
        check_given(given, config)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return config


def check_names(values: dict[str, Any], parser: argparse.ArgumentParser) -> None:
    """Unknown model / dataset, missing data directory -> parser.error (exit code 2)."""
    from ..data import list_datasets
    from ..models import list_models

    model = values.get("model")
    if model is not None and model not in list_models():
        close = difflib.get_close_matches(str(model), list_models(), n=4, cutoff=0.5)
        parser.error(f"unknown model {model!r}; " + (f"did you mean {', '.join(close)}? " if close else "")
                     + f"choose from {', '.join(list_models())}")
    dataset = values.get("dataset")
    if dataset is not None and dataset not in list_datasets():
        parser.error(f"unknown dataset {dataset!r}; choose from {', '.join(list_datasets())}")
    data_dir = values.get("data_dir")
    if data_dir is not None and not os.path.isdir(data_dir):
        parser.error(f"--data-dir {data_dir!r} is not a directory")
