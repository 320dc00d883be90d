"""The ``torchsphere curves`` report: ``report.md`` (tables and the protocol) and ``curves.png`` (the fitted curves).

The plot shows test error (percent) against n (samples per class) on log-log axes: the measurements as dots, each
fitted curve ``alpha + eta n**gamma`` with its pointwise interval band (three-parameter delta method), a dotted line
at N, a dashed line at 4N and the region beyond 4N shaded (the official README trusts extrapolation up to 4N only).
"""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write, atomic_write_text
from .report import markdown_table

REPORT_FILE = "report.md"
PLOT_FILE = "curves.png"


def _ci(fit: Any, key: str, digits: int = 2) -> str:
    value, (low, high) = getattr(fit, key), getattr(fit, f"{key}_ci")
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def fit_table(fits: dict[str, Any]) -> str:
    """One row per configuration: e_N, beta_N, gamma with intervals, alpha, eta, e(N/4) and e(4N)."""
    rows = [["configuration", "e_N (%)", "beta_N", "gamma", "alpha", "eta", "e(N/4) exact / rule",
             "e(4N) exact / rule", "v1", "objective"]]
    for name, fit in fits.items():
        n4, n_4 = fit.N / 4, 4 * fit.N
        rows.append([name, _ci(fit, "e_N"), _ci(fit, "beta_N"), _ci(fit, "gamma") if not fit.gamma_fixed else
                     f"{fit.gamma:g} (fixed)", f"{fit.alpha:.2f}", f"{fit.eta:.4g}",
                     f"{fit.e(n4):.2f} / {fit.approx(0.25):.2f}", f"{fit.e(n_4):.2f} / {fit.approx(4):.2f}",
                     f"{fit.v1:.3g}", f"{fit.objective:.3g}"])
    return markdown_table(rows)


def comparison_table(result: dict[str, Any]) -> str:
    rows = [["configuration", "baseline", "Δe_N (± SE)", "Δbeta_N (± SE)", "crossings (n per class)"]]
    for name, comp in result["comparisons"].items():
        cross = "; ".join(f"{c['n']:.0f} ({c['error']:.2f}%, {'trusted' if c['trusted'] else 'outside [n_min, 4N]'}"
                          f", {name if c['below'] == 'b' else comp['baseline']} lower above)"
                          for c in comp["crossings"]) or "none"
        rows.append([name, comp["baseline"], f"{comp['delta_e_N']:+.2f} ± {comp['delta_e_N_se']:.2f}",
                     f"{comp['delta_beta_N']:+.2f} ± {comp['delta_beta_N_se']:.2f}", cross])
    return markdown_table(rows)


def measurement_table(rows: list[dict[str, Any]], sizes: tuple[int, ...]) -> str:
    names = list(dict.fromkeys(r["config"] for r in rows))
    table = [["n per class"] + names]
    for n in sorted(sizes):
        cells = [str(n)]
        for name in names:
            errors = [r["test_error"] for r in rows if r["config"] == name and r["per_class"] == n]
            sd = statistics.stdev(errors) if len(errors) > 1 else 0.0
            cells.append(f"{statistics.fmean(errors):.2f} ± {sd:.2f} (m={len(errors)})")
        table.append(cells)
    return markdown_table(table)


def write_curves_report(output: str | Path, spec: Any, plan: Any, rows: list[dict[str, Any]], result: dict[str, Any],
                        fits: dict[str, Any]) -> str:
    """Writes ``report.md`` and ``curves.png`` into ``output``; returns the markdown."""
    output = Path(output)
    plot_curves(fits, rows, output / PLOT_FILE, title=spec.title)
    level = f"{100 * spec.level:g}%"
    notes = [f"- {name}: {note}" for name, fit in fits.items() for note in fit.notes]
    steps = sorted({(r["per_class"], r["steps"]) for r in rows}, reverse=True)
    gamma_text = ("gamma searched on -1.00..-0.01 with the prior 5|gamma + 0.5|" if spec.gamma is None else
                  f"gamma fixed at {spec.gamma:g}")
    text = "\n".join([
        f"# {spec.title}", "", *([spec.description, ""] if spec.description else []),
        "## Protocol", "",
        f"- dataset `{plan.dataset}`, {plan.num_classes} classes; a validation split of {plan.val_size} images carved "
        f"once (split seed {spec.split_seed}) and a test set of {plan.test_size} images, the same for every run;",
        f"- training pool {plan.pool_per_class} per class (smallest class); N = {plan.schedule.sizes[0]} per class; "
        f"sizes {list(plan.schedule.sizes)} per class with {list(plan.schedule.reps)} class-stratified disjoint "
        f"partitions; partition i trains with seed i;",
        f"- budget: {spec.budget_rule()}; steps per run: " + ", ".join(f"n={n}: {s}" for n, s in steps) + ";",
        f"- {spec.evaluations} evaluation point(s) per run; measurement = test error (%) of the "
        f"{'best-on-validation' if spec.measure == 'best' else 'final'} weights;",
        "- fit: e(n) = alpha + eta n^gamma (Hoiem et al., ICML 2021; the estimator of "
        "github.com/allenai/learning-curve: variance model v0 + v1/n, weights 1/(sigma^2 m), " + gamma_text + ");",
        f"- intervals: {level}, delta method over (alpha, eta, gamma) (the official band, gamma held fixed, "
        "under-covers); the rule e(dN) ≈ e_N + (1/√d − 1) beta_N is exact only at gamma = −0.5; "
        "trust the curves up to 4N only.", "",
        "## Fits", "", fit_table(fits), "",
        "## Against the first configuration", "",
        "Δ = configuration − baseline; SE = √(SE_a² + SE_b²) (independent fits; conservative when both models err on "
        "the same partitions). A crossing is *trusted* between the smallest measured size and 4N.", "",
        comparison_table(result), "",
        "## Measurements (test error %, mean ± sd over partitions)", "",
        measurement_table(rows, plan.schedule.sizes), "", *(["## Notes", "", *notes, ""] if notes else []),
        f"![learning curves]({PLOT_FILE})", ""])
    atomic_write_text(output / REPORT_FILE, text)
    return text


def plot_curves(fits: dict[str, Any], rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Log-log error vs n: measurements, fitted curves with bands, N and 4N marked, n > 4N shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    N = max(f.N for f in fits.values())
    n_lo = min(min(f.sizes) for f in fits.values()) / 2
    n_hi = 8 * N
    grid = np.geomspace(n_lo, n_hi, 300)
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for i, (name, fit) in enumerate(fits.items()):
        color = f"C{i}"
        mine = [r for r in rows if r["config"] == name]
        ax.scatter([r["per_class"] for r in mine], [r["test_error"] for r in mine], s=14, color=color,
                   edgecolors="k", linewidths=0.4, zorder=3)
        low, high = fit.band(grid)
        curve = np.asarray(fit.e(grid))
        label = f"{name}: e_N {fit.e_N:.2f}, β_N {fit.beta_N:.2f}, γ {fit.gamma:.2f}"
        ax.plot(grid, curve, color=color, label=label, zorder=2)
        ax.fill_between(grid, np.maximum(low, 1e-3), np.maximum(high, 1e-3), color=color, alpha=0.15, linewidth=0)
    ax.axvline(N, color="k", linestyle=":", linewidth=0.8)
    ax.axvline(4 * N, color="k", linestyle="--", linewidth=0.8)
    ax.axvspan(4 * N, n_hi, color="gray", alpha=0.15, linewidth=0)
    ax.text(4 * N, 0.01, " 4N: extrapolation limit", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    ax.text(N, 0.01, " N", transform=ax.get_xaxis_transform(), va="bottom", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n_lo, n_hi)
    values = [r["test_error"] for r in rows]
    # the y range covers the measurements and the curves up to 4N (beyond it, a negative alpha dives towards 0)
    top, bottom = max(values), min(min(values), min(float(f.e(f.extrapolation_limit)) for f in fits.values()))
    ax.set_ylim(max(bottom * 0.7, 0.1), top * 1.25)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("training samples per class, n (log)")
    ax.set_ylabel("test error % (log)")
    ax.set_title(title or "learning curves")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
