"""``torchsphere ensemble`` end to end on a tiny pool trained on the synthetic dataset: outputs, reuse, resume after
SIGKILL, and every user error (exit code 2 with a message)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchsphere.cli import main
from torchsphere.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(num_classes=8, train_size=800, test_size=160)
TASK = ["--dataset", "synthetic", "--dataset-option", "num_classes=8", "--dataset-option", "train_size=800",
        "--dataset-option", "test_size=160", "--classes", "5,6,7", "--shots", "3", "--val-shots", "4"]
RUN = ["--top", "2", "--sweep", "0.01:4,0.05:4", "--max-size", "3", "--baselines", "--quiet"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """Three upstream runs (CNN-9, SphereNet-9 linear, CNN-9 with GA-Softmax) on synthetic classes 0-4."""
    root = tmp_path_factory.mktemp("pool")
    common = dict(dataset="subset", dataset_kwargs=dict(base="synthetic", classes=[0, 1, 2, 3, 4],
                                                        base_options=OPTIONS),
                  width_mult=0.0625, bn_momentum=0.1, batch_size=32, steps=8, eval_every=8, threads=1, quiet=True,
                  lr_schedule="constant", lr=0.01)
    for name, kw in (("cnn9", dict(model="cnn9")), ("sphere-linear", dict(model="spherenet9", operator="linear")),
                     ("cnn9-ga", dict(model="cnn9", head="gasoftmax"))):
        train(TrainConfig(**common, **kw, output=str(root / "runs" / name / "seed_0")))
    return root / "runs"


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out + out.err


def _comparable(results: dict) -> dict:
    return {k: results[k] for k in ("knn", "finetuned", "methods", "greedy", "task")}


@pytest.fixture(scope="module")
def reference(pool, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ens") / "reference"
    assert main(["ensemble", "--pool", str(pool), *TASK, *RUN, "--output", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_end_to_end_outputs(reference):
    out, results = reference
    for name in ("spec.json", "knn.json", "results.json", "report.md", "ensemble.png"):
        assert (out / name).is_file(), name
    assert len(results["knn"]) == 3 and sorted(r["rank"] for r in results["knn"]) == [1, 2, 3]
    assert {r["layer"] for r in results["knn"]} == {"fc6"}
    assert set(results["methods"]) >= {"best-knn", "best-single", "topk-knn", "greedy", "random", "seed-only"}
    greedy, single = results["methods"]["greedy"], results["methods"]["best-single"]
    assert greedy["val_nll"] <= single["val_nll"] + 1e-12  # never worse on what it minimises
    assert results["greedy"]["trajectory"][0] == pytest.approx(single["val_nll"])
    assert results["task"] == dict(dataset="synthetic", classes=[5, 6, 7],
                                   class_names=["pattern_5", "pattern_6", "pattern_7"], shots=3, val_shots=4,
                                   draw=0, train=9, val=12, test=60)
    size = results["methods"]["greedy"]["distinct"]
    assert results["methods"]["random"]["distinct"] == size == results["methods"]["seed-only"]["distinct"]
    runs = sorted(p.parent.name for p in out.glob("finetune/*/*/probs.pt"))
    assert len(runs) >= 4  # top 2 x sweep 2, plus the baselines' runs
    probs = torch.load(next(out.glob("finetune/*/*/probs.pt")), weights_only=True)
    assert probs["val_probs"].shape == (12, 3) and probs["test_probs"].shape == (60, 3)
    report = (out / "report.md").read_text()
    assert "## Pool ranked by leave-one-out k-NN accuracy" in report and "| greedy |" in report
    summary = json.loads(next(out.glob("finetune/*/*/run/summary.json")).read_text())
    assert summary["data"]["num_classes"] == 3  # a fresh head for the downstream classes


def test_rerun_reuses_everything(pool, reference, capsys):
    out, results = reference
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("finetune/*/*/probs.pt")}
    code, text = run_cli(["ensemble", "--pool", str(pool), *TASK, *RUN, "--output", str(out)], capsys)
    assert code == 0 and "| greedy |" in text
    assert {p: p.stat().st_mtime_ns for p in out.glob("finetune/*/*/probs.pt")} == stamps  # nothing retrained
    assert _comparable(json.loads((out / "results.json").read_text())) == _comparable(results)


KILLER = """
import os, signal, sys
import torchsphere.train.loop as loop
from torchsphere.cli import main
count, real = [0], loop.train_step
def train_step(run, x, y):
    count[0] += 1
    if count[0] == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, in the middle of a fine-tuning run
    return real(run, x, y)
loop.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def test_resumes_after_sigkill_with_identical_results(pool, reference, tmp_path):
    out = tmp_path / "killed"
    argv = ["ensemble", "--pool", str(pool), *TASK, *RUN, "--output", str(out)]
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "KILL_AT_STEP": "10"}
    done = subprocess.run([sys.executable, "-c", KILLER, *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == -9, done.stderr[-2000:]
    assert len(list(out.glob("finetune/*/*/probs.pt"))) == 2  # two 4-step runs finished, the third was killed
    assert not (out / "results.json").exists()
    assert main(argv) == 0  # the same command again: reuses the two, redoes the killed run, finishes
    assert _comparable(json.loads((out / "results.json").read_text())) == _comparable(reference[1])


@pytest.mark.parametrize(("extra", "message"), [
    (["--top", "5"], "top=5 is larger than the pool of 3 trained runs"),
    (["--shots", "200"], r"class 5 has only 100 training examples; shots \+ val_shots = 200 \+ 4 = 204"),
    (["--knn-k", "9"], "k=9 is larger than the 8 neighbours left when one of the 9 examples is left out"),
    (["--classes", "5,9"], r"classes \[9\] do not exist in dataset 'synthetic'"),
    (["--sweep", "0.01"], "sweep entry '0.01' is not LR:STEPS"),
    (["--sweep", "0.01:5,0.01:5"], "repeats an entry"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset-option", "image_size=16"], r"incompatible inputs: run .* was trained on images of shape "
                                            r"\(1, 8, 8\) .* the downstream task has \(1, 16, 16\)"),
])
def test_user_errors_exit_2_with_a_message(pool, tmp_path, capsys, extra, message):
    import re

    code, text = run_cli(["ensemble", "--pool", str(pool), *TASK, *RUN, *extra, "--output", str(tmp_path / "o")],
                         capsys)
    assert code == 2
    assert re.search(message, text), text[-1000:]


def test_empty_pool_and_missing_paths(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, text = run_cli(["ensemble", "--pool", str(tmp_path / "empty"), *TASK, "--output", str(tmp_path / "o")],
                         capsys)
    assert code == 2 and "the pool is empty: no finished run folder" in text
    code, text = run_cli(["ensemble", "--pool", str(tmp_path / "nope"), *TASK, "--output", str(tmp_path / "o")],
                         capsys)
    assert code == 2 and "pool path" in text and "does not exist" in text


def test_a_folder_with_another_specification_is_refused(pool, reference, capsys):
    out, _ = reference
    code, text = run_cli(["ensemble", "--pool", str(pool), *TASK, *RUN, "--max-size", "2", "--output", str(out)],
                         capsys)
    assert code == 2 and "holds an ensemble run with another specification (max_size: 3 -> 2)" in text


def test_selection_never_looks_at_the_test_split(pool, reference, tmp_path, monkeypatch):
    """With every test image replaced by NaN, the ranking, the sweep choices and the ensembles stay the same."""
    import torchsphere.ensemble.runner as runner

    real = runner.fewshot_task

    def poisoned(*args, **kwargs):
        task = real(*args, **kwargs)
        task.test_x = torch.full_like(task.test_x, float("nan"))
        return task

    monkeypatch.setattr(runner, "fewshot_task", poisoned)
    out = tmp_path / "nan-test"
    assert main(["ensemble", "--pool", str(pool), *TASK, *RUN, "--output", str(out)]) == 0
    got, ref = json.loads((out / "results.json").read_text()), reference[1]
    assert got["greedy"]["pick_indices"] == ref["greedy"]["pick_indices"]
    assert [r["rank"] for r in got["knn"]] == [r["rank"] for r in ref["knn"]]
    for name, method in ref["methods"].items():
        assert got["methods"][name]["members"] == method["members"]
        assert got["methods"][name]["val_nll"] == method["val_nll"]
        assert got["methods"][name]["test_nll"] != got["methods"][name]["test_nll"]  # NaN: the test was poisoned
