"""``torchsphere curves``: help, bad arguments (exit code 2), every output file, reuse and resume after a kill."""
from __future__ import annotations

import csv
import json
from dataclasses import fields

import pytest

import torchsphere.train.curves as curves_module
import torchsphere.train.loop as loop_module
from torchsphere.cli import build_parser, main
from torchsphere.train import TrainConfig
from torchsphere.train.curves import CurvesSpec

TINY = ["--models", "cnn9,spherenet9", "--operators", "cosine", "--dataset", "synthetic", "--width-mult", "0.0625",
        "--bn-momentum", "0.1", "--batch-size", "32", "--lr", "0.01", "--threads", "1", "--quiet",
        "--num-sizes", "3", "--reps", "1,1,2", "--epochs", "1", "--min-steps", "3", "--evaluations", "2",
        "--checkpoint-every", "1"]
OUTPUTS = ("curves.csv", "fit.json", "report.md", "curves.png")
SET_BY_CURVES = {"partition", "limit_train", "seed", "output", "resume", "dataset_kwargs", "config"}


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_help_documents_every_flag(capsys):
    assert exit_code(["curves", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--spec", "--models", "--operators", "--output", "--num-sizes", "--reps", "--N", "--split-seed",
                 "--min-steps", "--evaluations", "--measure", "--gamma", "--v1", "--level", "--refit-only",
                 "--epochs", "--steps"):
        assert flag in text
    missing = [f.name for f in fields(TrainConfig)
               if f.name not in SET_BY_CURVES and f"--{f.name.replace('_', '-')}" not in text]
    assert missing == []
    parser = build_parser()._subparsers._group_actions[0].choices["curves"]
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []


@pytest.mark.parametrize(("argv", "message"), [
    (["curves", "--output", "x"], "give --spec YAML or --models M1,M2"),
    (["curves", "--models", "cnn9,spherenet", "--output", "x"], "unknown model 'spherenet'"),
    (["curves", "--models", "spherenet9", "--operators", "tanh", "--output", "x"], "unknown operator 'tanh'"),
    (["curves", "--models", "cnn9", "--gamma", "0.3", "--output", "x"], "argument --gamma: expected 'search' or a "
                                                                        "negative number"),
    (["curves", "--models", "cnn9", "--level", "1.5", "--output", "x"], "argument --level: must be in (0, 1)"),
    (["curves", "--models", "cnn9", "--reps", "1,2", "--output", "x"], "reps must give one count per size"),
    (["curves", "--models", "cnn9", "--limit-train", "10", "--output", "x"], "unrecognized arguments: --limit-train"),
    (["curves", "--models", "cnn9", "--measure", "peak", "--output", "x"], "argument --measure: invalid choice"),
    (["curves", "--models", "cnn9", "--dataset", "synthetic", "--N", "1000", "--output", "x"],
     "N = 1000 per class, but the training pool"),
    (["curves", "--models", "cnn9", "--dataset", "synthetic", "--reps", "1,3,1,1,1", "--output", "x"],
     "holds at most 2 disjoint partitions"),
    (["curves", "--models", "cnn9", "--steps", "5", "--epochs", "2", "--output", "x"], "not allowed with argument"),
])
def test_bad_arguments_exit_with_code_2(argv, message, capsys, tmp_path):
    argv = [a if a != "x" else str(tmp_path / "out") for a in argv]
    assert exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_spec_file_errors_exit_2(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text("runs: [{name: a, model: cnn9}]\nsizes: 3\n")
    assert exit_code(["curves", "--spec", str(tmp_path / "spec.yaml"), "--output", str(tmp_path / "o")]) == 2
    assert "unknown curves keys ['sizes']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'seed' is set by curves for every run"):
        CurvesSpec(runs=[{"name": "a", "model": "cnn9", "seed": 3}])
    with pytest.raises(ValueError, match="measure must be one of"):
        CurvesSpec(runs=[{"name": "a"}], measure="peak")
    with pytest.raises(ValueError, match="'val_fraction' must be the same for every configuration"):
        CurvesSpec(runs=[{"name": "a", "val_fraction": 0.2}])
    with pytest.raises(ValueError, match="at least 3 sizes; got num_sizes=2"):
        CurvesSpec(runs=[{"name": "a"}], num_sizes=2)
    with pytest.raises(ValueError, match="variance cannot be estimated"):
        CurvesSpec(runs=[{"name": "a"}], num_sizes=3, reps=[1, 1, 1])
    assert CurvesSpec(runs=[{"name": "a"}], num_sizes=3, reps=[1, 1, 1], v1=20).v1 == 20


def test_curves_writes_every_file_reuses_runs_and_resumes_after_a_kill(tmp_path, monkeypatch, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(["curves", *TINY, "--output", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "e_N" in out and "budget: steps = max(3, ceil(1 epochs" in out
    assert all((reference / name).is_file() for name in OUTPUTS)
    rows = read_rows(reference / "curves.csv")
    assert len(rows) == 2 * 4 and {r["config"] for r in rows} == {"cnn9", "spherenet9-cosine"}
    assert sorted({int(r["per_class"]) for r in rows}) == [28, 57, 115]
    fit = json.loads((reference / "fit.json").read_text())
    assert set(fit["fits"]) == {"cnn9", "spherenet9-cosine"}
    for entry in fit["fits"].values():
        assert entry["e_N_ci"][0] <= entry["e_N"] <= entry["e_N_ci"][1]
        assert entry["beta_N_ci"][0] <= entry["beta_N"] <= entry["beta_N_ci"][1]
        assert set(entry["at"]) == {"0.25N", "2N", "4N"}
    assert fit["comparisons"]["spherenet9-cosine"]["baseline"] == "cnn9"
    report = (reference / "report.md").read_text()
    assert "## Fits" in report and "![learning curves](curves.png)" in report
    assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a kill in the middle of the third run: the checkpoint writer raises after its 7th save
    calls = {"n": 0}
    original = loop_module.save_run_checkpoint

    def save_then_die(run, epoch):
        original(run, epoch)
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(loop_module, "save_run_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(["curves", *TINY, "--output", str(killed)])
    monkeypatch.setattr(loop_module, "save_run_checkpoint", original)
    runs = sorted(p for p in (killed / "runs").glob("*/*") if p.is_dir())
    interrupted = [p for p in runs if (p / "checkpoint.pt").is_file() and not (p / "summary.json").is_file()]
    assert len(interrupted) == 1 and not (killed / "fit.json").exists()

    assert main(["curves", *TINY, "--output", str(killed)]) == 0  # resumes the killed run, trains the rest
    resumed = read_rows(killed / "curves.csv")
    assert [(r["config"], r["per_class"], r["partition"], r["steps"], r["test_error"]) for r in resumed] == \
        [(r["config"], r["per_class"], r["partition"], r["steps"], r["test_error"]) for r in rows]

    # finished runs are reused: nothing trains again, and --refit-only gives the same fit
    def no_training(config):
        raise AssertionError(f"trained {config.output} again")

    monkeypatch.setattr(curves_module, "train", no_training)
    first = (killed / "fit.json").read_text()
    assert main(["curves", *TINY, "--output", str(killed)]) == 0
    assert main(["curves", *TINY, "--refit-only", "--output", str(killed)]) == 0
    assert (killed / "fit.json").read_text() == first
    capsys.readouterr()
    refit_more = [a if a != "1,1,2" else "1,1,3" for a in TINY]  # one more partition at N/4: not trained
    assert exit_code(["curves", *refit_more, "--refit-only", "--output", str(killed)]) == 2
    assert "--refit-only: 2 of 10 runs are not finished" in capsys.readouterr().err
    assert exit_code(["curves", *TINY, "--epochs", "2", "--output", str(killed)]) == 2
    assert "holds a run with another configuration" in capsys.readouterr().err
