"""BatchNorm statistics: the official zero-started EMA, precise BN, statistics kept side by side, drift, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TOL
from torchsphere.cli import main
from torchsphere.models import create_model, list_models
from torchsphere.nn import OfficialBatchNorm2d
from torchsphere.train import TrainConfig, loop, read_metrics, train
from torchsphere.train.bn_stats import (MomentDrift, MomentHooks, ShadowStats, bn_layers, parse_stats_spec,
                                        precise_bn, precise_bn_batches, spec_name)

C = 3


def batches(n: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # moments drift over the batches, so an EMA that lags or starts wrong is visible
    return [(0.1 * torch.randn(4, C, 2, 3, generator=g, dtype=dtype) + 0.01 * i / n) * (1 + i / n) for i in range(n)]


def reference_official_ema(xs, decay: float = 0.999):
    """tf.train.ExponentialMovingAverage(decay) shadows of tf.nn.moments(x, [0, 1, 2]), zero-started, in float64."""
    mean_avg = [0.0] * C
    var_avg = [0.0] * C
    for x in xs:
        for c in range(C):
            values = [float(v) for v in x[:, c].reshape(-1)]
            m = sum(values) / len(values)
            v = sum((u - m) ** 2 for u in values) / len(values)  # biased
            mean_avg[c] = decay * mean_avg[c] + (1 - decay) * m
            var_avg[c] = decay * var_avg[c] + (1 - decay) * v
    return torch.tensor(mean_avg, dtype=torch.float64), torch.tensor(var_avg, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_official_bn_matches_explicit_ema_over_1000_updates(dtype):
    xs = batches(1000)
    bn = OfficialBatchNorm2d(C).to(dtype)
    assert bn.momentum == pytest.approx(0.001) and bn.eps == pytest.approx(1e-3)
    assert torch.equal(bn.running_var, torch.zeros(C, dtype=dtype)), "the official shadows start at zero"
    for x in xs:
        bn(x.to(dtype))
    mean_ref, var_ref = reference_official_ema(xs)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(bn.running_mean.double(), mean_ref, rtol=max(rtol, 1e-5), atol=atol)
    torch.testing.assert_close(bn.running_var.double(), var_ref, rtol=max(rtol, 1e-5), atol=atol)
    assert int(bn.num_batches_tracked) == 1000
    # inference: (x - mean_avg) / sqrt(var_avg + 1e-3) * gamma + beta
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    bn.eval()
    x = xs[0].to(dtype)
    expected = ((x.double() - mean_ref.view(1, C, 1, 1)) / torch.sqrt(var_ref.view(1, C, 1, 1) + 1e-3)
                * bn.weight.double().view(1, C, 1, 1) + bn.bias.double().view(1, C, 1, 1))
    torch.testing.assert_close(bn(x).double(), expected, rtol=max(rtol, 1e-5), atol=max(atol, 1e-6))


def test_official_bn_trains_exactly_like_torch_bn():
    torch.manual_seed(0)
    x = torch.randn(8, C, 4, 4, requires_grad=True)
    official, plain = OfficialBatchNorm2d(C), nn.BatchNorm2d(C, eps=1e-3)
    y1, y2 = official(x), plain(x)
    assert torch.equal(y1, y2), "the same kernel: statistics never change the training trajectory"
    g1, = torch.autograd.grad(y1.square().sum(), x)
    g2, = torch.autograd.grad(y2.square().sum(), x)
    assert torch.equal(g1, g2)


def test_official_bn_cumulative_average_and_state_dict_compatibility():
    xs = batches(7)
    bn = OfficialBatchNorm2d(C, momentum=None).double()
    for x in xs:
        bn(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    variances = torch.stack([x.var((0, 2, 3), unbiased=False) for x in xs])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-12, atol=1e-14)
    plain = nn.BatchNorm2d(C).double()
    plain.load_state_dict(bn.state_dict())  # the same buffer names
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\] or None; got 1.5"):
        OfficialBatchNorm2d(C, momentum=1.5)


def test_create_model_bn_stats_and_defaults():
    official = create_model("spherenet9", in_channels=1, input_size=28, width_mult=0.0625, bn_stats="official")
    layers = bn_layers(official)
    assert layers and all(type(m) is OfficialBatchNorm2d and m.momentum == pytest.approx(1e-3) for _, m in layers)
    with pytest.raises(ValueError, match=r"unknown bn_stats 'tf'; choose from \['torch', 'official'\]"):
        create_model("spherenet9", bn_stats="tf")


@pytest.mark.parametrize("name", list_models())
def test_no_registered_model_defaults_to_a_slow_bn_momentum(name):
    """The official momentum 0.001 with PyTorch's running_var = 1 start is the trap; no default may use it."""
    model = create_model(name, num_classes=10)
    for _, m in bn_layers(model):
        assert type(m) is nn.BatchNorm2d and m.momentum == pytest.approx(0.1), (name, m)


def test_default_running_statistics_follow_a_sphere_layer_within_a_few_dozen_batches():
    """A SphereConv output has a variance far below 1: with the default momentum the running variance reaches it
    after a few dozen training batches, while momentum 0.001 (the official value with PyTorch's semantics) stays
    near its initial 1."""
    torch.manual_seed(0)
    default = create_model("spherenet9", in_channels=1, input_size=16, width_mult=0.0625, num_classes=4)
    slow = create_model("spherenet9", in_channels=1, input_size=16, width_mult=0.0625, num_classes=4,
                        bn_momentum=0.001)
    slow.load_state_dict(default.state_dict())
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        for _ in range(50):
            default(x)
            slow(x)
        batch_var = default.stages[0][0].conv(x).var((0, 2, 3))
    torch.testing.assert_close(default.stages[0][0].norm.running_var, batch_var, rtol=0.05, atol=1e-6)
    assert (slow.stages[0][0].norm.running_var > 5 * batch_var).all()


@pytest.mark.parametrize("bn_stats", ["torch", "official"])
def test_precise_bn_is_the_equal_weight_average_of_batch_moments(bn_stats):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, C, 3), OfficialBatchNorm2d(C) if bn_stats == "official" else nn.BatchNorm2d(C),
                          nn.ReLU()).double()
    model.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    xs = [torch.randn(5, 1, 6, 6, dtype=torch.float64) * (i + 1) for i in range(6)]
    precise_bn(model, xs)
    with torch.no_grad():
        outs = [model[0](x) for x in xs]
    means = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    unbiased = bn_stats == "torch"  # each layer averages the moments it accumulates
    variances = torch.stack([o.var((0, 2, 3), unbiased=unbiased) for o in outs]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model[1].running_var, variances, rtol=1e-10, atol=1e-12)
    assert not model.training, "the mode is restored"
    assert model[1].momentum == (0.1 if bn_stats == "torch" else pytest.approx(0.001)), "momentum restored"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items()), "weights untouched"


def test_precise_bn_errors():
    with pytest.raises(ValueError, match="precise BN needs a model with BatchNorm layers; Sequential has none"):
        precise_bn(nn.Sequential(nn.Conv2d(1, 2, 3)), [torch.randn(2, 1, 4, 4)])
    with pytest.raises(ValueError, match="precise BN needs at least one batch; got none"):
        precise_bn(nn.Sequential(nn.BatchNorm2d(1)), [])
    with pytest.raises(ValueError, match="precise_bn must be a positive number of batches; got -3"):
        precise_bn_batches(torch.zeros(4, 1), -3, 2, seed=0)


def test_precise_bn_batches_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    first = precise_bn_batches(torch.arange(10.0).view(10, 1), 3, 4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    again = precise_bn_batches(torch.arange(10.0).view(10, 1), 3, 4, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and [len(b) for b in first] == [4, 4, 4]


def test_shadow_sets_equal_the_layers_they_imitate():
    """A shadow 'official' set equals OfficialBatchNorm2d's own statistics, a 'torch@0.1' set nn.BatchNorm2d's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, C, 3).double()

    def net(bn):
        return nn.Sequential(conv, bn).double()

    official, torch_bn, slow = net(OfficialBatchNorm2d(C)), net(nn.BatchNorm2d(C, eps=1e-3, momentum=0.1)), \
        net(nn.BatchNorm2d(C, momentum=0.001))
    shadow = ShadowStats(official, ["torch@0.1", "official", "torch@0.001"])
    hooks = MomentHooks(official, [shadow])
    assert list(shadow.sets) == ["torch_0.1", "official", "torch_0.001"]
    with torch.no_grad():
        for i in range(300):
            x = torch.randn(4, 1, 5, 5, dtype=torch.float64) * (1 + i / 100)
            official(x), torch_bn(x), slow(x)
    for name, layer in (("official", official[1]), ("torch_0.1", torch_bn[1]), ("torch_0.001", slow[1])):
        stats = shadow.sets[name][0]
        torch.testing.assert_close(stats["running_mean"], layer.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(stats["running_var"], layer.running_var, rtol=1e-10, atol=1e-12)
    own = official[1].running_var.clone()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    official.eval()
    with shadow.applied("torch_0.1"):
        torch.testing.assert_close(official(x), torch_bn.eval()(x), rtol=1e-10, atol=1e-12)
    assert torch.equal(official[1].running_var, own), "the model's own statistics are restored"
    hooks.remove()
    with pytest.raises(ValueError, match=r"unknown bn statistics set 'x'; kept: \["):
        with shadow.applied("x"):
            pass


def test_stats_specs():
    assert parse_stats_spec("official") == ("official", pytest.approx(0.001))
    assert parse_stats_spec("torch@0.05") == ("torch", 0.05) and spec_name("torch@0.05") == "torch_0.05"
    for bad, message in (("tf", "must be MODE or MODE@MOMENTUM"), ("torch@2", r"must be in \(0, 1\]; got 2.0")):
        with pytest.raises(ValueError, match=message):
            parse_stats_spec(bad)


def test_moment_drift_windows():
    bn = nn.Sequential(nn.BatchNorm2d(2))
    drift = MomentDrift(bn)
    hooks = MomentHooks(bn, [drift])
    x = torch.randn(16, 2, 3, 3)
    for _ in range(3):
        bn(x)
    first = drift.close_window(3)
    assert len(first) == 1 and first[0]["layer"] == "0" and first[0]["mean_rel_change"] != first[0]["mean_rel_change"]
    for _ in range(3):
        bn(2 * x)
    second = drift.close_window(6)[0]
    m1, m2 = x.mean((0, 2, 3)), (2 * x).mean((0, 2, 3))
    assert second["mean_rel_change"] == pytest.approx(float((m2 - m1).norm() / m1.norm()), rel=1e-5)
    v1, v2 = x.var((0, 2, 3), unbiased=False), (2 * x).var((0, 2, 3), unbiased=False)
    assert second["var_rel_change"] == pytest.approx(float((v2 - v1).norm() / v1.norm()), rel=1e-5)
    bn.eval()
    bn(x)  # eval-mode forwards are not training batches
    assert drift.close_window(7) == []
    bn.train()
    with hooks.paused():
        bn(x)
    assert drift.close_window(8) == [], "paused hooks feed nothing"
    with pytest.raises(ValueError, match="MomentDrift was built for another model's BatchNorm layers"):
        MomentHooks(nn.Sequential(nn.BatchNorm2d(2)), [drift])


def tiny(output, **kw) -> TrainConfig:
    base = dict(model="spherenet9", dataset="synthetic", width_mult=0.0625, steps=30, batch_size=32, eval_every=10,
                checkpoint_every=4, lr=0.01, threads=1, quiet=True, output=str(output), train_eval_size=64)
    return TrainConfig(**{**base, **kw})


BN_OPTIONS = [dict(bn_stats="official"), dict(precise_bn=3), dict(bn_shadow=("torch@0.1", "official"), bn_drift=5),
              dict(bn_stats="official", precise_bn=2, bn_shadow=("torch@0.001",), bn_drift=7)]


@pytest.mark.parametrize("options", BN_OPTIONS, ids=lambda o: ",".join(o))
def test_resume_identity_and_unchanged_trajectory_with_bn_options(tmp_path, monkeypatch, options):
    plain = train(tiny(tmp_path / "plain"))
    reference = train(tiny(tmp_path / "reference", **options))
    crashed = tiny(tmp_path / "crashed", **options)
    real_step, calls = loop.train_step, []

    def crash_at_step_23(run, x, y):
        calls.append(1)
        if len(calls) == 23:  # after the checkpoint of step 20, mid-epoch
            raise RuntimeError("simulated crash")
        return real_step(run, x, y)

    monkeypatch.setattr(loop, "train_step", crash_at_step_23)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashed)
    monkeypatch.undo()
    train(crashed.replace(resume=True))
    rows = {name: read_metrics(tmp_path / name / "metrics.csv") for name in ("plain", "reference", "crashed")}
    assert rows["reference"] == [{**r, "wall_time": rows["reference"][i]["wall_time"]}
                                 for i, r in enumerate(rows["crashed"])]
    # BN statistics never change the training trajectory: the same losses as the run without options
    assert [r["train_loss"] for r in rows["reference"]] == [r["train_loss"] for r in rows["plain"]]
    summary = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert summary["final"] == reference["final"] and summary["best"] == reference["best"]
    if options.get("bn_drift"):
        assert (tmp_path / "crashed" / "bn_drift.csv").read_text() == \
            (tmp_path / "reference" / "bn_drift.csv").read_text()
    columns = set(rows["reference"][0])
    assert "train_eval_acc" in columns
    assert ("test_acc_precise" in columns) == bool(options.get("precise_bn"))
    for spec in options.get("bn_shadow", ()):
        assert f"test_acc_{spec_name(spec)}" in columns
    if options.get("precise_bn"):
        assert "test_acc_running" in summary["final"]


def test_final_model_carries_precise_statistics(tmp_path):
    config = tiny(tmp_path / "run", precise_bn=3, steps=12, eval_every=6)
    train(config)
    from torchsphere.train import evaluate_run

    saved = evaluate_run(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["accuracy"] == pytest.approx(summary["final"]["test_acc"])
    again = evaluate_run(tmp_path / "run", precise_bn=3)  # the same batches (seeded), the same statistics
    assert again["precise_bn"] == 3 and 0.0 <= again["accuracy"] <= 1.0


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(bn_stats="tf"), ValueError, r"unknown bn_stats 'tf'; choose from \['torch', 'official'\]"),
    (dict(precise_bn=-1), ValueError, r"precise_bn must be an integer >= 0; got -1"),
    (dict(bn_drift=-5), ValueError, r"bn_drift must be an integer >= 0; got -5"),
    (dict(train_eval_size=1.5), ValueError, r"train_eval_size must be an integer >= 0; got 1.5"),
    (dict(norm="none", precise_bn=4), ValueError, r"precise_bn needs BatchNorm layers; got norm='none'"),
    (dict(norm="spherenorm", bn_shadow=("torch",)), ValueError, r"bn_shadow needs BatchNorm layers"),
    (dict(bn_shadow=("torch@0.1", "torch@0.1")), ValueError, r"bn_shadow specs must be distinct"),
    (dict(bn_shadow="official"), TypeError, r"bn_shadow must be a sequence of specs"),
])
def test_config_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**kwargs)


def test_cli_bn_flags_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "spherenet9", "--dataset", "synthetic", "--width-mult", "0.0625", "--steps", "6",
                 "--eval-every", "3", "--bn-stats", "official", "--precise-bn", "2", "--bn-shadow", "torch@0.1",
                 "--bn-drift", "3", "--threads", "1", "--quiet", "--output", str(out)]) == 0
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_eval_acc", "test_acc_precise", "test_acc_torch_0.1"} <= set(header)
    assert (out / "bn_drift.csv").is_file()
    for argv, message in ((["--bn-stats", "tf"], "invalid choice: 'tf'"),
                          (["--precise-bn", "-2"], "--precise-bn"),
                          (["--norm", "none", "--precise-bn", "2"], "precise_bn needs BatchNorm layers"),
                          (["--bn-shadow", "torch@7"], r"must be in \(0, 1\]")):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--dataset", "synthetic", "--steps", "2", "--output", str(tmp_path / "x"), *argv])
        assert exc.value.code == 2
        assert message.split("\\")[0] in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(out), "--precise-bn", "-1"])
    assert exc.value.code == 2
    assert main(["evaluate", str(out), "--precise-bn", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precise_bn"] == 2
