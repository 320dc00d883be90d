"""Forward+backward time of SphereConv2d against nn.Conv2d of the same shape, eager and compiled (docs/benchmarks.md).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). For each (batch, C_in, H=W, C_out) with
3x3 kernels and padding 1, a fresh process per thread count builds ``nn.Conv2d`` (no bias), ``SphereConv2d`` for
every operator in the layers' default mode and in ``memory_efficient`` mode (same weight), and a slow unfold
reference (``F.unfold`` patches, per-patch cosine, the linear operator), and with ``--compile`` also
``torch.compile`` of each module; then it times one forward+backward of each (gradients for the input and the
weight) in interleaved rounds: A, B, C, ... in an order rotated every round, so that load from other processes hits
all candidates alike. A cell is the median over rounds of a candidate's time over ``nn.Conv2d``'s time in the same
round (eager over eager, compiled over compiled: a paired ratio in one process); the ``nn.Conv2d`` rows give its
median time. The target: SphereConv2d (linear) <= 1.10x ``nn.Conv2d`` in every shape, at 1 and 2 threads, eager
and compiled; the patch norm costs O(C_in H W) against the convolution's O(C_in C_out k^2 H W).

Each thread count runs in its own process (``OMP_NUM_THREADS=N``, ``torch.set_num_threads(N)``): the thread pool
cannot be resized reliably in one process. ``--autocast bf16`` runs the forward under bfloat16 autocast (on CPU too,
where it is slow without AVX-512-BF16/AMX hardware; the sphere tail runs in float32 inside it either way). The
section written is ``bench_ops`` (CPU, float32), with ``_cuda`` and/or ``_bf16`` appended for those runs; a CUDA
section is labelled with ``torch.cuda.get_device_name()``.

Time on an otherwise idle 2-core x86_64 CPU (from the step times of the earlier, eager-only figures; a ``--quick``
run at 1 thread took 2.3 min wall, 0.3 min CPU, at load 6-7, i.e. other jobs stretch it several-fold): the default
full run (batch 128, 10 rounds, threads 1 and 2, eager, with the unfold reference) about 6 minutes; ``--compile``
makes it 15-20 minutes -- the compiled candidates step as long again, and Inductor compiles 9 modules per shape
for the first thread count (the second reuses its on-disk cache).

Usage:
    python benchmarks/bench_ops.py                       # full: batch 128, 10 rounds, threads 1 and 2
    python benchmarks/bench_ops.py --compile             # + the compiled column
    python benchmarks/bench_ops.py --quick               # batch 8, 3 rounds: checks that the script runs
    python benchmarks/bench_ops.py --device cuda --autocast bf16 --compile --threads 4
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
import _harness as H  # noqa: E402
from _report import DOC, machine, write_section  # noqa: E402

from torchsphere.functional import angular_activation  # noqa: E402
from torchsphere.nn import SphereConv2d  # noqa: E402

OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
MODES = ("default", "memory_efficient")  # SphereConv2d(memory_efficient=False) / (memory_efficient=True)
SHAPES = ((128, 64, 32, 64), (128, 128, 16, 128), (128, 256, 8, 256))  # (batch, C_in, H = W, C_out)
TARGET = 1.10  # SphereConv2d (linear) / nn.Conv2d, eager and compiled
TARGET_OPERATORS = ("linear",)
CONV = "nn.Conv2d"
REFERENCE = "unfold reference (linear)"


def unfold_sphere_conv2d(x: Tensor, weight: Tensor, operator: str = "linear", eps: float = 1e-4) -> Tensor:
    """Naive SphereConv2d (3x3, stride 1, padding 1) by explicit im2col: the slow reference of the tests' kind."""
    n, _, h, w = x.shape
    patches = F.unfold(x, weight.shape[2:], padding=1)  # (N, C_in k k, H W)
    w_flat = weight.flatten(1)  # (C_out, C_in k k)
    dot = w_flat @ patches  # (N, C_out, H W)
    x_norm = torch.sqrt(patches.square().sum(1, keepdim=True) + eps)  # (N, 1, H W)
    w_norm = torch.sqrt(w_flat.square().sum(1, keepdim=True) + eps)  # (C_out, 1)
    return angular_activation(dot / x_norm / w_norm, operator).reshape(n, -1, h, w)


def sphere_name(operator: str, mode: str) -> str:
    return f"SphereConv2d {operator} {mode}"


def candidates(c_in: int, c_out: int, operators, modes, reference: bool, device: str
               ) -> dict[str, Callable[[Tensor], Tensor]]:
    """name -> module or function, all sharing one weight."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, device=device)
    out: dict[str, Callable[[Tensor], Tensor]] = {CONV: conv}
    for operator in operators:
        for mode in modes:
            layer = SphereConv2d(c_in, c_out, 3, padding=1, operator=operator,
                                 memory_efficient=mode == "memory_efficient", device=device)
            layer.weight = conv.weight
            out[sphere_name(operator, mode)] = layer
    if reference:
        out[REFERENCE] = lambda x: unfold_sphere_conv2d(x, conv.weight)
    return out


def child(job: dict) -> None:
    """Measures one shape at one thread count (in a fresh process); writes the raw per-round times."""
    with H.child_context(job) as result:
        batch, c_in, hw, c_out = job["shape"]
        device = job["device"]
        torch.manual_seed(0)
        fns = candidates(c_in, c_out, job["operators"], job["modes"], job["reference"], device)
        x = torch.randn(batch, c_in, hw, hw, device=device, requires_grad=True)
        grads: dict[torch.dtype, Tensor] = {}
        grad32 = torch.randn(batch, c_out, hw, hw, device=device)

        def step(fn: Callable[[Tensor], Tensor]) -> Callable[[], None]:
            def run() -> None:
                x.grad = None
                with H.autocast(device, job["autocast"]):
                    out = fn(x)
                if out.dtype not in grads:
                    grads[out.dtype] = grad32.to(out.dtype)
                out.backward(grads[out.dtype])
            return run

        steps = {f"eager|{name}": step(fn) for name, fn in fns.items()}
        if job["compile"]:
            for name, fn in fns.items():
                if name != REFERENCE:
                    steps[f"compiled|{name}"] = step(H.compile_fn(fn, job["backend"]))
        result["times"] = H.interleaved(steps, job["rounds"], device, job["inner"])


def parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is BATCH,C_IN,HW,C_OUT of positive ints; got {text!r}")
    return shape  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 8, 3 rounds: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 10, quick 3)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts, each measured in a fresh process (default: 1 2 on CPU, torch's on CUDA)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile column (module vs nn.Conv2d)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; 'eager' only traces, for a quick check)")
    p.add_argument("--device", choices=H.DEVICES, default="cpu")
    p.add_argument("--autocast", choices=H.AUTOCASTS, default="none",
                   help="bf16: forward under bfloat16 autocast (meant for CUDA; allowed on CPU)")
    p.add_argument("--shapes", type=parse_shape, nargs="+", default=None, metavar="B,C_IN,HW,C_OUT",
                   help="shapes to run (default: the three of the target)")
    p.add_argument("--batch", type=int, default=None, help="override every shape's batch (quick: 8)")
    p.add_argument("--operators", nargs="+", choices=OPERATORS, default=list(OPERATORS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="SphereConv2d modes: default (memory_efficient=False), memory_efficient")
    p.add_argument("--no-reference", action="store_true", help="skip the slow unfold reference")
    p.add_argument("--inner", type=int, default=None,
                   help="calls per timed sample (default 1 on CPU, 10 on CUDA, where one call is too short)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: shapes not started in time are left out (marked in the section)")
    H.add_output_arguments(p, DOC)
    return p


def section_name(device: str, autocast: str) -> str:
    return "bench_ops" + ("_cuda" if device == "cuda" else "") + ("_bf16" if autocast == "bf16" else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = H.parse_or_run_child(parser, argv, child)
    if args is None:  # this process was a measuring child
        return 0
    try:
        rounds = args.rounds if args.rounds is not None else (3 if args.quick else 10)
        H.check_positive("--rounds", rounds)
        H.check_positive("--batch", args.batch)
        H.check_positive("--inner", args.inner)
        H.check_positive("--max-minutes", args.max_minutes)
        H.check_device(args.device, args.autocast)
        threads = H.check_threads(args.threads, args.device)
    except ValueError as err:
        parser.error(str(err))
    batch = args.batch or (8 if args.quick else None)
    shapes = [(batch or b, c, hw, co) for b, c, hw, co in (args.shapes or SHAPES)]
    inner = args.inner or (10 if args.device == "cuda" else 1)
    deadline = H.Deadline(args.max_minutes)
    kinds = ["eager", "compiled"] if args.compile else ["eager"]
    names = [CONV] + [sphere_name(o, m) for o in args.operators for m in args.modes] + \
        ([] if args.no_reference else [REFERENCE])
    command = " ".join(["python benchmarks/bench_ops.py", *(sys.argv[1:] if argv is None else argv)])

    start, load_start = time.perf_counter(), H.load1()
    done: dict[tuple, dict] = {}  # (shape, threads) -> child result
    missing: dict[tuple, str] = {}  # (shape, threads) -> why not measured
    failed = False

    def render(final: bool) -> str:
        headers = ["(batch, C_in, H=W, C_out)", "candidate", "mode"] + \
            [f"{t} thr {k}" for t in threads for k in kinds]
        rows, over, cells = [], {"linear": 0, "all": 0}, {"linear": 0, "all": 0}
        for shape in shapes:
            for name in names:
                row = [str(shape), name.rsplit(" ", 1)[0] if name.startswith("SphereConv2d") else name,
                       name.rsplit(" ", 1)[1] if name.startswith("SphereConv2d") else "—"]
                for t in threads:
                    res = done.get((shape, t))
                    for kind in kinds:
                        key, base = f"{kind}|{name}", f"{kind}|{CONV}"
                        if res is None:
                            row.append(missing.get((shape, t), "…"))
                        elif key not in res["times"]:
                            row.append("—")
                        elif name == CONV:
                            row.append(f"{1e3 * statistics.median(res['times'][key]):.1f} ms")
                        else:
                            ratio = H.paired_median(res["times"], key, base)
                            targeted = name.startswith("SphereConv2d")
                            row.append(H.ratio_cell(ratio, TARGET if targeted else None))
                            if targeted:
                                for group in ("all",) + (("linear",) if " linear " in name else ()):
                                    cells[group] += 1
                                    over[group] += ratio > TARGET
                rows.append(row)
        wall = time.perf_counter() - start
        device = H.device_label(args.device)
        status = H.status_note(final, bool(missing))
        return "\n".join([
            f"## SphereConv2d vs nn.Conv2d: forward + backward (bench_ops, {device}"
            f"{', bf16 autocast' if args.autocast == 'bf16' else ', float32'})",
            "",
            f"Command: `{command}`. Machine: {machine(args.device)}. "
            + H.load_line(load_start, H.load1(), list(done.values()), os.cpu_count())
            + f" Wall time {wall / 60:.1f} min, CPU time of the measuring processes {H.child_cpu_seconds() / 60:.1f}"
              " min.",
            "",
            "3x3 kernels, padding 1, no bias; gradients for input and weight. Each thread count is measured in a "
            "fresh process; in it every candidate runs twice to warm up (compiling, for the compiled column), then "
            f"all run interleaved in a rotated order for {rounds} rounds ({inner} call(s) per timed sample). A cell "
            "is the median over rounds of the candidate's time over nn.Conv2d's time in the same round (eager "
            "over eager nn.Conv2d, compiled over `torch.compile(nn.Conv2d)`); the nn.Conv2d rows give its median "
            "time. `default` = `SphereConv2d(memory_efficient=False)` (the layers' default), `memory_efficient` "
            "= `memory_efficient=True` (as the models build them). "
            f"Target: SphereConv2d linear <= {TARGET:.2f}x nn.Conv2d in every shape, eager and compiled; cells "
            f"above {TARGET:.2f}x are marked {H.OVER} for every operator.",
            "",
            *H.markdown_table(headers, rows, 3),
            "",
            f"Over target: linear {over['linear']} of {cells['linear']} cells, all operators {over['all']} of "
            f"{cells['all']}." + status,
        ])

    for shape in shapes:
        for t in threads:
            if deadline.expired():
                missing[(shape, t)] = "budget"
                continue
            job = dict(shape=shape, operators=args.operators, modes=args.modes, reference=not args.no_reference,
                       rounds=rounds, inner=inner, compile=args.compile, backend=args.compile_backend,
                       device=args.device, autocast=args.autocast)
            try:
                done[(shape, t)] = H.run_child(Path(__file__), job, t, deadline.left())
            except H.ChildError as err:
                print(f"bench_ops: {shape} at {t} thread(s) failed: {err}", file=sys.stderr)
                missing[(shape, t)] = "failed"
                failed = True
            text = render(final=False)
            print(f"bench_ops: {shape} at {t} thread(s): {'failed' if (shape, t) in missing else 'done'}",
                  flush=True)
            if not args.no_write:  # partial results survive an interrupted run
                write_section(section_name(args.device, args.autocast), text, args.doc)
    text = render(final=True)
    print(text)
    if not args.no_write:
        write_section(section_name(args.device, args.autocast), text, args.doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
