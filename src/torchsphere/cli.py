"""The ``torchsphere`` command line: ``train``, ``compare``, ``evaluate``, ``predict``, ``ensemble``. Parsing and calls
only.

Two-stage configuration (as timm's ``train.py``): ``--config file.yaml`` sets :class:`TrainConfig` defaults, flags
override them, and the resolved configuration is saved as ``config.yaml`` in the run folder; ``--output DIR --resume``
starts from ``DIR/config.yaml`` instead. Bad arguments (unknown model, dataset or operator, a negative learning rate,
a missing dataset, a flag the configuration would ignore, ...) print a message and exit with code 2, before
anything trains. SIGINT / SIGTERM stop a run with a checkpoint, print the resume command and exit with 130 / 143.
See docs/training.md.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from .functional._checks import OPERATORS
from .models.factory import BN_STATS
from .train.config import (DEVICES, HEADS, LR_SCHEDULES, NORMS, OPTIMIZERS, REGULARIZERS, TrainConfig,
                           config_defaults, load_yaml)

_D = config_defaults()


def _number(kind: type, *, minimum: float, strict: bool) -> Any:
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


_POS_INT, _POS_FLOAT = _number(int, minimum=0, strict=True), _number(float, minimum=0, strict=True)
_NONNEG_INT, _NONNEG_FLOAT = _number(int, minimum=0, strict=False), _number(float, minimum=0, strict=False)


def _fraction(text: str) -> float:
    value = _NONNEG_FLOAT(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _list(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def _partition(text: str) -> dict[str, int]:
    values = _int_list(text)
    if not 1 <= len(values) <= 3 or values[0] < 1 or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected PER_CLASS[,INDEX[,SEED]] with PER_CLASS >= 1, got {text!r}")
    return dict(zip(("per_class", "index", "seed"), values))


def _flag(group, name: str, help: str) -> None:
    group.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                       help=f"{help} (default: {_D[name[2:].replace('-', '_')]})")


def add_train_arguments(parser: argparse.ArgumentParser, *, for_compare: bool = False,
                        for_curves: bool = False) -> None:
    """The TrainConfig flags. Defaults are suppressed so that only the flags given override the YAML/preset.

    ``for_curves`` leaves out the flags that ``torchsphere curves`` sets for every run (the partition, the subset)."""
    S = argparse.SUPPRESS

    def d(key: str) -> str:
        return f"(default: {_D[key]})"

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=S, metavar="NAME", help=f"registered model, e.g. cnn9, spherenet9, "
                   f"sphere_resnet32 (`torchsphere train --list-models`) {d('model')}")
    g.add_argument("--operator", default=S, choices=OPERATORS, help="SphereConv operator (default: the model's own)")
    g.add_argument("--sigmoid-k", type=_POS_FLOAT, default=S, metavar="K",
                   help="k of the sigmoid operator / initial k of learnable_sigmoid (default: the layer's, 0.3 / 0.75)")
    g.add_argument("--head", default=S, choices=HEADS, help=f"classifier head {d('head')}")
    g.add_argument("--margin", type=_number(float, minimum=1, strict=False), default=S,
                   help=f"GA-Softmax margin m >= 1 on the target angle (head gasoftmax) {d('margin')}")
    _flag(g, "--anneal-lambda", "A-Softmax lambda annealing for the gasoftmax head (SphereFace schedule)")
    _flag(g, "--detach-margin", "the gasoftmax margin changes the forward value only, the gradient is the "
          "unmargined one (OpenSphere's annealing-free recipe)")
    g.add_argument("--head-scale", type=_POS_FLOAT, default=S, metavar="S",
                   help="fixed logit scale s of the angular head, as ArcFace/CosFace (default: s = |x|)")
    _flag(g, "--fc-norm", "the model's normalization after fc6 (plain nets; SphereNet features become unbounded)")
    g.add_argument("--head-operator", default=S, choices=OPERATORS,
                   help="operator of the angular head (wsoftmax / gasoftmax; default: cosine)")
    g.add_argument("--norm", default=S, choices=NORMS, help=f"normalization after each conv {d('norm')}")
    g.add_argument("--bn-momentum", type=_number(float, minimum=0, strict=True), default=S, metavar="M",
                   help="BatchNorm momentum, PyTorch convention = 1 - decay (default: 0.1 with --bn-stats torch, "
                   "the official 0.001 with --bn-stats official)")
    g.add_argument("--bn-stats", default=S, choices=BN_STATS,
                   help="how BatchNorm keeps its test-time statistics: torch (nn.BatchNorm2d: EMA from mean 0 / var 1 "
                   "of the unbiased batch variance) or official (the official code's zero-started EMA of the biased "
                   f"batch moments, decay 0.999) {d('bn_stats')}")
    g.add_argument("--precise-bn", type=_NONNEG_INT, default=S, metavar="N",
                   help="re-estimate the BN statistics on N training batches before each evaluation and before "
                   "saving the final model (equal-weight average; 0: off) (default: 0)")
    g.add_argument("--bn-shadow", type=_list, default=S, metavar="SPEC,...",
                   help="extra BN statistics kept side by side and evaluated on the test set as test_acc_NAME, e.g. "
                   "official,torch@0.1 (they never change training)")
    g.add_argument("--bn-drift", type=_NONNEG_INT, default=S, metavar="STEPS",
                   help="log the relative change of each BN layer's mean batch moments from one window of STEPS "
                   "training steps to the next, to bn_drift.csv (0: off) (default: 0)")
    g.add_argument("--width-mult", type=_POS_FLOAT, default=S, metavar="F",
                   help=f"channel multiplier {d('width_mult')}")
    g.add_argument("--widths", type=_int_list, default=S, metavar="W1,W2,W3",
                   help="stage widths before --width-mult (default: the model's; MHE CNN-9: 64,128,256)")
    g.add_argument("--feature-dim", type=_POS_INT, default=S, metavar="D",
                   help="outputs of a plain net's fc6, fed to the classifier (default 256; 2 to plot the features)")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default=S, metavar="NAME", help=f"fashion-mnist, mnist, cifar10, cifar100, digits, "
                   f"imagefolder, synthetic {d('dataset')}")
    g.add_argument("--data-dir", default=S, metavar="DIR", help="folder searched first for the dataset files, then "
                   "$TORCHSPHERE_DATA, then system folders")
    g.add_argument("--val-fraction", type=_fraction, default=S, metavar="F",
                   help=f"validation split carved from the training set, used for model selection {d('val_fraction')}")
    if not for_curves:
        g.add_argument("--limit-train", type=_POS_INT, default=S, metavar="N",
                       help="use a seeded subset of N training images")
    g.add_argument("--limit-test", type=_POS_INT, default=S, metavar="N", help="use a fixed subset of N test images")
    g.add_argument("--augment", default=S, metavar="NAME", help="batch augmentation: none, flip, crop_flip, cifar10+, "
                   "... (default: the dataset's own)")
    if not for_curves:
        g.add_argument("--partition", type=_partition, default=S, metavar="N[,I[,S]]",
                       help="train on partition I (default 0) of N examples per class of the pool left after a "
                       "validation split carved with seed S (default 0): the protocol of `torchsphere curves`")

    g = parser.add_argument_group("budget and optimization")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_POS_INT, default=S, metavar="N",
                        help="training epochs (a budget is required: --epochs or --steps)")
    budget.add_argument("--steps", type=_POS_INT, default=S, metavar="N",
                        help="training steps (official: 64000; a budget is required: --steps or --epochs)")
    g.add_argument("--batch-size", type=_POS_INT, default=S, metavar="N",
                   help=f"global batch size, split over DDP ranks {d('batch_size')}")
    g.add_argument("--optimizer", default=S, choices=OPTIMIZERS, help=f"{d('optimizer')}")
    g.add_argument("--lr", type=_POS_FLOAT, default=S, help=f"learning rate {d('lr')}")
    g.add_argument("--momentum", type=_NONNEG_FLOAT, default=S, help=f"SGD momentum {d('momentum')}")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S,
                   help="Nesterov momentum for SGD (default: on; --no-nesterov: plain momentum, as the MHE recipe)")
    g.add_argument("--weight-decay", type=_NONNEG_FLOAT, default=S, metavar="WD",
                   help=f"coupled L2; none on SphereConv filters (official) {d('weight_decay')}")
    _flag(g, "--decay-sphere-weights", "also decay SphereConv filters")
    g.add_argument("--lr-schedule", default=S, choices=LR_SCHEDULES, help=f"per-step schedule {d('lr_schedule')}")
    g.add_argument("--milestones", type=_int_list, default=S, metavar="S1,S2",
                   help="multistep drop steps (default: 34/64 and 54/64 of the budget, as the official 34k/54k/64k)")
    g.add_argument("--lr-gamma", type=_POS_FLOAT, default=S, help=f"multistep factor {d('lr_gamma')}")
    g.add_argument("--label-smoothing", type=_fraction, default=S, metavar="EPS", help=f"{d('label_smoothing')}")
    _flag(g, "--official-loss", "the official log(softmax + 1e-4) floored loss")

    g = parser.add_argument_group("regularizers (added to the loss explicitly)")
    g.add_argument("--regularizer", default=S, choices=REGULARIZERS, help=f"{d('regularizer')}")
    g.add_argument("--reg-lambda-hidden", type=_NONNEG_FLOAT, default=S, metavar="L",
                   help="weight on hidden layers (default: the method's official value)")
    g.add_argument("--reg-lambda-output", type=_NONNEG_FLOAT, default=S, metavar="L",
                   help="weight on the classifier (default: the method's official value)")
    g.add_argument("--reg-s", type=_NONNEG_FLOAT, default=S, metavar="S",
                   help="MHE power s (0: log energy; default: the regularizer's, 2); MHE methods only")
    g.add_argument("--orth", type=_NONNEG_FLOAT, default=S, metavar="C",
                   help=f"orthonormality penalty on sphere layers (official 1e-4) {d('orth')}")

    g = parser.add_argument_group(
        "training across sites", "K sites each train on their own shard; after every round of E local epochs (one "
        "learning-rate cycle) their models are averaged, weighted by shard size (Xu, Mi, Feng et al., arXiv "
        "1810.06877). One process simulates the K sites; under `torchrun --nproc_per_node=K` each process is one "
        "site. The budget is --rounds (not --steps/--epochs); --batch-size is per site. See docs/collaborative.md.")
    g.add_argument("--sites", type=_POS_INT, default=S, metavar="K", help="number of sites (default: none, plain "
                   "training)")
    g.add_argument("--rounds", type=_POS_INT, default=S, metavar="R", help="averaging rounds (required with --sites)")
    g.add_argument("--local-epochs", type=_POS_INT, default=S, metavar="E",
                   help=f"passes over its own shard per site between averagings {d('local_epochs')}")
    g.add_argument("--site-partition", default=S, choices=("iid", "label-shards", "dirichlet"),
                   help=f"how the training split is cut into the sites' shards {d('site_partition')}")
    g.add_argument("--shards-per-site", type=_POS_INT, default=S, metavar="S",
                   help=f"label-shards: label-sorted pieces per site {d('shards_per_site')}")
    g.add_argument("--dirichlet-alpha", type=_POS_FLOAT, default=S, metavar="A",
                   help=f"dirichlet: label-skew concentration, small = more skewed {d('dirichlet_alpha')}")
    g.add_argument("--lr-cycle", default=S, choices=("triangular", "cosine", "constant"),
                   help="learning rate over each round, between --lr-min and --lr: triangular (low-high-low, "
                   f"Smith's CLR), cosine (restart high, anneal low) or constant {d('lr_cycle')}")
    g.add_argument("--lr-min", type=_POS_FLOAT, default=S, metavar="LR", help="low end of the cycle (default: lr/10)")
    g.add_argument("--avg-bn", default=S, choices=("average", "recompute"),
                   help="BatchNorm running statistics after averaging: the weighted mean of the sites', or "
                   f"recomputed over all sites' data with the averaged model {d('avg_bn')}")
    g.add_argument("--avg-optimizer", default=S, choices=("average", "reset", "local"),
                   help="optimizer state (moments, momentum) after averaging: weighted mean, fresh every round, or "
                   f"kept per site {d('avg_optimizer')}")

    g = parser.add_argument_group("evaluation, checkpoints, runtime")
    g.add_argument("--eval-every", type=_POS_INT, default=S, metavar="STEPS", help=f"{d('eval_every')}")
    g.add_argument("--eval-batch-size", type=_POS_INT, default=S, metavar="N", help=f"{d('eval_batch_size')}")
    g.add_argument("--train-eval-size", type=_NONNEG_INT, default=S, metavar="N",
                   help="fixed training images evaluated in eval mode at each evaluation (train_eval_acc; 0: off) "
                   f"{d('train_eval_size')}")
    g.add_argument("--checkpoint-every", type=_NONNEG_INT, default=S, metavar="STEPS",
                   help="extra checkpoints between evaluations (0: at evaluations only)")
    if not for_compare:
        g.add_argument("--seed", type=_NONNEG_INT, default=S, help=f"{d('seed')}")
    g.add_argument("--device", default=S, choices=DEVICES, help=f"{d('device')}")
    g.add_argument("--threads", type=_POS_INT, default=S, metavar="N", help="torch CPU threads (default: torch's)")
    _flag(g, "--amp", "autocast (bfloat16 on CPU, float16 + GradScaler on CUDA)")
    _flag(g, "--compile", "torch.compile the model")
    _flag(g, "--sync-bn", "SyncBatchNorm under DDP")
    g.add_argument("--quiet", action="store_true", default=S, help="log lines instead of a progress bar")
    if not for_compare:
        _flag(g, "--resume", "continue the run in --output from its checkpoint; its config.yaml supplies every "
              "setting, flags given with it may change only --device, --threads, --quiet, --data-dir, "
              "--eval-batch-size, --checkpoint-every")
        parser.add_argument("--config", metavar="YAML", help="YAML file of TrainConfig fields used as defaults")
        parser.add_argument("--list-models", action="store_true", help="print the registered models and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchsphere", description="Hyperspherical learning (SphereNet, Liu et al., NIPS 2017): train, compare, "
        "evaluate and predict.", epilog="Run `torchsphere COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train one model", usage="%(prog)s --output DIR [options]",
                       description="Train one model into a run folder (config.yaml, metrics.csv, summary.json, "
                       "model.safetensors, best.safetensors, checkpoint.pt). Under "
                       "`torchrun --nproc_per_node=N -m torchsphere train ...` it trains with DDP.")
    add_train_arguments(p)
    p.add_argument("--output", default=argparse.SUPPRESS, metavar="DIR", help="run folder, e.g. runs/NAME (required)")

    p = sub.add_parser("compare", help="train several configurations over seeds and report",
                       usage="%(prog)s (--preset NAME | --models M1,M2 [--operators ...]) --output DIR [options]",
                       description="Train each configuration with each seed on the same data and budget, then write "
                       "report.md (final / best-on-val test accuracy, mean ± std, steps to accuracy, time per step) "
                       "and convergence.png. Train flags override the preset for every configuration.")
    p.add_argument("--preset", metavar="NAME|YAML", help="a shipped preset (demo, ...) or a compare YAML file")
    p.add_argument("--models", type=_list, metavar="M1,M2", help="models to compare (the first is the baseline)")
    p.add_argument("--operators", type=_list, metavar="OP1,OP2",
                   help=f"operators for the *sphere* models, from {list(OPERATORS)}")
    p.add_argument("--seeds", type=_POS_INT, metavar="N", help="seeds 0..N-1 per configuration")
    p.add_argument("--thresholds", type=_list, metavar="A1,A2", help="accuracies for 'steps to reach' (e.g. 0.8,0.9)")
    p.add_argument("--output", required=True, metavar="DIR", help="report folder, e.g. reports/NAME")
    add_train_arguments(p, for_compare=True)

    p = sub.add_parser("evaluate", help="evaluate a saved run", description="Accuracy of a run's final or "
                       "best-on-validation weights on its test (or validation) split.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--weights", choices=("final", "best"), default="final", help="(default: final)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="(default: test)")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset lives now (default: as in config.yaml)")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--precise-bn", type=_NONNEG_INT, default=0, metavar="N",
                   help="re-estimate the BN statistics on N batches of the run's training split first (default: 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("predict", help="classify images with a saved run", description="Top-k classes of images: "
                       ".npy/.pt arrays or image files; one line per image, named by its file (and [i] within an "
                       "array).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--weights", choices=("final", "best"), default="final", help="(default: final)")
    p.add_argument("--top-k", type=_POS_INT, default=1, help="(default: 1)")
    p.add_argument("--pixels", choices=("auto", "raw", "unit", "normalized"), default="auto",
                   help="array values: raw 0..255, unit 0..1 (ToTensor), normalized (x - 127.5) / 128; auto: integer "
                   "arrays raw, float arrays within [0, 1] unit, other floats normalized (default: auto; image files "
                   "are always raw)")
    p.add_argument("--resize", action="store_true", help="resize images of another size to the model's input size "
                   "(bilinear, antialiased) instead of refusing them")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    # ensemble: k-NN ranking of a pool of runs, fine-tuning sweep, greedy ensemble (torchsphere.ensemble.command)
    from .ensemble.command import add_ensemble_parser

    add_ensemble_parser(sub)
    _add_curves_parser(sub)
    _add_gradflow_parser(sub)
    for name, subparser in sub.choices.items():
        subparser.set_defaults(_parser=subparser)
    return parser


_NOT_CONFIG = {"command", "_parser", "_argv", "config", "list_models", "preset", "models", "operators", "seeds",
               "thresholds"}
# errors of a configuration found while a run is set up (before its first step): a message and exit code 2
SETUP_ERRORS = (ValueError, TypeError, OSError)


def train_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    """YAML defaults (``--config``) overridden by the flags given; validated, errors via ``parser.error``.

    With ``--resume`` the run folder's own ``config.yaml`` comes first, so ``--output DIR --resume`` alone resumes
    a run; what is given besides overrides it (and the resume refuses changes to the run itself).
    """
    from .train.preflight import check_given

    values: dict[str, Any] = {}
    flags = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}
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
    from .data import list_datasets
    from .models import list_models

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    command = {"train": _train, "compare": _compare, "evaluate": _evaluate, "predict": _predict,
               "ensemble": _ensemble, "curves": _curves, "gradflow": _gradflow}[args.command]
    return command(args, args._parser)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(args, "list_models", False):
        from .models import list_models

        print("\n".join(list_models()))
        return 0
    from .train.interrupt import TrainingInterrupted
    from .train.loop import setup, torch_threads, train_run

    config = train_config(args, parser)
    if config.sites is not None:  # training across sites: rounds of local epochs and averaging
        from .train import train
        from .train.collaborative import SitesError

        try:
            train(config)
        except (SitesError, *SETUP_ERRORS) as exc:  # the data or the launch does not allow these sites
            parser.error(str(exc))
        return 0
    with torch_threads(config.threads):
        try:
            run = setup(config)  # every configuration error surfaces here, before the first step
        except SETUP_ERRORS as exc:
            parser.error(str(exc))
        try:
            train_run(run)
        except TrainingInterrupted as exc:
            print(f"\n{exc.message}", file=sys.stderr)
            return exc.exit_code
    return 0


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train import compare, load_spec, spec_from_models

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG | {"output"}}
    quiet = bool(overrides.pop("quiet", False))
    check_names(overrides, parser)
    thresholds = None
    if args.thresholds:
        try:
            thresholds = [float(t) for t in args.thresholds]
        except ValueError:
            parser.error(f"--thresholds expects accuracies such as 0.8,0.9; got {args.thresholds}")
    try:
        if args.preset:
            spec = load_spec(args.preset)
            if args.models:
                parser.error("give either --preset or --models, not both")
            if args.seeds:
                spec.seeds = list(range(args.seeds))
            if thresholds:
                spec.thresholds = thresholds
        elif args.models:
            for model in args.models:
                check_names({"model": model}, parser)
            if "operator" in overrides:
                parser.error(f"--operator {overrides['operator']!r} would set the operator of every configuration "
                             f"({', '.join(args.models)}); use --operators OP1,OP2 to give the sphere models one "
                             f"configuration per operator (plain models stay plain)")
            for op in args.operators or []:
                if op not in OPERATORS:
                    parser.error(f"unknown operator {op!r}; choose from {list(OPERATORS)}")
            spec = spec_from_models(args.models, args.operators, args.seeds or 1, {}, thresholds or [0.8, 0.9])
        else:
            parser.error("give --preset NAME or --models M1,M2")
        from .train.compare import check_folders, run_configs

        check_folders(run_configs(spec, args.output, overrides))  # every configuration, before any training
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    from .train.interrupt import TrainingInterrupted

    try:
        table = compare(spec, args.output, overrides, quiet=quiet)
    except TrainingInterrupted as exc:
        import shlex

        print(f"\ninterrupted by {exc.signal_name} at step {exc.step}/{exc.total} of {exc.output} (checkpoint "
              f"saved); finished runs are kept. Resume the comparison with the same command:\n  "
              f"{shlex.join(['torchsphere', *args._argv])}", file=sys.stderr)
        return exc.exit_code
    except FileNotFoundError as exc:  # the dataset is missing and the preset has no fallback
        parser.error(str(exc))
    print(table)
    print(f"report: {os.path.join(args.output, 'report.md')}  plot: {os.path.join(args.output, 'convergence.png')}")
    return 0


def _evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train import evaluate_run

    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir!r} is not a directory")
    if args.device == "cuda":
        _check_cuda(parser)
    try:
        result = evaluate_run(args.run_dir, args.weights, split=args.split, data_dir=args.data_dir, device=args.device,
                              precise_bn=args.precise_bn)
    except (OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['run']} [{result['weights']} weights] {result['dataset']} {result['split']}: accuracy "
              f"{100 * result['accuracy']:.2f}% loss {result['loss']:.4f} ({result['samples']} images)")
    return 0


def _predict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train.inference import predict_files

    if args.device == "cuda":
        _check_cuda(parser)
    try:
        results = predict_files(args.run_dir, args.inputs, weights=args.weights, top_k=args.top_k,
                                device=args.device, pixels=args.pixels, resize=args.resize)
    except (OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    if args.json:
        print(json.dumps([{"input": r["input"], "top": [{"index": i, "class": c, "probability": p}
                                                         for i, c, p in r["top"]]} for r in results], indent=2))
    else:
        for r in results:
            print(f"{r['input']}: " + ", ".join(f"{c} ({i}) {100 * p:.1f}%" for i, c, p in r["top"]))
    return 0


def _check_cuda(parser: argparse.ArgumentParser) -> None:
    import torch

    if not torch.cuda.is_available():
        parser.error("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu")


def _ensemble(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .ensemble.command import run_command

    return run_command(args, parser)


# ---------------------------------------------------------------------------------------------- curves
_CURVES_KEYS = {"spec", "models", "operators", "output", "num_sizes", "reps", "N", "split_seed", "min_steps",
                "evaluations", "measure", "gamma", "v1", "level", "refit_only", "title", "epochs", "steps"}


def _gamma(text: str) -> float | None:
    if text == "search":
        return None
    value = _number(float, minimum=-math.inf, strict=False)(text)
    if value >= 0:
        raise argparse.ArgumentTypeError(f"expected 'search' or a negative number such as -0.5, got {text!r}")
    return value


def _v1(text: str) -> float | None:
    return None if text == "auto" else _NONNEG_FLOAT(text)


def _level(text: str) -> float:
    value = _POS_FLOAT(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value


def _add_curves_parser(sub) -> None:
    S = argparse.SUPPRESS
    p = sub.add_parser(
        "curves", help="learning curves: train on partitions of the data, fit error vs n (Hoiem et al., ICML 2021)",
        usage="%(prog)s (--spec YAML | --models M1,M2 [--operators ...]) --output DIR [options]",
        description="Train every configuration on class-stratified disjoint partitions of the training set (sizes N, "
        "N/2, ... per class; a validation split carved once; the same test set), fit e(n) = alpha + eta n^gamma to "
        "the test errors (percent) as github.com/allenai/learning-curve does, and write curves.csv, fit.json (e_N, "
        "beta_N, gamma with intervals), report.md and curves.png. Finished runs are reused, killed ones resumed. "
        "Budget: --steps S for every partition, or max(--min-steps, ceil(--epochs x n x C / batch)). "
        "See docs/learning_curves.md.")
    p.add_argument("--spec", metavar="YAML", help="a curves YAML file (title, train, runs, num_sizes, reps, ...)")
    p.add_argument("--models", type=_list, metavar="M1,M2", help="models to compare (the first is the baseline)")
    p.add_argument("--operators", type=_list, metavar="OP1,OP2",
                   help=f"operators for the *sphere* models, from {list(OPERATORS)}")
    p.add_argument("--output", required=True, metavar="DIR", help="report folder, e.g. reports/NAME")
    g = p.add_argument_group("measurement protocol")
    g.add_argument("--num-sizes", type=_POS_INT, default=S, metavar="K", help="sizes N, N/2, ..., N/2^(K-1) per "
                   "class (default 5)")
    g.add_argument("--reps", type=_int_list, default=S, metavar="R1,R2,...", help="disjoint partitions per size, "
                   "largest size first, at most 2^j at N/2^j (default 1,2,4,8,16)")
    g.add_argument("--N", type=_POS_INT, default=S, metavar="N", help="largest size, per class (default: the "
                   "smallest class of the training pool after the validation split)")
    g.add_argument("--split-seed", type=_NONNEG_INT, default=S, metavar="S", help="seed of the validation carve and "
                   "of the partitions (default 0)")
    g.add_argument("--min-steps", type=_NONNEG_INT, default=S, metavar="S", help="floor of the epoch budget "
                   "(default 100)")
    g.add_argument("--evaluations", type=_POS_INT, default=S, metavar="K", help="evaluation points per run "
                   "(default 2)")
    g.add_argument("--measure", choices=("best", "final"), default=S, help="test error of the best-on-validation "
                   "or of the final weights (default: best)")
    g = p.add_argument_group("fit")
    g.add_argument("--gamma", type=_gamma, default=S, metavar="search|G", help="search gamma on -1.00..-0.01 with "
                   "the prior 5|gamma+0.5| (default), or fix it, e.g. -0.5")
    g.add_argument("--v1", type=_v1, default=S, metavar="auto|V", help="variance slope of v0 + v1/n in %%^2: "
                   "estimated from repeated sizes (default auto), or set (lazy mode, one run per size)")
    g.add_argument("--level", type=_level, default=S, metavar="L", help="confidence level of the intervals "
                   "(default 0.95)")
    g.add_argument("--title", default=S, help="report title")
    g.add_argument("--refit-only", action="store_true", default=S, help="train nothing: refit the finished runs")
    add_train_arguments(p, for_compare=True, for_curves=True)
    p.set_defaults(_parser=p)


def _curves(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train.curves import CurvesSpec, run_curves
    from .train.compare import spec_from_models

    values = vars(args)
    overrides = {k: v for k, v in values.items() if k not in _NOT_CONFIG | _CURVES_KEYS}
    quiet = bool(overrides.pop("quiet", False))
    check_names(overrides, parser)
    options = {k: values[k] for k in ("num_sizes", "reps", "N", "split_seed", "min_steps", "evaluations", "measure",
                                      "gamma", "v1", "level", "title", "steps", "epochs") if k in values}
    if options.get("reps") is not None:
        options["reps"] = list(options["reps"])
    try:
        if args.spec:
            if args.models:
                parser.error("give either --spec or --models, not both")
            from .train.config import load_yaml

            spec_values = load_yaml(args.spec)
            if "steps" in options or "epochs" in options:  # the command line's budget replaces the file's
                spec_values.pop("epochs", None)
                spec_values.pop("steps", None)
            spec = CurvesSpec.from_dict({**spec_values, **options})
        elif args.models:
            for model in args.models:
                check_names({"model": model}, parser)
            for op in args.operators or []:
                if op not in OPERATORS:
                    parser.error(f"unknown operator {op!r}; choose from {list(OPERATORS)}")
            runs = spec_from_models(args.models, args.operators, 1, {}, [0.8]).runs
            spec = CurvesSpec.from_dict({"runs": runs, **options})
        else:
            parser.error("give --spec YAML or --models M1,M2")
        result = run_curves(spec, args.output, overrides, quiet=quiet, refit_only=bool(values.get("refit_only")))
    except (TypeError, ValueError, FileNotFoundError) as exc:  # FileNotFoundError: a missing dataset or run
        parser.error(str(exc))
    for name, fit in result["fits"].items():
        print(f"{name}: e_N {fit['e_N']:.2f} [{fit['e_N_ci'][0]:.2f}, {fit['e_N_ci'][1]:.2f}]  beta_N "
              f"{fit['beta_N']:.2f} [{fit['beta_N_ci'][0]:.2f}, {fit['beta_N_ci'][1]:.2f}]  gamma {fit['gamma']:.2f}"
              f"  (N = {result['N']} per class)")
    print(f"report: {os.path.join(args.output, 'report.md')}  plot: {os.path.join(args.output, 'curves.png')}")
    return 0


# ---------------------------------------------------------------------------------------------- gradflow
def _add_gradflow_parser(sub) -> None:
    p = sub.add_parser(
        "gradflow", help="per-layer activation / gradient / weight norms and effective lr over a run's first steps",
        usage="%(prog)s --output DIR [--measure-steps K] [--every E] [train options]",
        description="Set a run up exactly as `torchsphere train` does, train its first K steps and record, every E "
        "steps, for each conv / linear / sphere layer in forward order: the per-example RMS of its output, the norm "
        "of its weight gradient, the norm of its weight and the effective learning rate ||w_t+1 - w_t|| / ||w_t||. "
        "Writes DIR/grad_flow.csv (+ grad_flow.json, config.yaml). The monitor changes nothing: the K steps are "
        "those of the training run. --steps (default: K) is the run's budget, which shapes the lr schedule. See "
        "docs/training.md.")
    p.add_argument("--output", default=argparse.SUPPRESS, metavar="DIR", help="measurement folder (required)")
    p.add_argument("--measure-steps", type=_POS_INT, default=100, metavar="K",
                   help="steps to train and measure (default: 100)")
    p.add_argument("--every", type=_POS_INT, default=1, metavar="E", help="record steps 0, E, 2E, ... (default: 1)")
    add_train_arguments(p)


def _gradflow(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .train.gradflow import measure_gradient_flow

    measure, every = args.measure_steps, args.every
    del args.measure_steps, args.every
    if getattr(args, "resume", False):
        parser.error("gradflow measures a fresh run; --resume does not apply (remove it)")
    budget_in_file = False
    if getattr(args, "config", None):
        try:
            budget_in_file = any(k in load_yaml(args.config) for k in ("steps", "epochs"))
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    if not any(hasattr(args, k) for k in ("steps", "epochs")) and not budget_in_file:
        args.steps = measure  # the budget defaults to the steps measured
    config = train_config(args, parser)
    try:
        result = measure_gradient_flow(config, measure, every)
    except SETUP_ERRORS as exc:
        parser.error(str(exc))
    print(f"gradient flow of {result['layers']} layers over {measure} steps (every {every}): {result['csv']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
