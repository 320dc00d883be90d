"""The ``torchsphere ensemble`` subcommand: its arguments and the call into :func:`run_ensemble`. Parsing only."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .finetune import DEFAULT_SWEEP, parse_sweep
from .knn import METRICS, WEIGHTINGS


def _pos_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _classes(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, got {text!r}") from None


def _sweep(text: str) -> list[list[float]]:
    try:
        return [[p.lr, p.steps] for p in parse_sweep(text)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _option(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. num_classes=6), got {text!r}")
    return key, yaml.safe_load(value)


def add_ensemble_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``ensemble`` subcommand to the ``torchsphere`` subparsers."""
    default_sweep = ",".join(f"{p.lr:g}:{p.steps}" for p in DEFAULT_SWEEP)
    p = sub.add_parser(
        "ensemble", help="rank a pool of trained runs by k-NN, fine-tune the best, select an ensemble greedily",
        usage="%(prog)s --pool DIR [DIR ...] --classes C1,C2,... --output DIR [options]",
        description="Deep ensembles for low-data transfer (Mustafa et al., 2020): rank every run of the pool by "
        "leave-one-out k-NN accuracy of its penultimate features on a downstream few-shot task, fine-tune the top "
        "K with a small sweep, and build an ensemble greedily on validation cross-entropy (Caruana et al., 2004). "
        "Writes report.md, results.json and ensemble.png; rerunning resumes. See docs/ensembles.md.")
    p.add_argument("--pool", nargs="+", required=True, metavar="DIR",
                   help="run folders, or folders holding run folders (e.g. the runs/ of a compare report)")
    g = p.add_argument_group("downstream task")
    g.add_argument("--dataset", default="fashion-mnist", help="base dataset of the task (default: fashion-mnist)")
    g.add_argument("--classes", type=_classes, required=True, metavar="C1,C2",
                   help="class indices of the base dataset that make the task (relabelled 0..n-1 in this order)")
    g.add_argument("--shots", type=_pos_int, default=5, metavar="K", help="training examples per class (default: 5)")
    g.add_argument("--val-shots", type=_pos_int, default=10, metavar="V",
                   help="validation examples per class, for the sweep and the ensemble (default: 10)")
    g.add_argument("--draw", type=_nonneg_int, default=0, metavar="S", help="seed of the example draw (default: 0)")
    g.add_argument("--data-dir", metavar="DIR", help="where the base dataset's files are")
    g.add_argument("--dataset-option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the base dataset (repeatable), e.g. num_classes=6 for synthetic")
    g.add_argument("--limit-test", type=_pos_int, metavar="N", help="use a fixed subset of N test images")
    g = p.add_argument_group("ranking, fine-tuning, selection")
    g.add_argument("--top", type=_pos_int, default=3, metavar="K", help="pool members fine-tuned (default: 3)")
    g.add_argument("--sweep", type=_sweep, default=None, metavar="LR:STEPS,...",
                   help=f"fine-tuning sweep, one run per point (default: {default_sweep})")
    g.add_argument("--max-size", type=_pos_int, default=5, metavar="M",
                   help="most greedy picks, repeats included (default: 5)")
    g.add_argument("--knn-k", type=_pos_int, default=1, metavar="K", help="neighbours of the k-NN (default: 1)")
    g.add_argument("--metric", choices=METRICS, default="cosine", help="k-NN similarity (default: cosine)")
    g.add_argument("--weighting", choices=WEIGHTINGS, default="uniform", help="k-NN votes (default: uniform)")
    g.add_argument("--baselines", action="store_true",
                   help="also a random ensemble and a seed-only ensemble of the same size (more fine-tuning runs)")
    g.add_argument("--seed", type=_nonneg_int, default=0, help="fine-tuning seed: head init, data order (default: 0)")
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=_pos_int, default=1, metavar="N", help="torch CPU threads (default: 1)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder (rerun the command to resume)")
    return p


def run_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Builds the :class:`EnsembleSpec`, runs it, prints the methods table; user errors exit with code 2."""
    from ..data import list_datasets
    from .runner import EnsembleSpec, run_ensemble

    if args.dataset not in list_datasets() or args.dataset == "subset":
        parser.error(f"unknown dataset {args.dataset!r}; choose from "
                     f"{', '.join(d for d in list_datasets() if d != 'subset')}")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        parser.error(f"--data-dir {args.data_dir!r} is not a directory")
    sweep = args.sweep if args.sweep is not None else [[p.lr, p.steps] for p in DEFAULT_SWEEP]
    try:
        spec = EnsembleSpec(pool=args.pool, classes=args.classes, dataset=args.dataset, shots=args.shots,
                            val_shots=args.val_shots, draw=args.draw, data_dir=args.data_dir,
                            dataset_options=dict(args.dataset_option), limit_test=args.limit_test, top=args.top,
                            sweep=sweep, max_size=args.max_size, knn_k=args.knn_k, metric=args.metric,
                            weighting=args.weighting, baselines=args.baselines, seed=args.seed,
                            threads=args.threads, device=args.device, quiet=args.quiet)
        results = run_ensemble(spec, args.output)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print("| method | distinct members | val acc % | val CE | test acc % | test CE |")
    print("|---|---|---|---|---|---|")
    for name, m in results["methods"].items():
        print(f"| {name} | {m['distinct']} | {100 * m['val_acc']:.2f} | {m['val_nll']:.4f} | "
              f"{100 * m['test_acc']:.2f} | {m['test_nll']:.4f} |")
    print(f"report: {os.path.join(args.output, 'report.md')}  plot: {os.path.join(args.output, 'ensemble.png')}")
    return 0
