"""Training across sites on torch.distributed: two gloo processes under torchrun (one per site) against the K = 2
simulation in one process, and the averaging collective against PyTorch's model_averaging utility."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from torchsphere.train import TrainConfig, read_metrics, train
from torchsphere.train.collaborative import read_site_metrics

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.model_averaging.utils import average_parameters
    from torchsphere.train import TrainConfig, train
    from torchsphere.train.averaging import SiteReducer, average_tensors_
    from torchsphere.train.distributed import init_distributed

    info, _ = init_distributed("cpu")
    torch.manual_seed(100 + info.rank)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    mine = [p.detach().clone() for p in params]
    everyone = [None, None]
    dist.all_gather_object(everyone, [t.clone() for t in mine])
    average_tensors_([mine], [1.0], SiteReducer(info))              # equal weights: the utility's case
    average_parameters(iter(params), dist.group.WORLD)               # PyTorch's (fp32, p.data rebinding)
    utility = all(torch.equal(a, p.detach()) for a, p in zip(mine, params))
    weighted = [t.clone() for t in everyone[info.rank]]
    average_tensors_([weighted], [(3.0, 5.0)[info.rank]], SiteReducer(info))
    reference = [((3 * everyone[0][i].double() + 5 * everyone[1][i].double()) / 8).float() for i in range(2)]
    simulated = [[t.clone() for t in everyone[k]] for k in range(2)]
    average_tensors_(simulated, [3.0, 5.0], SiteReducer())           # the same sites in one process
    result = dict(utility=utility, reference=all(torch.equal(a, b) for a, b in zip(weighted, reference)),
                  simulated=all(torch.equal(a, b) for a, b in zip(weighted, simulated[info.rank])))
    if info.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    train(TrainConfig(**json.loads(sys.argv[2])))
''')


def test_two_gloo_processes_equal_the_in_process_simulation(tmp_path):
    args = dict(model="spherenet9", dataset="synthetic", width_mult=0.0625, bn_momentum=0.1, batch_size=32,
                lr=0.01, sites=2, rounds=2, site_partition="dirichlet", dirichlet_alpha=1.0, avg_bn="recompute",
                avg_optimizer="average", threads=1, quiet=True)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    checks = tmp_path / "checks.json"
    gloo = tmp_path / "gloo"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
               str(worker), str(checks), json.dumps(dict(args, output=str(gloo)))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(checks.read_text()) == dict(utility=True, reference=True, simulated=True)

    simulated = tmp_path / "simulated"
    single = train(TrainConfig(**args, output=str(simulated)))
    summary = json.loads((gloo / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sites"]["processes"] == 2 and single["world_size"] == 1
    assert summary["replica_max_abs_diff"] == 0.0  # both processes hold the same averaged model
    sizes = summary["sites"]["partition"]["sizes"]
    assert sizes[0] != sizes[1]  # unequal shards: unequal local phases, no deadlock
    a = torch.load(gloo / "checkpoint.pt", weights_only=True)
    b = torch.load(simulated / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])  # bit for bit
    assert [s["site"] for s in a["sites"]] == [0, 1]
    for sa, sb in zip(a["sites"], b["sites"]):
        assert torch.equal(sa["generator"], sb["generator"])
    compared = ("step", "epoch", "lr", "train_loss", "train_acc", "val_acc", "test_acc")
    rows_a, rows_b = read_metrics(gloo / "metrics.csv"), read_metrics(simulated / "metrics.csv")
    assert [[r[k] for k in compared] for r in rows_a] == [[r[k] for k in compared] for r in rows_b]
    assert read_site_metrics(gloo / "sites.csv") == read_site_metrics(simulated / "sites.csv")
    assert summary["final"] == single["final"]
