"""What a new user hits: plain baselines stay plain, resolved configs, user errors as messages with exit code 2,
file modes, interrupt-and-resume, resume from the run folder, ignored flags, predict's inputs, conversion warnings."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from torchsphere import convert_to_sphere
from torchsphere.cli import main
from torchsphere.functional import fused
from torchsphere.models import create_model
from torchsphere.nn import SphereConv2d
from torchsphere.regularizers import HypersphericalRegularizer
from torchsphere.train import CompareSpec, TrainConfig, read_metrics, read_summary, train
from torchsphere.train.checkpoint import atomic_write_text
from torchsphere.train.compare import run_configs

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--dataset", "synthetic", "--width-mult", "0.0625", "--bn-momentum", "0.1", "--batch-size", "32",
        "--lr", "0.01", "--lr-schedule", "constant", "--threads", "1", "--quiet"]
TINY = ["--model", "spherenet9", *BASE]


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def error_of(argv, capsys) -> str:
    capsys.readouterr()
    assert exit_code(argv) == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("newcomer") / "run"
    assert main(["train", *TINY, "--steps", "4", "--eval-every", "4", "--output", str(run)]) == 0
    return run


# ---------------------------------------------------------------- 1. a plain baseline stays plain
def test_a_cnn_refuses_a_sphere_operator_and_a_spherenet_refuses_conv():
    with pytest.raises(ValueError, match=r"cnn9 is a plain CNN baseline .*operator='sigmoid' would turn it into a "
                                         r"SphereNet"):
        create_model("cnn9", operator="sigmoid")
    with pytest.raises(ValueError, match=r"resnet32 is a plain CNN baseline"):
        create_model("resnet32", operator="linear")
    with pytest.raises(ValueError, match=r"spherenet9 is a sphere model; operator='conv'"):
        create_model("spherenet9", operator="conv")
    model = create_model("cnn9", width_mult=0.0625)
    assert not any(isinstance(m, SphereConv2d) for m in model.modules())


def test_cli_train_and_compare_keep_the_baseline_plain(tmp_path, capsys):
    err = error_of(["train", "--model", "cnn9", "--operator", "sigmoid", *BASE, "--steps", "2",
                    "--output", str(tmp_path / "a")], capsys)
    assert "cnn9 is a plain CNN baseline" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    err = error_of(["compare", "--models", "cnn9,spherenet9", "--operator", "sigmoid", *BASE, "--steps", "2",
                    "--output", str(tmp_path / "c")], capsys)
    assert "--operator 'sigmoid' would set the operator of every configuration" in err and "--operators" in err


def test_compare_refuses_overrides_that_make_configurations_identical(tmp_path):
    spec = CompareSpec(runs=[{"name": "lin", "model": "spherenet9", "operator": "linear"},
                             {"name": "cos", "model": "spherenet9", "operator": "cosine"}],
                       train=dict(dataset="synthetic", steps=2, width_mult=0.0625))
    with pytest.raises(ValueError, match=r"--operator 'sigmoid' replaces the operator of lin, cos"):
        run_configs(spec, tmp_path, {"operator": "sigmoid"})
    assert set(run_configs(spec, tmp_path, {"lr": 0.5})) == {"lin", "cos"}
    spec = CompareSpec(runs=[{"name": "a", "model": "spherenet9", "lr": 0.1}, {"name": "b", "model": "spherenet9"}],
                       train=dict(dataset="synthetic", steps=2, width_mult=0.0625, lr=0.2))
    with pytest.raises(ValueError, match=r"configurations 'a' and 'b' are identical after the overrides "
                                         r"\(--lr 0.2 replaced what distinguished them\)"):
        run_configs(spec, tmp_path, {"lr": 0.2})
    assert set(run_configs(spec, tmp_path, {"steps": 1})) == {"a", "b"}  # a shared setting is fine


# ---------------------------------------------------------------- 2. the resolved config records what ran
def test_config_yaml_records_the_augmentation_that_ran(finished_run, tmp_path):
    from torchsphere.train.preflight import resolve_augment

    assert yaml.safe_load((finished_run / "config.yaml").read_text())["augment"] == "none"  # synthetic: none
    assert resolve_augment(TrainConfig(dataset="fashion-mnist")).augment == "flip"
    assert resolve_augment(TrainConfig(dataset="cifar100")).augment == "cifar10+"
    assert resolve_augment(TrainConfig(dataset="mnist", augment="flip")).augment == "flip"
    # a run folder written before the augmentation was resolved (augment: null) still resumes
    old = tmp_path / "old"
    assert main(["train", *TINY, "--steps", "4", "--eval-every", "2", "--output", str(old)]) == 0
    saved = yaml.safe_load((old / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump({**saved, "augment": None}))
    assert main(["train", "--output", str(old), "--resume"]) == 0


def test_default_augment_table_agrees_with_what_the_datasets_return():
    from torchsphere.data import build_dataset, default_augment

    for name in ("synthetic", "digits"):
        assert build_dataset(name).augment == default_augment(name)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        default_augment("imagenet")


# ---------------------------------------------------------------- 3. user errors: a message and exit code 2
@pytest.mark.parametrize(("extra", "message"), [
    (["--augment", "flipp"], "unknown augment 'flipp'; did you mean flip"),
    (["--operator", "cosine", "--sigmoid-k", "0.5"], "sigmoid_k applies only to operator 'sigmoid'"),
    (["--model", "resnet32", "--feature-dim", "2"], "model 'resnet32': resnet32: unexpected keyword argument(s) "
                                                    "['feature_dim']"),
    (["--widths", "16,32"], "spherenet9 has 3 stages; widths needs 3 entries, got (16, 32)"),
    (["--margin", "2"], "--margin 2.0 needs head 'gasoftmax' (got head='softmax')"),
    (["--momentum", "0.5"], "--momentum 0.5 needs optimizer 'sgd' (got optimizer='adam')"),
    (["--reg-s", "1"], "--reg-s 1.0 needs an MHE regularizer"),
    (["--regularizer", "mhs", "--reg-s", "1"], "--reg-s 1.0 needs an MHE regularizer"),
    (["--lr-schedule", "cosine", "--milestones", "5,8"], "--milestones (5, 8) needs lr_schedule 'multistep'"),
])
def test_configuration_errors_exit_2_before_training(extra, message, tmp_path, capsys):
    argv = ["train", *TINY, "--steps", "2", *extra, "--output", str(tmp_path / "run")]
    err = error_of(argv, capsys)  # a flag given twice: the last one wins
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_no_budget_is_an_error_that_names_the_flags(tmp_path, capsys):
    err = error_of(["train", *TINY, "--output", str(tmp_path / "r")], capsys)
    assert "no training budget: give --steps N or --epochs N" in err
    capsys.readouterr()
    assert exit_code(["train", "--help"]) == 0
    assert "a budget is required" in capsys.readouterr().out


def test_missing_dataset_and_data_dir_without_it_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TORCHSPHERE_DATA", raising=False)
    (tmp_path / "empty").mkdir()
    err = error_of(["train", "--model", "cnn9", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"),
                    "--steps", "2", "--output", str(tmp_path / "r")], capsys)
    assert "dataset 'mnist' not found. Looked in:" in err and str(tmp_path / "empty") in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_device_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    err = error_of(["train", *TINY, "--steps", "2", "--device", "cuda", "--output", str(tmp_path / "r")], capsys)
    assert "device 'cuda' was requested but torch.cuda.is_available() is False" in err


def test_folder_in_use_resume_changes_and_resume_without_checkpoint_exit_2(finished_run, tmp_path, capsys):
    err = error_of(["train", *TINY, "--steps", "4", "--eval-every", "4", "--output", str(finished_run)], capsys)
    assert "already holds a checkpoint; pass --resume to continue it (`torchsphere train --output" in err
    err = error_of(["train", "--output", str(finished_run), "--resume", "--lr", "0.5"], capsys)
    assert "cannot resume" in err and "lr: 0.01 -> 0.5" in err and "only " in err
    err = error_of(["train", *TINY, "--steps", "4", "--output", str(tmp_path / "fresh"), "--resume"], capsys)
    assert "holds no checkpoint (checkpoint.pt); nothing to resume" in err


def test_compare_rerun_with_another_configuration_lists_the_differences(tmp_path, capsys):
    argv = ["compare", "--models", "cnn9", *BASE, "--steps", "2", "--eval-every", "2", "--output",
            str(tmp_path / "cmp")]
    assert main(argv) == 0
    err = error_of([*argv, "--lr", "0.02"], capsys)
    assert "holds a run with another configuration (lr: 0.01 -> 0.02)" in err


def test_predict_on_a_file_that_is_no_image_exits_2(finished_run, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    err = error_of(["predict", str(finished_run), str(tmp_path / "notes.txt")], capsys)
    assert "is neither a .npy / .pt array nor an image file" in err and "Traceback" not in err


# ---------------------------------------------------------------- 4. the regularizer call
def test_regularizer_called_with_the_model_says_how_to_call_it():
    model = create_model("spherenet9", width_mult=0.0625)
    reg = HypersphericalRegularizer(model, method="mhe")
    with pytest.raises(TypeError, match=r"call it as reg\(\) .*not reg\(model\); got a PlainNet"):
        reg(model)
    assert torch.isfinite(reg())


# ---------------------------------------------------------------- 5. file modes follow the umask
@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == mode


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_run_files_are_readable_by_the_group_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        train(TrainConfig(model="cnn9", dataset="synthetic", width_mult=0.0625, bn_momentum=0.1, steps=2,
                          eval_every=2, batch_size=32, threads=1, quiet=True, output=str(tmp_path / "run")))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes


# ---------------------------------------------------------------- 6. interrupts, through a subprocess
_INTERRUPT = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)
import torchsphere.train.loop as loop
from torchsphere.cli import main
step, real = [0], loop.train_step
def train_step(run, x, y):
    step[0] += 1
    if step[0] == {at}:
        os.kill(os.getpid(), signal.{sig})  # arrives during the step; the loop stops at its end
    return real(run, x, y)
loop.train_step = train_step
sys.exit(main(sys.argv[1:]))
"""


def _run_cli(code: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_saves_a_checkpoint_prints_the_resume_command_and_resume_matches(sig, code, tmp_path):
    argv = ["train", *TINY, "--steps", "10", "--eval-every", "4", "--output", str(tmp_path / "run")]
    done = _run_cli(_INTERRUPT.format(at=6, sig=sig), argv)
    assert done.returncode == code, done.stderr
    assert f"interrupted by {sig} at step 6/10; checkpoint saved" in done.stderr
    assert f"torchsphere train --output {tmp_path / 'run'} --resume" in done.stderr
    assert "Traceback" not in done.stderr
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and not (tmp_path / "run" / "summary.json").exists()
    # resume with nothing but the folder: config.yaml supplies the rest; ends as an uninterrupted run
    assert main(["train", "--output", str(tmp_path / "run"), "--resume"]) == 0
    assert main(["train", *TINY, "--steps", "10", "--eval-every", "4", "--output", str(tmp_path / "ref")]) == 0
    def rows(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "wall_time"} for r in read_metrics(tmp_path / run / "metrics.csv")]

    assert rows("run") == rows("ref") and len(rows("run")) == 3
    resumed, ref = read_summary(tmp_path / "run" / "summary.json"), read_summary(tmp_path / "ref" / "summary.json")
    assert resumed["final"] == ref["final"]


def test_stop_signals_restore_the_previous_handlers():
    from torchsphere.train.interrupt import StopSignals

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under nohup / CI
    try:
        before = signal.getsignal(signal.SIGINT)
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is not before
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and stop.signum == signal.SIGINT
            assert signal.getsignal(signal.SIGINT) is before  # a second Ctrl-C acts at once
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, inherited)


# ---------------------------------------------------------------- 8. warnings for settings that do nothing here
def test_sync_bn_without_ddp_and_late_milestones_warn(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="torchsphere.train"):
        train(TrainConfig(model="cnn9", dataset="synthetic", width_mult=0.0625, bn_momentum=0.1, steps=2,
                          eval_every=2, batch_size=32, threads=1, quiet=True, sync_bn=True, milestones=(1, 5),
                          output=str(tmp_path / "run")))
    text = caplog.text
    assert "--sync-bn has no effect without DDP" in text and "--milestones [5] at or beyond the budget of 2" in text


# ---------------------------------------------------------------- 9. input size of the plain nets
def test_plain_net_on_another_size_says_how_to_build_it():
    model = create_model("spherenet9", in_channels=1, width_mult=0.0625)
    with pytest.raises(ValueError, match=r"create_model\(\.\.\., input_size=\(28, 28\)\)"):
        model(torch.randn(2, 1, 28, 28))
    model = create_model("spherenet9", in_channels=1, width_mult=0.0625, input_size=28)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# ---------------------------------------------------------------- 10. convert_to_sphere
def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))


def test_convert_warns_about_patterns_that_match_nothing():
    with pytest.warns(UserWarning, match=r"exclude patterns \['\*\.downsampel\.\*'\] match no module"):
        convert_to_sphere(_net(), exclude=["0", "*.downsampel.*"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = convert_to_sphere(_net(), exclude=["0"])  # every pattern matches: no warning
    assert isinstance(model[3], SphereConv2d) and not isinstance(model[0], SphereConv2d)


def test_convert_with_learnable_sigmoid_warns_about_the_new_parameters():
    with pytest.warns(UserWarning, match=r"added 2 learnable parameter\(s\) \(0\.sigmoid_k_raw, 3\.sigmoid_k_raw\): "
                                         r"build the optimizer after the conversion"):
        convert_to_sphere(_net(), "learnable_sigmoid")


def test_memory_efficient_inplace_error_names_the_option():
    layer = SphereConv2d(2, 3, 3, padding=1, memory_efficient=True)
    out = layer(torch.randn(2, 2, 5, 5, requires_grad=True))
    torch.relu_(out)
    with pytest.raises(RuntimeError, match=r"(?s)inplace operation.*memory_efficient=True.*memory_efficient=False"):
        out.sum().backward()


# ---------------------------------------------------------------- 11. predict's inputs
def test_predict_reads_unit_floats_like_uint8_names_files_and_resizes(finished_run, tmp_path, capsys):
    pixels = np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "raw.npy", pixels)
    np.save(tmp_path / "unit.npy", (pixels / 255.0).astype(np.float32))  # the ToTensor convention
    capsys.readouterr()
    assert main(["predict", str(finished_run), str(tmp_path / "raw.npy"), str(tmp_path / "unit.npy"), "--json",
                 "--top-k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    raw, unit = out[:3], out[3:]
    for a, b in zip(raw, unit):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-5)
    assert unit[0]["input"] == f"{tmp_path / 'unit.npy'}[0]"
    np.save(tmp_path / "big.npy", np.kron(pixels[:1], np.ones((2, 2), np.uint8)))  # 16x16
    err = error_of(["predict", str(finished_run), str(tmp_path / "big.npy")], capsys)
    assert "size (8, 8)" in err and "--resize" in err
    assert main(["predict", str(finished_run), str(tmp_path / "big.npy"), "--resize"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'big.npy'}[0]: pattern_")


# ---------------------------------------------------------------- 12. inference does not wait for a compilation
def test_fused_kernels_run_eagerly_for_inference_until_compiled(monkeypatch):
    monkeypatch.setattr(fused, "_WARM", set())
    monkeypatch.setattr(fused, "_COMPILED", {})
    big = fused.COMPILE_MIN_NUMEL
    assert fused._kernel("forward", fused.tail_forward, big, inference=True) is fused.tail_forward
    # training (an input requires grad; grad mode is off inside autograd.Function, so it cannot be the signal)
    assert fused._kernel("forward", fused.tail_forward, big, inference=False) is not fused.tail_forward
    monkeypatch.setattr(fused, "_WARM", {"forward"})  # once a training step compiled it, inference reuses it
    assert fused._kernel("forward", fused.tail_forward, big, inference=True) is not fused.tail_forward


def test_inference_forward_does_not_compile(monkeypatch):
    monkeypatch.setattr(fused, "_WARM", set())
    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 0)
    layer = SphereConv2d(2, 3, 3, padding=1, memory_efficient=True)
    with torch.no_grad():
        out = layer(torch.randn(2, 2, 5, 5))
    assert fused._COMPILED == {} and out.shape == (2, 3, 5, 5)  # nothing was handed to torch.compile
