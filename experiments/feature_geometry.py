"""Experiment 6: draws the 2-D test-set features of CNN-9 and SphereNet-9 and measures their geometry.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189): the official README's MNIST figure
(``asserts/MNIST_featvis.jpg`` in wy1iu/SphereNet) shows CNN features spread in radial streaks from the origin and
SphereNet features in compact angular clusters. This script loads the finished runs of
``e6_feature_geometry.yaml`` (feature_dim 2: fc6 outputs the 2-D feature fed to the classifier), computes the
features of the test split (final weights) and writes into the experiment folder:

- ``features.png``: one scatter plot per configuration (seed 0), coloured by class;
- ``features.json``: per configuration and seed, two numbers averaged over the classes:
  ``angular_concentration`` — the mean resultant length of the unit feature directions of a class (1: all points
  of the class on one ray, 0: directions spread evenly) — and ``radial_cv`` — the coefficient of variation
  (std / mean) of the feature norms of a class (large for streaks, whose points lie at all distances).

Command (run_all.py runs it after training)::

    .venv/bin/python experiments/feature_geometry.py reports/experiments/e6_feature_geometry
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor

FIGURE = "features.png"
METRICS = "features.json"


def test_features(run_dir: Path) -> tuple[Tensor, Tensor, list[str]]:
    """(features (N, D), labels (N,), class names) of the run's test split, final weights."""
    from torchsphere.train.builders import build_data
    from torchsphere.train.inference import load_run

    run = load_run(run_dir)
    data = build_data(run.config)
    features = []
    with torch.no_grad():
        for start in range(0, data.test_y.numel(), 500):
            features.append(run.model.forward_features(data.test_x[start:start + 500]))
    return torch.cat(features).double(), data.test_y, list(run.data_info["classes"])


def geometry(features: Tensor, labels: Tensor) -> dict[str, float]:
    """Class-averaged angular concentration (mean resultant length) and radial coefficient of variation."""
    concentration, radial = [], []
    for c in labels.unique():
        f = features[labels == c]  # (n_c, D)
        norms = f.norm(dim=1)
        units = f / norms.clamp_min(1e-12)[:, None]
        concentration.append(float(units.mean(dim=0).norm()))
        # population coefficient of variation: defined for a single sample too
        radial.append(float(norms.std(correction=0) / norms.mean().clamp_min(1e-12)))
    return {"angular_concentration": statistics.fmean(concentration), "radial_cv": statistics.fmean(radial)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot and measure the 2-D features of the e6 runs.")
    parser.add_argument("folder", type=Path, help="the experiment folder (holding runs/CONFIG/seed_S)")
    args = parser.parse_args(argv)
    runs = sorted(p for p in (args.folder / "runs").glob("*/seed_*") if (p / "summary.json").is_file())
    if not runs:
        raise SystemExit(f"no finished runs under {args.folder / 'runs'}")
    configs = sorted({p.parent.name for p in runs}, key=lambda n: (not n.startswith("cnn"), n))
    metrics: dict[str, dict[str, dict[str, float]]] = {name: {} for name in configs}
    plotted: dict[str, tuple[Tensor, Tensor, list[str]]] = {}
    for run_dir in runs:
        features, labels, classes = test_features(run_dir)
        if features.shape[1] != 2:
            raise SystemExit(f"{run_dir} has {features.shape[1]}-D features; experiment 6 needs feature_dim 2")
        metrics[run_dir.parent.name][run_dir.name] = geometry(features, labels)
        if run_dir.parent.name not in plotted:
            plotted[run_dir.parent.name] = (features, labels, classes)
    (args.folder / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    plot(plotted, args.folder / FIGURE)
    print(f"wrote {args.folder / FIGURE} and {args.folder / METRICS}")
    return 0


def plot(plotted: dict[str, tuple[Tensor, Tensor, list[str]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plotted), figsize=(5.5 * len(plotted), 5), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (name, (features, labels, classes)) in zip(axes[0], plotted.items()):
        for c, cls in enumerate(classes):
            f = features[labels == c].numpy()
            ax.scatter(f[:, 0], f[:, 1], s=3, alpha=0.5, color=cmap(c % 10), label=cls)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.set(title=f"{name} (seed 0): 2-D test features", xlabel="feature 1", ylabel="feature 2")
        ax.set_aspect("equal", adjustable="datalim")
    axes[0][-1].legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
