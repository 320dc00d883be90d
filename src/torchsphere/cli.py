"""The ``torchsphere`` command line: ``train``, ``compare``, ``evaluate``, ``predict``, ``ensemble``, ``curves``,
``gradflow``. Parsing and calls only; the training flags live in ``torchsphere.commands.arguments``, the curves and
gradflow commands in ``torchsphere.commands``.

Two-stage configuration (as timm's ``train.py``): ``--config file.yaml`` sets :class:`TrainConfig` defaults, flags
override them, and the resolved configuration is saved as ``config.yaml`` in the run folder; ``--output DIR --resume``
starts from ``DIR/config.yaml`` instead. Bad arguments (unknown model, dataset or operator, a negative learning rate,
a missing dataset, a flag the configuration would ignore, ...) print a message and exit with code 2, before
anything trains. SIGINT / SIGTERM stop a run with a checkpoint, print the resume command and exit with 130 / 143.
See docs/training.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .commands.arguments import (NONNEG_INT, NOT_CONFIG, POS_INT, SETUP_ERRORS, add_model_list_arguments,
                                 add_train_arguments, check_model_list, check_names, str_list, train_config)
from .commands.curves import add_curves_parser, run_curves_command
from .commands.gradflow import add_gradflow_parser, run_gradflow_command
from .train.config import DEVICES

__all__ = ["add_train_arguments", "build_parser", "main", "train_config"]


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
    add_model_list_arguments(p)
    p.add_argument("--seeds", type=POS_INT, metavar="N", help="seeds 0..N-1 per configuration")
    p.add_argument("--thresholds", type=str_list, metavar="A1,A2",
                   help="accuracies for 'steps to reach' (e.g. 0.8,0.9)")
    p.add_argument("--output", required=True, metavar="DIR", help="report folder, e.g. reports/NAME")
    add_train_arguments(p, for_compare=True)

    p = sub.add_parser("evaluate", help="evaluate a saved run", description="Accuracy of a run's final or "
                       "best-on-validation weights on its test (or validation) split.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--weights", choices=("final", "best"), default="final", help="(default: final)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="(default: test)")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset lives now (default: as in config.yaml)")
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--precise-bn", type=NONNEG_INT, default=0, metavar="N",
                   help="re-estimate the BN statistics on N batches of the run's training split first (default: 0)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("predict", help="classify images with a saved run", description="Top-k classes of images: "
                       ".npy/.pt arrays or image files; one line per image, named by its file (and [i] within an "
                       "array).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--weights", choices=("final", "best"), default="final", help="(default: final)")
    p.add_argument("--top-k", type=POS_INT, default=1, help="(default: 1)")
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
    add_curves_parser(sub)
    add_gradflow_parser(sub)
    for name, subparser in sub.choices.items():
        subparser.set_defaults(_parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    command = {"train": _train, "compare": _compare, "evaluate": _evaluate, "predict": _predict,
               "ensemble": _ensemble, "curves": run_curves_command, "gradflow": run_gradflow_command}[args.command]
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

    overrides = {k: v for k, v in vars(args).items() if k not in NOT_CONFIG | {"output"}}
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
            check_model_list(args, parser)
            if "operator" in overrides:
                parser.error(f"--operator {overrides['operator']!r} would set the operator of every configuration "
                             f"({', '.join(args.models)}); use --operators OP1,OP2 to give the sphere models one "
                             f"configuration per operator (plain models stay plain)")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
