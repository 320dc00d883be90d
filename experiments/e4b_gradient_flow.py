"""Experiment 4b: gradient flow through depth, CNN-N vs SphereNet-N (cosine), N = 9-60, with BatchNorm and without.

Liu et al., *Deep Hyperspherical Learning* (NIPS 2017, arXiv 1711.03189) claim that SphereConv mitigates vanishing /
exploding gradients so that deep plain SphereNets optimize more easily than plain CNNs. Two parts, both on the
configurations of ``experiments/e4b_gradient_flow.yaml`` (widths / 4 = 32/48/64 channels, batch 128):

(a) the diagnostic: the first ``--diag-steps`` steps of each configuration's training run (seed 0) measured with
    :class:`torchsphere.analysis.gradient_flow.GradientFlow` (per-layer activation RMS, weight-gradient norm, weight
    norm and effective lr ||w_t+1 - w_t|| / ||w_t||), into ``OUTPUT/e4b_gradient_flow/gradflow/CONFIG/``;
(b) the training runs (1,500 steps of batch 128, 3 seeds), the compare spec that ``experiments/run_all.py`` trains
    (``--only e4b_gradient_flow``; finished runs reused, killed ones resumed). ``--train`` trains a subset here.

Then it writes ``docs/results/e4b_gradient_flow.md`` with ``e4b_gradient_flow.png`` (layer index vs gradient norm
per depth) and ``e4b_effective_lr.png`` from whatever has finished, and states what remains and its cost.

Commands::

    .venv/bin/python experiments/e4b_gradient_flow.py                       # diagnostic (what is missing) + page
    .venv/bin/python experiments/e4b_gradient_flow.py --train cnn9-bn,spherenet9-bn --seeds 0   # + these runs
    .venv/bin/python experiments/e4b_gradient_flow.py --report-only         # measure / train nothing: the page
    .venv/bin/python experiments/run_all.py --only e4b_gradient_flow        # every training run, then the page

The generated lines restate numbers by the rules printed with them; interpretation goes between the
``human-discussion`` markers, which regeneration keeps.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAME = "e4b_gradient_flow"
DEFAULT_OUTPUT = ROOT / "reports" / "experiments"
DEFAULT_PAGE = ROOT / "docs" / "results" / "e4b_gradient_flow.md"
COMMAND = ".venv/bin/python experiments/e4b_gradient_flow.py"
DIAG_STEPS = 10  # 0.6-5 CPU s per step of batch 128 (9-60 layers): about 8 CPU-minutes for the 20 configurations
DIAG_EVERY = 1
DIAG_DIR = "gradflow"
LONG_DIR = "gradflow_long"  # the longer diagnostic: the first LONG_STEPS steps, every LONG_EVERY-th recorded
LONG_STEPS = 300
LONG_EVERY = 25
LONG_CONFIGS = ("cnn9-bn", "spherenet9-bn", "cnn9-none", "spherenet9-none", "cnn18-bn", "spherenet18-bn",
                "cnn18-none", "spherenet18-none")  # the depths trained at 3 seeds (16 CPU-minutes measured)
CPU_FILE = "train_cpu.json"  # process CPU seconds of the runs trained by this driver
DISCUSSION = re.compile(r"<!-- human-discussion:start -->.*?<!-- human-discussion:end -->", re.S)
EARLY_FRACTION = 1 / 3  # the "easier optimization" claim read early: the training loss at the first evaluation
                        # after a third of the budget (step 500 of 1,500)
TRAINS_AT = 0.5  # as E4: a run "trains" when its final test accuracy reaches 50% (chance 10%)
DECADE = 10.0  # a gradient ratio beyond 10x between the first and the last conv layer is called vanishing/exploding
sys.path.insert(0, str(HERE))


def _experiment():
    import run_all

    return next(e for e in run_all.EXPERIMENTS if e.name == NAME)


def _configs(output: Path, overrides: dict[str, Any]) -> dict[str, list]:
    """{configuration: [TrainConfig per seed]} of the training part, as run_all trains them."""
    import run_all
    from torchsphere.train.compare import run_configs

    return run_configs(run_all.load(_experiment(), False), output / NAME, {**run_all.overrides(False), **overrides})


# ---------------------------------------------------------------------------------------------- (a) diagnostic
def diag_folder(output: Path, name: str, folder: str = DIAG_DIR) -> Path:
    return output / NAME / folder / name


def diag_state(config, steps: int, every: int) -> str:
    """``"done"`` when the folder holds a finished measurement of this configuration and stride over at least
    ``steps`` steps (the monitor is deterministic, so the first ``steps`` steps of a longer measurement are the
    measurement of ``steps`` steps)."""
    from torchsphere.train.config import TrainConfig
    from torchsphere.train.gradflow import GRAD_FLOW_FILE, GRAD_FLOW_INFO
    from torchsphere.train.loop import CONFIG_FILE, RESUME_FREE
    from torchsphere.train.preflight import config_diff

    out = Path(config.output)
    if not all((out / f).is_file() for f in (CONFIG_FILE, GRAD_FLOW_FILE, GRAD_FLOW_INFO)):
        return "new"
    info = json.loads((out / GRAD_FLOW_INFO).read_text())
    if config_diff(config, TrainConfig.from_yaml(out / CONFIG_FILE).to_dict(), RESUME_FREE) or \
            info.get("every") != every or info.get("steps", 0) < steps:
        return "stale"
    return "done"


def run_diagnostic(output: Path, steps: int, every: int, overrides: dict[str, Any], names: list[str] | None = None,
                   log=print, folder: str = DIAG_DIR) -> int:
    """Measures every configuration (seed 0) not yet measured with this step count and stride into
    ``OUTPUT/e4b_gradient_flow/<folder>/<configuration>``; returns how many."""
    import shutil

    from torchsphere.train.gradflow import measure_gradient_flow

    done = 0
    for name, cfgs in _configs(output, overrides).items():
        if names and name not in names:
            continue
        config = cfgs[0].replace(output=str(diag_folder(output, name, folder)), quiet=True, checkpoint_every=0)
        state = diag_state(config, steps, every)
        if state == "done":
            continue
        if state == "stale":  # another step count or configuration: measured again, never mixed
            shutil.rmtree(config.output)
        result = measure_gradient_flow(config, steps, every)
        log(f"gradflow {name}: {steps} steps, {result['cpu_s']:.1f} CPU s", flush=True)
        done += 1
    return done


def load_diagnostic(output: Path, steps: int = DIAG_STEPS, folder: str = DIAG_DIR) -> dict[str, dict[str, Any]]:
    """{configuration: {"rows", "info"}} of the finished measurements, cut to their first ``steps`` steps (the CPU
    time in ``info`` scaled to them)."""
    from torchsphere.analysis.gradient_flow import read_csv
    from torchsphere.train.gradflow import GRAD_FLOW_FILE, GRAD_FLOW_INFO

    found = {}
    root = output / NAME / folder
    for run in sorted(root.iterdir()) if root.is_dir() else []:
        if (run / GRAD_FLOW_INFO).is_file():
            info = json.loads((run / GRAD_FLOW_INFO).read_text())
            if info["steps"] < steps:
                continue  # a shorter measurement than asked for: not used (measured again by run_diagnostic)
            scale = steps / info["steps"]
            info = {**info, "measured_steps": info["steps"], "measured_cpu_s": info["cpu_s"], "steps": steps,
                    "cpu_s": info["cpu_s"] * scale,
                    "wall_s": info["wall_s"] * scale}
            found[run.name] = {"rows": [r for r in read_csv(run / GRAD_FLOW_FILE) if r["step"] < steps],
                               "info": info}
    return found


# ---------------------------------------------------------------------------------------------- (b) training
def train_subset(output: Path, names: list[str], seeds: list[int] | None, overrides: dict[str, Any],
                 log=print) -> int:
    """Trains (or resumes) the chosen runs of the training part in this process; returns how many."""
    import run_all

    configs = _configs(output, overrides)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; choose from {sorted(configs)}")
    todo = [c for n in names for c in configs[n] if seeds is None or c.seed in seeds]
    todo = [c for c in todo if run_all.run_state(c) != "done"]
    wall = time.perf_counter()
    try:
        for config in todo:
            start = time.process_time()
            log(f"train {config.output}", flush=True)
            run_all._train_one(config)
            add_cpu_time(output, config, time.process_time() - start)
    finally:
        if todo:
            run_all.add_wall_time(output / NAME, time.perf_counter() - wall, 1)
    return len(todo)


def add_cpu_time(output: Path, config, seconds: float) -> None:
    """Adds a run's process CPU seconds to the driver's CPU log, under a file lock and with the log read afresh, so
    that several processes training runs of this experiment at once do not lose each other's entries."""
    import fcntl

    from torchsphere.train.checkpoint import atomic_write_text

    cpu_path = output / NAME / CPU_FILE
    key = str(Path(config.output).relative_to(output / NAME))
    with open(cpu_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cpu_log = json.loads(cpu_path.read_text()) if cpu_path.is_file() else {}
        cpu_log[key] = round(cpu_log.get(key, 0.0) + seconds, 1)
        atomic_write_text(cpu_path, json.dumps(cpu_log, indent=2, sort_keys=True) + "\n")


def training_state(output: Path, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{configuration: {"done": [run dirs], "missing": [seeds]}}."""
    import run_all

    state = {}
    for name, cfgs in _configs(output, overrides).items():
        done = [c for c in cfgs if run_all.run_state(c) == "done"]
        state[name] = {"done": [c.output for c in done], "missing": [c.seed for c in cfgs if c not in done],
                       "steps": cfgs[0].steps, "eval_every": cfgs[0].eval_every}
    return state


# ---------------------------------------------------------------------------------------------- measures
def split_name(name: str) -> tuple[str, int, str]:
    """'spherenet30-none' -> ('SphereNet', 30, 'none')."""
    match = re.fullmatch(r"(cnn|spherenet)(\d+)-(\w+)", name)
    if not match:
        raise ValueError(f"not an E4b configuration name: {name!r}")
    return ("CNN" if match.group(1) == "cnn" else "SphereNet"), int(match.group(2)), match.group(3)


def stage_convs(rows: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """The N hidden conv layers (``stages.*``) of one step, in forward order."""
    return sorted((r for r in rows if r["step"] == step and r["name"].startswith("stages.")), key=lambda r: r["index"])


def profile(rows: list[dict[str, Any]], step: int) -> dict[str, float]:
    convs = stage_convs(rows, step)
    grads = [r["grad_norm"] for r in convs]
    finite = [g for g in grads if g > 0 and math.isfinite(g)]
    return dict(first=grads[0], last=grads[-1], ratio=grads[0] / grads[-1] if grads[-1] > 0 else math.nan,
                spread=math.log10(max(finite) / min(finite)) if finite else math.nan,
                act_first=convs[0]["act_rms"], act_last=convs[-1]["act_rms"],
                eff_lr=statistics.median(r["update_ratio"] for r in convs),
                loss=convs[0]["loss"])


def weight_growth(rows: list[dict[str, Any]], step: int) -> float:
    """Median over the hidden conv layers of ||w_step|| / ||w_0||."""
    first = {r["name"]: r["weight_norm"] for r in stage_convs(rows, 0)}
    return statistics.median(r["weight_norm"] / first[r["name"]] for r in stage_convs(rows, step))


def flow_word(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "undefined"
    if ratio < 1 / DECADE:
        return "vanishing toward the input"
    if ratio > DECADE:
        return "exploding toward the input"
    return "within 10x"


# ---------------------------------------------------------------------------------------------- plots
def plot_gradients(diag: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f, n) for f in ("CNN", "SphereNet") for n in ("bn", "none")]
    last = {name: max(r["step"] for r in d["rows"]) for name, d in diag.items()}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharey="row", squeeze=False)
    for col, (family, norm) in enumerate(panels):
        for row, when in enumerate(("init", "last")):
            ax = axes[row][col]
            for name in sorted(diag, key=lambda n: split_name(n)[1]):
                fam, depth, nrm = split_name(name)
                if (fam, nrm) != (family, norm):
                    continue
                step = 0 if when == "init" else last[name]
                convs = stage_convs(diag[name]["rows"], step)
                ax.plot([r["index"] for r in convs], [r["grad_norm"] for r in convs], marker=".", label=f"N = {depth}")
            ax.set_yscale("log")
            ax.set_title(f"{family}, {'BN' if norm == 'bn' else 'no norm'}, "
                         + ("step 0 (init)" if when == "init" else f"step {max(last.values())}"))
            ax.set_xlabel("conv layer index (0 = input side)")
            if col == 0:
                ax.set_ylabel("||dL/dW|| (Frobenius)")
            if ax.get_lines():
                ax.legend(fontsize=7)
    fig.suptitle("E4b: weight-gradient norm per conv layer, Fashion-MNIST, widths / 4, batch 128 (seed 0)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_effective_lr(diag: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f, n) for f in ("CNN", "SphereNet") for n in ("bn", "none")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharey="row", squeeze=False)
    for col, (family, norm) in enumerate(panels):
        for name in sorted(diag, key=lambda n: split_name(n)[1]):
            fam, depth, nrm = split_name(name)
            if (fam, nrm) != (family, norm):
                continue
            rows = diag[name]["rows"]
            steps = sorted({r["step"] for r in rows})
            axes[0][col].plot(steps, [statistics.median(r["update_ratio"] for r in stage_convs(rows, s))
                                      for s in steps], label=f"N = {depth}")
            axes[1][col].plot(steps, [weight_growth(rows, s) for s in steps], label=f"N = {depth}")
        kind = "SphereConv filters" if family == "SphereNet" else "conv filters"
        axes[0][col].set_title(f"{family}, {'BN' if norm == 'bn' else 'no norm'}: {kind}")
        axes[0][col].set_yscale("log")
        axes[1][col].set_xlabel("step")
        for r in (0, 1):
            if axes[r][col].get_lines():
                axes[r][col].legend(fontsize=7)
    axes[0][0].set_ylabel("median ||w_t+1 - w_t|| / ||w_t||")
    axes[1][0].set_ylabel("median ||w_t|| / ||w_0||")
    fig.suptitle("E4b: effective learning rate and filter-norm growth of the hidden conv layers (Adam 1e-3, seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def early_step(steps: int, eval_every: int) -> int:
    """The first evaluation step at or after ``EARLY_FRACTION`` of the budget."""
    return min(steps, eval_every * math.ceil(EARLY_FRACTION * steps / eval_every))


def run_measures(run: Path, early: int) -> dict[str, Any]:
    """A finished run's numbers: final and best-on-val test accuracy, training loss (train mode) at step ``early``
    and at the end, training accuracy in eval mode at the end, wall seconds per step."""
    from torchsphere.train.metrics import METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary

    summary = read_summary(run / SUMMARY_FILE)
    rows = [r for r in read_metrics(run / METRICS_FILE) if r["step"] > 0]
    at_early = [r for r in rows if r["step"] == early]
    if not at_early:
        raise ValueError(f"{str(run)!r}: metrics.csv has no evaluation at step {early}")
    return {"test_acc": summary["final"]["test_acc"], "best_test_acc": summary["best"]["test_acc"],
            "early_loss": at_early[0]["train_loss"], "train_loss": rows[-1]["train_loss"],
            "train_eval_acc": rows[-1].get("train_eval_acc", math.nan),
            "time_per_step_s": summary["time_per_step_s"], "curve": [(r["step"], r["train_loss"]) for r in rows]}


def noise_word(a: list[float], b: list[float]) -> str:
    """\"higher\"/\"lower\" (mean of ``a`` against ``b``) when the difference exceeds the sum of the two standard
    deviations, else \"within noise\"; no verdict with fewer than 2 values on either side."""
    if min(len(a), len(b)) < 2:
        return "one seed: no verdict"
    diff = statistics.fmean(a) - statistics.fmean(b)
    if abs(diff) > statistics.stdev(a) + statistics.stdev(b):
        return "higher" if diff > 0 else "lower"
    return "within noise"


def plot_training(finished: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({split_name(n)[1] for n, runs in finished.items() if runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True, squeeze=False)
    colors = {d: plt.get_cmap("viridis")(i / max(1, len(depths) - 1)) for i, d in enumerate(depths)}
    for col, norm in enumerate(("bn", "none")):
        ax = axes[0][col]
        for name, runs in finished.items():
            fam, depth, nrm = split_name(name)
            if nrm != norm or not runs:
                continue
            steps = [s for s, _ in runs[0]["curve"]]
            values = [[v for _, v in r["curve"]] for r in runs]
            mean = [statistics.fmean(v[i] for v in values) for i in range(len(steps))]
            style = "-" if fam == "SphereNet" else "--"
            ax.plot(steps, mean, style, color=colors[depth], label=f"{fam}-{depth} ({len(runs)} seeds)")
            ax.fill_between(steps, [min(v[i] for v in values) for i in range(len(steps))],
                            [max(v[i] for v in values) for i in range(len(steps))], color=colors[depth], alpha=0.12)
        ax.set_title("BN" if norm == "bn" else "no normalization")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if ax.get_lines():
            ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training loss (train mode)")
    fig.suptitle("E4b: training loss, SphereNet-N (solid) vs CNN-N (dashed), 1,500 steps of batch 128")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_long(diag: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({split_name(n)[1] for n in diag})
    colors = {d: plt.get_cmap("viridis")(i / max(1, len(depths) - 1)) for i, d in enumerate(depths)}
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True, sharey="row", squeeze=False)
    for col, norm in enumerate(("bn", "none")):
        for name in sorted(diag, key=lambda n: (split_name(n)[1], n)):
            fam, depth, nrm = split_name(name)
            if nrm != norm:
                continue
            rows = diag[name]["rows"]
            steps = sorted({r["step"] for r in rows})
            kw = dict(linestyle="-" if fam == "SphereNet" else "--", color=colors[depth], marker=".",
                      label=f"{fam}-{depth}")
            axes[0][col].plot(steps, [profile(rows, t)["ratio"] for t in steps], **kw)
            axes[1][col].plot(steps, [profile(rows, t)["eff_lr"] for t in steps], **kw)
            axes[2][col].plot(steps, [weight_growth(rows, t) for t in steps], **kw)
        axes[0][col].set_title("BN" if norm == "bn" else "no normalization")
        axes[2][col].set_xlabel("step")
        for r in (0, 1):
            axes[r][col].set_yscale("log")
        if axes[0][col].get_lines():
            axes[0][col].legend(fontsize=8)
    axes[0][0].set_ylabel("grad norm, first / last hidden conv")
    axes[1][0].set_ylabel("median ||w_t+1 - w_t|| / ||w_t||")
    axes[2][0].set_ylabel("median ||w_t|| / ||w_0||")
    fig.suptitle("E4b: gradient flow, effective learning rate and filter-norm growth over the first steps "
                 "(seed 0; SphereNet solid, CNN dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def long_section(diag: dict[str, dict[str, Any]], steps: int, images: Path) -> list[str]:
    """Part (a2): the longer diagnostic, a table at its first, middle and last recorded step and a plot."""
    from torchsphere.train.report import markdown_table

    head = [f"### (a2) Over the first {steps} steps", ""]
    if not diag:
        return head + [f"Not measured yet: run `{COMMAND} --long default` (the 9- and 18-layer configurations, "
                       "about 16 CPU-minutes).", ""]
    recorded = sorted({r["step"] for d in diag.values() for r in d["rows"]})
    marks = sorted({recorded[0], recorded[len(recorded) // 2], recorded[-1]})
    rows = [["configuration", *[f"first / last @ {t}" for t in marks], *[f"eff. lr @ {t}" for t in marks],
             f"‖w‖ / ‖w_0‖ @ {marks[-1]}", f"train loss @ {marks[-1]}"]]
    for name in sorted(diag, key=lambda n: (split_name(n)[2], split_name(n)[1], n)):
        rows_ = diag[name]["rows"]
        prof = {t: profile(rows_, t) for t in marks}
        rows.append([name, *[f"{prof[t]['ratio']:.2g}" for t in marks], *[f"{prof[t]['eff_lr']:.2g}" for t in marks],
                     f"{weight_growth(rows_, marks[-1]):.3f}", f"{prof[marks[-1]]['loss']:.3f}"])
    cpu = sum(d["info"]["measured_cpu_s"] for d in diag.values())
    plot_long(diag, images / "e4b_long.png")
    return head + [f"The same measurement as (a) for {len(diag)} configurations (seed 0), every "
                   f"{diag[next(iter(diag))]['info']['every']}th step recorded ({cpu / 60:.1f} CPU-min): the ratio "
                   "of the first to the last hidden conv layer's weight-gradient norm, the median effective learning "
                   "rate ‖Δw‖ / ‖w‖ of the hidden conv layers, and their median filter-norm growth ‖w‖ / ‖w_0‖.", "",
                   markdown_table(rows), "", "![E4b over the first steps](e4b_long.png)", ""]


def _mean_std(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# ---------------------------------------------------------------------------------------------- the page
def _pct(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f} ({len(values)} seeds)"


def page(output: Path, page_path: Path, overrides: dict[str, Any], steps: int = DIAG_STEPS,
         long_steps: int = LONG_STEPS) -> str:
    from torchsphere.train.report import markdown_table

    diag = load_diagnostic(output, steps)
    state = training_state(output, overrides)
    names = list(state)
    images = page_path.parent
    lines = ["## E4b: gradient flow through depth, and deep plain nets at a budget where depth can show", "",
             "E4 found that deep plain nets of either family stop training, but at widths / 16 (8-16 channels) and "
             "300 steps of batch 32, where a failure of the method cannot be told from a failure of the setting. "
             "E4b measures what the claim is about (Liu et al., NIPS 2017: SphereConv mitigates vanishing / "
             "exploding gradients in deep plain nets) and trains at widths / 4 (32/48/64 channels), 1,500 steps of "
             "batch 128. Spec: `experiments/e4b_gradient_flow.yaml`; driver: `experiments/e4b_gradient_flow.py`; the "
             "diagnostic is `torchsphere.analysis.gradient_flow` (also `torchsphere gradflow`, docs/training.md).",
             ""]
    hardware = _machine()
    if diag:
        steps = {d["info"]["steps"] for d in diag.values()}
        cpu = sum(d["info"]["cpu_s"] for d in diag.values())
        wall = sum(d["info"]["wall_s"] for d in diag.values())
        spent = sum(d["info"]["measured_cpu_s"] for d in diag.values())
        longer = sorted(n for n, d in diag.items() if d["info"]["measured_steps"] > d["info"]["steps"])
        lines += ["### (a) Gradient flow over the first steps", "",
                  f"Each configuration's training run (seed 0) for its first {'/'.join(map(str, sorted(steps)))} "
                  f"steps, every step recorded: the same data, initial weights, batches, Adam 1e-3 and augmentation "
                  f"as the training runs of part (b) (the monitor changes nothing: bit-identical losses, tested). "
                  f"{len(diag)} of {len(names)} configurations measured; these steps cost {cpu / 60:.1f} CPU-min "
                  f"({wall / 60:.1f} min wall) at 1 thread on {hardware}"
                  + (f"; {spent / 60:.1f} CPU-min were spent in all, {', '.join(longer)} having been measured over "
                     f"{max(diag[n]['info']['measured_steps'] for n in longer)} steps (the first "
                     f"{min(steps)} are shown)" if longer else "") + ".", "",
                  "Columns: the weight-gradient norm ||dL/dW|| of the first and the last hidden conv layer at "
                  "initialization (step 0), their ratio first / last (< 0.1: *vanishing toward the input*, > 10: "
                  "*exploding toward the input*) and the same ratio at the last step measured, the spread "
                  "log10(max / min) of the gradient norms over the N hidden "
                  "conv layers, the per-example activation RMS of the first and the last conv output, the median "
                  "effective lr ||w_t+1 - w_t|| / ||w_t|| of the conv filters at step 0 and at the last step "
                  "measured, the median filter-norm growth ||w_t|| / ||w_0|| there, and the training loss at both "
                  "steps.", ""]
        rows = [["configuration", "grad first", "grad last", "first/last", "first/last at last step", "spread (decades)",
                 "act RMS first → last",
                 "eff. lr step 0 → last", "‖w‖ growth", "loss step 0 → last"]]
        verdict_lines = []
        for name in names:
            if name not in diag:
                rows.append([name] + ["not measured"] + [""] * 8)
                continue
            d = diag[name]["rows"]
            last = max(r["step"] for r in d)
            p0, pl = profile(d, 0), profile(d, last)
            rows.append([name, f"{p0['first']:.3g}", f"{p0['last']:.3g}", f"{p0['ratio']:.3g}", f"{pl['ratio']:.3g}",
                         f"{p0['spread']:.2f}",
                         f"{p0['act_first']:.3g} → {p0['act_last']:.3g}", f"{p0['eff_lr']:.2e} → {pl['eff_lr']:.2e}",
                         f"{weight_growth(d, last):.3f}", f"{p0['loss']:.3f} → {pl['loss']:.3f}"])
        lines += [markdown_table(rows), ""]
        lines += ["Rule: per depth and norm, the family whose first/last ratio is nearer 1 (|log10| smaller) has the "
                  "flatter gradient profile (at step 0 and at the last step measured); \"vanishing\" / \"exploding\" as defined above. One "
                  "seed: these are measurements of one initialization, not a distribution.", ""]
        for norm in ("bn", "none"):
            for depth in sorted({split_name(n)[1] for n in names}):
                cnn, sph = f"cnn{depth}-{norm}", f"spherenet{depth}-{norm}"
                if cnn in diag and sph in diag:
                    rc, rs = profile(diag[cnn]["rows"], 0)["ratio"], profile(diag[sph]["rows"], 0)["ratio"]
                    flatter = ("SphereNet" if abs(math.log10(rs)) < abs(math.log10(rc)) else "CNN")
                    lc = profile(diag[cnn]["rows"], max(r["step"] for r in diag[cnn]["rows"]))["ratio"]
                    ls = profile(diag[sph]["rows"], max(r["step"] for r in diag[sph]["rows"]))["ratio"]
                    later = ("SphereNet" if abs(math.log10(ls)) < abs(math.log10(lc)) else "CNN")
                    verdict_lines.append(f"- N = {depth}, {'BN' if norm == 'bn' else 'no norm'}: at step 0 CNN "
                                         f"{rc:.3g} ({flow_word(rc)}), SphereNet {rs:.3g} ({flow_word(rs)}), "
                                         f"flatter: {flatter}; at the last step CNN {lc:.3g} ({flow_word(lc)}), "
                                         f"SphereNet {ls:.3g} ({flow_word(ls)}), flatter: {later}.")
        lines += verdict_lines + [""]
        plot_gradients(diag, images / "e4b_gradient_flow.png")
        plot_effective_lr(diag, images / "e4b_effective_lr.png")
        lines += ["![E4b gradient norms](e4b_gradient_flow.png)", "", "![E4b effective lr](e4b_effective_lr.png)", ""]
    else:
        lines += ["### (a) Gradient flow over the first steps", "", f"Not measured yet: run `{COMMAND}`.", ""]

    lines += long_section(load_diagnostic(output, long_steps, LONG_DIR), long_steps, images)

    # (b) training
    lines += ["### (b) Training: 1,500 steps of batch 128", ""]
    cpu_log = json.loads((output / NAME / CPU_FILE).read_text()) if (output / NAME / CPU_FILE).is_file() else {}
    early = early_step(state[names[0]]["steps"], state[names[0]]["eval_every"]) if names else 0
    finished = {name: [run_measures(Path(d), early) for d in state[name]["done"]] for name in names}
    rows = [["configuration", "seeds", f"train loss @ {early} (train mode)", "final train loss (train mode)",
             "train acc % (eval mode)", "final test % (eval mode)", "best-on-val test %", f"trains (≥ {TRAINS_AT:.0%})",
             "s / step", "CPU-min per run"]]
    for name in names:
        runs = finished[name]
        if not runs:
            continue
        cpus = [cpu_log[k] for k in cpu_log if k.startswith(f"runs/{name}/")]
        rows.append([name, f"{len(runs)}/{len(runs) + len(state[name]['missing'])}",
                     _mean_std([r["early_loss"] for r in runs], 3), _mean_std([r["train_loss"] for r in runs], 3),
                     _pct([r["train_eval_acc"] for r in runs]), _pct([r["test_acc"] for r in runs]),
                     _pct([r["best_test_acc"] for r in runs]),
                     f"{sum(r['test_acc'] >= TRAINS_AT for r in runs)}/{len(runs)}",
                     f"{statistics.fmean(r['time_per_step_s'] for r in runs):.2f}",
                     f"{statistics.fmean(cpus) / 60:.1f}" if cpus else "—"])
    if len(rows) > 1:
        hours = sum(cpu_log.values()) / 3600
        lines += [markdown_table(rows), "",
                  f"Hardware: {hardware}, two runs at a time; {hours:.1f} CPU-hours for the runs "
                  "this driver's log holds. Train mode: the loss (and accuracy) of the training batches as the step "
                  f"saw them, BatchNorm on batch statistics, averaged over the {state[names[0]]['eval_every']} steps "
                  "before the evaluation; eval mode: BatchNorm on its moving statistics, on a fixed set of 1,000 "
                  "training images (train acc) or the 1,000-image test subset. s / step: training wall seconds per "
                  "step (summary.json; evaluations excluded, the machine shared by two runs); CPU-min per run: "
                  "process CPU time of the whole run where this driver's trainer ran it.", ""]
        if any(finished.values()):
            plot_training(finished, images / "e4b_training.png")
            lines += ["![E4b training loss](e4b_training.png)", "",
                      "Training loss in train mode against steps, mean over the finished seeds (band: min to max).",
                      ""]
        pairs = []
        for name in names:
            fam, depth, norm = split_name(name)
            twin = f"cnn{depth}-{norm}"
            if fam != "SphereNet" or not finished.get(name) or not finished.get(twin):
                continue
            a, b = finished[name], finished[twin]
            parts = []
            for key, label, scale in (("early_loss", f"train loss @ {early}", 1.0),
                                      ("train_loss", "final train loss", 1.0),
                                      ("train_eval_acc", "train acc (eval mode)", 100.0),
                                      ("test_acc", "final test acc", 100.0)):
                x, y = [r[key] for r in a], [r[key] for r in b]
                diff = scale * (statistics.fmean(x) - statistics.fmean(y))
                unit = " points" if scale == 100.0 else ""
                parts.append(f"{label} {diff:+.{2 if scale == 100.0 else 3}f}{unit} ({noise_word(x, y)})")
            pairs.append(f"- {name} vs {twin}: " + "; ".join(parts) + ".")
        if pairs:
            lines += ["Rule (as E1): \"higher\"/\"lower\" when the difference of the two means exceeds the sum of "
                      "the two standard deviations; no verdict with fewer than 2 seeds on either side. For a loss, "
                      "lower is better.", ""]
            lines += pairs + [""]
    else:
        lines += ["No training run has finished yet.", ""]
    lines += remaining(state, diag, cpu_log)
    lines += ["### Discussion", "", _discussion(page_path), ""]
    return "\n".join(lines)


def diag_estimate(st: dict[str, Any], info: dict[str, Any]) -> float:
    """CPU minutes of one training run from the diagnostic: its measured CPU seconds per step times the budget, plus
    about 2,000 images evaluated per evaluation (forward only, about a third of a training step per 128 images)."""
    per_step = info["cpu_s"] / info["steps"]
    evals = st["steps"] // st["eval_every"] + 1
    return (st["steps"] * per_step + evals * (2000 / 128) * per_step / 3) / 60


def remaining(state: dict[str, dict[str, Any]], diag: dict[str, dict[str, Any]],
              cpu_log: dict[str, float] | None = None) -> list[str]:
    """What is left to train and its estimated CPU cost: the diagnostic's estimate, scaled by the median ratio of
    measured to estimated CPU time over the configurations whose runs this driver's log holds."""
    cpu_log = cpu_log or {}
    ratios = []
    for name, st in state.items():
        measured = [cpu_log[k] / 60 for k in cpu_log if k.startswith(f"runs/{name}/")]
        if measured and name in diag:
            ratios.append(statistics.fmean(measured) / diag_estimate(st, diag[name]["info"]))
    scale = statistics.median(ratios) if ratios else 1.0
    rows = [["configuration", "seeds left", "est. CPU-min per run", "est. CPU-min"]]
    total = 0.0
    for name, st in state.items():
        if not st["missing"]:
            continue
        per_run = scale * diag_estimate(st, diag[name]["info"]) if name in diag else math.nan
        if math.isfinite(per_run):
            total += per_run * len(st["missing"])
        rows.append([name, ",".join(map(str, st["missing"])), f"{per_run:.0f}" if math.isfinite(per_run) else "?",
                     f"{per_run * len(st['missing']):.0f}" if math.isfinite(per_run) else "?"])
    if len(rows) == 1:
        return ["Every training run has finished.", ""]
    from torchsphere.train.report import markdown_table

    basis = ("the diagnostic's measured CPU time per step at 1 thread"
             + (f", times {scale:.2f}, the median ratio of measured to estimated CPU time of the {len(ratios)} "
                f"configurations trained so far" if ratios else ""))
    return [f"**What remains to run** (estimated from {basis}; "
            "`.venv/bin/python experiments/run_all.py --only e4b_gradient_flow --jobs N` trains all of it, "
            "reusing every finished run):", "", markdown_table(rows), "",
            f"Total: about {total / 60:.1f} CPU-hours" + (" (configurations without a measurement not counted)"
                                                         if any(r[2] == "?" for r in rows[1:]) else "") + ".", ""]


def _discussion(page_path: Path) -> str:
    old = page_path.read_text() if page_path.is_file() else ""
    match = DISCUSSION.search(old)
    return match.group(0) if match else ("<!-- human-discussion:start -->\n(discussion to be written from the "
                                         "numbers above)\n<!-- human-discussion:end -->")


def _machine() -> str:
    import run_all

    return run_all.machine()


def write_page(output: Path, page_path: Path, overrides: dict[str, Any] | None = None,
               steps: int = DIAG_STEPS, long_steps: int = LONG_STEPS) -> Path:
    from torchsphere.train.checkpoint import atomic_write_text

    text = page(output, page_path, overrides or {}, steps, long_steps)
    page_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(page_path, text)
    return page_path


def _set(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. width_mult=0.0625), got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="experiments folder (default "
                        "reports/experiments; this experiment lives in OUTPUT/e4b_gradient_flow)")
    parser.add_argument("--page", type=Path, default=DEFAULT_PAGE, help="Markdown page (default %(default)s)")
    parser.add_argument("--diag-steps", type=int, default=DIAG_STEPS, help="steps measured per configuration "
                        "(default %(default)s)")
    parser.add_argument("--every", type=int, default=DIAG_EVERY, help="record every k-th step (default 1)")
    parser.add_argument("--diag-only", metavar="C1,C2", help="measure only these configurations")
    parser.add_argument("--long", metavar="C1,C2", help="also measure the longer diagnostic (--long-steps steps, "
                        "every --long-every-th recorded) for these configurations; 'default' for the "
                        f"{len(LONG_CONFIGS)} of the 9- and 18-layer pairs")
    parser.add_argument("--long-every", type=int, default=LONG_EVERY, help="recording stride of the longer "
                        "diagnostic (default %(default)s)")
    parser.add_argument("--long-steps", type=int, default=LONG_STEPS, help="steps of the longer diagnostic "
                        "(default %(default)s)")
    parser.add_argument("--train", metavar="C1,C2", help="also train these configurations of the training part "
                        "(resumable; 'all' for every one)")
    parser.add_argument("--seeds", metavar="S1,S2", help="with --train: only these seeds (default: the spec's)")
    parser.add_argument("--report-only", action="store_true", help="measure and train nothing; rewrite the page")
    parser.add_argument("--set", type=_set, action="append", default=[], metavar="KEY=VALUE",
                        help="override a training field for every run (smoke tests: width_mult=0.0625, ...)")
    parser.add_argument("--data-dir", help="folder searched first for the dataset files")
    args = parser.parse_args(argv)
    if args.diag_steps < 1 or args.every < 1:
        parser.error(f"--diag-steps and --every must be >= 1; got {args.diag_steps} and {args.every}")
    if args.long_every < 1 or args.long_steps <= args.long_every:
        parser.error(f"--long-every must be >= 1 and --long-steps greater than it; got {args.long_every} and "
                     f"{args.long_steps}")
    overrides = dict(args.set)
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    try:
        if not args.report_only:
            names = args.diag_only.split(",") if args.diag_only else None
            run_diagnostic(args.output, args.diag_steps, args.every, overrides, names)
            if args.long:
                chosen = list(LONG_CONFIGS) if args.long == "default" else [n for n in args.long.split(",") if n]
                unknown = sorted(set(chosen) - set(_configs(args.output, overrides)))
                if unknown:
                    raise ValueError(f"--long: unknown configuration(s) {unknown}")
                run_diagnostic(args.output, args.long_steps, args.long_every, overrides, chosen, folder=LONG_DIR)
            if args.train:
                configs = list(_configs(args.output, overrides))
                chosen = configs if args.train == "all" else [n for n in args.train.split(",") if n]
                seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
                train_subset(args.output, chosen, seeds, overrides)
        path = write_page(args.output, args.page, overrides, args.diag_steps, args.long_steps)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
