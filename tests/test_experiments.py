"""The reproduction machinery: CIFAR presets, experiment specs, ``experiments/run_all.py``.

Every CIFAR preset runs each of its configurations for a few steps at a tiny width on small CIFAR-10 / CIFAR-100
datasets written here in the standard pickle layout (``cifar-10-batches-py``, ``cifar-100-python``); every experiment
spec runs end to end through ``run_all.py --quick`` on a small Fashion-MNIST-format IDX dataset, including the
regeneration of the results page, resumability (finished runs are skipped) and the feature-geometry step.
"""
from __future__ import annotations

import gzip
import json
import math
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchsphere.train import TrainConfig
from torchsphere.train.builders import build_model, build_optimizer, build_regularizer
from torchsphere.train.compare import compare, list_presets, load_spec
from torchsphere.train.metrics import METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import feature_geometry  # noqa: E402
import run_all  # noqa: E402

CIFAR_PRESETS = ("cifar10-official", "cifar10plus-resnet32", "cifar100-mhe")
# a few steps at a tiny width on CPU; data_dir is added per test
TINY = dict(steps=2, eval_every=1, batch_size=8, width_mult=0.0625, device="cpu", checkpoint_every=0, threads=1,
            quiet=True)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 10) -> Path:
    """cifar-10-batches-py with 5 training batches, a test batch and batches.meta, as the official tarball."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": _images(rng, per_batch), b"filenames": [b"x.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    return root


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    """cifar-100-python with train, test and meta (fine and coarse labels), as the official tarball."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", n_train), ("test", n_test)):
        batch = {b"data": _images(rng, n), b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                 b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)], b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_idx(root: Path, n_train: int = 260, n_test: int = 60) -> Path:
    """Fashion-MNIST-format gzipped IDX files (28x28 uint8 images, 10 classes) in ``root/fashion-mnist``."""
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        images[np.arange(n), labels * 2, :] = 255  # a learnable class mark
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


def _check_runs(output: Path, names: list[str], seeds: list[int]) -> None:
    for name in names:
        for seed in seeds:
            run = output / "runs" / name / f"seed_{seed}"
            rows = read_metrics(run / METRICS_FILE)
            summary = read_summary(run / SUMMARY_FILE)
            assert rows and all(math.isfinite(r["test_acc"]) and math.isfinite(r["train_loss"]) for r in rows), run
            assert 0.0 <= summary["final"]["test_acc"] <= 1.0


# ---------------------------------------------------------------------------------------------- CIFAR presets
def test_cifar_presets_are_shipped():
    assert set(CIFAR_PRESETS) <= set(list_presets())


@pytest.mark.parametrize("preset", CIFAR_PRESETS)
def test_cifar_preset_trains_every_configuration(preset, tmp_path):
    spec = load_spec(preset)
    data = write_cifar100(tmp_path / "data") if "100" in preset else write_cifar10(tmp_path / "data")
    spec.seeds = [0]
    table = compare(spec, tmp_path / "out", {**TINY, "data_dir": str(data)}, quiet=True)
    names = [r["name"] for r in spec.runs]
    _check_runs(tmp_path / "out", names, [0])
    assert all(name in table for name in names)
    summary = read_summary(tmp_path / "out" / "runs" / names[0] / "seed_0" / SUMMARY_FILE)
    assert summary["data"]["num_classes"] == (100 if "100" in preset else 10)
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "convergence.png").is_file()


def _preset_config(preset: str, run: str) -> TrainConfig:
    spec = load_spec(preset)
    entry = next(r for r in spec.runs if r["name"] == run)
    return TrainConfig.from_dict({**spec.train, **{k: v for k, v in entry.items() if k != "name"}})


def test_cifar10_official_protocol():
    """spherenet.md §7: Adam 1e-3, / 10 at 34k and 54k, 64k steps of 128, smoothing 0.01, orth 1e-4, flip only."""
    cnn, sphere = _preset_config("cifar10-official", "cnn9"), _preset_config("cifar10-official", "spherenet9-cosine")
    for c in (cnn, sphere):
        assert (c.optimizer, c.lr, c.milestones, c.steps, c.batch_size) == ("adam", 1e-3, (34000, 54000), 64000, 128)
        assert (c.label_smoothing, c.augment, c.weight_decay, c.decay_sphere_weights) == (0.01, "flip", 5e-4, False)
    assert (cnn.orth, sphere.orth) == (0.0, 1e-4)


def test_cifar10plus_resnet32_protocol():
    """spherenet.md §6.3 / §7: widths 96/192/384, linear SphereConv, CIFAR-10+ augmentation, orth only on sphere."""
    base, sphere = (_preset_config("cifar10plus-resnet32", n) for n in ("resnet32", "sphere-resnet32-linear"))
    assert (base.augment, sphere.augment, base.orth, sphere.orth) == ("cifar10+", "cifar10+", 0.0, 1e-4)
    model = build_model(sphere, 10, 3)
    assert model.default_cfg["widths"] == (96, 192, 384) and model.default_cfg["operator"] == "linear"
    assert model.default_cfg["layers_per_stage"] == 5


def test_cifar100_mhe_recipe():
    """mhe_uniformity.md §1.3 / §1.7: CNN-9 64/128/256, plain momentum SGD 0.9, lr 0.1 x 0.1 at 20k/30k/37.5k."""
    config = _preset_config("cifar100-mhe", "half_mhe_2")
    assert (config.optimizer, config.lr, config.momentum, config.nesterov) == ("sgd", 0.1, 0.9, False)
    assert (config.milestones, config.steps, config.lr_gamma) == ((20000, 30000, 37500), 42500, 0.1)
    model = build_model(config, 100, 3, (32, 32))
    widths = [stage[0].conv.out_channels for stage in model.stages]
    assert widths == [64, 128, 256] and model.fc6.out_channels == 256
    optimizer = build_optimizer(config, model)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["nesterov"] is False
    reg = build_regularizer(config, model)
    assert (reg.method, reg.s, reg.half_space, reg.lambda_hidden, reg.lambda_output) == ("mhe_half", 2, True, 1, 10)
    assert len(reg.layers) == 11  # 9 convolutions + fc6 (hidden) + the score layer (output)
    spec = load_spec("cifar100-mhe")
    assert len(spec.runs) == 13 and "73.99" in spec.description  # the official best run is quoted as a target


# ---------------------------------------------------------------------------------------------- new config fields
def test_new_config_fields_reach_the_model():
    config = TrainConfig(model="spherenet9", operator="sigmoid", sigmoid_k=0.1, feature_dim=2, widths=(8, 8, 8),
                         head="gasoftmax", margin=2.0, head_operator="linear")
    model = build_model(config, 10, 1, (28, 28))
    cfg = model.default_cfg
    assert (cfg["sigmoid_k"], cfg["feature_dim"], cfg["widths"], cfg["head_operator"]) == (0.1, 2, (8, 8, 8),
                                                                                          "linear")
    assert model.fc6.out_channels == 2
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("changes, match", [
    (dict(sigmoid_k=0.0), "sigmoid_k"), (dict(sigmoid_k=-1.0), "sigmoid_k"), (dict(feature_dim=0), "feature_dim"),
    (dict(widths=(8, 0, 8)), "widths"), (dict(widths=()), "widths"), (dict(reg_s=-1.0), "reg_s"),
    (dict(head_operator="bogus", head="wsoftmax"), "head_operator"), (dict(head_operator="cosine"), "head_operator"),
])
def test_new_config_fields_reject_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)


def test_nesterov_default_and_plain_momentum():
    model = torch.nn.Linear(3, 2)
    assert build_optimizer(TrainConfig(optimizer="sgd"), model).param_groups[0]["nesterov"] is True
    assert build_optimizer(TrainConfig(optimizer="sgd", nesterov=False), model).param_groups[0]["nesterov"] is False


# ---------------------------------------------------------------------------------------------- experiments
def test_specs_are_sized_as_documented():
    """>= 3 seeds everywhere; E3 sees the same number of examples at every batch size; E4 covers N = 9..60."""
    specs = {e.name: run_all.load(e, quick=False) for e in run_all.EXPERIMENTS}
    assert all(len(s.seeds) >= 3 for s in specs.values())
    seen = {r["batch_size"] * r["steps"] for r in specs["e3_norm_batch"].runs}
    assert len(seen) == 1
    assert {r["batch_size"] for r in specs["e3_norm_batch"].runs} == {2, 4, 8, 16, 32, 128}
    assert {(r["norm"]) for r in specs["e3_norm_batch"].runs} == {"none", "bn", "spherenorm", "spherenorm+bn", "gn"}
    assert {r["batch_size"] for r in specs["e3_norm_batch"].runs if r["norm"] == "gn"} == {2, 8, 32}
    e4b = specs["e4b_gradient_flow"]
    assert {r["model"] for r in e4b.runs} == {f"{f}{n}" for f in ("cnn", "spherenet") for n in (9, 18, 30, 45, 60)}
    assert e4b.train["steps"] >= 1500 and e4b.train["batch_size"] == 128 and e4b.train["width_mult"] == 0.25
    assert {r["model"] for r in specs["e4_deep_plain"].runs} == {f"{f}{n}" for f in ("cnn", "spherenet")
                                                                for n in (9, 18, 30, 45, 60)}
    assert {r.get("sigmoid_k") for r in specs["e1_operators_heads"].runs} >= {0.1, 0.3, 0.7}
    for experiment in run_all.EXPERIMENTS:  # the header comment gives the exact command
        assert f"run_all.py --only {experiment.name}" in run_all.spec_path(experiment).read_text()


def test_run_all_quick_end_to_end(tmp_path, monkeypatch, capsys):
    """Every configuration of every spec trains a few steps; the report is regenerated; reruns skip finished runs."""
    monkeypatch.setattr(run_all, "QUICK_OVERRIDES", dict(steps=2, eval_every=2, limit_train=150, val_fraction=0.1,
                                                         limit_test=20, checkpoint_every=0))
    data = write_idx(tmp_path / "data")
    out, results = tmp_path / "out", tmp_path / "docs" / "results.md"
    argv = ["--quick", "--output", str(out), "--results", str(results), "--data-dir", str(data)]
    assert run_all.main(argv) == 0
    for experiment in run_all.EXPERIMENTS:
        spec = run_all.load(experiment, quick=True)
        _check_runs(out / experiment.name, [r["name"] for r in spec.runs], [0])
        assert (out / experiment.name / "report.md").is_file()
    text = results.read_text()
    assert "SMOKE TEST" in text and "not results" in text
    for title in ("E1", "E2", "E3", "E4", "E5", "E6", "E7"):
        assert f"## {title}" in text or f"### {title}" in text
    assert "Not complete" not in text
    for png in ("e1_e2_convergence.png", "e3_norm_batch.png", "e4_deep_plain.png", "e6_features.png"):
        assert (results.parent / "results" / png).stat().st_size > 0
    geometry = json.loads((out / "e6_feature_geometry" / feature_geometry.METRICS).read_text())
    assert set(geometry) == {"cnn9-2d", "sphere-cosine-2d"}

    # a human discussion survives regeneration; finished runs are skipped; a partial run is resumed
    results.write_text(text.replace(run_all_human_default(), "Claim X holds here."))
    summary = out / "e6_feature_geometry" / "runs" / "cnn9-2d" / "seed_0" / SUMMARY_FILE
    summary.unlink()
    capsys.readouterr()
    assert run_all.main(argv + ["--only", "e6_feature_geometry"]) == 0
    log = capsys.readouterr().out
    assert "1/2 runs finished earlier, 1 to train" in log
    assert summary.is_file() and "Claim X holds here." in results.read_text()


def run_all_human_default() -> str:
    import results as results_module

    return results_module.HUMAN_DEFAULT


def test_feature_geometry_measures():
    """Points on one ray per class: concentration 1; a class spread over all angles at one radius: CV 0."""
    labels = torch.arange(2).repeat_interleave(50)
    radii = torch.linspace(0.5, 5.0, 50, dtype=torch.float64)
    rays = torch.cat([radii[:, None] * torch.tensor([[1.0, 0.0]], dtype=torch.float64),
                      radii[:, None] * torch.tensor([[0.0, 1.0]], dtype=torch.float64)])
    streak = feature_geometry.geometry(rays, labels)
    assert streak["angular_concentration"] == pytest.approx(1.0) and streak["radial_cv"] > 0.4
    angles = torch.linspace(0, 2 * math.pi, 51, dtype=torch.float64)[:-1]
    ring = torch.stack([angles.cos(), angles.sin()], dim=1).repeat(2, 1)
    spread = feature_geometry.geometry(ring, labels)
    assert spread["angular_concentration"] == pytest.approx(0.0, abs=1e-12)
    assert spread["radial_cv"] == pytest.approx(0.0, abs=1e-12)


def _result(name: str, accs: list[float]):
    from torchsphere.train.report import ConfigResult

    return ConfigResult(name, [{"final": {"test_acc": a}} for a in accs], [[] for _ in accs])


def test_verdict_rule():
    """'higher'/'lower' only when the means differ by more than the sum of the stds, and never from one seed."""
    import results as results_module

    base = _result("base", [0.80, 0.81, 0.82])
    assert results_module.verdict(_result("a", [0.90, 0.91, 0.92]), base) == "higher"
    assert results_module.verdict(_result("b", [0.70, 0.71, 0.72]), base) == "lower"
    assert results_module.verdict(_result("c", [0.79, 0.82, 0.85]), base) == "within noise"
    assert results_module.verdict(_result("d", [0.99]), _result("e", [0.10])) == "one seed: no verdict"


def test_results_page_without_runs_says_so(tmp_path):
    import results as results_module

    results_module.write_results(tmp_path / "nothing", tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "The full grid has not been run yet" in text and run_all.COMMAND in text
    assert "SMOKE TEST" not in text and "| final test %" not in text


@pytest.mark.parametrize("partial", [True, False])
def test_after_step_on_a_partial_grid_only_when_marked(partial, tmp_path):
    """An experiment marked ``partial`` (E4b, whose page reports a partial grid) runs its ``after`` step before every
    run has finished; the others wait for the whole grid (and none writes a compare report early)."""
    calls: list[Path] = []
    experiment = run_all.Experiment("e4b_gradient_flow", "e4b_gradient_flow.yaml", after=calls.append,
                                    partial=partial)
    assert run_all.finish_experiment(experiment, tmp_path, quick=False) is False
    assert calls == ([tmp_path / "e4b_gradient_flow"] if partial else [])
    assert not (tmp_path / "e4b_gradient_flow" / "report.md").exists()
    assert [e.name for e in run_all.EXPERIMENTS if e.partial] == ["e4b_gradient_flow"]
