"""Experiment 1b: what an angular margin does at fair settings, and the feature statistics that explain it.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189) propose GA-Softmax; SphereFace (Liu et al.,
CVPR 2017, wy1iu/sphereface) trains its multiplicative margin with the annealing lambda = max(5, 1000 / (1 + 0.12
it)); OpenSphere (ydwen/opensphere) detaches the margin instead; ArcFace / CosFace fix the logit scale s. The runs are
those of ``e1b_margins.yaml`` (trained by ``run_all.py``); this script reads every finished run (any number of seeds)
and computes from its final weights, on the fixed 2,000-image test subset and on the 1,000 fixed training images of
``train_eval_acc``:

- accuracies with BatchNorm in **eval mode** (running statistics) and in **training mode** (the statistics of each
  batch of 128, the mode the optimizer saw; a copy of the model, so nothing is changed), logits without the margin;
- the **feature norm** of the features fed to the classifier (bounded by sqrt(256) = 16 for a SphereNet fc6
  without BN, whose cosine outputs lie in [-1, 1]);
- the **angles** between a feature and the class weights W_j: the target angle theta_y, the nearest other angle
  min_{j != y} theta_j, and their gap (positive: the feature is angularly closer to its own class than to any other);
  a margin is meant to widen that gap;
- the smallest and the median **angle between two class weights**, which shows a classifier whose classes have
  collapsed into a narrow cone.

It writes ``margins.json`` and ``margins.png`` into the experiment folder and the page
``docs/results/e1b_margins.md`` (spliced into docs/results.md), each configuration with the seeds it has.

Command (run_all.py runs it when the grid is complete)::

    .venv/bin/python experiments/e1b_margins.py [reports/experiments/e1b_margins]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchsphere.train.checkpoint import atomic_write, atomic_write_bytes, atomic_write_text

HERE = Path(__file__).resolve().parent
DEFAULT_FOLDER = HERE.parent / "reports" / "experiments" / "e1b_margins"
PAGE = HERE.parent / "docs" / "results" / "e1b_margins.md"
METRICS, FIGURE = "margins.json", "margins.png"
BATCH = 128          # training-mode evaluation: the training batch size, so BN sees batches like those of training
TRAIN_EVAL_SALT = 3  # the loop's seed salt for the fixed train_eval_acc images (torchsphere.train.loop)
MIN_SEEDS = 3        # a verdict needs this many seeds on both sides

# (configuration, its softmax baseline) for the verdicts; the W-Softmax of the same net is the second reference
BASELINES = {"sphere": ("sphere-softmax", "sphere-wsoftmax"), "cnn9": ("cnn9-softmax", "cnn9-wsoftmax")}
STAT_KEYS = ("test_eval", "test_train", "train_eval", "train_train", "feature_norm", "theta_target", "theta_other",
             "theta_gap", "weight_angle_min", "weight_angle_median")


# ---------------------------------------------------------------------------------------------- statistics
def _classifier_weight(model: torch.nn.Module) -> Tensor:
    """The class weights W (C, D) of the model's classifier (a bias-free linear layer or an AngularHead)."""
    return model.get_classifier().weight.detach()


def angle_statistics(features: Tensor, weight: Tensor, labels: Tensor) -> dict[str, float]:
    """Mean |x|, target angle, nearest other angle and their gap (degrees) over the samples, in float64."""
    x, w = features.double(), weight.double()
    norms = x.norm(dim=1)
    cos = (x / norms.clamp_min(1e-300)[:, None]) @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)).T
    theta = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))  # (N, C); float64, clamped: rounding only
    target = theta.gather(1, labels[:, None]).squeeze(1)
    other = theta.scatter(1, labels[:, None], math.inf).min(dim=1).values
    return {"feature_norm": float(norms.mean()), "theta_target": float(target.mean()),
            "theta_other": float(other.mean()), "theta_gap": float((other - target).mean())}


def class_weight_angles(weight: Tensor) -> dict[str, float]:
    """Smallest and median angle (degrees) between two class weights W_i, W_j, i != j, in float64: how far apart the
    classifier keeps its classes (90 for orthogonal weights; a collapse into a narrow cone shows as small angles)."""
    w = weight.double()
    units = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    theta = torch.rad2deg(torch.acos((units @ units.T).clamp(-1.0, 1.0)))
    pairs = theta[torch.triu(torch.ones_like(theta, dtype=torch.bool), diagonal=1)]
    return {"weight_angle_min": float(pairs.min()), "weight_angle_median": float(pairs.median())}


def _accuracy(model: torch.nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(x[i:i + BATCH]).argmax(dim=1) for i in range(0, y.numel(), BATCH)])
    return float((predictions == y).double().mean())


def run_statistics(run_dir: Path) -> dict[str, float]:
    """The statistics of one finished run (final weights), described in the module docstring."""
    from torchsphere.train.builders import build_data, mix_seed
    from torchsphere.train.inference import load_run

    run = load_run(run_dir)
    run.model.requires_grad_(False)  # inference: SphereConv runs its eager kernels instead of compiling new ones
    data = build_data(run.config)
    generator = torch.Generator().manual_seed(mix_seed(run.config.seed, TRAIN_EVAL_SALT))
    index = torch.randperm(data.train_y.numel(), generator=generator)[:run.config.train_eval_size]
    splits = {"test": (data.test_x, data.test_y), "train": (data.train_x[index], data.train_y[index])}
    training_mode = copy.deepcopy(run.model).train()  # BN normalizes with batch statistics; the copy absorbs updates
    out: dict[str, float] = {}
    for split, (x, y) in splits.items():
        out[f"{split}_eval"] = _accuracy(run.model, x, y)
        out[f"{split}_train"] = _accuracy(training_mode, x, y)
    with torch.no_grad():
        features = torch.cat([run.model.forward_features(data.test_x[i:i + 500])
                              for i in range(0, data.test_y.numel(), 500)])
    weight = _classifier_weight(run.model)
    out.update(angle_statistics(features, weight, data.test_y))
    out.update(class_weight_angles(weight))
    summary = json.loads((run_dir / "summary.json").read_text())
    out["final_test"] = summary["final"]["test_acc"]
    out["best_test"] = summary["best"]["test_acc"]
    out["time_per_step_s"] = summary["time_per_step_s"]
    return out


def collect(folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    """{configuration: {seed: statistics}} of every finished run. Entries of ``margins.json`` are reused while the
    run's ``summary.json`` is unchanged (its SHA-256), so a clone with the committed text files, without the weights,
    regenerates the page."""
    path = folder / METRICS
    cached = json.loads(path.read_text()) if path.is_file() else {}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in spec_names():
        for seed_dir in sorted((folder / "runs" / name).glob("seed_*")):
            if not (seed_dir / "summary.json").is_file():
                continue
            seed = seed_dir.name.split("_", 1)[1]
            stamp = hashlib.sha256((seed_dir / "summary.json").read_bytes()).hexdigest()
            entry = cached.get(name, {}).get(seed)
            fresh = (entry is None or entry.get("summary_sha256") != stamp or not set(STAT_KEYS) <= set(entry))
            if fresh:  # the weights are needed only here
                entry = {**run_statistics(seed_dir), "summary_sha256": stamp}
            out.setdefault(name, {})[seed] = entry
            if fresh:  # saved as it goes: a long first pass that is interrupted keeps what it computed
                cached.setdefault(name, {})[seed] = entry
                atomic_write_text(path, json.dumps(cached, indent=1) + "\n")
    return out


def spec_names() -> list[str]:
    """The configuration names of ``e1b_margins.yaml``, in its order."""
    from torchsphere.train.compare import load_spec

    return [run["name"] for run in load_spec(str(HERE / "e1b_margins.yaml")).runs]


# ---------------------------------------------------------------------------------------------- page
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    mean, std = _mean_std(values)
    return f"{scale * mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {scale * std:.{digits}f}")


def verdict(a: list[float], b: list[float]) -> str:
    """'higher' / 'lower' when |mean_a - mean_b| exceeds std_a + std_b, else 'within noise' (the rule of
    docs/results.md); no verdict with fewer than ``MIN_SEEDS`` seeds on either side."""
    if min(len(a), len(b)) < MIN_SEEDS:
        return f"fewer than {MIN_SEEDS} seeds: no verdict"
    (ma, sa), (mb, sb) = _mean_std(a), _mean_std(b)
    if abs(ma - mb) > sa + sb:
        return "higher" if ma > mb else "lower"
    return "within noise"


def _values(stats: dict[str, dict[str, float]], key: str) -> list[float]:
    return [s[key] for s in stats.values()]


def page(stats: dict[str, dict[str, dict[str, float]]], image: str | None) -> list[str]:
    total = len(spec_names())
    seeds = sorted({len(s) for s in stats.values()}) or [0]
    lines = ["## E1b: angular margins at fair settings (annealed, detached, unbounded features)", "",
             "Spec: `experiments/e1b_margins.yaml`; statistics: `experiments/e1b_margins.py` (final weights). "
             "SphereNet-9 (cosine SphereConv, fc6 a SphereConv) and CNN-9 at widths / 16, the full Fashion-MNIST "
             "training set (5% held out), batch 128, 3,000 steps at constant lr 1e-3 (Adam, the budget of E8), "
             "PyTorch BatchNorm statistics (momentum 0.1). GA-Softmax with SphereFace's lambda annealing (`anneal`: "
             "lambda = max(5, 1000 / (1 + 0.12 step)), at its floor 5 from step 1,658 on), with OpenSphere's "
             "detached margin (`detach`), and, for SphereNet, with unbounded features: BatchNorm on fc6 (`fcbn`) or "
             "a fixed logit scale s = 30 (`s30`, OpenSphere's SphereFace scale).", "",
             f"{len(stats)}/{total} configurations have finished runs; seeds per configuration: "
             f"{', '.join(map(str, seeds))}. Accuracies in %, mean ± std over seeds, logits without the margin. "
             "`test (eval)` is the reported number (BN running statistics); `test (train)` and `train (train)` use "
             "BN in training mode (batch statistics of 128 images), `train (eval)` the running statistics on the "
             "fixed 1,000 training images. Angles in degrees on the test set: theta_y to the own class weight, "
             "theta_other to the nearest other class, gap = theta_other − theta_y; W angle: the smallest and the median "
             "angle between two class weights (mean over seeds; 90 for orthogonal classes).", ""]
    header = ["configuration", "seeds", "test (eval)", "test (train)", "train (eval)", "train (train)",
              "best-on-val test", "feature norm", "theta_y", "theta_other", "gap", "W angle min / median"]
    rows = [header, ["---"] * len(header)]
    for name, per_seed in stats.items():
        rows.append([name, str(len(per_seed)), _cell(_values(per_seed, "test_eval")),
                     _cell(_values(per_seed, "test_train")), _cell(_values(per_seed, "train_eval")),
                     _cell(_values(per_seed, "train_train")), _cell(_values(per_seed, "best_test")),
                     _cell(_values(per_seed, "feature_norm"), 1, 2), _cell(_values(per_seed, "theta_target"), 1, 1),
                     _cell(_values(per_seed, "theta_other"), 1, 1), _cell(_values(per_seed, "theta_gap"), 1, 1),
                     f"{_mean_std(_values(per_seed, 'weight_angle_min'))[0]:.0f} / "
                     f"{_mean_std(_values(per_seed, 'weight_angle_median'))[0]:.0f}"])
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if image:
        lines += [f"![E1b margins]({image})", ""]
    lines += ["Verdicts on the final test accuracy in eval mode, against the softmax and the W-Softmax head of the "
              "same net (\"higher\"/\"lower\": the difference of the means exceeds the sum of the two standard "
              f"deviations; at least {MIN_SEEDS} seeds on both sides):", ""]
    for name, per_seed in stats.items():
        family = "sphere" if name.startswith("sphere") else "cnn9"
        softmax, wsoftmax = BASELINES[family]
        if name == softmax:
            continue
        parts = []
        for base in (softmax, wsoftmax):
            if base == name or base not in stats:
                continue
            diff = 100 * (_mean_std(_values(per_seed, "test_eval"))[0]
                          - _mean_std(_values(stats[base], "test_eval"))[0])
            parts.append(f"{diff:+.2f} points vs {base} "
                         f"({verdict(_values(per_seed, 'test_eval'), _values(stats[base], 'test_eval'))})")
        if parts:
            lines.append(f"- {name}: " + "; ".join(parts) + ".")
    missing = [n for n in spec_names() if len(stats.get(n, {})) < MIN_SEEDS]
    if missing:
        lines += ["", f"Not yet run to {MIN_SEEDS} seeds: {', '.join(missing)} (`make results` trains what is "
                  "missing and reuses the rest)."]
    return lines


def plot(stats: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Left: test accuracy in eval and training mode per configuration; right: theta_y and theta_other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats)
    ys = range(len(names))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.42 * len(names) + 1.6), sharey=True)
    for key, marker, label in (("test_eval", "o", "test, BN eval mode"), ("test_train", "x", "test, BN train mode")):
        means = [100 * _mean_std(_values(stats[n], key))[0] for n in names]
        stds = [100 * (_mean_std(_values(stats[n], key))[1] if len(stats[n]) > 1 else 0.0) for n in names]
        left.errorbar(means, ys, xerr=stds, fmt=marker, capsize=3, label=label)
    left.set_xlabel("accuracy (%)")
    left.set_yticks(list(ys), names)
    left.invert_yaxis()
    left.legend(loc="lower left", fontsize=8)
    left.grid(alpha=0.3)
    for key, marker, label in (("theta_target", "o", "theta_y (own class)"),
                               ("theta_other", "s", "theta_other (nearest other class)")):
        means = [_mean_std(_values(stats[n], key))[0] for n in names]
        right.plot(means, ys, marker, label=label)
    right.set_xlabel("mean angle on the test set (degrees)")
    right.legend(loc="lower right", fontsize=8)
    right.grid(alpha=0.3)
    fig.suptitle("E1b: margins on Fashion-MNIST, 3,000 steps of batch 128, widths / 16 (mean over seeds)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="E1b: margin statistics and page from the finished runs.")
    parser.add_argument("folder", nargs="?", type=Path, default=DEFAULT_FOLDER,
                        help=f"the experiment folder (default {DEFAULT_FOLDER})")
    parser.add_argument("--page", type=Path, default=PAGE, help=f"the page written (default {PAGE})")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small batches: more threads only add synchronization, badly so on a busy machine
    stats = collect(args.folder)
    if not stats:
        print(f"no finished run under {args.folder}/runs", file=sys.stderr)
        return 1
    atomic_write_text(args.folder / METRICS, json.dumps(stats, indent=1) + "\n")  # finished runs only
    plot(stats, args.folder / FIGURE)
    figure = args.page.parent / "e1b_margins.png"
    atomic_write_bytes(figure, (args.folder / FIGURE).read_bytes())
    text = "\n".join(page(stats, figure.name)) + "\n"
    atomic_write_text(args.page, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
