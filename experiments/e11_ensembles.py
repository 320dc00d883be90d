"""E11: deep ensembles for low-data transfer in miniature (Mustafa et al., arXiv 2010.06866, 2020).

A pool of 13 upstream models trained by ``torchsphere compare`` (``e11_pool.yaml`` + ``e11_pool_seeds.yaml``: CNN-9 /
SphereNet-9 with three operators, softmax / W-Softmax / GA-Softmax heads, four upstream tasks, three seeds of one
configuration) is ranked, fine-tuned and ensembled by ``torchsphere ensemble`` on the four held-out Fashion-MNIST
classes (T-shirt/top, Pullover, Coat, Shirt) with 1, 5, 10 and 25 training examples per class, 5 paired draws each.
Writes ``docs/results/e11_ensembles.md`` and ``docs/results/e11_ensembles.png``.

Commands::

    .venv/bin/python experiments/e11_ensembles.py                # pool (reused when trained), then every draw
    .venv/bin/python experiments/e11_ensembles.py --report-only  # only regenerate the page from finished draws
    .venv/bin/python experiments/e11_ensembles.py --quick        # smoke test: tiny budgets, separate folder

Resumable at every level: finished pool runs and draws are reused, an interrupted fine-tuning run continues from its
checkpoint. CPU and wall time of each phase are accumulated over sessions in ``OUTPUT/timing.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUTPUT = Path("reports") / "e11_ensembles"  # relative to ROOT (main() changes into it)
PAGE = Path("docs") / "results" / "e11_ensembles.md"
PLOT = "e11_ensembles.png"
SHOTS = (1, 5, 10, 25)
DRAWS = tuple(range(5))
DOWNSTREAM = [0, 2, 4, 6]  # T-shirt/top, Pullover, Coat, Shirt: never seen upstream
SETTINGS = dict(dataset="fashion-mnist", classes=DOWNSTREAM, val_shots=10, limit_test=1000, top=3,
                sweep=[[0.01, 30], [0.003, 60]], max_size=5, knn_k=1, metric="cosine", weighting="uniform",
                baselines=True, seed=0, threads=1, quiet=True)
METHODS = ("best-knn", "best-single", "topk-knn", "greedy", "random", "seed-only", "greedy-plain-only")
COMMAND = "nice -n 5 .venv/bin/python experiments/e11_ensembles.py"
HUMAN_START, HUMAN_END = "<!-- human-discussion:start -->", "<!-- human-discussion:end -->"


def _cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Timer:
    """Adds the CPU and wall seconds of a phase to ``timing.json`` (accumulated over sessions)."""

    def __init__(self, folder: Path, phase: str) -> None:
        self.path, self.phase = folder / "timing.json", phase

    def __enter__(self) -> Timer:
        self.cpu, self.wall = _cpu(), time.time()
        return self

    def __exit__(self, *exc: object) -> None:
        from torchsphere.train.checkpoint import atomic_write_text

        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        entry = data.setdefault(self.phase, dict(cpu_s=0.0, wall_s=0.0))
        entry["cpu_s"] = round(entry["cpu_s"] + _cpu() - self.cpu, 1)
        entry["wall_s"] = round(entry["wall_s"] + time.time() - self.wall, 1)
        atomic_write_text(self.path, json.dumps(data, indent=1) + "\n")


def train_pool(output: Path, quick: bool) -> list[str]:
    from torchsphere.train import compare, load_spec

    overrides = dict(steps=4, eval_every=2, limit_train=400, limit_test=100) if quick else {}
    folders = []
    for name in ("e11_pool", "e11_pool_seeds"):
        target = output / ("pool" if name == "e11_pool" else "pool_seeds")
        compare(load_spec(str(HERE / f"{name}.yaml")), target, overrides, quiet=True)
        folders.append(str(target / "runs"))
    return folders


def run_draws(pool: list[str], output: Path, quick: bool) -> None:
    from torchsphere.ensemble import EnsembleSpec, run_ensemble

    settings = dict(SETTINGS, **(dict(sweep=[[0.01, 3], [0.003, 3]], limit_test=100) if quick else {}))
    shots, draws = ((1, 5), (0, 1)) if quick else (SHOTS, DRAWS)
    for k in shots:
        for draw in draws:
            folder = output / "downstream" / f"shots{k}_draw{draw}"
            if (folder / "results.json").is_file():
                continue
            start = time.time()
            spec = EnsembleSpec(pool=pool, shots=k, draw=draw, **settings)
            results = run_ensemble(spec, folder)
            greedy = results["methods"]["greedy"]
            print(f"shots {k} draw {draw}: greedy test acc {100 * greedy['test_acc']:.2f} ({greedy['distinct']} "
                  f"members), {time.time() - start:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ the page
def _load(output: Path) -> dict[tuple[int, int], dict[str, Any]]:
    found = {}
    for path in sorted((output / "downstream").glob("shots*_draw*/results.json")):
        r = json.loads(path.read_text())
        found[(r["task"]["shots"], r["task"]["draw"])] = r
    return found


def _ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def _paired(a: list[float], b: list[float]) -> tuple[float, int, int, int]:
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), sum(x > 1e-12 for x in d), sum(abs(x) <= 1e-12 for x in d), sum(x < -1e-12 for x in d)


def _sign_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def write_page(output: Path, page: Path) -> str:
    results = _load(output)
    shots = sorted({k for k, _ in results})
    by_shot = {k: [results[key] for key in sorted(results) if key[0] == k] for k in shots}
    lines = ["## E11: ensembles from a pool of trained models (deep ensembles for low-data transfer, in miniature)", ""]
    any_result = next(iter(results.values()), None)
    if any_result is None:
        return "\n".join(lines + ["No finished draw yet.", ""])
    pool_rows = sorted(any_result["knn"], key=lambda r: r["index"])
    timing = json.loads((output / "timing.json").read_text()) if (output / "timing.json").is_file() else {}
    lines += [
        "Mustafa et al. (*Deep Ensembles for Low-Data Transfer Learning*, arXiv 2010.06866, 2020) rank a pool of "
        "pre-trained models by k-NN accuracy on the downstream data, fine-tune the best few with a small sweep and "
        "select an ensemble greedily on validation cross-entropy; they report that diversity from different "
        f"pre-training beats diversity from seeds. Here the pool is {len(pool_rows)} small models trained by "
        "torchsphere on Fashion-MNIST classes that the downstream task never sees; downstream is the four "
        "upper-body classes (T-shirt/top, Pullover, Coat, Shirt), the hardest group of the dataset. The paper's "
        "body was not available to us: every setting below is torchsphere's choice (docs/ensembles.md lists them).",
        "",
        f"**Setting.** Pool: {len(pool_rows)} runs (`experiments/e11_pool.yaml`, `experiments/e11_pool_seeds.yaml`), "
        "width 1/16 (8/12/16 channels, fc6 256), 200 steps of batch 128, Adam 1e-3, BatchNorm momentum 0.1, 5% "
        "validation split. Downstream: k = 1, 5, 10, 25 training and 10 validation examples per class drawn from the "
        "Fashion-MNIST training split, 5 draws per k (paired: every method sees the same examples), a fixed subset "
        f"of {any_result['task']['test']} test images of the four classes. Ranking: leave-one-out 1-NN accuracy, "
        "cosine, on the fc6 features (at k = 1: over training + validation pooled). Top 3 fine-tuned (new head, all "
        "weights trained, SGD momentum 0.9, cosine decay, batch min(32, n)) at the sweep points "
        f"{', '.join(f'lr {lr:g} / {s} steps' for lr, s in SETTINGS['sweep'])}; greedy selection with replacement, "
        "at most 5 picks. Random and seed-only ensembles have as many distinct members as the greedy one.",
        "",
        "**Methods.** best-knn: the top-1 k-NN model at its best sweep point (lowest validation cross-entropy); "
        "best-single: the fine-tuned run (of the 3 x 2) with the lowest validation cross-entropy; topk-knn: uniform "
        "average of the top 3 at their best sweep points; greedy: the paper's method; random: pool members drawn "
        "uniformly, each fine-tuned with the sweep and taken at its best point; seed-only: the top-1 k-NN model "
        "fine-tuned at its best point with other seeds (head initialisation and data order): downstream diversity "
        "only; greedy-plain-only: greedy over the same library with the SphereNet runs removed.",
        "",
        f"### Pool (upstream validation accuracy; k-NN accuracy averaged over the {len(results)} draws)",
        "",
        "| member | model | operator | head | upstream task | upstream val acc % | mean k-NN acc % | times in top 3 |",
        "|---|---|---|---|---|---|---|---|"]
    from torchsphere.train.metrics import read_summary

    all_results = list(results.values())
    for row in pool_rows:
        summary = read_summary(Path(row["path"]) / "summary.json")
        knn = [next(r for r in res["knn"] if r["name"] == row["name"])["knn_acc"] for res in all_results]
        top = sum(next(r for r in res["knn"] if r["name"] == row["name"])["rank"] <= res["spec"]["top"]
                  for res in all_results)
        lines.append(f"| {row['name']} | {row['model']} | {row['operator'] or 'default'} | {row['head']} | "
                     f"{row['upstream']} | {100 * summary['final']['val_acc']:.1f} | {_ms(knn)} | "
                     f"{top}/{len(all_results)} |")
    lines += ["", "### Test accuracy % (mean ± std over draws)", "",
              "| method | " + " | ".join(f"k = {k} ({len(by_shot[k])} draws)" for k in shots) + " |",
              "|---|" + "---|" * len(shots)]
    present = [m for m in METHODS if any(m in r["methods"] for k in shots for r in by_shot[k])]

    def cell(m: str, k: int, key: str, scale: float = 100.0, digits: int = 1) -> str:
        rs = [r for r in by_shot[k] if m in r["methods"]]
        text = _ms([r["methods"][m][key] for r in rs], scale, digits)
        return text if len(rs) == len(by_shot[k]) else f"{text} ({len(rs)} draws)"

    for m in present:
        lines.append(f"| {m} | " + " | ".join(cell(m, k, "test_acc") for k in shots) + " |")
    lines += ["", "### Test cross-entropy (mean ± std over draws)", "",
              "| method | " + " | ".join(f"k = {k}" for k in shots) + " |", "|---|" + "---|" * len(shots)]
    for m in present:
        lines.append(f"| {m} | " + " | ".join(cell(m, k, "test_nll", 1.0, 3) for k in shots) + " |")
    pairs = [("greedy", "best-knn"), ("greedy", "best-single"), ("greedy", "seed-only"), ("greedy", "random"),
             ("topk-knn", "seed-only"), ("topk-knn", "random"), ("greedy", "greedy-plain-only")]
    verdict: dict[tuple[str, str, str], tuple[float, int, int, int, float]] = {}
    for key, title, scale, unit in (("test_acc", "test accuracy (percentage points", 100.0, "+.1f"),
                                    ("test_nll", "test cross-entropy (lower is better", 1.0, "+.3f")):
        lines += ["", f"### Paired differences on {title}; wins / ties / losses = first higher / equal / lower)", "",
                  "| comparison | " + " | ".join(f"k = {k}" for k in shots)
                  + " | all draws: mean, W/T/L, sign-test p |", "|---|" + "---|" * (len(shots) + 1)]
        for a, b in pairs:
            if a not in present or b not in present:
                continue
            cells, all_a, all_b = [], [], []
            for k in shots:
                rs = [r for r in by_shot[k] if a in r["methods"] and b in r["methods"]]  # paired: the same draws
                xa = [r["methods"][a][key] for r in rs]
                xb = [r["methods"][b][key] for r in rs]
                if not rs:
                    cells.append("—")
                    continue
                mean, w, t, l = _paired(xa, xb)
                cells.append(f"{scale * mean:{unit}} ({w}/{t}/{l})")
                all_a += xa
                all_b += xb
            mean, w, t, l = _paired(all_a, all_b)
            p = _sign_p(w, l)
            verdict[(key, a, b)] = (mean, w, t, l, p)
            lines.append(f"| {a} − {b} | " + " | ".join(cells)
                         + f" | {scale * mean:{unit}}, {w}/{t}/{l}, p = {p:.3f} |")
    lines += ["", "### The greedy ensembles", "",
              "| k | distinct members (mean) | with a SphereNet member | with ≥ 2 upstream tasks | "
              "k-NN vs fine-tuned Spearman (mean) |", "|---|---|---|---|---|"]
    for k in shots:
        rs = by_shot[k]
        distinct = [r["methods"]["greedy"]["distinct"] for r in rs]
        sphere = sum(r["greedy"]["sphere_members"] > 0 for r in rs)
        upstream = []
        for r in rs:
            tasks = {next(x for x in r["knn"] if x["name"] == m.split(" @ ")[0])["upstream"]
                     for m in r["methods"]["greedy"]["members"]}
            upstream.append(len(tasks) >= 2)
        rho = [r["knn_vs_finetuned_spearman"] for r in rs if not math.isnan(r["knn_vs_finetuned_spearman"])]
        lines.append(f"| {k} | {statistics.fmean(distinct):.1f} | {sphere}/{len(rs)} | {sum(upstream)}/{len(rs)} | "
                     f"{statistics.fmean(rho) if rho else math.nan:.2f} |")
    lines += ["", f"![E11: test accuracy and cross-entropy against examples per class]({PLOT})", ""]
    complete = [m for m in present if all(m in r["methods"] for k in shots for r in by_shot[k])]
    plot_page(by_shot, complete, page.parent / PLOT)
    lines += _readings(verdict)
    from run_all import machine

    pool_t, down_t = timing.get("pool", {}), timing.get("downstream", {})
    total_cpu = pool_t.get("cpu_s", 0.0) + down_t.get("cpu_s", 0.0)
    lines += ["", "**Cost.** " + machine() + f". Pool training: {pool_t.get('cpu_s', 0) / 60:.1f} CPU minutes "
              f"({pool_t.get('wall_s', 0) / 60:.1f} min wall); {len(results)} downstream draws (k-NN ranking of the "
              f"pool, fine-tuning, selection, baselines): {down_t.get('cpu_s', 0) / 60:.1f} CPU minutes "
              f"({down_t.get('wall_s', 0) / 60:.1f} min wall); in all {total_cpu / 60:.1f} CPU minutes, one process on "
              "1 thread under `nice`, on a machine shared with other jobs (wall time includes their load). "
              f"Command: `{COMMAND}` (resumable; `--report-only` regenerates this page).", ""]
    old = page.read_text() if page.is_file() else ""
    human = old[old.index(HUMAN_START):old.index(HUMAN_END) + len(HUMAN_END)] if HUMAN_START in old else \
        f"{HUMAN_START}\n### Discussion\n\n(to be written from the numbers above)\n{HUMAN_END}"
    text = "\n".join(lines) + "\n" + human + "\n"
    from torchsphere.train.checkpoint import atomic_write_text

    atomic_write_text(page, text)
    return text


def _readings(verdict: dict[tuple[str, str, str], tuple[float, int, int, int, float]]) -> list[str]:
    """Generated sentences; the rule: "better" = the mean paired difference over all draws favours it (higher
    accuracy, lower cross-entropy) and the two-sided sign test over the draws gives p < 0.05."""
    out = ["**Readings** (rule: a method is called better when its mean paired difference over all draws favours it "
           "— higher test accuracy, lower test cross-entropy — and the two-sided sign test over the draws gives "
           "p < 0.05; otherwise \"no clear difference\").", ""]
    names = {("greedy", "seed-only"): "pre-training diversity (greedy) vs seed diversity (seed-only), same size",
             ("topk-knn", "seed-only"): "the top-3 k-NN models averaged (topk-knn) vs the seed-only ensemble",
             ("greedy", "best-knn"): "greedy ensemble vs the best single model by k-NN",
             ("greedy", "random"): "greedy vs a random ensemble of the same size",
             ("greedy", "greedy-plain-only"): "greedy with vs without the SphereNet runs (draws whose library has "
                                              "both kinds)"}
    for (a, b), label in names.items():
        parts = []
        for key, what, sign, fmt, scale in (("test_acc", "accuracy", 1, "+.2f", 100.0),
                                            ("test_nll", "cross-entropy", -1, "+.3f", 1.0)):
            if (key, a, b) not in verdict:
                continue
            mean, w, t, l, p = verdict[(key, a, b)]
            word = f"{a} better" if sign * mean > 0 and p < 0.05 else (
                f"{b} better" if sign * mean < 0 and p < 0.05 else "no clear difference")
            parts.append(f"{what} {scale * mean:{fmt}} ({w}/{t}/{l}, p = {p:.3f}): **{word}**")
        if parts:
            out.append(f"- {label}: " + "; ".join(parts) + ".")
    return out


def plot_page(by_shot: dict[int, list[dict[str, Any]]], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchsphere.train.checkpoint import atomic_write

    shots = sorted(by_shot)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3), dpi=110)
    for i, m in enumerate(methods):
        for ax, key, scale in ((axes[0], "test_acc", 100.0), (axes[1], "test_nll", 1.0)):
            vals = [[scale * r["methods"][m][key] for r in by_shot[k]] for k in shots]
            mean = [statistics.fmean(v) for v in vals]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            offset = [k * (1 + 0.03 * (i - len(methods) / 2)) for k in shots]  # spread the error bars
            ax.errorbar(offset, mean, yerr=sd, marker="os^Dvx*"[i % 7], capsize=3, lw=1.5, label=m)
    axes[0].set(xscale="log", xlabel="training examples per class", ylabel="test accuracy (%)",
                title="downstream test accuracy (mean ± std over draws)")
    axes[1].set(xscale="log", xlabel="training examples per class", ylabel="test cross-entropy",
                title="downstream test cross-entropy")
    for ax in axes:
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=None, help=f"(default: {DEFAULT_OUTPUT})")
    parser.add_argument("--page", type=Path, default=None, help=f"(default: {PAGE})")
    parser.add_argument("--report-only", action="store_true", help="train nothing; regenerate the page")
    parser.add_argument("--quick", action="store_true", help="smoke test into reports/e11_ensembles-quick")
    args = parser.parse_args(argv)
    args.output, args.page = (p.resolve() if p is not None else None for p in (args.output, args.page))
    os.chdir(ROOT)  # every path below (and in the results files) relative to the repository root
    output = args.output or (Path("reports") / "e11_ensembles-quick" if args.quick else DEFAULT_OUTPUT)
    page = args.page or (output / "e11_ensembles.md" if args.quick else PAGE)
    output.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # the training threads, and what the hardware line reports
    if not args.report_only:
        with Timer(output, "pool"):
            pool = train_pool(output, args.quick)
        with Timer(output, "downstream"):
            run_draws(pool, output, args.quick)
    print(write_page(output, page))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
