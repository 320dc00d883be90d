"""Forward+backward time of SphereConv2d against nn.Conv2d of the same shape (docs/benchmarks.md).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). For each (batch, C_in, H=W, C_out) with
3x3 kernels and padding 1, one process builds ``nn.Conv2d`` (no bias), ``SphereConv2d`` for every operator (same
weight) and a slow unfold reference (``F.unfold`` patches, per-patch cosine, the linear operator), then times one
forward+backward of each (gradients for the input and the weight) in interleaved rounds: A, B, C, ... in a rotated
order every round, so that load from other processes hits all candidates alike. The figure per candidate is the
median over rounds of its time divided by ``nn.Conv2d``'s time in the same round (a paired ratio), next to the
median time itself. The issue's target is SphereConv2d <= 1.10x ``nn.Conv2d`` in every shape: the patch norm costs
O(C_in H W) against the convolution's O(C_in C_out k^2 H W).

Usage:
    python benchmarks/bench_ops.py            # full: batch 128, 10 rounds, writes docs/benchmarks.md
    python benchmarks/bench_ops.py --quick    # batch 8, 3 rounds: checks that the script runs
    python benchmarks/bench_ops.py --threads 1 --rounds 7   # on a machine shared with other jobs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

from torchsphere.functional import angular_activation  # noqa: E402
from torchsphere.nn import SphereConv2d  # noqa: E402

OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
SHAPES = ((128, 64, 32, 64), (128, 128, 16, 128), (128, 256, 8, 256))  # (batch, C_in, H = W, C_out)


def unfold_sphere_conv2d(x: Tensor, weight: Tensor, operator: str = "linear", eps: float = 1e-4) -> Tensor:
    """Naive SphereConv2d (3x3, stride 1, padding 1) by explicit im2col: the slow reference of the tests' kind."""
    n, _, h, w = x.shape
    patches = F.unfold(x, weight.shape[2:], padding=1)  # (N, C_in k k, H W)
    w_flat = weight.flatten(1)  # (C_out, C_in k k)
    dot = w_flat @ patches  # (N, C_out, H W)
    x_norm = torch.sqrt(patches.square().sum(1, keepdim=True) + eps)  # (N, 1, H W)
    w_norm = torch.sqrt(w_flat.square().sum(1, keepdim=True) + eps)  # (C_out, 1)
    return angular_activation(dot / x_norm / w_norm, operator).reshape(n, -1, h, w)


def candidates(c_in: int, c_out: int) -> dict[str, Callable[[Tensor], Tensor]]:
    """name -> module or function, all sharing one weight."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    out: dict[str, Callable[[Tensor], Tensor]] = {"nn.Conv2d": conv}
    for operator in OPERATORS:
        layer = SphereConv2d(c_in, c_out, 3, padding=1, operator=operator)
        layer.weight = conv.weight
        out[f"SphereConv2d {operator}"] = layer
    out["unfold reference (linear)"] = lambda x: unfold_sphere_conv2d(x, conv.weight)
    return out


def time_step(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> float:
    """Seconds for one forward + backward (input and weight gradients)."""
    x.grad = None
    start = time.perf_counter()
    fn(x).backward(grad)
    return time.perf_counter() - start


def bench_shape(shape: tuple[int, int, int, int], rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (median seconds, median ratio to nn.Conv2d in the same round)."""
    batch, c_in, hw, c_out = shape
    torch.manual_seed(0)
    fns = candidates(c_in, c_out)
    names = list(fns)
    x = torch.randn(batch, c_in, hw, hw, requires_grad=True)
    grad = torch.randn(batch, c_out, hw, hw)
    for name in names:  # warm-up
        time_step(fns[name], x, grad)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(time_step(fns[name], x, grad))
    base = times["nn.Conv2d"]
    return {name: (statistics.median(t), statistics.median(a / b for a, b in zip(t, base)))
            for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 10, quick 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's); 1 resists stalls on a machine shared with others")
    parser.add_argument("--no-write", action="store_true", help="print only, leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 10)
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1; got {rounds}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    shapes = [(8 if args.quick else b, c, hw, co) for b, c, hw, co in SHAPES]

    load_start = os.getloadavg()[0]
    lines = ["| (batch, C_in, H=W, C_out) | candidate | median fwd+bwd (ms) | median ratio to nn.Conv2d |",
             "|---|---|---:|---:|"]
    for shape in shapes:
        for name, (sec, ratio) in bench_shape(shape, rounds).items():
            lines.append(f"| {shape} | {name} | {1e3 * sec:.1f} | {ratio:.2f}x |")
            print(lines[-1], flush=True)
    command = "python benchmarks/bench_ops.py" + (" --quick" if args.quick else "") + \
        (f" --rounds {args.rounds}" if args.rounds else "") + (f" --threads {args.threads}" if args.threads else "")
    section = "\n".join([
        "## SphereConv2d vs nn.Conv2d: forward + backward (bench_ops)",
        "",
        f"Command: `{command}`. Machine: {machine()}. 1-minute load average {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end (above the core count, other jobs shared the CPUs and the figures "
        "are noisy).",
        "",
        "3x3 kernels, padding 1, float32, no bias; gradients for input and weight. Candidates run interleaved in a "
        f"rotated order for {rounds} rounds after one warm-up step; the ratio is the median over rounds of the "
        "candidate's time over nn.Conv2d's time in the same round. SphereConv2d uses its default path. Target "
        "(the project's speed target): SphereConv2d <= 1.10x nn.Conv2d.",
        "",
        *lines,
    ])
    if not args.no_write:
        write_section("bench_ops", section)


if __name__ == "__main__":
    main()
