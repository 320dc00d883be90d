"""The command line (torchsphere.cli): help, bad arguments (exit code 2), config layering, smoke runs."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from torchsphere.cli import build_parser, main, train_config
from torchsphere.train import CompareSpec, TrainConfig, compare, read_summary

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "spherenet9", "--dataset", "synthetic", "--width-mult", "0.0625", "--bn-momentum", "0.1",
        "--batch-size", "32", "--lr", "0.01", "--lr-schedule", "constant", "--threads", "1", "--quiet"]


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_help_lists_every_config_field(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "compare", "evaluate", "predict"))
    assert exit_code(["train", "--help"]) == 0
    text = capsys.readouterr().out
    missing = [f.name for f in fields(TrainConfig)
               if f.name != "dataset_kwargs" and f"--{f.name.replace('_', '-')}" not in text]
    assert missing == []
    for command in ("compare", "evaluate", "predict"):
        assert exit_code([command, "--help"]) == 0
    assert "--preset" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "torchsphere", "train", "--help"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0 and "--output DIR" in done.stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "spherenet", "--output", "x"], "unknown model 'spherenet'; did you mean spherenet9"),
    (["train", "--dataset", "imagenet21k", "--output", "x"], "unknown dataset 'imagenet21k'; choose from"),
    (["train", "--operator", "tanh", "--output", "x"], "argument --operator: invalid choice: 'tanh'"),
    (["train", "--lr", "-0.1", "--output", "x"], "argument --lr: must be > 0, got '-0.1'"),
    (["train", "--data-dir", "/no/such/folder", "--output", "x"], "--data-dir '/no/such/folder' is not a directory"),
    (["train", "--steps", "5", "--epochs", "2", "--output", "x"], "not allowed with argument"),
    (["train", "--model", "cnn9"], "the following arguments are required: --output"),
    (["train", "--head", "gasoftmax", "--margin", "0.5", "--output", "x"], "argument --margin: must be >= 1"),
    (["train", "--val-fraction", "1.5", "--output", "x"], r"argument --val-fraction: must be in [0, 1)"),
    (["compare", "--output", "x"], "give --preset NAME or --models M1,M2"),
    (["compare", "--preset", "nope", "--output", "x"], "unknown preset 'nope'"),
    (["compare", "--models", "cnn9,spherenet", "--output", "x"], "unknown model 'spherenet'"),
    (["compare", "--models", "spherenet9", "--operators", "tanh", "--output", "x"], "unknown operator 'tanh'"),
    (["evaluate", "/no/such/run"], "is not a finished run folder"),
])
def test_bad_arguments_exit_with_code_2(argv, message, capsys):
    assert exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": "cnn9", "lr": 0.5, "milestones": [10, 20],
                                                     "output": "from-yaml"}))
    parser = build_parser()
    args = parser.parse_args(["train", "--config", str(tmp_path / "c.yaml"), "--lr", "0.01", "--output", "runs/x"])
    config = train_config(args, args._parser)
    assert (config.model, config.lr, config.milestones, config.output) == ("cnn9", 0.01, (10, 20), "runs/x")
    assert config.batch_size == TrainConfig().batch_size  # untouched fields keep the dataclass defaults
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nlearning_rate: 3\n")
    args = parser.parse_args(["train", "--config", str(tmp_path / "bad.yaml"), "--output", "x"])
    with pytest.raises(SystemExit) as info:
        train_config(args, args._parser)
    assert info.value.code == 2


def test_config_yaml_round_trip(tmp_path):
    config = TrainConfig(model="cnn9", milestones=(3, 7), data_dir="/d", dataset_kwargs={"image_size": 8},
                         amp=True, output="o")
    (tmp_path / "c.yaml").write_text(config.to_yaml())
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config


def test_train_evaluate_predict(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "12", "--eval-every", "6", "--output", str(run)]) == 0
    saved = TrainConfig.from_yaml(run / "config.yaml")
    assert (saved.model, saved.steps, saved.lr, saved.output) == ("spherenet9", 12, 0.01, str(run))
    summary = read_summary(run / "summary.json")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["final"]["test_acc"])
    assert main(["evaluate", str(run), "--weights", "best"]) == 0
    assert f"{100 * summary['best']['test_acc']:.2f}%" in capsys.readouterr().out
    np.save(tmp_path / "raw.npy", np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8))
    torch.save(torch.zeros(2, 1, 8, 8), tmp_path / "norm.pt")
    assert main(["predict", str(run), str(tmp_path / "raw.npy"), str(tmp_path / "norm.pt"), "--top-k", "2",
                 "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert len(predictions) == 5 and all(len(p["top"]) == 2 for p in predictions)
    assert all(p["top"][0]["probability"] >= p["top"][1]["probability"]
               and p["top"][0]["class"].startswith("pattern_") for p in predictions)
    assert [p["input"] for p in predictions] == [f"{tmp_path / 'raw.npy'}[{i}]" for i in range(3)] + [
        f"{tmp_path / 'norm.pt'}[{i}]" for i in range(2)]
    np.save(tmp_path / "wrong.npy", np.zeros((2, 9, 9), dtype=np.uint8))
    assert exit_code(["predict", str(run), str(tmp_path / "wrong.npy")]) == 2
    assert "expected images of 1 channel(s) and size (8, 8)" in capsys.readouterr().err


def test_compare_writes_report_and_reuses_finished_runs(tmp_path, capsys):
    argv = ["compare", "--models", "cnn9,spherenet9", "--operators", "linear", "--seeds", "2", "--thresholds",
            "0.3", *TINY[2:], "--steps", "6", "--eval-every", "3", "--output", str(tmp_path / "cmp")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| cnn9 " in out and "| spherenet9-linear " in out and "steps to 30%" in out
    assert (tmp_path / "cmp" / "report.md").is_file() and (tmp_path / "cmp" / "convergence.png").is_file()
    assert read_summary(tmp_path / "cmp" / "runs" / "spherenet9-linear" / "seed_1" / "summary.json")["seed"] == 1
    assert read_summary(tmp_path / "cmp" / "runs" / "cnn9" / "seed_0" / "summary.json")["model"] == "cnn9"
    assert main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, reused") == 4


def test_compare_falls_back_when_the_dataset_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHSPHERE_DATA", raising=False)
    (tmp_path / "empty").mkdir()
    spec = CompareSpec(runs=[{"name": "cnn9", "model": "cnn9"}], fallback_dataset="synthetic",
                       train=dict(dataset="mnist", data_dir=str(tmp_path / "empty"), width_mult=0.0625, steps=3,
                                  batch_size=32, eval_every=3, threads=1))
    compare(spec, tmp_path / "cmp", quiet=True)
    out = capsys.readouterr().out
    assert "falling back to dataset 'synthetic'" in out and "mnist" in out
    assert read_summary(tmp_path / "cmp" / "runs" / "cnn9" / "seed_0" / "summary.json")["dataset"] == "synthetic"
