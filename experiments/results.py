"""Regenerates ``docs/results.md`` (and its PNG plots under ``docs/results/``) from the experiments' run folders.

Only finished experiments get tables; the others are listed with their number of finished runs. Every generated
sentence restates a number from the tables under a rule written next to it (for example "higher" means the
difference of the means exceeds the sum of the two standard deviations); the interpretation is left to the
human-written discussion, kept between ``<!-- human-discussion:start -->`` and ``<!-- human-discussion:end -->``
across regenerations.
"""
from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import run_all
from e8_report import section_e8
from torchsphere.train.report import ConfigResult, markdown_table, mean_std, steps_to_reach, table_rows

HUMAN_START, HUMAN_END = "<!-- human-discussion:start -->", "<!-- human-discussion:end -->"
HUMAN_DEFAULT = ("*Not written yet.* After the full grid has run, a person reads the tables above and writes here "
                 "where each claim holds on this data and where it does not, and why that may be (reduced widths, "
                 "short budgets, Fashion-MNIST instead of CIFAR).")
TRAINS_AT = 0.5  # experiment 4: a run "trains" when its final test accuracy reaches 50% (chance: 10%)


# ---------------------------------------------------------------------------------------------- loading runs
class Loaded:
    """The finished runs of one experiment: ``results`` per configuration (only when every run is finished)."""

    def __init__(self, experiment: run_all.Experiment, output: Path, quick: bool) -> None:
        self.experiment = experiment
        self.folder = output / experiment.name
        self.spec = run_all.load(experiment, quick)
        configs = run_all.configs_of(experiment, output, quick)
        states = {c.output: run_all.run_state(c) for cfgs in configs.values() for c in cfgs}
        self.configs = configs
        self.total = len(states)
        self.done = sum(s == "done" for s in states.values())
        self.complete = self.done == self.total
        self.results: dict[str, ConfigResult] = {}
        if self.complete:
            self.results = {name: ConfigResult.from_runs(name, [c.output for c in cfgs])
                            for name, cfgs in configs.items()}
        timing = self.folder / run_all.TIMING_FILE
        self.timing = json.loads(timing.read_text()) if timing.is_file() else None

    def subset(self, names: list[str]) -> list[ConfigResult]:
        return [self.results[n] for n in names if n in self.results]


def final_acc(result: ConfigResult) -> tuple[float, float]:
    return mean_std([s["final"]["test_acc"] for s in result.summaries])


def step_time(result: ConfigResult) -> float:
    return statistics.fmean(s["time_per_step_s"] for s in result.summaries)


def reach(result: ConfigResult, threshold: float) -> tuple[float, int]:
    """(mean step over the seeds that reach ``threshold``, number of those seeds)."""
    steps = [s for s in (steps_to_reach(rows, threshold) for rows in result.curves) if s is not None]
    return (statistics.fmean(steps) if steps else math.nan), len(steps)


def pct(mean_and_std: tuple[float, float]) -> str:
    mean, std = mean_and_std
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.2f} (1 seed)" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def verdict(a: ConfigResult, b: ConfigResult) -> str:
    """Final test accuracy of ``a`` against ``b``: 'higher' / 'lower' when |mean_a - mean_b| exceeds
    std_a + std_b, else 'within noise'; no verdict with fewer than 2 seeds on either side."""
    if min(len(a.summaries), len(b.summaries)) < 2:
        return "one seed: no verdict"
    (mean_a, std_a), (mean_b, std_b) = final_acc(a), final_acc(b)
    if abs(mean_a - mean_b) > std_a + std_b:
        return "higher" if mean_a > mean_b else "lower"
    return "within noise"


# ---------------------------------------------------------------------------------------------- sections
def copy_png(src: Path, images: Path, name: str) -> str | None:
    """Copies ``src`` to ``images/name``; returns the markdown image path relative to the report, or None."""
    if not src.is_file():
        return None
    images.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, images / name)
    return f"{images.name}/{name}"


def vs_baseline(results: list[ConfigResult], thresholds: list[float]) -> list[str]:
    """One line per configuration against the first: final accuracy verdict and steps to each threshold."""
    base = results[0]
    lines = [f"Against {base.name} (\"higher\"/\"lower\": the difference of the mean final test accuracies exceeds "
             f"the sum of the two standard deviations; steps: mean first evaluation step at the threshold, over "
             f"the seeds that reach it):", ""]
    for result in results[1:]:
        diff = 100 * (final_acc(result)[0] - final_acc(base)[0])
        cells = []
        for t in thresholds:
            (s, n), (sb, nb) = reach(result, t), reach(base, t)
            fmt = lambda v, k, r: "never" if k == 0 else f"{v:.0f} ({k}/{len(r.curves)})"  # noqa: E731
            cells.append(f"{100 * t:g}% at {fmt(s, n, result)} vs {fmt(sb, nb, base)}")
        lines.append(f"- {result.name}: final {diff:+.2f} points ({verdict(result, base)}); "
                     + "; ".join(cells) + ".")
    return lines


def convergence_count(results: list[ConfigResult], threshold: float) -> str:
    """How many configurations reach ``threshold`` (all seeds) in fewer mean steps than the baseline."""
    base = results[0]
    sb, nb = reach(base, threshold)
    faster = [r.name for r in results[1:] if reach(r, threshold)[1] == len(r.curves) and
              (nb < len(base.curves) or reach(r, threshold)[0] < sb)]
    return (f"{len(faster)} of {len(results) - 1} configurations reach {100 * threshold:g}% with every seed in "
            f"fewer mean steps than {base.name}" + (f": {', '.join(faster)}." if faster else "."))


def comparison(exp: Loaded) -> list[str]:
    """The compare table, the verdicts against the first configuration and the convergence counts."""
    results = list(exp.results.values())
    out = [markdown_table(table_rows(results, exp.spec.thresholds)), ""]
    out += vs_baseline(results, exp.spec.thresholds) + [""]
    return out + [convergence_count(results, t) for t in exp.spec.thresholds]


def section_e1(exp: Loaded, images: Path) -> list[str]:
    out = comparison(exp)
    image = copy_png(exp.folder / "convergence.png", images, "e1_e2_convergence.png")
    out += ["", "### E2: convergence curves", ""]
    out += [f"![E1/E2 convergence]({image})" if image else "(convergence plot missing)", "",
            "Test accuracy (reported curve) and training loss against steps, mean over seeds with a ±1 std band. "
            "The paper's central claim is faster convergence of the SphereNets (Liu et al., NIPS 2017; in the "
            "official wy1iu/SphereNet CIFAR-10 logs the SphereNet-9 runs reach 80% at 3.0k-4.5k iterations, the "
            "CNN-9 at 11.5k)."]
    return out


def section_e3(exp: Loaded, images: Path) -> list[str]:
    grid: dict[str, dict[int, ConfigResult]] = {}
    for entry in exp.spec.runs:
        grid.setdefault(entry["norm"], {})[int(entry["batch_size"])] = exp.results[entry["name"]]
    batches = sorted({b for row in grid.values() for b in row})
    rows = [["norm \\ batch"] + [str(b) for b in batches]]
    rows += [[norm] + [pct(final_acc(row[b])) if b in row else "—" for b in batches] for norm, row in grid.items()]
    out = ["Final test accuracy (%), mean ± std over seeds; every run saw the same number of training examples.", "",
           markdown_table(rows), ""]
    if "bn" in grid and "spherenorm" in grid:
        diffs = [f"batch {b}: {100 * (final_acc(grid['spherenorm'][b])[0] - final_acc(grid['bn'][b])[0]):+.2f} "
                 f"({verdict(grid['spherenorm'][b], grid['bn'][b])})"
                 for b in batches if b in grid["spherenorm"] and b in grid["bn"]]
        out += ["SphereNorm minus BatchNorm, final test accuracy in points (verdict rule as in E1): "
                + "; ".join(diffs) + ".", ""]
    if "gn" in grid and "spherenorm" in grid:  # GroupNorm: the usual small-batch alternative to BatchNorm
        diffs = [f"batch {b}: {100 * (final_acc(grid['spherenorm'][b])[0] - final_acc(grid['gn'][b])[0]):+.2f} "
                 f"({verdict(grid['spherenorm'][b], grid['gn'][b])})"
                 for b in batches if b in grid["spherenorm"] and b in grid["gn"]]
        out += ["SphereNorm minus GroupNorm (8 groups), final test accuracy in points (verdict rule as in E1): "
                + "; ".join(diffs) + ".", ""]
    best = [f"batch {b}: {max(grid, key=lambda n: final_acc(grid[n][b])[0] if b in grid[n] else -1)}"
            for b in batches]
    out += ["Highest mean final accuracy per batch size: " + "; ".join(best) + ".", ""]
    image = plot_lines(images / "e3_norm_batch.png", "E3: final test accuracy vs batch size", "batch size",
                       {norm: [(b, row[b]) for b in batches if b in row] for norm, row in grid.items()}, logx=True)
    out += [f"![E3]({image})"]
    return out


def section_e4(exp: Loaded, images: Path, label: str = "E4") -> list[str]:
    lines: dict[str, list[tuple[int, ConfigResult]]] = {}
    depths: set[int] = set()
    for entry in exp.spec.runs:
        family = "SphereNet" if entry["model"].startswith("sphere") else "CNN"
        depth = int("".join(ch for ch in entry["model"] if ch.isdigit()))
        depths.add(depth)
        lines.setdefault(f"{family}, {entry['norm']}", []).append((depth, exp.results[entry["name"]]))
    depths_sorted = sorted(depths)
    header = ["N"] + [f"{k}: final %" for k in lines] + [f"{k}: trains" for k in lines]
    rows = [header]
    for depth in depths_sorted:
        row = [str(depth)]
        cells = {k: dict(v).get(depth) for k, v in lines.items()}
        row += [pct(final_acc(r)) if r else "—" for r in cells.values()]
        row += [f"{sum(s['final']['test_acc'] >= TRAINS_AT for s in r.summaries)}/{len(r.summaries)}" if r else "—"
                for r in cells.values()]
        rows.append(row)
    out = [f"*trains*: seeds whose final test accuracy reaches {100 * TRAINS_AT:g}% (chance is 10%).", "",
           markdown_table(rows), "", "Full tables (steps to each threshold, time per step):", ""]
    out += [markdown_table(table_rows(list(exp.results.values()), exp.spec.thresholds)), ""]
    for key, points in lines.items():
        trained = [d for d, r in points if all(s["final"]["test_acc"] >= TRAINS_AT for s in r.summaries)]
        out.append(f"- {key}: every seed trains at N = {', '.join(map(str, trained)) or 'none'}.")
    image = plot_lines(images / f"{label.lower()}_deep_plain.png", f"{label}: final test accuracy vs depth",
                       "conv layers N", {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items()}, logx=False)
    out += ["", f"![{label}]({image})"]
    return out


def section_e5(exp: Loaded, images: Path) -> list[str]:
    out = []
    for prefix, title in (("cnn9-", "CNN-9"), ("sphere-", "SphereNet-9 (cosine)")):
        results = [r for n, r in exp.results.items() if n.startswith(prefix)]
        if not results:
            continue
        out += [f"**{title}** (baseline: no regularizer)", "", markdown_table(table_rows(results,
                                                                                         exp.spec.thresholds)), ""]
        out += vs_baseline(results, exp.spec.thresholds) + [""]
    return out


def section_e6(exp: Loaded, images: Path) -> list[str]:
    out = [markdown_table(table_rows(list(exp.results.values()), exp.spec.thresholds)), ""]
    metrics_path = exp.folder / "features.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        rows = [["configuration", "angular concentration (1 = one ray per class)", "radial CV (std/mean of norms)"]]
        for name, seeds in metrics.items():
            rows.append([name, pct_plain([m["angular_concentration"] for m in seeds.values()]),
                         pct_plain([m["radial_cv"] for m in seeds.values()])])
        out += ["Geometry of the 2-D test features (class averages, mean ± std over seeds; "
                "`experiments/feature_geometry.py` defines both numbers):", "", markdown_table(rows), ""]
    image = copy_png(exp.folder / "features.png", images, "e6_features.png")
    out += [f"![E6 features]({image})" if image else "(feature plot missing)"]
    return out


def pct_plain(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.3f} (1 seed)" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


TWINS = {  # experiment -> function(config name) -> name of its CNN twin (same settings, plain convolutions)
    "e1_operators_heads": lambda n: None if n.startswith("cnn") else ("cnn9-wsoftmax" if n.endswith("wsoftmax")
                                                                       else "cnn9"),
    "e4_deep_plain": lambda n: n.replace("spherenet", "cnn") if n.startswith("spherenet") else None,
    "e4b_gradient_flow": lambda n: n.replace("spherenet", "cnn") if n.startswith("spherenet") else None,
    "e5_regularizers": lambda n: n.replace("sphere-", "cnn9-", 1) if n.startswith("sphere-") else None,
    "e6_feature_geometry": lambda n: "cnn9-2d" if n.startswith("sphere") else None,
}


def section_e7(loaded: list[Loaded]) -> list[str]:
    rows = [["experiment", "SphereNet configuration", "CNN twin", "ms/step", "twin ms/step", "ratio"]]
    for exp in loaded:
        twin_of = TWINS.get(exp.experiment.name)
        if not exp.complete or twin_of is None:
            continue
        for name, result in exp.results.items():
            twin = twin_of(name)
            if twin is None or twin not in exp.results:
                continue
            t, tb = step_time(result), step_time(exp.results[twin])
            rows.append([exp.experiment.name, name, twin, f"{1000 * t:.1f}", f"{1000 * tb:.1f}", f"{t / tb:.2f}x"])
    if len(rows) == 1:
        return ["No finished experiment with CNN twins yet."]
    return ["Training wall time per step (evaluations excluded), mean over seeds, from each run's `summary.json`. "
            "Runs shared the machine with each other (`--jobs`) and with other work, so ratios are indicative; "
            "`benchmarks/bench_train_step.py` measures the step in isolation (docs/benchmarks.md).", "",
            markdown_table(rows)]


SECTIONS = {"e1_operators_heads": ("E1: operators × heads", section_e1),
            "e3_norm_batch": ("E3: SphereNorm vs BatchNorm across batch sizes", section_e3),
            "e4_deep_plain": ("E4: deep plain networks", section_e4),
            "e5_regularizers": ("E5: regularizers", section_e5),
            "e6_feature_geometry": ("E6: feature geometry", section_e6),
            "e8_convergence_bn": ("E8: convergence decomposed — optimization vs evaluation", section_e8),
            "e1b_margins": ("E1b: angular margins at fair settings (training runs)",
                            lambda exp, images: comparison(exp)
                            + ["", "The training- and eval-mode accuracies, feature norms and angles, and the "
                               "verdicts: section E1b below."]),
            "e4b_gradient_flow": ("E4b: deep plain networks at widths / 4, 1,500 steps of batch 128 (training runs)",
                                  lambda exp, images: section_e4(exp, images, label="E4b")
                                  + ["", "The gradient-flow diagnostic and the discussion: section E4b below."])}


PARTIAL = {  # experiment -> where its finished runs are reported before the whole grid has run
    "e4b_gradient_flow": " The finished runs, with training- and eval-mode numbers and a verdict per pair: section "
                         "E4b (b) below.",
}


def plot_lines(path: Path, title: str, xlabel: str, lines: dict[str, list[tuple[int, ConfigResult]]],
               logx: bool) -> str:
    """Final test accuracy (mean ± std over seeds) against x, one line per key; returns the relative image path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(lines) > len(colors):
        colors = list(plt.get_cmap("tab20").colors)
    styles = [(c, ls, mk) for ls, mk in (("-", "o"), ("--", "s"), (":", "^")) for c in colors]  # no shared colour
    for (label, points), (color, linestyle, marker) in zip(lines.items(), styles * (1 + len(lines) // len(styles))):
        xs = [x for x, _ in points]
        stats = [final_acc(r) for _, r in points]
        ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[0 if math.isnan(s) else 100 * s for _, s in stats],
                    color=color, ls=linestyle, marker=marker, capsize=3, label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set(title=title, xlabel=xlabel, ylabel="final test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return f"{path.parent.name}/{path.name}"


# ---------------------------------------------------------------------------------------------- the document
def human_block(results_path: Path) -> str:
    """The human-written discussion of the previous report, or the default text."""
    if results_path.is_file():
        text = results_path.read_text()
        if HUMAN_START in text and HUMAN_END in text:  # the page's own block is the last one
            return text.rsplit(HUMAN_START, 1)[1].split(HUMAN_END, 1)[0].strip()
    return HUMAN_DEFAULT


def hardware(exp: Loaded) -> str:
    if not exp.timing:
        return "not recorded"
    sessions = exp.timing["sessions"]
    machines = sorted({s["machine"] for s in sessions})
    jobs = sorted({s["jobs"] for s in sessions})
    return (f"{exp.timing['wall_s'] / 60:.1f} min wall over {len(sessions)} session(s), --jobs {jobs}, on "
            + "; ".join(machines))


def write_results(output: Path, results_path: Path, *, quick: bool = False) -> None:
    """Writes the report for every experiment found under ``output``."""
    loaded = [Loaded(e, output, quick) for e in run_all.EXPERIMENTS]
    images = results_path.parent / "results"
    lines = ["# Results: reproducing the claims of Deep Hyperspherical Learning", ""]
    if quick:
        lines += ["> **SMOKE TEST (`--quick`)**: every configuration ran 4 steps on 400 images with one seed. "
                  "These numbers only show that the pipeline works; they are **not results**.", ""]
    lines += [f"Generated by `experiments/run_all.py` from the run folders under `{_rel(output)}` on "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every number below comes from those runs; "
              f"rerun `make results` (`{run_all.COMMAND}`) to regenerate them (finished runs are reused). The experiments, their commands and "
              f"the estimated CPU time of each are listed in `experiments/README.md`.", ""]
    rows = [["experiment", "runs finished", "status", "training time (hardware)"]]
    for exp in loaded:
        status = "complete" if exp.complete else ("not run" if exp.done == 0 else "partial")
        rows.append([exp.experiment.name, f"{exp.done}/{exp.total}", status, hardware(exp)])
    lines += [markdown_table(rows), ""]
    if not any(e.done for e in loaded):
        lines += ["**The full grid has not been run yet**, so this page holds no results. Run:", "", "```bash",
                  run_all.COMMAND, "```", "", "(about 2.7 CPU hours, i.e. about 1.5 hours with `--jobs 2` on 2 free cores; see `experiments/README.md`).",
                  ""]
    for exp in loaded:
        title, fn = SECTIONS[exp.experiment.name]
        lines += [f"## {title}", "", f"Spec: `experiments/{exp.experiment.spec}`. "
                  + (exp.spec.description.strip() if exp.spec.description else ""), ""]
        if not exp.complete:
            lines += [f"Not complete ({exp.done}/{exp.total} runs finished): no compare table until every run has "
                      "finished." + PARTIAL.get(exp.experiment.name, ""), ""]
            continue
        first = next(iter(exp.results.values())).summaries[0]
        lines += [f"Data: {first['dataset']} ({first['data']['train']} train / {first['data']['val']} validation / "
                  f"{first['data']['test']} test images); {len(exp.spec.seeds)} seed(s) per configuration.", ""]
        lines += fn(exp, images) + [""]
    if not quick:
        lines += spliced_sections(results_path.parent / "results")
    lines += ["## E7: cost per training step relative to the CNN twin", ""] + section_e7(loaded) + [""]
    lines += ["## Discussion", "",
              "The generated lines above restate the numbers under the rules given with them. The discussion below "
              "is written by a person and kept when the page is regenerated.", "", HUMAN_START,
              human_block(results_path), HUMAN_END, ""]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text("\n".join(lines))


def spliced_sections(folder: Path) -> list[str]:
    """The experiments with drivers of their own (learning curves, sites, ensembles) write their section as
    ``docs/results/eN_*.md``; it is copied here in the order of N, image links made relative to this page."""
    import re

    def number(path: Path) -> tuple[int, str]:  # e4b_... sorts after e4_... and before e5_...
        match = re.match(r"e(\d+)([a-z]?)_", path.name)
        return int(match.group(1)), match.group(2)

    lines: list[str] = []
    for path in sorted((p for p in folder.glob("e*_*.md") if re.match(r"e\d+[a-z]?_", p.name)), key=number):
        text = re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", lambda m: f"]({folder.name}/{m.group(1)})", path.read_text())
        text = re.sub(r"\]\(\.\./([^)]+\.md)\)", r"](\1)", text)  # links to docs/*.md from docs/results/
        text = text.replace(HUMAN_START, "").replace(HUMAN_END, "")  # the driver's own markers stay in its file
        lines += [text.rstrip(), "", f"(Section written by its driver into `docs/results/{path.name}`.)", ""]
    return lines


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(run_all.ROOT))
    except ValueError:
        return str(path)
