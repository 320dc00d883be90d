"""Runs the reproduction experiments (experiments/README.md) and regenerates ``docs/results.md`` from their run folders.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189); Liu et al., *Learning towards Minimum
Hyperspherical Energy*, NeurIPS 2018 (arXiv 1805.09298). Each experiment is a ``torchsphere compare`` spec in this
folder (``e1_operators_heads.yaml``, ...). Experiment 2 (convergence curves) is drawn from the runs of experiment 1
and experiment 7 (cost) from the timings of all runs, so they have no spec of their own.

Commands::

    .venv/bin/python experiments/run_all.py                      # everything (or: make results)
    .venv/bin/python experiments/run_all.py --only e4_deep_plain  # one experiment (repeatable)
    .venv/bin/python experiments/run_all.py --jobs 2             # two runs at a time (1 thread each)
    .venv/bin/python experiments/run_all.py --quick              # smoke test: a few steps, 1 seed, tiny data
    .venv/bin/python experiments/run_all.py --report-only        # only regenerate docs/results.md

Resumable: each run trains into ``OUTPUT/NAME/runs/CONFIG/seed_S``; a finished run (``summary.json`` present,
same configuration) is skipped and an interrupted one continues from its checkpoint (``--resume`` of the training
tool), so rerunning the command after a kill only trains what is missing. ``--quick`` writes to a separate folder
(``reports/experiments-quick``) and its report to that folder, never to ``docs/results.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUTPUT = ROOT / "reports" / "experiments"
QUICK_OUTPUT = ROOT / "reports" / "experiments-quick"
DEFAULT_RESULTS = ROOT / "docs" / "results.md"
TIMING_FILE = "timing.json"
COMMAND = ".venv/bin/python experiments/run_all.py --jobs 2"
# --quick: every configuration of every spec, 1 seed, a few steps on a few hundred images
QUICK_OVERRIDES: dict[str, Any] = dict(steps=4, eval_every=2, limit_train=400, val_fraction=0.1, limit_test=100,
                                       checkpoint_every=0)
QUICK_SEEDS = [0]
sys.path.insert(0, str(HERE))  # results.py, feature_geometry.py


def machine() -> str:
    """The hardware line of benchmarks/_report.py (loaded by path: ``benchmarks`` is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("torchsphere_benchmarks_report", ROOT / "benchmarks" / "_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.machine()


@dataclass(frozen=True)
class Experiment:
    """One experiment: a compare spec in this folder, plus an optional step after training."""

    name: str
    spec: str
    after: Callable[[Path], None] | None = None
    quick: dict[str, Any] | None = None  # extra --quick overrides (e.g. a width that keeps the smoke test short)
    partial: bool = False  # run ``after`` on a partly finished grid too (its page reports what has finished)


def _feature_plots(folder: Path) -> None:
    import feature_geometry

    feature_geometry.main([str(folder)])


def _e4b_page(folder: Path) -> None:
    """E4b's diagnostics, the 10-step one and the 300-step one (what is missing), and its page docs/results/e4b_gradient_flow.md; the real grid only."""
    if folder.parent.resolve() != DEFAULT_OUTPUT.resolve():
        return  # --quick or another --output: the page describes the committed runs
    import e4b_gradient_flow

    e4b_gradient_flow.main(["--output", str(folder.parent), "--long", "default"])


def _e8b_page(folder: Path) -> None:
    """E8b's page (learnable vs fixed SphereConv, learned k per layer) from E8's runs; the real grid only."""
    if folder.parent.resolve() != DEFAULT_OUTPUT.resolve():
        return
    import e8b_learnable_k

    e8b_learnable_k.main([str(folder)])


def _e1b_page(folder: Path) -> None:
    """E1b's margin statistics (training- and eval-mode accuracies, feature norms, angles) from the final weights
    and its page docs/results/e1b_margins.md; the real grid only."""
    if folder.parent.resolve() != DEFAULT_OUTPUT.resolve():
        return
    import e1b_margins

    e1b_margins.main([str(folder)])


EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment("e1_operators_heads", "e1_operators_heads.yaml"),
    Experiment("e3_norm_batch", "e3_norm_batch.yaml"),
    Experiment("e4_deep_plain", "e4_deep_plain.yaml"),
    Experiment("e5_regularizers", "e5_regularizers.yaml"),
    Experiment("e6_feature_geometry", "e6_feature_geometry.yaml", after=_feature_plots),
    Experiment("e8_convergence_bn", "e8_convergence_bn.yaml", after=_e8b_page),
    Experiment("e1b_margins", "e1b_margins.yaml", after=_e1b_page),
    # last: its 60 training runs are many CPU-hours (docs/results/e4b_gradient_flow.md states what remains)
    Experiment("e4b_gradient_flow", "e4b_gradient_flow.yaml", after=_e4b_page, partial=True,
               quick=dict(width_mult=1 / 32, batch_size=8)),
)
NAMES = [e.name for e in EXPERIMENTS]


def spec_path(experiment: Experiment) -> Path:
    return HERE / experiment.spec


def load(experiment: Experiment, quick: bool):
    """The experiment's CompareSpec (1 seed under ``--quick``)."""
    from torchsphere.train.compare import load_spec

    spec = load_spec(str(spec_path(experiment)))
    if quick:
        spec.seeds = list(QUICK_SEEDS)
    return spec


def overrides(quick: bool, data_dir: str | None = None) -> dict[str, Any]:
    """TrainConfig fields that beat the specs: the smoke-test budget under ``--quick``, the data folder."""
    return {**(QUICK_OVERRIDES if quick else {}), **({"data_dir": data_dir} if data_dir else {})}


def configs_of(experiment: Experiment, output: Path, quick: bool, data_dir: str | None = None) -> dict[str, list]:
    """{configuration name: [TrainConfig per seed]} of an experiment."""
    from torchsphere.train.compare import run_configs

    return run_configs(load(experiment, quick), output / experiment.name, experiment_overrides(experiment, quick,
                                                                                                data_dir))


def experiment_overrides(experiment: Experiment, quick: bool, data_dir: str | None = None) -> dict[str, Any]:
    """:func:`overrides` plus the experiment's own ``--quick`` overrides."""
    return {**overrides(quick, data_dir), **(experiment.quick if quick and experiment.quick else {})}


def run_state(config) -> str:
    """``"done"`` (summary written, same configuration), ``"partial"`` (started, same configuration), ``"new"``;
    raises ValueError when the folder holds a run with another configuration."""
    from torchsphere.train.checkpoint import STATE_FILE
    from torchsphere.train.config import TrainConfig
    from torchsphere.train.loop import CONFIG_FILE, RESUME_FREE
    from torchsphere.train.metrics import SUMMARY_FILE
    from torchsphere.train.preflight import config_diff

    out = Path(config.output)
    if not (out / CONFIG_FILE).is_file():
        return "new"
    diff = config_diff(config, TrainConfig.from_yaml(out / CONFIG_FILE).to_dict(), RESUME_FREE)
    if diff:
        raise ValueError(f"{str(out)!r} holds a run with another configuration ({', '.join(diff)}); remove it or "
                         f"use another --output")
    if (out / SUMMARY_FILE).is_file():
        return "done"
    return "partial" if (out / STATE_FILE).is_file() else "new"  # stopped before its first checkpoint: start again


def _train_one(config) -> str:
    """Worker: trains (or resumes) one run; returns its folder."""
    from torchsphere.train import train

    train(config.replace(resume=run_state(config) == "partial", quiet=True))
    return config.output


def train_experiment(experiment: Experiment, output: Path, quick: bool, jobs: int,
                     data_dir: str | None = None) -> int:
    """Trains the missing runs of one experiment (``jobs`` at a time); returns how many were trained."""
    per_config = list(configs_of(experiment, output, quick, data_dir).values())
    # seed-major order: every configuration of seed 0 first, so a cut-short session leaves complete seeds
    configs = [cfgs[i] for i in range(max(map(len, per_config), default=0)) for cfgs in per_config if i < len(cfgs)]
    todo = [c for c in configs if run_state(c) != "done"]
    print(f"== {experiment.name}: {len(configs) - len(todo)}/{len(configs)} runs finished earlier, "
          f"{len(todo)} to train", flush=True)
    if not todo:
        return 0
    start = time.perf_counter()
    try:
        if jobs == 1:
            for i, config in enumerate(todo, 1):
                print(f"[{i}/{len(todo)}] {config.output}", flush=True)
                _train_one(config)
        else:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_train_one, c) for c in todo]
                for i, future in enumerate(as_completed(futures), 1):
                    print(f"[{i}/{len(todo)}] done {future.result()}", flush=True)
    finally:  # an interrupted session's time counts too
        add_wall_time(output / experiment.name, time.perf_counter() - start, jobs)
    return len(todo)


def add_wall_time(folder: Path, seconds: float, jobs: int) -> None:
    """Accumulates the wall time spent training an experiment (over resumptions) in ``timing.json``."""
    path = folder / TIMING_FILE
    timing = json.loads(path.read_text()) if path.is_file() else {"wall_s": 0.0, "sessions": []}
    timing["wall_s"] += seconds
    timing["sessions"].append({"wall_s": round(seconds, 1), "jobs": jobs, "machine": machine(),
                               "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    path.write_text(json.dumps(timing, indent=2) + "\n")


def finish_experiment(experiment: Experiment, output: Path, quick: bool, data_dir: str | None = None) -> bool:
    """Writes the experiment's compare report and runs its ``after`` step when all its runs are finished (``after``
    alone on a partial grid for an experiment marked ``partial``); returns whether the grid is complete."""
    from torchsphere.train.compare import compare

    configs = [c for cfgs in configs_of(experiment, output, quick, data_dir).values() for c in cfgs]
    if not all(run_state(c) == "done" for c in configs):
        if experiment.partial and experiment.after is not None:
            experiment.after(output / experiment.name)
        return False
    compare(load(experiment, quick), output / experiment.name, experiment_overrides(experiment, quick, data_dir),
            quiet=True)
    if experiment.after is not None:
        experiment.after(output / experiment.name)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the experiments of experiments/README.md and regenerate docs/results.md.")
    parser.add_argument("--only", action="append", choices=NAMES, metavar="NAME",
                        help=f"run only this experiment (repeatable); one of {NAMES}")
    parser.add_argument("--quick", action="store_true", help="smoke test: every configuration, 1 seed, 4 steps on "
                        "400 images; writes to reports/experiments-quick, never to docs/results.md")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (each on 1 thread)")
    parser.add_argument("--output", type=Path, help="run folders (default reports/experiments, "
                        "reports/experiments-quick with --quick)")
    parser.add_argument("--results", type=Path, help="the generated report (default docs/results.md; "
                        "OUTPUT/results.md with --quick)")
    parser.add_argument("--report-only", action="store_true", help="train nothing, only regenerate the report")
    parser.add_argument("--data-dir", help="folder searched first for the dataset files (default: the usual places)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    output = args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT)
    results = args.results or (output / "results.md" if args.quick else DEFAULT_RESULTS)
    selected = [e for e in EXPERIMENTS if not args.only or e.name in args.only]
    for experiment in selected:
        if not args.report_only:
            train_experiment(experiment, output, args.quick, args.jobs, args.data_dir)
        finish_experiment(experiment, output, args.quick, args.data_dir)
    from results import write_results

    write_results(output, results, quick=args.quick)
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
