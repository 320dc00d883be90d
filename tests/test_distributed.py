"""DDP (torchsphere.train.distributed): sharding, environment parsing, and a 2-process gloo run through torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchsphere.train import TrainConfig, read_metrics, train
from torchsphere.train import distributed as dist_utils
from torchsphere.train.distributed import DistInfo, env_info, gather_objects, replica_divergence, shard_batch

ROOT = Path(__file__).resolve().parents[1]


def test_shards_partition_the_global_batch():
    batch = torch.randperm(48)[:24]
    shards = [shard_batch(batch, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert all(s.numel() == 8 for s in shards)
    assert torch.equal(torch.cat(shards), batch)  # disjoint, complete and in order
    assert torch.equal(shard_batch(batch, DistInfo()), batch)


def test_env_info(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert env_info() == DistInfo(0, 1, 0) and env_info().is_main and not env_info().enabled
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ValueError, match="invalid torchrun environment: RANK=5 WORLD_SIZE=4"):
        env_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="malformed torchrun environment: RANK='x'"):
        env_info()


def test_collectives_of_cpu_tensors_run_on_cuda_under_nccl(monkeypatch):
    """NCCL rejects CPU tensors: the loop's CPU loss sums must travel through the current CUDA device."""
    monkeypatch.setattr(dist_utils.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dist_utils.collective_device(torch.zeros(2)) == torch.device("cuda", 3)
    monkeypatch.setattr(dist_utils.dist, "get_backend", lambda: "gloo")
    assert dist_utils.collective_device(torch.zeros(2)) == torch.device("cpu")


def test_single_process_fallbacks():
    assert replica_divergence(torch.nn.Linear(2, 2), DistInfo()) == 0.0
    assert gather_objects({"a": 1}, DistInfo()) == [{"a": 1}]


def test_torchrun_two_cpu_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    args = dict(model="spherenet9", dataset="synthetic", width_mult=0.0625, norm="none", steps=10, batch_size=32,
                eval_every=5, lr=0.003, lr_schedule="constant", threads=1, quiet=True)
    ddp_out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               "-m", "torchsphere", "train", "--model", "spherenet9", "--dataset", "synthetic", "--width-mult",
               "0.0625", "--norm", "none", "--steps", "10", "--batch-size", "32", "--eval-every", "5", "--lr",
               "0.003", "--lr-schedule", "constant", "--threads", "1", "--quiet", "--output", str(ddp_out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((ddp_out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["replica_max_abs_diff"] == 0.0  # DDP kept both ranks' parameters identical
    assert sorted(p.name for p in ddp_out.iterdir() if not p.name.startswith(".")) == [
        "best.safetensors", "checkpoint.pt", "config.yaml", "data.json", "metrics.csv", "model.safetensors",
        "summary.json"]
    single = train(TrainConfig(**args, output=str(tmp_path / "single")))
    state = torch.load(ddp_out / "checkpoint.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["data"], state["rng"][1]["data"])  # per rank
    ddp_weights = state["model"]
    one_weights = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)["model"]
    for key in one_weights:
        torch.testing.assert_close(ddp_weights[key], one_weights[key], rtol=1e-4, atol=1e-5)
    rows_ddp, rows_one = read_metrics(ddp_out / "metrics.csv"), read_metrics(tmp_path / "single" / "metrics.csv")
    for a, b in zip(rows_ddp, rows_one):
        assert a["step"] == b["step"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_acc"] == b["val_acc"]
    assert summary["final"]["test_acc"] == single["final"]["test_acc"]


def test_sync_bn_on_cpu_is_refused_under_ddp(monkeypatch, tmp_path):
    # the check runs before any process group is needed: fake a 2-rank environment without initializing it
    from torchsphere.train import distributed, loop

    monkeypatch.setattr(loop.dist_utils, "init_distributed",
                        lambda device: (distributed.DistInfo(0, 2, 0), torch.device("cpu")))
    config = TrainConfig(model="spherenet9", dataset="synthetic", width_mult=0.0625, steps=2, batch_size=32,
                         sync_bn=True, quiet=True, output=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="sync_bn needs device 'cuda'"):
        loop.setup(config)
