"""What a SphereConv2d layer costs beyond its convolutions and its pointwise kernels (docs/benchmarks.md).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). ``bench_floor`` splits the SphereNet-9
step's extra time over its CNN twin into the floor's passes, the fused tail's kernels and "the rest of the node".
This script measures the parts of that rest, each on its own, in a fresh process per thread count
(``OMP_NUM_THREADS=N``, ``torch.set_num_threads(N)``, Inductor's compile workers off):

- *weight normalization*: ``fused_conv.normalize_weight`` (the layers' forward on the small weights) and
  ``normalize_weight_backward`` (dL/dw from dL/dw_hat) over every SphereConv2d weight of SphereNet-9 at each width,
  ms per training step;
- *fixed cost per layer*: ``SphereConv2d`` forward + backward (cosine, each ``memory_efficient`` mode) less
  ``nn.Conv2d``'s on a tiny input, where the convolutions and the pointwise arithmetic cost almost nothing, so that
  the difference is what every layer pays whatever its size: the node's Python, ``autograd.Function.apply``, the
  small ops on the patch norms and the kernels' entry. Once with the compiled kernels (as the layers run on tensors
  of at least ``fused.COMPILE_MIN_NUMEL`` elements) and once with the eager ones (as on small tensors); times the
  number of SphereConv2d layers of SphereNet-9 it is the per-step figure;
- *one compiled-kernel call*: the forward tail on the tiny tensor through the library's wrapper
  (``fused._kernel``), through the compiled callable directly (Dynamo's entry and guards only) and as the eager
  function.

Each figure is the median over interleaved rounds of the paired difference (or time) within a round. About 1.5
minutes per thread count on an idle 2-core x86_64 CPU once Inductor's on-disk cache holds the kernels.

Usage:
    python benchmarks/bench_node.py                    # widths 0.25 and 0.5, threads 1 and 2, writes bench_node
    python benchmarks/bench_node.py --quick --no-write --backend eager    # checks that it runs
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
from torchsphere.functional.fused_conv import normalize_weight, normalize_weight_backward  # noqa: E402
from torchsphere.models import create_model  # noqa: E402
from torchsphere.nn import SphereConv2d  # noqa: E402

WIDTHS = (0.25, 0.5)
TINY = (2, 8, 6, 6)  # input of the fixed-cost layers: 8 -> 8 channels, 3x3, padding 1
BACKENDS = ("inductor", "aot_eager", "eager")
MODES = ("default", "memory_efficient")
KERNELS = ("compiled", "eager")
CONV = "nn.Conv2d"
CALLS = ("wrapper", "direct", "eager function")
EPS = 1e-12


def sphere_weights(width: float) -> list[torch.Tensor]:
    """The SphereConv2d weights of SphereNet-9 at ``width`` (32x32x3 input: the score layer's 4x4 kernel)."""
    torch.manual_seed(0)
    model = create_model("spherenet9", operator="cosine", width_mult=width, in_channels=3, input_size=32,
                         num_classes=10)
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, SphereConv2d)]


def weight_steps(weights: list[torch.Tensor]) -> dict[str, Callable[[], None]]:
    """Forward and backward of the weight normalization over ``weights``, as the layers call them in one step."""
    normalized = [normalize_weight(w, EPS) for w in weights]
    grads = [torch.randn_like(w) for w in weights]

    def forward() -> None:
        for w in weights:
            normalize_weight(w, EPS)

    def backward() -> None:
        for g, w, (w_hat, s) in zip(grads, weights, normalized):
            normalize_weight_backward(g, w, w_hat, s)

    return {"forward": forward, "backward": backward}


def layer_step(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of ``layer`` on ``x`` (the input requires a gradient, as inside a network)."""
    def run() -> None:
        layer(x).sum().backward()
    return run


def with_kernels(step: Callable[[], None], kernels: str) -> Callable[[], None]:
    """``step`` with the compiled kernels forced (``COMPILE_MIN_NUMEL = 0``) or with the eager ones."""
    def run() -> None:
        saved = fused.COMPILE_MIN_NUMEL
        fused.COMPILE_MIN_NUMEL = 0 if kernels == "compiled" else saved
        try:
            step()
        finally:
            fused.COMPILE_MIN_NUMEL = saved
    return run


def kernel_call_steps() -> dict[str, Callable[[], object]]:
    """The forward tail on the tiny tensor: the library's wrapper, the compiled callable, the eager function."""
    n, c, h, w = TINY
    z, r = torch.rand(n, c, h, w) * 1.8 - 0.9, torch.ones(n, 1, h, w)
    args = (z, r, None, None, "cosine")
    saved = fused.COMPILE_MIN_NUMEL
    fused.COMPILE_MIN_NUMEL = 0
    try:
        wrapper = fused._kernel("forward", fused.tail_forward, z.numel())
    finally:
        fused.COMPILE_MIN_NUMEL = saved
    wrapper(*args)  # compiles
    compiled, specialized = fused._compiled_for("forward", fused.tail_forward, args, None)
    return {"wrapper": partial(wrapper, *args),
            "direct": partial(fused._call_compiled, compiled, args, specialized),
            "eager function": partial(fused.tail_forward, *args)}


def paired_difference(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s time less ``base``'s in the same round, in seconds."""
    return statistics.median(a - b for a, b in zip(times[name], times[base]))


def child(job: dict) -> None:
    with H.child_context(job) as result:
        fused.compile_kernel = partial(fused.compile_kernel, backend=job["backend"])
        rounds = job["rounds"]
        result["weights"] = {}
        for width in job["widths"]:
            weights = sphere_weights(width)
            times = H.interleaved(weight_steps(weights), rounds, "cpu", inner=job["inner"])
            result["weights"][str(width)] = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            result["layers"] = len(weights)

        torch.manual_seed(0)
        x = torch.randn(*TINY, requires_grad=True)
        c = TINY[1]
        conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        steps = {CONV: layer_step(conv, x)}
        for mode in MODES:
            layer = SphereConv2d(c, c, 3, padding=1, operator="cosine", memory_efficient=mode == "memory_efficient")
            for kernels in KERNELS:
                steps[f"{mode}|{kernels}"] = with_kernels(layer_step(layer, x), kernels)
        times = H.interleaved(steps, rounds, "cpu", inner=job["inner"], warmup=3)
        result["conv_us"] = 1e6 * statistics.median(times[CONV])
        result["fixed_us"] = {k: 1e6 * paired_difference(times, k, CONV) for k in steps if k != CONV}

        times = H.interleaved(kernel_call_steps(), rounds, "cpu", inner=10 * job["inner"])
        result["call_us"] = {k: 1e6 * statistics.median(v) for k, v in times.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width 0.25, 3 rounds: checks that it runs")
    p.add_argument("--widths", type=float, nargs="+", default=None,
                   help="width multipliers of SphereNet-9 for the weight normalization "
                        f"(default {' '.join(map(str, WIDTHS))})")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 31, quick 3)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts, each measured in a fresh process (default 1 2)")
    p.add_argument("--backend", choices=BACKENDS, default="inductor",
                   help="compiler of the kernels (default inductor; the others only check that the script runs)")
    H.add_output_arguments(p, DOC)
    return p


def render(done: dict[int, dict], threads: list[int], widths: list[float]) -> tuple[list[str], list[list[str]]]:
    """The table: one row per measured part, one column per thread count."""
    headers = ["part", *(f"{t} thr" for t in threads)]

    def row(label: str, cell: Callable[[dict], str]) -> list[str]:
        return [label, *(cell(done[t]) if t in done else "failed" for t in threads)]

    layers = next((d["layers"] for d in done.values()), 0)
    rows = []
    for width in widths:
        for part in ("forward", "backward"):
            rows.append(row(f"weight normalization, width {width:g}, {part}, {layers} layers (ms / step)",
                            lambda d, w=width, p=part: f"{d['weights'][str(w)][p]:.2f}"))
    rows.append(row(f"`nn.Conv2d` forward + backward on {TINY} (µs)", lambda d: f"{d['conv_us']:.0f}"))
    for mode in MODES:
        for kernels in KERNELS:
            rows.append(row(f"fixed cost per layer, {mode}, {kernels} kernels (µs)",
                            lambda d, k=f"{mode}|{kernels}": f"{d['fixed_us'][k]:.0f}"))
            rows.append(row(f"the same x {layers} layers (ms / step)",
                            lambda d, k=f"{mode}|{kernels}": f"{d['fixed_us'][k] * layers / 1e3:.1f}"))
    for call in CALLS:
        rows.append(row(f"one forward-tail call, {call} (µs)", lambda d, c=call: f"{d['call_us'][c]:.1f}"))
    return headers, rows


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = H.parse_or_run_child(parser, argv, child)
    if args is None:  # this process was a measuring child
        return 0
    try:
        rounds = args.rounds if args.rounds is not None else (3 if args.quick else 31)
        H.check_positive("--rounds", rounds)
        widths = args.widths or ([0.25] if args.quick else list(WIDTHS))
        for width in widths:
            H.check_positive("--widths", width)
        threads = H.check_threads(args.threads, "cpu")
    except ValueError as err:
        parser.error(str(err))
    command = " ".join(["python benchmarks/bench_node.py", *(sys.argv[1:] if argv is None else argv)])
    start, load_start = time.perf_counter(), H.load1()
    job = dict(widths=widths, rounds=rounds, backend=args.backend, inner=1 if args.quick else 10)
    done = H.run_per_thread(Path(__file__), "bench_node", job, threads, {"TORCHINDUCTOR_COMPILE_THREADS": "1"})
    headers, rows = render(done, threads, widths)
    md = H.finished_section(
        "## A SphereConv2d layer beyond its convolutions and kernels (bench_node, cpu, float32)",
        command, machine("cpu"), start, load_start, done, threads, f" Compiler: {args.backend}.", [
        f"Medians over {rounds} interleaved rounds, each thread count in a fresh process. Weight normalization: "
        "`normalize_weight` and `normalize_weight_backward` over every SphereConv2d weight of SphereNet-9 "
        "(32x32x3 input), float32 weights, per training step. Fixed cost per layer: cosine "
        f"`SphereConv2d` forward + backward less `nn.Conv2d`'s (8 -> 8 channels, 3x3, padding 1, input {TINY}), "
        "the paired difference within a round; `compiled kernels`: the pointwise kernels compiled, as on tensors "
        "of at least `fused.COMPILE_MIN_NUMEL` elements; `eager kernels`: as on smaller ones. One forward-tail "
        "call: the library's wrapper (`fused._kernel`), the compiled callable directly (Dynamo's entry and "
        "guards), the eager function.", "",
        *H.markdown_table(headers, rows, 1),
        ])
    return publish("bench_node", md, args.no_write, args.doc, len(done) == len(threads))


if __name__ == "__main__":
    sys.exit(main())
