"""torchsphere.analysis.gradient_flow, torchsphere.train.gradflow, ``torchsphere gradflow`` and ``norm="gn"``.

The norms are checked against a 2-layer net whose gradients are written out by hand in float64; the monitor must
leave training bit-identical and remove its hooks on exit, also on an exception.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TOL
from torchsphere.analysis.gradient_flow import (COLUMNS, GradientFlow, activation_rms, read_csv, relative_update,
                                                rows_to_csv, tracked_layers, write_csv)
from torchsphere.cli import main
from torchsphere.models import create_model
from torchsphere.models.factory import GN_GROUPS, LayerConfig, group_norm
from torchsphere.nn import SphereConv2d
from torchsphere.train.config import TrainConfig
from torchsphere.train.gradflow import GRAD_FLOW_FILE, measure_gradient_flow
from torchsphere.train.metrics import METRICS_FILE, read_metrics

RTOL, ATOL = TOL[torch.float64]
ROOT = Path(__file__).resolve().parents[1]


class TwoLayer(nn.Module):
    """x -> fc1 (no bias) -> ReLU -> fc2 (no bias), float64."""

    def __init__(self, d_in: int = 5, d_hidden: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden, bias=False, dtype=torch.float64)
        self.fc2 = nn.Linear(d_hidden, d_out, bias=False, dtype=torch.float64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _loss(out):  # L = sum(out^2) / (2N)
    return out.square().sum() / (2 * out.shape[0])


def _hand(model: TwoLayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward of TwoLayer under _loss, written out: dL/dout = out / N, dW2 = g^T a, ..."""
    w1, w2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    h = x @ w1.T  # (N, H)
    a = h.clamp_min(0)
    out = a @ w2.T  # (N, O)
    g_out = out / x.shape[0]
    g_w2 = g_out.T @ a
    g_h = (g_out @ w2) * (h > 0)
    g_w1 = g_h.T @ x
    rms = lambda t: torch.sqrt((t ** 2).mean(dim=1)).mean()  # noqa: E731  per-example RMS, batch mean
    return dict(h=h, out=out, g_w1=g_w1, g_w2=g_w2, rms_h=rms(h), rms_out=rms(out))


def _row(rows, step, name):
    (row,) = [r for r in rows if r["step"] == step and r["name"] == name]
    return row


def test_hand_computed_norms_and_sgd_update_ratio():
    torch.manual_seed(0)
    model, x = TwoLayer(), torch.randn(6, 5, dtype=torch.float64)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    expected = _hand(model, x)
    w1, w2 = model.fc1.weight.detach().clone(), model.fc2.weight.detach().clone()
    with GradientFlow(model, opt) as flow:
        opt.zero_grad()
        _loss(model(x)).backward()
        torch.testing.assert_close(model.fc1.weight.grad, expected["g_w1"], rtol=RTOL, atol=ATOL)  # the hand algebra
        opt.step()
    r1, r2 = _row(flow.rows, 0, "fc1"), _row(flow.rows, 0, "fc2")
    assert (r1["index"], r2["index"]) == (0, 1) and r1["kind"] == "Linear" and r1["numel"] == 20
    for row, grad, weight, act in ((r1, expected["g_w1"], w1, expected["rms_h"]),
                                   (r2, expected["g_w2"], w2, expected["rms_out"])):
        assert row["grad_norm"] == pytest.approx(float(grad.norm()), rel=RTOL, abs=ATOL)
        assert row["weight_norm"] == pytest.approx(float(weight.norm()), rel=RTOL, abs=ATOL)
        assert row["act_rms"] == pytest.approx(float(act), rel=RTOL, abs=ATOL)
        # plain SGD: w_1 - w_0 = -lr * g, so the effective lr is lr * ||g|| / ||w_0||
        assert row["update_ratio"] == pytest.approx(lr * float(grad.norm()) / float(weight.norm()), rel=1e-9)
    assert set(flow.rows[0]) == set(COLUMNS)


def test_adam_first_step_update_ratio():
    """Adam's first step moves each coordinate by lr * g / (|g| + eps): ||dw|| = lr * sqrt(sum (g / (|g|+eps))^2)."""
    torch.manual_seed(1)
    model, x = TwoLayer(), torch.randn(8, 5, dtype=torch.float64)
    lr, eps = 1e-3, 1e-8
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)
    grads = _hand(model, x)
    w2 = model.fc2.weight.detach().clone()
    with GradientFlow(model, opt) as flow:
        _loss(model(x)).backward()
        opt.step()
    g = grads["g_w2"]
    expected = lr * float((g / (g.abs() + eps)).norm()) / float(w2.norm())
    assert _row(flow.rows, 0, "fc2")["update_ratio"] == pytest.approx(expected, rel=1e-6)


def test_functional_core():
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, -1.0]])  # per-example RMS: sqrt(12.5), 0, 1
    assert activation_rms(y) == pytest.approx((math.sqrt(12.5) + 0 + 1) / 3, rel=1e-12)
    assert activation_rms(torch.ones(2, 3, 4, 4) * 2) == pytest.approx(2.0)
    before, after = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])
    assert relative_update(before, after) == pytest.approx(0.1)
    assert math.isnan(relative_update(torch.zeros(2), torch.ones(2)))
    with pytest.raises(ValueError, match=r"one shape; got \(2,\) and \(3,\)"):
        relative_update(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="batched output"):
        activation_rms(torch.tensor(1.0))


def test_forward_order_not_definition_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 2, bias=False)   # defined first, called second
            self.early = nn.Conv2d(1, 4, 3, bias=False)

        def forward(self, x):
            return self.late(self.early(x).mean(dim=(2, 3)))

    model = Reversed()
    assert [n for n, _ in tracked_layers(model)] == ["late", "early"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientFlow(model, opt) as flow:
        model(torch.randn(2, 1, 5, 5)).sum().backward()
        opt.step()
    assert [(r["index"], r["name"]) for r in flow.rows] == [(0, "early"), (1, "late")]


def test_sphere_layers_are_tracked_in_a_spherenet():
    model = create_model("spherenet9", width_mult=1 / 16, in_channels=1, input_size=28)
    kinds = [type(m).__name__ for _, m in tracked_layers(model)]
    assert kinds.count("SphereConv2d") == 10 and kinds[-1] == "Linear"  # 9 convs + fc6, then the classifier


def _hook_counts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    forward = sum(len(m._forward_hooks) for m in model.modules())
    return forward, len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)


def test_hooks_removed_on_exit_and_on_exception():
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientFlow(model, opt) as flow:
        assert _hook_counts(model, opt) == (2, 1, 1) and flow.attached
    assert _hook_counts(model, opt) == (0, 0, 0) and not flow.attached
    with pytest.raises(RuntimeError, match="boom"):
        with GradientFlow(model, opt):
            model(torch.randn(2, 5, dtype=torch.float64))
            raise RuntimeError("boom")
    assert _hook_counts(model, opt) == (0, 0, 0)
    model(torch.randn(2, 5, dtype=torch.float64)).sum().backward()
    opt.step()  # runs without any monitor left behind


def _train(model, opt, batches, flow_every=None):
    losses = []
    flow = GradientFlow(model, opt, every=flow_every) if flow_every else None
    if flow:
        flow.attach()
    try:
        for x, y in batches:
            loss = nn.functional.cross_entropy(model(x, y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            with torch.no_grad():  # an evaluation pass inside a recorded step is not recorded
                model.eval()
                model(x)
                model.train()
    finally:
        if flow:
            flow.remove()
    return losses, flow


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_training_is_bit_identical_with_the_monitor(norm):
    def build():
        torch.manual_seed(0)
        model = create_model("spherenet9", width_mult=1 / 16, in_channels=1, input_size=12, norm=norm,
                             feature_dim=8)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)

    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 1, 12, 12, generator=gen), torch.randint(0, 10, (4,), generator=gen))
               for _ in range(5)]
    (m0, o0), (m1, o1) = build(), build()
    plain, _ = _train(m0, o0, batches)
    watched, flow = _train(m1, o1, batches, flow_every=2)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched))
    for (k, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b), k
    assert sorted({r["step"] for r in flow.rows}) == [0, 2, 4]
    first = [r for r in flow.rows if r["step"] == 0]
    assert [r["index"] for r in first] == list(range(len(first)))
    assert all(math.isfinite(r["act_rms"]) and r["grad_norm"] > 0 and r["update_ratio"] > 0 for r in first)


def test_capture_without_optimizer_and_argument_errors():
    model, x = TwoLayer(), torch.randn(3, 5, dtype=torch.float64)
    with GradientFlow(model) as flow:
        _loss(model(x)).backward()
        flow.capture()
    assert flow.step == 1 and len(flow.rows) == 2 and all(math.isnan(r["update_ratio"]) for r in flow.rows)
    assert _row(flow.rows, 0, "fc1")["grad_norm"] == pytest.approx(float(_hand(model, x)["g_w1"].norm()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="without an optimizer"):
        GradientFlow(model, opt).capture()
    with pytest.raises(ValueError, match="every must be an integer >= 1; got 0"):
        GradientFlow(model, opt, every=0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None; got str"):
        GradientFlow(model, "adam")
    with pytest.raises(ValueError, match="ReLU has no conv / linear / sphere layer"):
        GradientFlow(nn.ReLU())
    with pytest.raises(TypeError, match="model must be an nn.Module; got int"):
        tracked_layers(3)


def test_csv_round_trip_is_exact(tmp_path):
    torch.manual_seed(2)
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientFlow(model, opt) as flow:
        for step in range(2):
            loss = _loss(model(torch.randn(4, 5, dtype=torch.float64)))
            loss.backward()
            opt.step()
            flow.set_loss(step, float(loss.detach()))
    path = write_csv(flow.rows, tmp_path / "sub" / "grad_flow.csv")
    assert read_csv(path) == flow.rows
    assert rows_to_csv(flow.rows).splitlines()[0] == ",".join(COLUMNS)
    (tmp_path / "bad.csv").write_text("step,index\n0,0\n")
    with pytest.raises(ValueError, match="not a gradient-flow file"):
        read_csv(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="no gradient-flow file"):
        read_csv(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------- the runner, the CLI
TINY = dict(model="spherenet9", dataset="synthetic", width_mult=1 / 16, batch_size=8, threads=1, quiet=True,
            eval_every=1)


def test_measurement_reproduces_the_training_run(tmp_path):
    """The measured steps are the training run's first steps: same losses as `train` logs at eval_every=1."""
    from torchsphere.train import train

    config = TrainConfig(**TINY, steps=4, output=str(tmp_path / "train"))
    train(config)
    logged = [r["train_loss"] for r in read_metrics(tmp_path / "train" / METRICS_FILE)]
    result = measure_gradient_flow(config.replace(output=str(tmp_path / "flow")), 3, every=1)
    assert result["losses"] == pytest.approx(logged[:3], rel=1e-12, abs=0)
    rows = read_csv(tmp_path / "flow" / GRAD_FLOW_FILE)
    assert sorted({r["step"] for r in rows}) == [0, 1, 2]
    assert [r["loss"] for r in rows if r["index"] == 0] == pytest.approx(result["losses"], rel=0, abs=0)
    with pytest.raises(ValueError, match=r"steps \(9\) must not exceed the run's budget of 4 steps"):
        measure_gradient_flow(config.replace(output=str(tmp_path / "long")), 9)
    with pytest.raises(ValueError, match="every must be an integer >= 1; got 0"):
        measure_gradient_flow(config, 2, every=0)


def test_cli_gradflow(tmp_path, capsys):
    out = tmp_path / "gf"
    argv = ["gradflow", "--model", "cnn9", "--dataset", "synthetic", "--width-mult", "0.0625", "--batch-size", "8",
            "--threads", "1", "--measure-steps", "4", "--every", "2", "--output", str(out)]
    assert main(argv) == 0
    rows = read_csv(out / GRAD_FLOW_FILE)
    assert sorted({r["step"] for r in rows}) == [0, 2] and (out / "config.yaml").is_file()
    assert "grad_flow.csv" in capsys.readouterr().out
    for extra, message in ((["--steps", "2"], "must not exceed the run's budget of 2 steps"),
                           (["--every", "0"], "argument --every: must be > 0"),
                           (["--resume"], "--resume does not apply")):
        with pytest.raises(SystemExit) as info:
            main(argv[:-1] + [str(tmp_path / "x")] + extra)
        assert info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- GroupNorm
def test_groupnorm_choice():
    model = create_model("spherenet9", norm="gn", width_mult=1 / 8, in_channels=1, input_size=28)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 9 and all(m.num_groups == GN_GROUPS == 8 for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    assert all(isinstance(m, SphereConv2d) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.default_cfg["norm"] == "gn"
    x = torch.randn(2, 1, 28, 28)
    model(x, torch.tensor([1, 2])).sum().backward()  # batch-independent: one example alone gives the same output
    model.eval()
    torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="a layer has 12 channels, which 8 does not divide"):
        create_model("cnn9", norm="gn", width_mult=1 / 16)
    with pytest.raises(ValueError, match=r"unknown norm 'groupnorm'; choose from \[.*'gn'"):
        LayerConfig(norm="groupnorm")
    assert isinstance(group_norm(16), nn.GroupNorm)
    with pytest.raises(ValueError, match="precise_bn needs BatchNorm layers; got norm='gn'"):
        TrainConfig(norm="gn", precise_bn=5, steps=1)


# ---------------------------------------------------------------------------------------------- the E4b driver
def test_e4b_driver_smoke(tmp_path):
    """Diagnostic + two training runs + the page on tiny settings; a rerun reuses everything."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import e4b_gradient_flow as e4b

    page = tmp_path / "docs" / "e4b.md"
    argv = ["--output", str(tmp_path / "out"), "--page", str(page), "--diag-steps", "3", "--diag-only",
            "cnn9-none,spherenet9-none", "--train", "cnn9-none,spherenet9-none", "--seeds", "0",
            "--long", "cnn9-none,spherenet9-none", "--long-steps", "4", "--long-every", "2",
            *[a for kv in ("dataset=synthetic", "width_mult=0.03125", "batch_size=8", "steps=4", "eval_every=2",
                           "limit_train=null") for a in ("--set", kv)]]
    assert e4b.main(argv) == 0
    text = page.read_text()
    assert "| cnn9-none " in text and "spherenet9-none vs cnn9-none" in text and "What remains to run" in text
    assert (page.parent / "e4b_gradient_flow.png").stat().st_size > 0
    assert (page.parent / "e4b_effective_lr.png").stat().st_size > 0
    assert "train loss @ 2 (train mode)" in text and "train acc % (eval mode)" in text
    assert (page.parent / "e4b_training.png").stat().st_size > 0
    assert "### (a2) Over the first 4 steps" in text and "| spherenet9-none " in text.split("(a2)")[1]
    assert "first / last @ 2" in text and (page.parent / "e4b_long.png").stat().st_size > 0
    page.write_text(text.replace("(discussion to be written from the numbers above)", "Kept."))
    logs: list[str] = []
    assert e4b.run_diagnostic(tmp_path / "out", 2, 1, {"dataset": "synthetic", "width_mult": 0.03125,
                                                        "batch_size": 8, "steps": 4, "eval_every": 2,
                                                        "limit_train": None},
                              ["cnn9-none"], log=lambda *a, **k: logs.append(a[0])) == 0  # 3 steps contain 2
    diag = e4b.load_diagnostic(tmp_path / "out", 2)
    assert sorted({r["step"] for r in diag["cnn9-none"]["rows"]}) == [0, 1]
    assert diag["cnn9-none"]["info"]["measured_steps"] == 3 and not logs
    assert e4b.main(argv) == 0 and "Kept." in page.read_text()


def test_e4b_cpu_log_keeps_every_writer(tmp_path):
    """Writers that update the CPU log at the same time lose no entry and no addition (a file lock, a fresh read)."""
    import json
    import threading
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "experiments"))
    import e4b_gradient_flow as e4b

    (tmp_path / e4b.NAME).mkdir()
    runs = tmp_path / e4b.NAME / "runs"

    def writer(i: int) -> None:
        for j in range(20):
            e4b.add_cpu_time(tmp_path, SimpleNamespace(output=str(runs / f"w{i}" / f"seed_{j}")), 1.5)
            e4b.add_cpu_time(tmp_path, SimpleNamespace(output=str(runs / "shared" / "seed_0")), 0.5)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log = json.loads((tmp_path / e4b.NAME / e4b.CPU_FILE).read_text())
    assert len(log) == 4 * 20 + 1
    assert log["runs/shared/seed_0"] == 4 * 20 * 0.5
    assert all(log[f"runs/w{i}/seed_{j}"] == 1.5 for i in range(4) for j in range(20))


def test_e4b_early_step_and_noise_rule():
    sys.path.insert(0, str(ROOT / "experiments"))
    import e4b_gradient_flow as e4b

    assert e4b.early_step(1500, 250) == 500 and e4b.early_step(4, 2) == 2 and e4b.early_step(900, 250) == 500
    assert e4b.early_step(100, 250) == 100
    assert e4b.noise_word([1.0, 1.2], [0.0, 0.2]) == "higher"  # difference 1.0 > 0.14 + 0.14
    assert e4b.noise_word([0.0, 0.2], [1.0, 1.2]) == "lower"
    assert e4b.noise_word([0.0, 1.0], [0.5, 0.6]) == "within noise"  # 0.05 < 0.71 + 0.07
    assert e4b.noise_word([1.0], [0.0, 0.1]) == "one seed: no verdict"


@pytest.mark.parametrize("argv, message", [
    (["--long-steps", "25"], "--long-steps greater than it; got 25 and 25"),
    (["--long-every", "0"], "--long-every must be >= 1"),
    (["--long", "cnn7-bn"], "unknown configuration"),
])
def test_e4b_long_diagnostic_argument_errors(argv, message, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import e4b_gradient_flow as e4b

    with pytest.raises(SystemExit):
        e4b.main(["--output", str(tmp_path / "out"), "--page", str(tmp_path / "p.md"), "--diag-only", "none",
                  *argv])
    assert message in capsys.readouterr().err
