"""Experiment 8b: the learnable sigmoid SphereConv against the fixed operators at the same budget (E8's runs).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189), Section 3.2: the learnable SphereConv learns
the k of the sigmoid operator by back-propagation (one k per output channel, effective k = |k_raw| + 0.05, official
k_raw initialised at 0.7, i.e. k = 0.75). The runs are E8's (``e8_convergence_bn.yaml``: SphereNet-9, widths / 16,
3,000 steps of batch 128, Adam 1e-3, 3 seeds), where ``sphere-learnable`` trains beside the fixed linear, cosine and
sigmoid (k = 0.3) operators under exactly the same settings. This script writes ``docs/results/e8b_learnable_k.md``
and ``learned_k.png`` (the learned k of every layer at the end of training: median and quartiles over the layer's
output channels, one line per seed), and compares, for every operator,

- optimization: the training loss and batch accuracy of the last evaluation window (training mode);
- evaluation: the final test accuracy with PyTorch's BatchNorm EMA at momentum 0.1 and with precise statistics
  (both eval mode; E8 shows that the official EMA at decay 0.999 lags and is not the number to compare).

Command (run_all.py runs it after E8)::

    .venv/bin/python experiments/e8b_learnable_k.py [reports/experiments/e8_convergence_bn]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

from torchsphere.train.checkpoint import atomic_write, atomic_write_text

HERE = Path(__file__).resolve().parent
DEFAULT_FOLDER = HERE.parent / "reports" / "experiments" / "e8_convergence_bn"
PAGE = HERE.parent / "docs" / "results" / "e8b_learnable_k.md"
FIGURE = "e8b_learned_k.png"
LEARNABLE = "sphere-learnable"
FIXED = ("sphere-linear", "sphere-cosine", "sphere-sigmoid")  # E8's fixed operators (sigmoid: k = 0.3)
COLUMNS = (("train_loss", "train loss (train mode)", 1.0, 3), ("train_acc", "train batch acc (train mode)", 100.0, 2),
           ("test_acc_torch_0.1", "test, torch EMA 0.1 (eval)", 100.0, 2),
           ("test_acc_precise", "test, precise BN (eval)", 100.0, 2))
MIN_SEEDS = 3


def learned_k(run_dir: Path) -> list[tuple[str, torch.Tensor]]:
    """(layer name, effective k per output channel) of every learnable SphereConv layer, final weights, in order."""
    from torchsphere.nn.sphere_conv import SPHERE_LAYERS
    from torchsphere.train.inference import load_run

    model = load_run(run_dir).model
    return [(name, module.effective_k().detach().double()) for name, module in model.named_modules()
            if isinstance(module, SPHERE_LAYERS) and getattr(module, "sigmoid_k_raw", None) is not None]


def last_rows(folder: Path, name: str) -> list[dict[str, float]]:
    """The last metrics row of every finished seed of configuration ``name``."""
    from torchsphere.train.metrics import read_metrics

    rows = []
    for seed_dir in sorted((folder / "runs" / name).glob("seed_*")):
        if (seed_dir / "summary.json").is_file():
            rows.append(read_metrics(seed_dir / "metrics.csv")[-1])
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _cell(values: list[float], scale: float, digits: int) -> str:
    mean, std = _mean_std(values)
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {scale * std:.{digits}f}")


def verdict(a: list[float], b: list[float], lower_is_better: bool = False) -> str:
    """'better' / 'worse' when the means differ by more than the sum of the stds (docs/results.md's rule)."""
    if min(len(a), len(b)) < MIN_SEEDS:
        return f"fewer than {MIN_SEEDS} seeds: no verdict"
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    if abs(ma - mb) <= sa + sb:
        return "within noise"
    return "better" if (ma < mb) == lower_is_better else "worse"


def plot(per_seed: list[list[tuple[str, torch.Tensor]]], path: Path, initial_k: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = [n for n, _ in per_seed[0]]
    x = range(1, len(names) + 1)
    for seed, layers in enumerate(per_seed):
        q = torch.stack([torch.quantile(k, torch.tensor([0.25, 0.5, 0.75], dtype=k.dtype)) for _, k in layers])
        line, = ax.plot(x, q[:, 1], marker="o", label=f"seed {seed}: median over channels")
        ax.fill_between(x, q[:, 0], q[:, 2], color=line.get_color(), alpha=0.15)
    ax.axhline(initial_k, color="grey", linestyle="--", label=f"initial k = {initial_k:g}")
    ax.axhline(0.3, color="black", linestyle=":", label="fixed sigmoid k = 0.3 (E8)")
    ax.set_xticks(list(x), [n.replace("stages.", "s").replace(".conv", "") for n in names], rotation=45,
                  fontsize=8)
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("learned k (band: quartiles over channels)")
    ax.set_title("Learnable sigmoid SphereConv: k per layer after 3,000 steps (SphereNet-9, widths / 16)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def page(folder: Path, image: str, per_seed: list[list[tuple[str, torch.Tensor]]]) -> list[str]:
    rows = {name: last_rows(folder, name) for name in (*FIXED, LEARNABLE)}
    lines = ["## E8b: learnable vs fixed SphereConv at the same budget", "",
             "Runs: E8's (`experiments/e8_convergence_bn.yaml`, the `sphere-learnable` configuration beside the "
             "fixed operators: SphereNet-9, widths / 16, 3,000 steps of batch 128, Adam 1e-3, 3 seeds); page: "
             "`experiments/e8b_learnable_k.py`. Mean ± std over seeds at step 3,000; training-mode numbers are the "
             "averages over the last 200 training steps, eval-mode numbers the test accuracy with BatchNorm's "
             "running statistics (PyTorch EMA, momentum 0.1) and with precise statistics.", ""]
    header = ["operator", "seeds"] + [label for _, label, _, _ in COLUMNS]
    table = [header, ["---"] * len(header)]
    for name, runs in rows.items():
        table.append([name, str(len(runs))] + [_cell([r[key] for r in runs], scale, digits) if runs else "—"
                                                for key, _, scale, digits in COLUMNS])
    lines += ["| " + " | ".join(r) + " |" for r in table] + [""]
    if per_seed:
        medians = [[float(k.quantile(0.5)) for _, k in layers] for layers in per_seed]
        per_layer = [statistics.fmean(m[i] for m in medians) for i in range(len(medians[0]))]
        groups = {"the convolutions": [k for layers in per_seed for _, k in layers[:-1]],
                  "fc6": [layers[-1][1] for layers in per_seed]}
        summaries = []
        for label, ks in groups.items():
            k = torch.cat(ks)
            summaries.append(f"{label} ({k.numel() // len(per_seed)} channels per model): median "
                             f"{float(k.quantile(0.5)):.3f}, "
                             f"quartiles {float(k.quantile(0.25)):.3f} – {float(k.quantile(0.75)):.3f}, range "
                             f"{float(k.min()):.3f} – {float(k.max()):.3f}")
        lines += [f"![learned k per layer]({image})", "",
                  f"Learned k at step 3,000 ({len(per_seed)} seed(s), initial 0.75) in "
                  + "; in ".join(summaries) + ". Median per layer, input to output (mean over seeds): "
                  + ", ".join(f"{v:.3f}" for v in per_layer) + ".", ""]
    fixed = [n for n in FIXED if len(rows[n]) >= MIN_SEEDS]
    if rows[LEARNABLE] and fixed:
        key = "test_acc_torch_0.1"
        best = max(fixed, key=lambda n: _mean_std([r[key] for r in rows[n]])[0])
        lines += [f"Verdicts for {LEARNABLE} (\"better\"/\"worse\": the means differ by more than the sum of the two "
                  f"standard deviations, at least {MIN_SEEDS} seeds on both sides). The best fixed operator by the "
                  f"test accuracy with the momentum-0.1 EMA is {best}.", ""]
        for name in fixed:
            parts = []
            for key, label, scale, _ in COLUMNS:
                a, b = [r[key] for r in rows[LEARNABLE]], [r[key] for r in rows[name]]
                diff = scale * (_mean_std(a)[0] - _mean_std(b)[0])
                parts.append(f"{label} {diff:+.3g} ({verdict(a, b, lower_is_better=key == 'train_loss')})")
            lines.append(f"- vs {name}{' (best fixed)' if name == best else ''}: " + "; ".join(parts) + ".")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="E8b: learnable vs fixed SphereConv, from E8's run folders.")
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER,
                        help=f"E8's experiment folder (default {DEFAULT_FOLDER})")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the page written (default {PAGE})")
    args = parser.parse_args(argv)
    seeds = [d for d in sorted((args.folder / "runs" / LEARNABLE).glob("seed_*")) if (d / "summary.json").is_file()]
    if not seeds:
        print(f"no finished {LEARNABLE} run under {args.folder}/runs", file=sys.stderr)
        return 1
    per_seed = [learned_k(d) for d in seeds]
    from torchsphere.train.config import TrainConfig

    config = TrainConfig.from_yaml(seeds[0] / "config.yaml")
    initial = config.sigmoid_k if config.sigmoid_k is not None else 0.75
    plot(per_seed, args.page.parent / FIGURE, initial)
    text = "\n".join(page(args.folder, FIGURE, per_seed)) + "\n"
    atomic_write_text(args.page, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
