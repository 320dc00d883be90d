"""Measures the cost of every experiment spec and estimates its total CPU time, before running the grid.

For each configuration of each spec (seed 0), the run is set up exactly as ``torchsphere.train`` does (same data,
model, optimizer, regularizer) in a temporary folder; a few training steps are timed after a warm-up, plus one
evaluation of the validation and test splits. The estimate of a configuration is

    seeds x (steps x CPU s/step + evaluations x CPU s/evaluation)

with process CPU time on 1 thread (every spec sets ``threads: 1``). Setup (reading the dataset) is not counted.
On a machine shared with other jobs the figures are noisy upper bounds.

Command (writes a markdown table to stdout and ``--output`` when given)::

    .venv/bin/python experiments/calibrate.py [--only e1_operators_heads] [--steps 4] [--output FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_all import EXPERIMENTS, spec_path  # noqa: E402


def time_config(config, steps: int) -> tuple[float, float]:
    """(CPU seconds per training step, CPU seconds per evaluation of val + test) of one configuration."""
    from torchsphere.train.loop import evaluate, setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        run = setup(config.replace(output=str(Path(tmp) / "run"), quiet=True))
        data, batch = run.data, config.batch_size
        x, y = data.train_x[:batch], data.train_y[:batch]
        train_step(run, x, y)  # warm-up
        times = []
        for _ in range(steps):
            tick = time.process_time()
            train_step(run, x, y)
            times.append(time.process_time() - tick)
        tick = time.process_time()
        evaluate(run.raw_model, data.val_x, data.val_y, batch_size=config.eval_batch_size)
        evaluate(run.raw_model, data.test_x, data.test_y, batch_size=config.eval_batch_size)
        return statistics.median(times), time.process_time() - tick


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", action="append", choices=[e.name for e in EXPERIMENTS if e.spec],
                        help="experiment(s) to calibrate (default: all)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (default 4)")
    parser.add_argument("--output", help="also write the markdown to this file")
    args = parser.parse_args(argv)
    from torchsphere.train.builders import total_steps
    from torchsphere.train.compare import load_spec, run_configs

    torch.set_num_threads(1)
    lines = ["| experiment | configuration | runs | steps | CPU ms/step | CPU s/eval | est. CPU min |",
             "|---|---|---|---|---|---|---|"]
    totals = {}
    for exp in EXPERIMENTS:
        if not exp.spec or (args.only and exp.name not in args.only):
            continue
        spec = load_spec(str(spec_path(exp)))
        configs = run_configs(spec, "/tmp/unused")
        total = 0.0
        for name, cfgs in configs.items():
            config = cfgs[0]
            step_s, eval_s = time_config(config, args.steps)
            steps = total_steps(config, 10 ** 9)
            evals = -(-steps // config.eval_every)
            minutes = len(cfgs) * (steps * step_s + evals * eval_s) / 60
            total += minutes
            line = (f"| {exp.name} | {name} | {len(cfgs)} | {steps} | {1000 * step_s:.1f} | {eval_s:.2f} | "
                    f"{minutes:.1f} |")
            lines.append(line)
            print(line, flush=True)
        totals[exp.name] = total
    lines.append("")
    lines += [f"- {name}: about {minutes:.0f} CPU minutes" for name, minutes in totals.items()]
    lines.append(f"- all: about {sum(totals.values()):.0f} CPU minutes")
    text = "\n".join(lines) + "\n"
    import run_all as run_all_module
    header = (f"# Calibration of the experiment specs\n\nWritten by `.venv/bin/python experiments/calibrate.py "
              f"--steps {args.steps}` on {time.strftime('%Y-%m-%d', time.gmtime())} ({run_all_module.machine()}): "
              f"process CPU time of one training step (median of {args.steps} after a warm-up) and of one "
              f"evaluation of the validation + test splits, and the estimate seeds x (steps x step + evaluations x "
              f"evaluation). Dataset loading and checkpoint writes are not counted.\n\n")
    text = header + text
    print("\n".join(lines[-len(totals) - 1:]))
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
