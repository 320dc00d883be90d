"""The training loop (torchsphere.train.loop / builders): loss, evaluation, data order, selection, schedules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import assert_close
from torchsphere.nn.sphere_conv import SPHERE_LAYERS
from torchsphere.train import TrainConfig, evaluate, read_metrics, read_summary, train
from torchsphere.train.builders import (build_optimizer, epoch_permutation, floored_cross_entropy, mix_seed,
                                        resolved_milestones, steps_per_epoch)
from torchsphere.train.checkpoint import load_weights
from torchsphere.train.inference import load_run


def tiny(tmp_path, **kw) -> TrainConfig:
    """A run of a few seconds: SphereNet-9 at 1/16 width on the 8x8 synthetic set."""
    base = dict(model="spherenet9", dataset="synthetic", width_mult=0.0625, bn_momentum=0.1, steps=24,
                batch_size=32, eval_every=8, lr=0.01, lr_schedule="constant", threads=1, quiet=True,
                output=str(tmp_path / "run"))
    return TrainConfig(**{**base, **kw})


def naive_floored_ce(logits: torch.Tensor, y: torch.Tensor, eps: float, floor: float) -> torch.Tensor:
    logits = logits.double()
    total = 0.0
    k = logits.shape[1]
    for i in range(logits.shape[0]):
        p = torch.exp(logits[i]) / torch.exp(logits[i]).sum()
        for j in range(k):
            target = (1 - eps) * (j == y[i]) + eps / k
            total -= target * math.log(float(p[j]) + floor)
    return torch.tensor(float(total) / logits.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.2])
def test_floored_cross_entropy_matches_float64_reference(eps):
    logits = torch.randn(7, 5, dtype=torch.float64) * 4
    y = torch.randint(0, 5, (7,))
    got = floored_cross_entropy(logits, y, eps, floor=1e-4).double()
    assert_close(got, naive_floored_ce(logits, y, eps, 1e-4), dtype=torch.float32)


def test_floored_loss_without_floor_equals_cross_entropy():
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    got = floored_cross_entropy(logits, y, 0.01, floor=0.0)
    assert_close(got, nn.functional.cross_entropy(logits, y, label_smoothing=0.01))


def test_floor_caps_the_loss():
    logits = torch.tensor([[100.0, -100.0]])  # target class 1 has probability ~0
    assert float(floored_cross_entropy(logits, torch.tensor([1]))) == pytest.approx(-math.log(1e-4), rel=1e-3)


def test_evaluate_counts_and_restores_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    x, y = torch.randn(11, 2, 2), torch.randint(0, 3, (11,))
    acc, loss = evaluate(model, x, y, batch_size=4)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert acc == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert all(math.isnan(v) for v in evaluate(model, x[:0], y[:0]))


def test_data_order_is_a_function_of_seed_and_epoch():
    a, b = epoch_permutation(100, 3, 0), epoch_permutation(100, 3, 0)
    assert torch.equal(a, b)
    assert sorted(a.tolist()) == list(range(100))
    assert not torch.equal(a, epoch_permutation(100, 3, 1))
    assert not torch.equal(a, epoch_permutation(100, 4, 0))
    assert mix_seed(1, 2) != mix_seed(2, 1)


def test_steps_per_epoch_drops_the_partial_batch():
    assert steps_per_epoch(100, 32) == 3
    with pytest.raises(ValueError, match="batch_size 64 exceeds the 10 training samples"):
        steps_per_epoch(10, 64)


def test_official_milestones_are_fractions_of_the_budget():
    assert resolved_milestones(TrainConfig(), 64_000) == [34_000, 54_000]
    assert resolved_milestones(TrainConfig(milestones=(5, 9)), 64_000) == [5, 9]


def test_optimizer_follows_the_official_no_decay_recipe(tmp_path):
    from torchsphere.models import create_model

    model = create_model("spherenet9", width_mult=0.0625, in_channels=1, num_classes=4, input_size=(8, 8))
    optimizer = build_optimizer(TrainConfig(weight_decay=5e-4), model)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    sphere = [m.weight for m in model.modules() if isinstance(m, SPHERE_LAYERS)]
    assert sphere and all(id(w) not in decayed for w in sphere)
    assert id(model.fc.weight) in decayed


def test_train_learns_selects_on_validation_and_writes_the_run(tmp_path):
    summary = train(tiny(tmp_path))
    out = tmp_path / "run"
    for name in ("config.yaml", "data.json", "metrics.csv", "summary.json", "model.safetensors", "best.safetensors",
                 "checkpoint.pt"):
        assert (out / name).is_file(), name
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == [8, 16, 24]
    assert list(rows[0]) == ["step", "epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc", "wall_time",
                            "train_eval_acc"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # selection on validation only: the best step is the first argmax of val_acc, whatever test_acc says
    best_row = max(rows, key=lambda r: (r["val_acc"], -r["step"]))
    assert summary["best"]["step"] == best_row["step"]
    assert summary["best"]["val_acc"] == pytest.approx(best_row["val_acc"])
    assert read_summary(out / "summary.json")["final"]["test_acc"] == pytest.approx(summary["final"]["test_acc"])
    assert summary["final"]["test_acc"] == pytest.approx(rows[-1]["test_acc"])
    # the best weights reproduce the reported best test accuracy
    run = load_run(out, "best")
    from torchsphere.train.builders import build_data

    data = build_data(run.config)
    assert evaluate(run.model, data.test_x, data.test_y)[0] == pytest.approx(summary["best"]["test_acc"])
    assert summary["epochs"] == pytest.approx(24 / steps_per_epoch(data.train_y.numel(), 32), abs=1e-3)


def test_existing_run_is_not_overwritten(tmp_path):
    train(tiny(tmp_path, steps=8))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(tiny(tmp_path, steps=8))


def test_regularizers_and_official_loss_run(tmp_path):
    summary = train(tiny(tmp_path, steps=8, orth=1e-4, official_loss=True, label_smoothing=0.01))
    assert math.isfinite(summary["final"]["test_loss"])


def test_mhe_regularizer_is_added(tmp_path):
    pytest.importorskip("torchsphere.regularizers", reason="torchsphere.regularizers not available")
    summary = train(tiny(tmp_path, steps=8, regularizer="mhe", reg_lambda_hidden=1e-3, reg_lambda_output=1e-3))
    assert math.isfinite(summary["final"]["test_loss"])


def test_gasoftmax_lambda_schedule_is_stepped_explicitly(tmp_path):
    from torchsphere.nn import AngularHead, LambdaSchedule

    train(tiny(tmp_path, steps=8, head="gasoftmax", margin=2.0, anneal_lambda=True))
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["lambda_schedule"]["iteration"] == 8
    run = load_run(tmp_path / "run")
    head = [m for m in run.model.modules() if isinstance(m, AngularHead)]
    assert head and head[0].margin == 2.0
    assert LambdaSchedule()(8) < LambdaSchedule()(0)


def test_epochs_budget(tmp_path):
    summary = train(tiny(tmp_path, steps=None, epochs=1, eval_every=100))
    assert summary["epochs"] == 1.0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.csv")] == [summary["steps"]]


def test_weights_roundtrip_through_safetensors(tmp_path):
    train(tiny(tmp_path, steps=8))
    run = load_run(tmp_path / "run")
    fresh = load_run(tmp_path / "run").model
    load_weights(fresh, tmp_path / "run" / "model.safetensors")
    for a, b in zip(run.model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(lr=-1.0), "lr must be > 0; got -1.0"),
    (dict(head="arcsoftmax"), "unknown head 'arcsoftmax'"),
    (dict(operator="tanh"), "unknown operator 'tanh'"),
    (dict(val_fraction=1.0), r"val_fraction must be in \[0, 1\); got 1.0"),
    (dict(margin=0.5), "margin must be >= 1"),
    (dict(milestones=(9, 5)), "milestones must be increasing"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(anneal_lambda=True), "anneal_lambda needs head='gasoftmax'"),
    (dict(bn_momentum=2.0), r"bn_momentum must be in \(0, 1\]"),
])
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_config_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(TypeError, match=r"unknown TrainConfig keys \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(TypeError, match="head must be a str"):
        TrainConfig(head=3)


def test_amp_bfloat16_on_cpu_runs(tmp_path):
    summary = train(tiny(tmp_path, steps=4, eval_every=4, amp=True))
    assert math.isfinite(summary["final"]["test_loss"]) and summary["steps"] == 4


@pytest.mark.parametrize("method", ["mhe", "mhe_half", "mhs", "orthonormal"])
def test_regularizer_coefficients_default_to_the_methods_official_values(method):
    from torchsphere.models import create_model
    from torchsphere.regularizers.model import default_lambdas
    from torchsphere.train.builders import build_regularizer

    model = create_model("cnn9", width_mult=1 / 32, in_channels=1, num_classes=10)
    reg = build_regularizer(TrainConfig(regularizer=method), model)
    assert (reg.lambda_hidden, reg.lambda_output) == default_lambdas(method)
    reg = build_regularizer(TrainConfig(regularizer=method, reg_lambda_hidden=0.5, reg_lambda_output=2.0), model)
    assert (reg.lambda_hidden, reg.lambda_output) == (0.5, 2.0)


def test_config_without_regularizer_drops_its_coefficients(tmp_path):
    """Runs saved before the coefficients defaulted to None (1.0 then) still resume and compare equal."""
    old = TrainConfig(reg_lambda_hidden=1.0, reg_lambda_output=1.0)
    assert old.to_dict() == TrainConfig().to_dict()
    kept = TrainConfig(regularizer="mhe", reg_lambda_hidden=1.0)
    assert kept.reg_lambda_hidden == 1.0
