"""Exact resume: a run killed with SIGKILL (or crashing) and resumed ends as an uninterrupted run with the same seed."""
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

from torchsphere.train import TrainConfig, loop, read_metrics, train

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("step", "epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc")  # wall_time differs


def tiny(output, **kw) -> TrainConfig:
    base = dict(model="spherenet9", dataset="synthetic", width_mult=0.0625, bn_momentum=0.1, steps=40,
                batch_size=32, eval_every=12, checkpoint_every=3, lr=0.01, lr_schedule="multistep",
                milestones=(20, 30), threads=1, quiet=True, output=str(output))
    return TrainConfig(**{**base, **kw})


def cli_args(config: TrainConfig) -> list[str]:
    return ["train", "--model", config.model, "--dataset", config.dataset, "--width-mult", str(config.width_mult),
            "--bn-momentum", str(config.bn_momentum), "--steps", str(config.steps), "--batch-size",
            str(config.batch_size), "--eval-every", str(config.eval_every), "--checkpoint-every",
            str(config.checkpoint_every), "--lr", str(config.lr), "--lr-schedule", config.lr_schedule,
            "--milestones", ",".join(map(str, config.milestones)), "--threads", "1", "--quiet",
            "--output", config.output]


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [[r[k] for k in COMPARED] for r in rows_a] == [[r[k] for k in COMPARED] for r in rows_b]
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    assert sa["final"] == sb["final"] and sa["best"] == sb["best"]
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    reference = tiny(tmp_path / "reference")
    train(reference)
    killed = tiny(tmp_path / "killed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "torchsphere", *cli_args(killed)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = Path(killed.output) / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state_file.exists(), f"no checkpoint appeared; stderr: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (Path(killed.output) / "summary.json").exists(), "the run finished before the kill"
    step_at_kill = torch.load(state_file, weights_only=True)["step"]
    assert 0 < step_at_kill < killed.steps
    train(killed.replace(resume=True))
    assert_same_run(Path(reference.output), Path(killed.output))


def test_crash_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    reference = tiny(tmp_path / "reference", steps=30, eval_every=10, checkpoint_every=4, milestones=(15,))
    train(reference)
    crashed = reference.replace(output=str(tmp_path / "crashed"))
    real_step, calls = loop.train_step, []

    def crash_at_step_23(run, x, y):
        calls.append(1)
        if len(calls) == 23:  # after the checkpoint of step 20, mid-epoch (14 steps per epoch)
            raise KeyboardInterrupt("simulated crash")
        return real_step(run, x, y)

    monkeypatch.setattr(loop, "train_step", crash_at_step_23)
    with pytest.raises(KeyboardInterrupt):
        train(crashed)
    monkeypatch.undo()
    assert torch.load(Path(crashed.output) / "checkpoint.pt", weights_only=True)["step"] == 20
    train(crashed.replace(resume=True))
    assert_same_run(Path(reference.output), Path(crashed.output))


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    config = tiny(tmp_path / "run", steps=12, eval_every=6)
    first = train(config)
    second = train(config.replace(resume=True))
    assert first["final"] == second["final"] and len(read_metrics(tmp_path / "run" / "metrics.csv")) == 2


def test_resume_with_another_configuration_is_refused(tmp_path):
    config = tiny(tmp_path / "run", steps=6, eval_every=6)
    train(config)
    with pytest.raises(ValueError, match=r"cannot resume .* with a different configuration \(lr: 0.01 -> 0.02\)"):
        train(config.replace(resume=True, lr=0.02))


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--resume: run folder .* holds no checkpoint .*nothing to resume"):
        train(tiny(tmp_path / "run", steps=6, eval_every=6, resume=True))
