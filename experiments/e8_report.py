"""The E8 section of ``docs/results.md``: the convergence claim decomposed into optimization and evaluation.

Every run of E8 trains once (BatchNorm statistics never change the training trajectory) and evaluates the test set
with four sets of BatchNorm statistics: the official zero-started EMA (decay 0.999) that the model keeps, PyTorch's EMA
at momentum 0.1 and at 0.001 kept side by side (``bn_shadow``), and precise statistics re-estimated on 20 training
batches (``precise_bn``). This module turns the run folders into

- steps to thresholds on the **training loss** (optimization) and on the **test accuracy** with each set of
  statistics (evaluation), mean ± std over seeds, with the verdict rule used everywhere in the report;
- the lag of the test accuracy behind the training-mode accuracy under each set of statistics;
- the per-layer drift of the BN input moments per 100 steps (``bn_drift.csv``), the mechanism of the lag;
- two plots (curves; drift per layer).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from torchsphere.train.metrics import read_metrics
from torchsphere.train.report import ConfigResult, markdown_table, mean_std, steps_to_reach

LOSS_THRESHOLDS = (0.60, 0.50, 0.45, 0.40)
# test accuracy columns: (metrics column, label)
STATS = (("test_acc", "official EMA (decay 0.999)"), ("test_acc_torch_0.1", "torch EMA, momentum 0.1"),
         ("test_acc_torch_0.001", "torch EMA, momentum 0.001"), ("test_acc_precise", "precise BN (20 batches)"))
LAG_WINDOW = (200, 1000)   # steps over which the lag of the test accuracy is averaged
DRIFT_FROM = 300           # drift windows from this step on (the first windows move fast for every model)


def first_below(rows: list[dict[str, Any]], threshold: float, key: str = "train_loss") -> int | None:
    for row in rows:
        if not math.isnan(row[key]) and row[key] <= threshold:
            return int(row["step"])
    return None


def _steps(values: list[int | None]) -> tuple[float, float, int]:
    reached = [v for v in values if v is not None]
    mean, std = mean_std([float(v) for v in reached])
    return mean, std, len(reached)


def _cell(mean: float, std: float, count: int, total: int) -> str:
    if count == 0:
        return "never"
    return f"{mean:.0f} ± {std:.0f}" + ("" if count == total else f" ({count}/{total})")


def _verdict(a: tuple[float, float, int], b: tuple[float, float, int], total: int) -> str:
    """'earlier' / 'later' when the mean steps differ by more than the sum of the stds (every seed reaching)."""
    if a[2] < total or b[2] < total:
        return "not every seed reaches it"
    if abs(a[0] - b[0]) > a[1] + b[1]:
        return "earlier" if a[0] < b[0] else "later"
    return "same (within noise)"


def _mean_over(rows: list[dict[str, Any]], key: str, window: tuple[int, int]) -> float:
    values = [r[key] for r in rows if window[0] <= r["step"] <= window[1] and not math.isnan(r[key])]
    return statistics.fmean(values) if values else math.nan


def load_drift(run_dirs: list[str]) -> list[list[dict[str, Any]]]:
    return [read_metrics(Path(d) / "bn_drift.csv") for d in run_dirs if (Path(d) / "bn_drift.csv").is_file()]


def drift_per_layer(drifts: list[list[dict[str, Any]]], key: str) -> list[tuple[float, float]]:
    """Mean over windows (from ``DRIFT_FROM``) of ``key`` per layer index, then mean ± std over seeds."""
    per_seed = []
    for rows in drifts:
        layers: dict[int, list[float]] = {}
        for r in rows:
            if r["step"] >= DRIFT_FROM and not math.isnan(r[key]):
                layers.setdefault(int(r["index"]), []).append(r[key])
        per_seed.append([statistics.fmean(layers[i]) for i in sorted(layers)])
    if not per_seed:
        return []
    return [mean_std([seed[i] for seed in per_seed]) for i in range(min(map(len, per_seed)))]


def section_e8(exp, images: Path) -> list[str]:
    results: dict[str, ConfigResult] = exp.results
    names = list(results)
    base = names[0]
    total = len(exp.spec.seeds)
    run_dirs = {name: [c.output for c in cfgs] for name, cfgs in exp.configs.items()}
    thresholds = list(exp.spec.thresholds)
    out = ["**Optimization.** Training loss (training mode, the average of the batches since the previous "
           "evaluation, label smoothing 0.01 included): first evaluation step at or below each value, mean ± std over "
           "seeds.", ""]
    rows = [["configuration"] + [f"loss ≤ {t:g}" for t in LOSS_THRESHOLDS] + ["final train loss", "final train acc"]]
    loss_steps = {n: [_steps([first_below(c, t) for c in results[n].curves]) for t in LOSS_THRESHOLDS] for n in names}
    for n in names:
        final_loss = mean_std([c[-1]["train_loss"] for c in results[n].curves])
        final_acc = mean_std([c[-1]["train_acc"] for c in results[n].curves])
        rows.append([n] + [_cell(*s, total) for s in loss_steps[n]]
                    + [f"{final_loss[0]:.3f} ± {final_loss[1]:.3f}", f"{100 * final_acc[0]:.2f} ± {100 * final_acc[1]:.2f}"])
    out += [markdown_table(rows), ""]
    out += [f"Against {base} (\"earlier\"/\"later\": the mean steps differ by more than the sum of the two standard "
            f"deviations, every seed reaching the threshold):", ""]
    for n in names[1:]:
        cells = [f"loss ≤ {t:g}: {_verdict(loss_steps[n][i], loss_steps[base][i], total)}"
                 for i, t in enumerate(LOSS_THRESHOLDS)]
        out.append(f"- {n}: " + "; ".join(cells) + ".")
    out += ["", "**Evaluation.** Test accuracy (eval mode) with each set of BatchNorm statistics, from the same runs: "
            "first evaluation step at each accuracy, mean ± std over seeds, and the final accuracy (step 3,000).", ""]
    header = ["statistics", "configuration"] + [f"≥ {100 * t:g}%" for t in thresholds] + ["final %"]
    rows = [header]
    test_steps: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for key, label in STATS:
        for n in names:
            test_steps[key, n] = [_steps([steps_to_reach(c, t, key) for c in results[n].curves]) for t in thresholds]
            final = mean_std([c[-1][key] for c in results[n].curves])
            rows.append([label, n] + [_cell(*s, total) for s in test_steps[key, n]]
                        + [f"{100 * final[0]:.2f} ± {100 * final[1]:.2f}"])
    out += [markdown_table(rows), ""]
    out += [f"Against {base}, per set of statistics (rule as above):", ""]
    for key, label in STATS:
        cells = []
        for n in names[1:]:
            cells.append(f"{n} " + "/".join(_verdict(test_steps[key, n][i], test_steps[key, base][i], total)
                                             for i in range(len(thresholds))))
        out.append(f"- {label} (at {', '.join(f'{100 * t:g}%' for t in thresholds)}): " + "; ".join(cells) + ".")
    out += ["", f"**The lag.** Training-mode batch accuracy minus test accuracy, in points, averaged over the "
            f"evaluations at steps {LAG_WINDOW[0]}–{LAG_WINDOW[1]} (mean ± std over seeds). A lag of a few points is "
            f"generalization; tens of points are BatchNorm statistics that do not describe the current weights. "
            f"`train_eval_acc` (1,000 fixed training images in eval mode, official statistics) shows the same gap "
            f"without the test set.", ""]
    rows = [["configuration"] + [label for _, label in STATS] + ["train images, eval mode (official)"]]
    for n in names:
        cells = []
        for key in [k for k, _ in STATS] + ["train_eval_acc"]:
            lag = mean_std([100 * (_mean_over(c, "train_acc", LAG_WINDOW) - _mean_over(c, key, LAG_WINDOW))
                            for c in results[n].curves])
            cells.append(f"{lag[0]:.1f} ± {lag[1]:.1f}")
        rows.append([n] + cells)
    out += [markdown_table(rows), ""]
    out += drift_section(names, run_dirs, images)
    image = plot_curves(images / "e8_convergence_bn.png", results, names)
    out += ["", f"![E8 curves]({image})", "",
            "Top: training loss and training-mode batch accuracy (optimization). Bottom and right: test accuracy "
            "with each set of BatchNorm statistics (evaluation). Mean over seeds, ±1 std band."]
    return out


def drift_section(names: list[str], run_dirs: dict[str, list[str]], images: Path) -> list[str]:
    drifts = {n: load_drift(run_dirs[n]) for n in names}
    if not all(drifts.values()):
        return ["(bn_drift.csv missing: no drift table)"]
    out = [f"**The mechanism: drift of the BN input moments.** Relative change of each BatchNorm layer's per-channel "
           f"batch mean and variance (averaged over a window of 100 training steps) from one window to the next, "
           f"averaged over the windows from step {DRIFT_FROM} on, then mean ± std over seeds. An EMA with decay 0.999 "
           f"averages over ~1,000 steps; statistics that move by more than ~0.1% per step make it describe old "
           f"weights.", ""]
    per = {n: (drift_per_layer(drifts[n], "mean_rel_change"), drift_per_layer(drifts[n], "var_rel_change"))
           for n in names}
    depth = min(len(p[0]) for p in per.values())
    if depth == 0:
        return [f"(no drift window from step {DRIFT_FROM} on: no drift table)"]
    rows = [["BN layer"] + [f"{n}: mean / var" for n in names]]
    for i in range(depth):
        rows.append([str(i + 1)] + [f"{per[n][0][i][0]:.3f} / {per[n][1][i][0]:.3f}" for n in names])
    rows.append(["mean over layers"] + [
        f"{statistics.fmean(m for m, _ in per[n][0][:depth]):.3f} / {statistics.fmean(m for m, _ in per[n][1][:depth]):.3f}"
        for n in names])
    out += [markdown_table(rows), ""]
    image = plot_drift(images / "e8_bn_drift.png", per, names, depth)
    out += [f"![E8 drift]({image})"]
    return out


def _band(ax, results: ConfigResult, key: str, label: str, scale: float = 1.0) -> None:
    steps = [r["step"] for r in results.curves[0]]
    stats = [mean_std([scale * c[i][key] for c in results.curves if i < len(c)]) for i in range(len(steps))]
    mean = [m for m, _ in stats]
    std = [s for _, s in stats]
    line, = ax.plot(steps, mean, label=label, lw=1.4)
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                    color=line.get_color(), alpha=0.15)


def plot_curves(path: Path, results: dict[str, ConfigResult], names: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), dpi=100)
    panels = [("train_loss", "training loss (training mode)", 1.0), ("train_acc", "training batch accuracy %", 100),
              ("test_acc", "test % — official EMA (decay 0.999)", 100),
              ("test_acc_torch_0.1", "test % — torch EMA momentum 0.1", 100),
              ("test_acc_torch_0.001", "test % — torch EMA momentum 0.001", 100),
              ("test_acc_precise", "test % — precise BN", 100)]
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for n in names:
            _band(ax, results[n], key, n, scale)
        ax.set(title=title, xlabel="step")
        ax.grid(True, alpha=0.3)
        if scale == 100:
            ax.set_ylim(0, 100)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("E8: optimization (top left) vs evaluation under four sets of BN statistics")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return f"{path.parent.name}/{path.name}"


def plot_drift(path: Path, per: dict[str, tuple[list, list]], names: list[str], depth: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    layers = list(range(1, depth + 1))
    for ax, which, title in ((axes[0], 0, "batch mean"), (axes[1], 1, "batch variance")):
        for n in names:
            stats = per[n][which][:depth]
            ax.errorbar(layers, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=n)
        ax.set(title=f"relative change per 100 steps: {title}", xlabel="BN layer (input side first)",
               yscale="log")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return f"{path.parent.name}/{path.name}"
