"""``torchsphere gradflow``: per-layer norms and effective learning rates over the first steps of a run
(torchsphere.analysis.gradient_flow). See docs/training.md."""
from __future__ import annotations

import argparse

from ..train.config import load_yaml
from .arguments import POS_INT, SETUP_ERRORS, add_train_arguments, train_config


def add_gradflow_parser(sub) -> None:
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
    p.add_argument("--measure-steps", type=POS_INT, default=100, metavar="K",
                   help="steps to train and measure (default: 100)")
    p.add_argument("--every", type=POS_INT, default=1, metavar="E", help="record steps 0, E, 2E, ... (default: 1)")
    add_train_arguments(p)


def run_gradflow_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..train.gradflow import measure_gradient_flow

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
