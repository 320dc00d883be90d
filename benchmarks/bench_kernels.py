"""Each compiled pointwise kernel of the fused SphereConv tail against one pass over memory (docs/benchmarks.md).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). The fused path
(:mod:`torchsphere.functional.fused`) runs the tail of a SphereConv layer as three compiled kernels over the
(N, C_out, H', W') output: the forward g(z r), the backward from the saved z (the layers' default) and the backward
from the saved output (``memory_efficient=True``, as ``create_model`` builds the models), both backward kernels
writing dL/dz into the reused buffer and summing dL/dr (and, for ``learnable_sigmoid``, dL/dk) in the same kernel,
as on the CPU training path. This script times each of them per operator on one tensor shape, in the same rounds as
one pass over that tensor (``torch.mul(a, s, out=b)``: one read and one write, the cheapest loop PyTorch has), so
that a kernel's cost reads as a number of passes: cosine does only memory traffic; linear and the sigmoids add the
polynomials of :mod:`torchsphere.functional.fast_math`, an exp (sigmoid forward), a log (sigmoid from the output) and
divisions, and where that arithmetic costs more than the traffic the kernel is compute-bound.

Beside it, the same kernels compiled in two of PyTorch's defaults that the library changes for them: with the
Python floats -- pi, the polynomials' coefficients, the clamp bounds, the sigmoid k -- as run-time inputs of the
generated code (``torch._dynamo.config.specialize_float = False``), which the library avoids by compiling them as
constants (``fused._call_compiled``), and with the C++ compiler's floating-point contraction off
(``torch._inductor.config.cpp.enable_floating_point_contract_flag = "off"``), where the library compiles its kernels
with ``"fast"`` (``fused.KERNEL_OPTIONS``: each multiply-add of the polynomials becomes one fused multiply-add).

Inputs: z uniform in [-0.9, 0.9] with r = 1 (so the cosines cover the domain without the clamp), dL/dout normal,
k = 0.3 (``learnable_sigmoid``: a per-channel tensor of 0.3, so dL/dk is computed and reduced). Each thread count is
measured in a fresh process (``OMP_NUM_THREADS=N``, ``torch.set_num_threads(N)``, Inductor's compile workers off so
that they do not run beside the timing); every kernel runs twice to compile and warm up, then all run interleaved in
a rotated order, each call after writing a 512 MiB scratch tensor (not timed), which evicts the tensors of the
call before from the caches: a kernel reads its inputs from memory, as inside a training step, where the
convolutions between two passes over a tensor push it out. A cell is the median over rounds. About 3.5 minutes per
thread count on an idle 2-core x86_64 CPU once Inductor's on-disk cache holds the kernels (the first run compiles
36, a few minutes more).

Usage:
    python benchmarks/bench_kernels.py                 # (128, 32, 28, 28), threads 1 and 2, writes bench_kernels
    python benchmarks/bench_kernels.py --quick --no-write --backend eager    # checks that it runs
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from _report import DOC, machine, publish  # noqa: E402

from torchsphere.functional import fused  # noqa: E402

OPERATORS = ("cosine", "linear", "sigmoid", "learnable_sigmoid")
KERNELS = ("forward", "backward from z", "backward from the output")
# how the compiled kernels take Python floats and whether the C++ compiler contracts a * b + c into one instruction
MODES = ("constants", "inputs", "uncontracted")
SHAPE = (128, 32, 28, 28)  # the first stage of SphereNet-9 at width 0.25 on 28x28x1, batch 128
QUICK_SHAPE = (2, 8, 8, 8)
BACKENDS = ("inductor", "aot_eager", "eager")
PASS = "pass"
FLUSH_MIB = 512  # written before every timed call, so that no call finds the tensors of the one before in a cache


def tail_inputs(shape: tuple[int, ...], operator: str) -> dict:
    """The tensors of one operator's kernels (see the module docstring), seeded."""
    g = torch.Generator().manual_seed(0)
    z = torch.rand(shape, generator=g) * 1.8 - 0.9
    r = torch.ones(shape[0], 1, *shape[2:])
    op = "sigmoid" if operator == "learnable_sigmoid" else operator
    k = {"cosine": None, "linear": None, "sigmoid": 0.3}.get(operator, torch.full((1, shape[1], 1, 1), 0.3))
    return dict(z=z, r=r, k=k, op=op, need_k=operator == "learnable_sigmoid", grad=torch.randn(shape, generator=g),
                out=fused.tail_forward(z, r, k, None, op))


def kernel_calls(t: dict) -> dict[str, Callable[[], object]]:
    """The three kernels of :data:`KERNELS` on the tensors ``t``, as the CPU training path calls them."""
    n = t["z"].numel()
    return {"forward": lambda: fused._kernel("forward", fused.tail_forward, n)(t["z"], t["r"], t["k"], None, t["op"]),
            "backward from z": partial(fused.tail_grads, t["grad"], t["z"], t["r"], t["k"], None, t["op"], False,
                                       t["need_k"], workspace=True),
            "backward from the output": partial(fused.tail_grads, t["grad"], t["out"], t["r"], t["k"], None, t["op"],
                                                True, t["need_k"], workspace=True)}


def in_mode(call, mode: str, caches: dict[str, dict]):
    """``call`` with the kernels compiled in the given mode of :data:`MODES` (each keeps its own compiled copies):
    the library's (``constants``), the floats as run-time inputs, or the constants without floating-point
    contraction."""
    def run():
        saved = fused._COMPILED, fused._CAN_SPECIALIZE_FLOATS, fused.KERNEL_OPTIONS
        fused._COMPILED = caches[mode]
        fused._CAN_SPECIALIZE_FLOATS = saved[1] and mode != "inputs"
        if mode == "uncontracted":
            fused.KERNEL_OPTIONS = {**saved[2], "cpp.enable_floating_point_contract_flag": "off"}
        try:
            call()
        finally:
            fused._COMPILED, fused._CAN_SPECIALIZE_FLOATS, fused.KERNEL_OPTIONS = saved
    return run


def child(job: dict) -> None:
    with H.child_context(job) as result:
        fused.COMPILE_MIN_NUMEL = 0  # every kernel compiled, also on the --quick shape
        fused.compile_kernel = partial(fused.compile_kernel, backend=job["backend"])
        caches: dict[str, dict] = {mode: {} for mode in MODES}
        shape = tuple(job["shape"])
        a, b = torch.randn(shape), torch.empty(shape)
        steps = {PASS: partial(torch.mul, a, 1.5, out=b)}
        for operator in job["operators"]:
            calls = kernel_calls(tail_inputs(shape, operator))
            for kernel in KERNELS:
                for mode in MODES:
                    steps[f"{operator}|{kernel}|{mode}"] = in_mode(calls[kernel], mode, caches)
        for step in steps.values():  # compile and warm up, then let the compile workers' load settle
            step()
            step()
        time.sleep(job["settle_s"])
        scratch = torch.empty(job["flush_mib"] << 18)  # float32: flush_mib MiB
        names = list(steps)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(job["rounds"]):
            for name in names[r % len(names):] + names[:r % len(names)]:
                scratch.fill_(r)  # evicts the tensors of the step before from the caches (not timed)
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
        result["ms"] = {name: 1e3 * statistics.median(v) for name, v in times.items()}
        result["passes"] = {name: H.paired_median(times, name, PASS) for name in times if name != PASS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"shape {QUICK_SHAPE}, 2 rounds: checks that it runs")
    p.add_argument("--shape", type=int, nargs=4, metavar=("N", "C", "H", "W"), default=None,
                   help=f"the output shape the kernels run on (default {SHAPE})")
    p.add_argument("--operators", nargs="+", choices=OPERATORS, default=list(OPERATORS))
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 21, quick 2)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts, each measured in a fresh process (default 1 2)")
    p.add_argument("--backend", choices=BACKENDS, default="inductor",
                   help="compiler of the kernels (default inductor; the others only check that the script runs)")
    H.add_output_arguments(p, DOC)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = H.parse_or_run_child(parser, argv, child)
    if args is None:  # this process was a measuring child
        return 0
    try:
        rounds = args.rounds if args.rounds is not None else (2 if args.quick else 21)
        H.check_positive("--rounds", rounds)
        shape = tuple(args.shape) if args.shape else (QUICK_SHAPE if args.quick else SHAPE)
        for size in shape:
            H.check_positive("--shape", size)
        threads = H.check_threads(args.threads, "cpu")
    except ValueError as err:
        parser.error(str(err))
    command = " ".join(["python benchmarks/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)])
    start, load_start = time.perf_counter(), H.load1()
    job = dict(shape=list(shape), operators=args.operators, rounds=rounds, backend=args.backend,
               settle_s=0 if args.quick else 3, flush_mib=1 if args.quick else FLUSH_MIB)
    done = H.run_per_thread(Path(__file__), "bench_kernels", job, threads, {"TORCHINDUCTOR_COMPILE_THREADS": "1"})

    headers = ["operator", "kernel"]
    for t in threads:
        headers += [f"{t} thr", f"{t} thr, passes", f"{t} thr, floats as inputs", f"{t} thr, no contraction"]
    rows = [["one pass (`torch.mul(a, s, out=b)`)", "—"]]
    for t in threads:
        rows[0] += [f"{done[t]['ms'][PASS]:.2f} ms" if t in done else "failed", "1.0", "—", "—"]
    for operator in args.operators:
        for kernel in KERNELS:
            row = [operator, kernel]
            for t in threads:
                if t not in done:
                    row += ["failed"] * 4
                    continue
                key = f"{operator}|{kernel}|"
                row += [f"{done[t]['ms'][key + 'constants']:.2f} ms", f"{done[t]['passes'][key + 'constants']:.1f}",
                        f"{done[t]['ms'][key + 'inputs']:.2f} ms", f"{done[t]['ms'][key + 'uncontracted']:.2f} ms"]
            rows.append(row)
    md = H.finished_section(
        "## The fused tail's kernels, each against one memory pass (bench_kernels, cpu, float32)",
        command, machine("cpu"), start, load_start, done, threads, f" Compiler: {args.backend}.", [
        f"Output shape {shape}, float32; medians over {rounds} interleaved rounds, each thread count in a fresh "
        "process, each call after a write of a 512 MiB scratch tensor that evicts the caches. `passes`: the kernel's time over one pass over the tensor (a read and a write) in the same round, "
        "median over rounds. `floats as inputs`: the same kernel compiled with the Python floats (pi, the "
        "polynomials' coefficients, the clamp bounds, k) as run-time inputs of the generated code, PyTorch's default; "
        "the library compiles them as constants. `no contraction`: the library's kernel compiled with the C++ "
        "compiler's floating-point contraction off (PyTorch's default, "
        "`torch._inductor.config.cpp.enable_floating_point_contract_flag`); the library compiles its kernels with "
        "`\"fast\"`, which makes each multiply-add one fused multiply-add instruction. The backward kernels write "
        "dL/dz into a buffer and reduce dL/dr "
        "(and dL/dk for `learnable_sigmoid`) in the same kernel, as on the CPU training path.", "",
        *H.markdown_table(headers, rows, 2),
        ])
    return publish("bench_kernels", md, args.no_write, args.doc, len(done) == len(threads))


if __name__ == "__main__":
    sys.exit(main())
