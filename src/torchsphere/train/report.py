"""The compare report: ``report.md`` (a markdown table) and ``convergence.png`` (curves with a band over seeds).

For each configuration, over its seeds (mean ± sample standard deviation, ddof = 1; with one seed the spread is
undefined and the cell says "(1 seed)" instead of a ± that would read as zero noise):

- **final test**: test accuracy of the final weights;
- **best-on-val test**: test accuracy of the weights with the highest validation accuracy (model selection on the
  validation split carved from the training set, never on the test set);
- **peak test (reported)**: the maximum of the test curve over the evaluation points — what the official SphereNet
  README calls "best", i.e. selected on the test set; shown for comparison with the paper only;
- **steps to X%**: first evaluation step at which the reported test curve reaches X (mean over the seeds that reach
  it; "k/n" when only k of n seeds do; "—" when none does);
- **time/step** and its ratio to the baseline (the first configuration): training wall time per step, evaluations
  excluded. Runs on a shared machine make this ratio noisy.

Under the table, an **outcome** list states what was measured against the baseline: per threshold, which
configurations reach it in fewer or more mean steps (a configuration counts only when every seed reaches it), and
which end with a higher or lower final accuracy beyond the seed spread.

The plot uses the matplotlib Agg backend (no display needed): test accuracy and training loss against steps, one curve
per configuration, the mean over seeds with a ±1 std band.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write, atomic_write_text
from .metrics import METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary

REPORT_FILE = "report.md"
PLOT_FILE = "convergence.png"


@dataclass
class ConfigResult:
    """All seeds of one configuration."""

    name: str
    summaries: list[dict[str, Any]] = field(default_factory=list)
    curves: list[list[dict[str, Any]]] = field(default_factory=list)  # metrics rows per seed

    @classmethod
    def from_runs(cls, name: str, run_dirs: list[str | os.PathLike]) -> ConfigResult:
        result = cls(name)
        for run_dir in run_dirs:
            result.summaries.append(read_summary(Path(run_dir) / SUMMARY_FILE))
            result.curves.append(read_metrics(Path(run_dir) / METRICS_FILE))
        return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (nan for a single value: the spread is undefined); NaNs are dropped; (nan, nan) when
    nothing is left."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def steps_to_reach(rows: list[dict[str, Any]], threshold: float, key: str = "test_acc") -> int | None:
    """The first step whose ``key`` is >= ``threshold``; None when never reached."""
    for row in rows:
        if not math.isnan(row[key]) and row[key] >= threshold:
            return int(row["step"])
    return None


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    if math.isnan(std):
        return f"{100 * mean:.2f} (1 seed)"
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _reach_cell(result: ConfigResult, threshold: float) -> str:
    steps = [s for s in (steps_to_reach(rows, threshold) for rows in result.curves) if s is not None]
    if not steps:
        return "—"
    cell = f"{statistics.fmean(steps):.0f}"
    if len(steps) < len(result.curves):
        cell += f" ({len(steps)}/{len(result.curves)})"
    return cell


def table_rows(results: list[ConfigResult], thresholds: list[float]) -> list[list[str]]:
    """Header plus one row per configuration (the first configuration is the baseline for the time ratio)."""
    header = ["configuration", "seeds", "final test %", "best-on-val test %", "peak test % (reported)"]
    header += [f"steps to {100 * t:g}%" for t in thresholds]
    header += ["ms/step", "time vs baseline"]
    rows = [header]
    base_time = None
    for result in results:
        final = mean_std([s["final"]["test_acc"] for s in result.summaries])
        best = mean_std([s["best"]["test_acc"] for s in result.summaries])
        peak = mean_std([max((r["test_acc"] for r in rows_ if not math.isnan(r["test_acc"])), default=math.nan)
                         for rows_ in result.curves])
        step_time = statistics.fmean(s["time_per_step_s"] for s in result.summaries)
        base_time = step_time if base_time is None else base_time
        row = [result.name, str(len(result.summaries)), _pct(*final), _pct(*best), _pct(*peak)]
        row += [_reach_cell(result, t) for t in thresholds]
        row += [f"{1000 * step_time:.1f}", f"{step_time / base_time:.2f}x"]
        rows.append(row)
    return rows


def outcome_lines(results: list[ConfigResult], thresholds: list[float]) -> list[str]:
    """What the runs measured against the baseline (the first configuration), one bullet per threshold plus the
    final accuracy: which configurations reach the threshold in fewer / more mean steps, and which end higher /
    lower beyond the seed spread (|difference of means| > the sum of the standard deviations)."""
    if len(results) < 2:
        return []
    base, others = results[0], results[1:]
    lines = [f"**Outcome against {base.name}:**", ""]
    for t in thresholds:
        b = _mean_reach(base, t)
        if b is None:
            lines.append(f"- {100 * t:g}%: {base.name} never reaches it; reached by "
                         + (", ".join(r.name for r in others if _mean_reach(r, t) is not None) or "none"))
            continue
        faster = [r.name for r in others if (m := _mean_reach(r, t)) is not None and m < b]
        slower = [r.name for r in others if (m := _mean_reach(r, t)) is not None and m > b]
        same = [r.name for r in others if _mean_reach(r, t) == b]
        never = [r.name for r in others if _mean_reach(r, t) is None]
        parts = [f"{label}: {', '.join(names)}" for label, names in (("fewer steps", faster), ("more steps", slower),
                                                                      ("the same", same), ("never", never)) if names]
        lines.append(f"- {100 * t:g}% (baseline at step {b:.0f}): " + "; ".join(parts))
    final = mean_std([s["final"]["test_acc"] for s in base.summaries])
    higher, lower, within = [], [], []
    for r in others:
        m, sd = mean_std([s["final"]["test_acc"] for s in r.summaries])
        if math.isnan(sd) or math.isnan(final[1]):
            within.append(f"{r.name} (1 seed: no verdict)")
        elif abs(m - final[0]) > sd + final[1]:
            (higher if m > final[0] else lower).append(r.name)
        else:
            within.append(r.name)
    parts = [f"{label}: {', '.join(names)}" for label, names in (("higher", higher), ("lower", lower),
                                                                  ("within noise", within)) if names]
    lines.append("- final test accuracy: " + "; ".join(parts))
    return lines


def _mean_reach(result: ConfigResult, threshold: float) -> float | None:
    """Mean step at which the seeds reach ``threshold``, None unless every seed does."""
    steps = [steps_to_reach(rows, threshold) for rows in result.curves]
    if not steps or any(s is None for s in steps):
        return None
    return statistics.fmean(steps)


def markdown_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_report(results: list[ConfigResult], output: str | os.PathLike, thresholds: list[float], *,
                 title: str = "torchsphere compare", notes: str = "") -> str:
    """Writes ``report.md`` and ``convergence.png`` into ``output``; returns the markdown table."""
    if not results:
        raise ValueError("write_report needs at least one configuration; got none")
    output = Path(output)
    table = markdown_table(table_rows(results, thresholds))
    first = results[0].summaries[0]
    text = [f"# {title}", "",
            f"Dataset: {first['dataset']} ({first['data']['train']} train / {first['data']['val']} validation / "
            f"{first['data']['test']} test images, read from {first.get('dataset_source') or 'n/a'}); "
            f"{first['steps']} steps of batch {_batch(first)} per run; baseline: {results[0].name}.", ""]
    if notes:
        text += [notes.strip(), ""]
    text += [table, "", *outcome_lines(results, thresholds), "", _LEGEND, "", f"![convergence]({PLOT_FILE})", "",
             "Runs:", ""]
    for result in results:
        text += [f"- {result.name}: " + ", ".join(f"`{s['run']}`" for s in result.summaries)]
    atomic_write_text(output / REPORT_FILE, "\n".join(text) + "\n")
    plot_convergence(results, output / PLOT_FILE, title=title)
    return table


def _batch(summary: dict[str, Any]) -> str:
    return str(summary.get("batch_size", "?"))


_LEGEND = (
    "Mean ± sample std over seeds (one seed: no spread, marked \"(1 seed)\"). *final*: the last weights; "
    "*best-on-val*: the weights with the highest validation "
    "accuracy (validation split carved from the training set; the test set is never used for selection); *peak test "
    "(reported)*: the maximum of the test-accuracy curve, i.e. selected on the test set as the official SphereNet "
    "README's \"best\" — shown for comparison only; the test curve itself is recorded at each evaluation for the "
    "convergence plot and is never used for selection. *steps to X%*: first evaluation step whose test accuracy "
    "reaches X (k/n: only k of n seeds reach it). *ms/step*: training time per step, evaluations excluded; the ratio "
    "is relative to the first configuration. The runs were timed one after another, not interleaved, so a change of "
    "the machine's load between them enters the ratio: it is a rough figure, not a speed benchmark (the interleaved, "
    "same-process ratios are benchmarks/bench_train_step.py's, in docs/benchmarks.md).")


def _aligned(curves: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std of ``key`` at the steps every seed recorded."""
    common = set.intersection(*({int(r["step"]) for r in rows} for rows in curves))
    steps = sorted(common)
    means, stds = [], []
    for step in steps:
        values = [next(r[key] for r in rows if int(r["step"]) == step) for rows in curves]
        m, s = mean_std(values)
        means.append(m)
        stds.append(s)
    return steps, means, stds


def plot_convergence(results: list[ConfigResult], path: str | os.PathLike, title: str = "") -> None:
    """Test accuracy and training loss against steps, mean ± std band over seeds, one colour per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    many = len(results) > 6  # then one legend beside the plots, so that it hides no curve
    fig, axes = plt.subplots(1, 2, figsize=(14.5 if many else 12, 4.5), dpi=110)
    # every configuration its own (colour, line style, marker): the 10-colour cycle repeats colours beyond 10
    # configurations, so those get tab20's 20 distinct colours
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if len(results) > len(colors):
        colors = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab20").colors]
    styles = [(c, ls, mk) for ls, mk in (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")) for c in colors]
    for result, (color, linestyle, marker) in zip(results, styles * (1 + len(results) // len(styles))):
        for ax, key, scale in ((axes[0], "test_acc", 100.0), (axes[1], "train_loss", 1.0)):
            steps, means, stds = _aligned(result.curves, key)
            low = [scale * (m - s) for m, s in zip(means, stds)]
            high = [scale * (m + s) for m, s in zip(means, stds)]
            ax.plot(steps, [scale * m for m in means], color=color, ls=linestyle, lw=1.8, marker=marker, ms=3,
                    label=f"{result.name} (n={len(result.curves)})")
            ax.fill_between(steps, low, high, color=color, alpha=0.18, lw=0)
    axes[0].set(title="Test accuracy (reported curve, not used for selection)", xlabel="step", ylabel="accuracy (%)")
    axes[1].set(title="Training loss (since previous evaluation)", xlabel="step", ylabel="loss", yscale="log")
    for formatter in (axes[1].yaxis.set_major_formatter, axes[1].yaxis.set_minor_formatter):
        formatter(FormatStrFormatter("%.2g"))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if not many:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title + ' — ' if title else ''}mean over seeds, band = ±1 std", fontsize=10)
    if many:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.83, 1))
    else:
        fig.tight_layout()

    def write(f) -> None:
        fig.savefig(f, format="png")

    atomic_write(path, write)
    plt.close(fig)
