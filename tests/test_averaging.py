"""Training across sites (torchsphere.train.averaging / collaborative): the weighted mean against a float64
reference, the BatchNorm choices, the cyclical lr, K = 1 against plain training, exact resume, and every error."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from torchsphere.cli import main
from torchsphere.train import TrainConfig, loop, read_metrics, train
from torchsphere.train import collaborative
from torchsphere.train.averaging import (SiteReducer, average_models_, average_optimizers_, average_tensors_,
                                         cycle_factor, recompute_bn_statistics_)
from torchsphere.train.collaborative import read_site_metrics

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("step", "epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc")  # wall_time differs


def tiny(output, **kw) -> TrainConfig:
    base = dict(model="spherenet9", dataset="synthetic", width_mult=0.0625, bn_momentum=0.1, batch_size=32,
                lr=0.01, sites=2, rounds=3, local_epochs=1, threads=1, quiet=True, output=str(output))
    return TrainConfig(**{**base, **kw})


# ---------------------------------------------------------------- the weighted mean
def test_average_equals_a_float64_weighted_mean_in_place():
    sites = [[torch.randn(5, 3), torch.randn(7), torch.tensor(k + 2)] for k in range(3)]
    originals = [[t.clone() for t in g] for g in sites]
    pointers = [[t.data_ptr() for t in g] for g in sites]
    weights = [100.0, 37.0, 251.0]
    average_tensors_(sites, weights, SiteReducer())
    for i in range(2):
        expected = sum(w * g[i].double() for w, g in zip(weights, originals)) / sum(weights)  # slow reference
        for g in sites:
            assert torch.equal(g[i], expected.float())  # float64 accumulation, one rounding to float32
    assert all(int(g[2]) == 4 for g in sites)  # integer tensors (num_batches_tracked): the largest
    assert [[t.data_ptr() for t in g] for g in sites] == pointers  # copied in place, storage kept


def test_one_site_and_identical_sites_are_unchanged_bit_for_bit():
    x = [torch.randn(64) * 1e3, torch.randn(3, 3)]
    copy = [t.clone() for t in x]
    average_tensors_([x], [12345.0], SiteReducer())
    assert all(torch.equal(a, b) for a, b in zip(x, copy))
    twins = [[t.clone() for t in copy] for _ in range(3)]
    average_tensors_(twins, [1.0, 2.0, 3.0], SiteReducer())
    assert all(torch.equal(a, b) for g in twins for a, b in zip(g, copy))


def test_mismatched_sites_are_refused():
    with pytest.raises(RuntimeError, match="site 1's tensors do not match site 0's"):
        average_tensors_([[torch.zeros(3)], [torch.zeros(4)]], [1.0, 1.0], SiteReducer())
    with pytest.raises(ValueError, match="need one weight per local site; got 2 tensor groups and 1 weights"):
        average_tensors_([[torch.zeros(3)], [torch.zeros(3)]], [1.0], SiteReducer())


def test_models_and_optimizer_states_average_with_the_weights():
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(2)]
    optimizers = [torch.optim.Adam(m.parameters()) for m in models]
    for k, (m, o) in enumerate(zip(models, optimizers)):
        for _ in range(k + 1):  # different states
            m(torch.randn(8, 3) + k).pow(2).mean().backward()
            o.step()
    before = [{n: t.clone() for n, t in m.state_dict().items()} for m in models]
    moments = [[o.state[p]["exp_avg_sq"].clone() for p in m.parameters()] for m, o in zip(models, optimizers)]
    weights = [3.0, 1.0]
    average_models_(models, weights, SiteReducer())
    average_optimizers_(optimizers, weights, SiteReducer())
    for name, value in models[0].state_dict().items():
        if name.endswith("num_batches_tracked"):
            assert int(value) == 2
            continue
        expected = (3 * before[0][name].double() + before[1][name].double()) / 4  # incl. running_mean / running_var
        assert torch.equal(value, expected.float()) and torch.equal(models[1].state_dict()[name], value)
    for i, p in enumerate(models[0].parameters()):
        expected = (3 * moments[0][i].double() + moments[1][i].double()) / 4
        assert torch.equal(optimizers[0].state[p]["exp_avg_sq"], expected.float())
    steps = [float(o.state[p]["step"]) for o in optimizers for p in list(o.state)[:1]]
    assert steps == [1.25, 1.25]  # (3 * 1 + 1 * 2) / 4: step counts are averaged like the rest


# ---------------------------------------------------------------- BatchNorm statistics
def bn_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())


def site_batches():
    gen = torch.Generator().manual_seed(2)
    a = [torch.randn(6, 2, 5, 5, generator=gen) for _ in range(3)]
    b = [torch.randn(6, 2, 5, 5, generator=gen) * 3 + 4 for _ in range(2)]  # another distribution: non-iid
    return [a, b]


def reference_union_stats(model: nn.Module, batches):
    """Float64, by hand: BN in train mode normalizes with batch statistics; union mean / unbiased var per layer."""
    bn1, conv, _ = model[0], model[1], model[2]
    inputs1, inputs2 = [], []
    for xb in (x for site in batches for x in site):
        x = xb.double()
        inputs1.append(x)
        mu, var = x.mean(dim=(0, 2, 3), keepdim=True), x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        w, b = bn1.weight.double()[None, :, None, None], bn1.bias.double()[None, :, None, None]
        h = (x - mu) / torch.sqrt(var + bn1.eps) * w + b
        inputs2.append(torch.nn.functional.conv2d(h, conv.weight.double(), conv.bias.double()))
    out = []
    for feats in (inputs1, inputs2):
        flat = torch.cat([f.transpose(0, 1).reshape(f.shape[1], -1) for f in feats], dim=1)
        out.append((flat.mean(dim=1), flat.var(dim=1, unbiased=True)))
    return out


def test_recompute_sets_the_union_statistics_of_all_sites():
    models = [bn_net(), bn_net()]
    batches = site_batches()
    assert recompute_bn_statistics_(models, batches, SiteReducer()) == 2
    expected = reference_union_stats(models[0], batches)
    for model in models:
        for layer, (mean, var) in zip((model[0], model[2]), expected):
            torch.testing.assert_close(layer.running_mean, mean.float(), rtol=0, atol=1e-5)
            torch.testing.assert_close(layer.running_var, var.float(), rtol=1e-5, atol=1e-5)


def test_average_of_per_site_statistics_misses_the_spread_between_sites():
    batches = site_batches()
    models = [bn_net(), bn_net()]
    for model, own in zip(models, batches):  # each site's exact statistics of its own data
        recompute_bn_statistics_([model], [own], SiteReducer())
    sizes = [sum(b.shape[0] for b in site) for site in batches]
    average_models_(models, sizes, SiteReducer())
    (union_mean, union_var), _ = reference_union_stats(models[0], batches)
    bn = models[0][0]
    torch.testing.assert_close(bn.running_mean, union_mean.float(), rtol=0, atol=1e-5)  # the mean is right
    assert (bn.running_var < 0.6 * union_var.float()).all()  # the variance misses the between-site spread


# ---------------------------------------------------------------- the cycle
def test_cycle_shapes():
    low = 0.1
    tri = [cycle_factor(s, 10, "triangular", low) for s in range(20)]
    assert tri[0] == tri[10] == pytest.approx(low) and tri[5] == pytest.approx(1.0)
    assert tri[:10] == tri[10:] and tri[1:5] == sorted(tri[1:5]) and tri[1] == pytest.approx(tri[9])
    cos = [cycle_factor(s, 8, "cosine", low) for s in range(8)]
    assert cos[0] == 1.0 and cos == sorted(cos, reverse=True) and cos[-1] > low
    assert {cycle_factor(s, 7, "constant", low) for s in range(7)} == {1.0}
    with pytest.raises(ValueError, match="unknown lr_cycle 'saw'"):
        cycle_factor(0, 4, "saw", low)


def test_each_round_runs_one_cycle_between_lr_min_and_lr(tmp_path, monkeypatch):
    seen, real = [], loop.train_step

    def record(run, x, y):
        seen.append(run.optimizer.param_groups[0]["lr"])
        return real(run, x, y)

    monkeypatch.setattr(loop, "train_step", record)
    train(tiny(tmp_path / "run", sites=1, rounds=2, local_epochs=2, lr=0.02, lr_min=0.002))
    per_round = len(seen) // 2  # one site: 2 epochs of 14 batches per round
    assert per_round == 28
    for r in range(2):
        lrs = seen[r * per_round:(r + 1) * per_round]
        assert lrs[0] == pytest.approx(0.002) and lrs[per_round // 2] == pytest.approx(0.02)
        assert max(lrs) == pytest.approx(0.02) and min(lrs) == pytest.approx(0.002)
    assert seen[:per_round] == seen[per_round:]


# ---------------------------------------------------------------- K = 1 is plain training
@pytest.mark.parametrize("avg_optimizer", ["average", "local"])
def test_one_site_equals_plain_training_bit_for_bit(tmp_path, avg_optimizer):
    sites = train(tiny(tmp_path / "site", sites=1, rounds=3, lr_cycle="constant", avg_optimizer=avg_optimizer))
    plain = train(TrainConfig(model="spherenet9", dataset="synthetic", width_mult=0.0625, bn_momentum=0.1,
                              batch_size=32, lr=0.01, lr_schedule="constant", steps=3 * 14, eval_every=14,
                              threads=1, quiet=True, output=str(tmp_path / "plain")))
    a = torch.load(tmp_path / "site" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sites["final"] == plain["final"] and sites["steps"] == plain["steps"] == 42
    rows_a, rows_b = read_metrics(tmp_path / "site" / "metrics.csv"), read_metrics(tmp_path / "plain" / "metrics.csv")
    assert [[r[k] for k in COMPARED] for r in rows_a] == [[r[k] for k in COMPARED] for r in rows_b]


# ---------------------------------------------------------------- a run across sites, its files, resume
def test_run_folder_records_the_partition_and_per_site_metrics(tmp_path):
    config = tiny(tmp_path / "run", sites=3, rounds=2, site_partition="dirichlet", dirichlet_alpha=1.0)
    summary = train(config)
    record = json.loads((tmp_path / "run" / "sites.json").read_text())
    assert record["method"] == "dirichlet" and record["alpha"] == 1.0 and record["num_sites"] == 3
    assert sum(record["sizes"]) == summary["data"]["train"]
    assert [sum(h) for h in record["class_histograms"]] == record["sizes"]
    rows = read_site_metrics(tmp_path / "run" / "sites.csv")
    assert [(r["round"], r["site"]) for r in rows] == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert [r["samples"] for r in rows[:3]] == record["sizes"]
    assert len(read_metrics(tmp_path / "run" / "metrics.csv")) == 2
    assert summary["sites"]["partition"]["sizes"] == record["sizes"] and summary["replica_max_abs_diff"] == 0.0
    assert summary["steps"] == sum(record["steps_per_round"]) * 2


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [[r[k] for k in COMPARED] for r in rows_a] == [[r[k] for k in COMPARED] for r in rows_b]
    assert read_site_metrics(a / "sites.csv") == read_site_metrics(b / "sites.csv")
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["final"] == sb["final"] and sa["best"] == sb["best"]
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


RESUMED = dict(rounds=3, site_partition="dirichlet", dirichlet_alpha=1.0, avg_bn="recompute", avg_optimizer="local",
               augment="flip", lr_cycle="cosine")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> TrainConfig:
    """One uninterrupted run that every resume test compares with (non-iid, recomputed BN, local optimizer state,
    augmentation: every piece of per-site state must survive the restart)."""
    config = tiny(tmp_path_factory.mktemp("reference") / "run", **RESUMED)
    train(config)
    return config


@pytest.mark.parametrize("crash_at", ["round boundary", "inside a round"])
def test_crash_then_resume_equals_uninterrupted(tmp_path, monkeypatch, reference, crash_at):
    steps_per_round = sum(json.loads((Path(reference.output) / "sites.json").read_text())["steps_per_round"])
    crash = 2 * steps_per_round + 1 if crash_at == "round boundary" else steps_per_round + steps_per_round // 2
    crashed = reference.replace(output=str(tmp_path / "crashed"))
    real, calls = loop.train_step, []

    def crash_at_call(run, x, y):
        calls.append(1)
        if len(calls) == crash:
            raise KeyboardInterrupt("simulated crash")
        return real(run, x, y)

    monkeypatch.setattr(loop, "train_step", crash_at_call)
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    monkeypatch.undo()
    saved_round = torch.load(tmp_path / "crashed" / "checkpoint.pt", weights_only=True)["round"]
    assert saved_round == (2 if crash_at == "round boundary" else 1)
    train(crashed.replace(resume=True))
    assert_same_run(Path(reference.output), tmp_path / "crashed")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference):
    out = tmp_path / "killed"
    args = ["train", "--model", "spherenet9", "--dataset", "synthetic", "--width-mult", "0.0625", "--bn-momentum",
            "0.1", "--batch-size", "32", "--lr", "0.01", "--sites", "2", "--rounds", "3", "--site-partition", "dirichlet",
            "--dirichlet-alpha", "1.0", "--avg-bn", "recompute", "--avg-optimizer", "local", "--augment", "flip",
            "--lr-cycle", "cosine", "--threads", "1", "--quiet", "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "torchsphere", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = out / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state_file.exists(), f"no checkpoint appeared; stderr: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run finished before the kill"
    assert 1 <= torch.load(state_file, weights_only=True)["round"] < 3
    train(reference.replace(output=str(out), resume=True))
    assert_same_run(Path(reference.output), out)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("changes, message", [
    (dict(rounds=None), r"sites=2 needs a budget in rounds \(rounds \* local_epochs epochs per site\); got "
                        r"rounds=None"),
    (dict(sites=None), r"rounds needs sites \(training across sites\); got rounds=3 with sites=None"),
    (dict(sites=0), r"sites must be a positive integer or None; got 0"),
    (dict(local_epochs=1.5), r"local_epochs must be a positive integer; got 1.5"),
    (dict(steps=10), r"steps cannot be set \(got steps=10\)"),
    (dict(milestones=(5,), checkpoint_every=2), r"milestones, checkpoint_every cannot be set \(got milestones=\(5,\), "
                                                r"checkpoint_every=2\)"),
    (dict(lr_min=0.1), r"lr_min must not exceed lr \(the cycle runs between lr_min and lr\); got lr_min=0.1 > "
                       r"lr=0.01"),
    (dict(lr_min=-1.0), r"lr_min must be a finite number > 0 or None; got -1.0"),
    (dict(lr_cycle="saw"), r"lr_cycle"),
    (dict(site_partition="random"), r"site_partition"),
    (dict(avg_bn="local"), r"avg_bn"),
    (dict(avg_optimizer="sum"), r"avg_optimizer"),
    (dict(dirichlet_alpha=0), r"dirichlet_alpha must be a finite number > 0; got 0"),
])
def test_config_errors(tmp_path, changes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny(tmp_path / "run", **changes)


def test_data_errors(tmp_path):
    with pytest.raises(ValueError, match=r"sites=20 is more than the data allows: 461 training examples give no site "
                                         r"32 examples \(at most 14 sites of 32\)"):
        train(tiny(tmp_path / "a", sites=20))
    with pytest.raises(ValueError, match=r"partition 'dirichlet' gave site \d+ \d+ examples, fewer than the 32 it "
                                         r"needs \(one batch\)"):
        train(tiny(tmp_path / "b", sites=6, site_partition="dirichlet", dirichlet_alpha=0.05))


def test_world_size_must_equal_the_number_of_sites(tmp_path, monkeypatch):
    from torchsphere.train import distributed

    monkeypatch.setattr(collaborative.dist_utils, "init_distributed",
                        lambda device: (distributed.DistInfo(0, 3, 0), torch.device("cpu")))
    with pytest.raises(ValueError, match=r"sites=2 needs --nproc_per_node=2 \(or a single process, which simulates "
                                         r"the sites\); got WORLD_SIZE=3"):
        train(tiny(tmp_path / "run"))


def test_cli_flags_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--sites", "--rounds", "--local-epochs", "--site-partition", "--dirichlet-alpha", "--lr-cycle",
                 "--lr-min", "--avg-bn", "--avg-optimizer", "training across sites"):
        assert flag in text
    base = ["train", "--dataset", "synthetic", "--width-mult", "0.0625", "--batch-size", "32", "--threads", "1",
            "--quiet", "--output", str(tmp_path / "run")]
    for extra, message in ((["--sites", "2"], "needs a budget in rounds"),
                           (["--sites", "20", "--rounds", "1"], "sites=20 is more than the data allows"),
                           (["--sites", "0", "--rounds", "1"], "must be > 0, got '0'")):
        with pytest.raises(SystemExit) as done:
            main(base + extra)
        assert done.value.code == 2 and message in capsys.readouterr().err


def test_reset_gives_every_round_a_fresh_optimizer(tmp_path, monkeypatch):
    states, real = [], loop.train_step

    def record(run, x, y):
        states.append(len(run.optimizer.state))  # parameters with optimizer state before this step
        return real(run, x, y)

    monkeypatch.setattr(loop, "train_step", record)
    train(tiny(tmp_path / "run", sites=1, rounds=2, avg_optimizer="reset"))
    assert states[0] == 0 and states[14] == 0 and min(states[1:14]) > 0  # 14 steps per round
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert "optimizer" not in saved["sites"][0]


def test_processes_with_different_data_are_refused(tmp_path, monkeypatch):
    def fake_gather(obj, info):
        return [obj, dict(obj, classes=100)]

    monkeypatch.setattr(collaborative.dist_utils, "gather_objects", fake_gather)
    with pytest.raises(ValueError, match=r"the sites' processes loaded different training data \(rank 0 vs rank 1: "
                                         r"classes: 4 vs 100\); the class count and the split must match"):
        train(tiny(tmp_path / "run"))
