"""``torchsphere curves``: learning curves over disjoint partitions of the training set (Hoiem et al., ICML 2021;
torchsphere.train.curves). See docs/learning_curves.md."""
from __future__ import annotations

import argparse
import math
import os

from ..train.config import load_yaml
from .arguments import (NONNEG_FLOAT, NONNEG_INT, NOT_CONFIG, POS_FLOAT, POS_INT, add_model_list_arguments,
                        add_train_arguments, check_model_list, check_names, int_list, number)


_CURVES_KEYS = {"spec", "models", "operators", "output", "num_sizes", "reps", "N", "split_seed", "min_steps",
                "evaluations", "measure", "gamma", "v1", "level", "refit_only", "title", "epochs", "steps"}


def _gamma(text: str) -> float | None:
    if text == "search":
        return None
    value = number(float, minimum=-math.inf, strict=False)(text)
    if value >= 0:
        raise argparse.ArgumentTypeError(f"expected 'search' or a negative number such as -0.5, got {text!r}")
    return value


def _v1(text: str) -> float | None:
    return None if text == "auto" else NONNEG_FLOAT(text)


def _level(text: str) -> float:
    value = POS_FLOAT(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value


def add_curves_parser(sub) -> None:
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
    add_model_list_arguments(p)
    p.add_argument("--output", required=True, metavar="DIR", help="report folder, e.g. reports/NAME")
    g = p.add_argument_group("measurement protocol")
    g.add_argument("--num-sizes", type=POS_INT, default=S, metavar="K", help="sizes N, N/2, ..., N/2^(K-1) per "
                   "class (default 5)")
    g.add_argument("--reps", type=int_list, default=S, metavar="R1,R2,...", help="disjoint partitions per size, "
                   "largest size first, at most 2^j at N/2^j (default 1,2,4,8,16)")
    g.add_argument("--N", type=POS_INT, default=S, metavar="N", help="largest size, per class (default: the "
                   "smallest class of the training pool after the validation split)")
    g.add_argument("--split-seed", type=NONNEG_INT, default=S, metavar="S", help="seed of the validation carve and "
                   "of the partitions (default 0)")
    g.add_argument("--min-steps", type=NONNEG_INT, default=S, metavar="S", help="floor of the epoch budget "
                   "(default 100)")
    g.add_argument("--evaluations", type=POS_INT, default=S, metavar="K", help="evaluation points per run "
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


def run_curves_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..train.curves import CurvesSpec, run_curves
    from ..train.compare import spec_from_models

    values = vars(args)
    overrides = {k: v for k, v in values.items() if k not in NOT_CONFIG | _CURVES_KEYS}
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
            from ..train.config import load_yaml

            spec_values = load_yaml(args.spec)
            if "steps" in options or "epochs" in options:  # the command line's budget replaces the file's
                spec_values.pop("epochs", None)
                spec_values.pop("steps", None)
            spec = CurvesSpec.from_dict({**spec_values, **options})
        elif args.models:
            check_model_list(args, parser)
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
