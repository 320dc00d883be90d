"""The margin options of a training run (detached margin, fixed scale, BN on fc6) and the E1b / E8b drivers.

E1b (experiments/e1b_margins.py) measures feature norms and angles from a run's final weights and recomputes its
accuracies with BatchNorm in eval and in training mode; E8b (experiments/e8b_learnable_k.py) reads the learned k of
every learnable SphereConv layer. Both are checked against hand-computed values and against the training loop's own
evaluation.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from torchsphere.cli import build_parser, train_config
from torchsphere.nn import AngularHead
from torchsphere.train import TrainConfig, train
from torchsphere.train.builders import build_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
import e1b_margins  # noqa: E402
import e8b_learnable_k  # noqa: E402

TINY = dict(dataset="synthetic", dataset_kwargs={"num_classes": 4, "image_size": 8, "train_size": 96,
                                                 "test_size": 40}, widths=(4, 4, 4), feature_dim=8, steps=3,
            batch_size=16, eval_every=3, val_fraction=0.1, train_eval_size=32, quiet=True, threads=1)


# ---------------------------------------------------------------------------------------------- config fields
def test_margin_options_reach_the_head_and_fc6():
    config = TrainConfig(model="spherenet9", head="gasoftmax", margin=4.0, detach_margin=True, head_scale=30.0,
                         fc_norm=True, widths=(4, 4, 4), feature_dim=8)
    model = build_model(config, 10, 1, (28, 28))
    head = model.get_classifier()
    assert isinstance(head, AngularHead)
    assert (head.margin, head.scale, head.detach_margin) == (4.0, 30.0, True)
    assert isinstance(model.fc6_norm, torch.nn.BatchNorm2d) and model.fc6_norm.num_features == 8
    plain = build_model(TrainConfig(model="spherenet9", widths=(4, 4, 4), feature_dim=8), 10, 1, (28, 28))
    assert isinstance(plain.fc6_norm, torch.nn.Identity)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_margin_options_from_the_command_line():
    parser = build_parser()
    args = parser.parse_args(["train", "--head", "gasoftmax", "--margin", "2", "--detach-margin", "--head-scale",
                              "16", "--fc-norm", "--output", "o"])
    config = train_config(args, args._parser)
    assert (config.detach_margin, config.head_scale, config.fc_norm) == (True, 16.0, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--head-scale", "0", "--output", "o"])


@pytest.mark.parametrize("changes, error, match", [
    (dict(head="wsoftmax", detach_margin=True), ValueError, "detach_margin needs head='gasoftmax'"),
    (dict(head="gasoftmax", margin=2.0, detach_margin=True, anneal_lambda=True), ValueError, "alternative"),
    (dict(head="softmax", head_scale=30.0), ValueError, "head_scale applies only"),
    (dict(head="wsoftmax", head_scale=0.0), ValueError, "head_scale must be a number > 0"),
    (dict(head="wsoftmax", head_scale=math.inf), ValueError, "head_scale must be a number > 0"),
    (dict(fc_norm=1), TypeError, "fc_norm must be a bool"),
    (dict(head="gasoftmax", margin=2.0, detach_margin="yes"), TypeError, "detach_margin must be a bool"),
])
def test_margin_options_reject_bad_values(changes, error, match):
    with pytest.raises(error, match=match):
        TrainConfig(**changes)


def test_fc_norm_on_a_resnet_names_the_option():
    with pytest.raises(TypeError, match="fc_norm"):
        build_model(TrainConfig(model="resnet18", fc_norm=True), 10, 3)


# ---------------------------------------------------------------------------------------------- E1b statistics
def test_angle_statistics_hand_computed():
    """2-D features at known angles to the class weights (1, 0) and (0, 1), at norms 2 and 4."""
    weight = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)  # norms of W must not matter
    deg = math.radians
    features = torch.tensor([[2 * math.cos(deg(10)), 2 * math.sin(deg(10))],     # class 0: 10 deg vs 80 deg
                             [4 * math.cos(deg(60)), 4 * math.sin(deg(60))]],    # class 1: 30 deg vs 60 deg
                            dtype=torch.float64)
    stats = e1b_margins.angle_statistics(features, weight, torch.tensor([0, 1]))
    assert stats["feature_norm"] == pytest.approx(3.0, abs=1e-12)
    assert stats["theta_target"] == pytest.approx((10 + 30) / 2, abs=1e-9)
    assert stats["theta_other"] == pytest.approx((80 + 60) / 2, abs=1e-9)
    assert stats["theta_gap"] == pytest.approx((70 + 30) / 2, abs=1e-9)
    wrong = e1b_margins.angle_statistics(features, weight, torch.tensor([1, 0]))  # misassigned: negative gaps
    assert wrong["theta_gap"] == pytest.approx(-50.0, abs=1e-9)


def test_class_weight_angles_hand_computed():
    """Weights at 0, 90 and 180 degrees in the plane (any norms): pairwise 90, 180, 90."""
    weight = torch.tensor([[2.0, 0.0], [0.0, 0.1], [-7.0, 0.0]], dtype=torch.float64)
    stats = e1b_margins.class_weight_angles(weight)
    assert stats == pytest.approx({"weight_angle_min": 90.0, "weight_angle_median": 90.0}, abs=1e-6)
    cone = torch.tensor([[1.0, 0.0], [math.cos(0.1), math.sin(0.1)], [math.cos(0.3), math.sin(0.3)]])
    stats = e1b_margins.class_weight_angles(cone)
    assert stats["weight_angle_min"] == pytest.approx(math.degrees(0.1), abs=1e-4)
    assert stats["weight_angle_median"] == pytest.approx(math.degrees(0.2), abs=1e-4)


def test_angle_statistics_survive_zero_features_and_exact_alignment():
    weight = torch.eye(3, dtype=torch.float64)
    features = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    stats = e1b_margins.angle_statistics(features, weight, torch.tensor([0, 0]))
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["theta_target"] == pytest.approx((90 + 0) / 2, abs=1e-6)  # a zero feature is at 90 deg to all


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_run_statistics_match_the_loops_evaluation(tmp_path, norm):
    """Eval-mode test accuracy equals the loop's final test accuracy; without BN, training mode changes nothing."""
    config = TrainConfig(model="spherenet9", head="gasoftmax", margin=2.0, anneal_lambda=True, norm=norm,
                         output=str(tmp_path / "run"), **TINY)
    train(config)
    stats = e1b_margins.run_statistics(tmp_path / "run")
    assert stats["test_eval"] == pytest.approx(stats["final_test"], abs=1e-12)
    if norm == "none":
        assert (stats["test_train"], stats["train_train"]) == (stats["test_eval"], stats["train_eval"])
    assert 0.0 <= stats["theta_target"] <= 180.0 and stats["feature_norm"] <= math.sqrt(8) + 1e-6  # bounded fc6


def test_e1b_verdict_rule():
    assert e1b_margins.verdict([0.9, 0.91, 0.92], [0.80, 0.81, 0.82]) == "higher"
    assert e1b_margins.verdict([0.80, 0.81, 0.82], [0.9, 0.91, 0.92]) == "lower"
    assert e1b_margins.verdict([0.80, 0.85, 0.90], [0.82, 0.83, 0.84]) == "within noise"
    assert "no verdict" in e1b_margins.verdict([0.9, 0.91], [0.8, 0.81, 0.82])


# ---------------------------------------------------------------------------------------------- E8b learned k
def test_learned_k_reads_every_learnable_layer(tmp_path):
    config = TrainConfig(model="spherenet9", operator="learnable_sigmoid", output=str(tmp_path / "run"), **TINY)
    train(config)
    layers = e8b_learnable_k.learned_k(tmp_path / "run")
    assert len(layers) == 10  # 9 convolutions + fc6
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name, k in layers:
        torch.testing.assert_close(k, weights[f"{name}.sigmoid_k_raw"].double().abs() + 0.05, rtol=0, atol=1e-7)
    assert layers[-1][0] == "fc6" and layers[-1][1].numel() == 8


def test_e8b_verdict_rule_lower_loss_is_better():
    assert e8b_learnable_k.verdict([0.30, 0.31, 0.32], [0.40, 0.41, 0.42], lower_is_better=True) == "better"
    assert e8b_learnable_k.verdict([0.30, 0.31, 0.32], [0.40, 0.41, 0.42]) == "worse"
    assert e8b_learnable_k.verdict([0.30, 0.35, 0.40], [0.33, 0.34, 0.35]) == "within noise"


def test_e1b_page_states_seeds_verdicts_and_what_is_missing():
    def seeds(acc: float, spread: float) -> dict[str, dict[str, float]]:
        keys = dict.fromkeys(e1b_margins.STAT_KEYS, 0.5) | {"best_test": 0.5}
        return {str(i): keys | {"test_eval": acc + spread * (i - 1)} for i in range(3)}

    stats = {"sphere-softmax": seeds(0.89, 0.002), "sphere-ga4-anneal": seeds(0.85, 0.002),
             "cnn9-softmax": seeds(0.89, 0.01), "cnn9-ga4-anneal": seeds(0.888, 0.01)}
    text = "\n".join(e1b_margins.page(stats, "e1b_margins.png"))
    assert "4/14 configurations" in text and "seeds per configuration: 3" in text
    assert "- sphere-ga4-anneal: -4.00 points vs sphere-softmax (lower)." in text
    assert "- cnn9-ga4-anneal: -0.20 points vs cnn9-softmax (within noise)." in text
    assert "Not yet run to 3 seeds: sphere-ga4-anneal-fcbn" in text
