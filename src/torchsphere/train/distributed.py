"""Data-parallel training with PyTorch DDP, launched by ``torchrun`` (PyTorch's elastic launcher).

Single machine, N processes (one per GPU, or N CPU processes with gloo)::

    torchrun --nproc_per_node=2 -m torchsphere train --model spherenet9 --dataset fashion-mnist --output runs/ddp

Several machines (run the same command on every node; ``--node_rank`` 0..nnodes-1, the rendezvous host is node 0)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --rdzv_backend=c10d \\
        --rdzv_endpoint=node0.example:29500 -m torchsphere train ... --device cuda --output /shared/runs/ddp

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; the process group uses
NCCL on GPUs (one device per local rank) and gloo on CPU. The run folder must be on a file system visible to rank 0
(only rank 0 writes; every rank reads the checkpoint on ``--resume``, so on several nodes it must be shared).

Design:

- ``--batch-size`` is the *global* batch; each rank takes ``batch_size / world_size`` samples of it. Every rank draws
  the same permutation of the in-memory training tensors from a generator seeded by (seed, epoch), cuts the global
  batch from it and keeps its own contiguous slice: the sharding of a ``DistributedSampler`` with ``drop_last``, but
  step-aligned, so a run on N processes sees exactly the batches of a single-process run with the same global batch
  (identical results up to BatchNorm statistics, which ``--sync-bn`` makes global, and float summation order).
- The angular head lives inside the model, so the one DDP wrapper synchronizes the class weights too (PML #710).
- Regularizers (MHE, orthonormality) are computed on every rank from the full, replicated weights: no gather needed.
- Evaluation runs the unwrapped model on every rank over the full evaluation set (identical results); rank 0 logs and
  writes files; barriers keep the ranks together around checkpoints.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Reads RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun); a plain process is rank 0 of 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"malformed torchrun environment: RANK={os.environ.get('RANK')!r} "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}"
                         ) from exc
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def init_distributed(device: str = "cpu") -> tuple[DistInfo, torch.device]:
    """Initializes the process group when launched by torchrun; returns the rank info and this rank's device.

    Args:
        device: "cpu" (gloo backend) or "cuda" (NCCL, device ``cuda:LOCAL_RANK``).
    """
    info = env_info()
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
        torch.cuda.set_device(info.local_rank)
        dev = torch.device("cuda", info.local_rank)
    else:
        dev = torch.device("cpu")
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(minutes=30))
    return info, dev


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Wraps ``model`` (head included) in DDP when distributed (convert BatchNorm to SyncBatchNorm before, with
    ``nn.SyncBatchNorm.convert_sync_batchnorm``, for ``--sync-bn``)."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def shard_batch(indices: Tensor, info: DistInfo) -> Tensor:
    """This rank's contiguous slice of one global batch of indices (equal sizes on every rank)."""
    per_rank = indices.numel() // info.world_size
    return indices[info.rank * per_rank:(info.rank + 1) * per_rank]


def barrier(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()


def collective_device(values: Tensor) -> torch.device:
    """Where a collective on ``values`` must run: the current CUDA device under NCCL (which rejects CPU tensors),
    else the tensor's own device (gloo takes CPU and CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return values.device


def all_reduce_sum(values: Tensor, info: DistInfo) -> Tensor:
    """Sums a tensor over ranks (a copy on ``values``' device; unchanged when not distributed). CPU tensors (the
    loop's running loss sums) travel through the collective's device and back."""
    if not (info.enabled and dist.is_initialized()):
        return values.clone()
    reduced = values.to(collective_device(values), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not (info.enabled and dist.is_initialized()):
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not (info.enabled and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def replica_divergence(model: nn.Module, info: DistInfo) -> float:
    """Largest absolute difference between this rank's parameters and rank 0's (0.0 when not distributed).

    DDP keeps replicas identical by averaging gradients; the loop records this check in ``summary.json``.
    """
    if not (info.enabled and dist.is_initialized()):
        return 0.0
    worst = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        reference = p.detach().clone()
        dist.broadcast(reference, src=0)
        worst = torch.maximum(worst, (p.detach() - reference).abs().max().double().cpu())
    worst = worst.to(next(model.parameters()).device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def cleanup(info: DistInfo) -> None:
    """Destroys the process group (after a final barrier)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
