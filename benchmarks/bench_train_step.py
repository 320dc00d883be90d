"""Training-step time and peak memory of SphereNet-9 against its CNN-9 twin (docs/benchmarks.md).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). One step = forward, cross-entropy,
backward, Adam step, batch 128, for the plain 9-layer net (``create_model("cnn9"/"spherenet9")``) at width
multipliers 0.25, 0.5 and 1.0, i.e. stage widths (32, 48, 64), (64, 96, 128) and the official (128, 192, 256), on
28x28x1 and 32x32x3 inputs. Every sphere operator runs in three variants: as the models build it (the fused path,
``memory_efficient=True``: the output is saved and written over the convolution's buffer), the fused path saving
z (``memory_efficient=False``, the layers' default), and the eager reference composition (``impl="reference"``,
the path before the fused one; only up to ``--reference-max-width``, it is slow).

Time: all models of one (width, input) run interleaved in one process (one step of each in turn, the order
rotated every round), after a warm-up step; the figure is the median over the measured rounds. Memory: a fresh
subprocess per configuration builds the model, runs one warm-up step, resets the peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), runs one more step and reads VmHWM from /proc/self/status; the figure is that
peak minus the RSS just before the measured step (model, data and optimizer state excluded), i.e. the memory the
step itself needs. glibc is told to mmap every block above 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so freed tensors
leave the RSS and the peak is the peak of live tensors rather than of the allocator's cache. Then a
``torch.profiler`` profile of one step per model (CNN and each operator, largest width, 32x32x3) sums the self CPU
time per category of op (convolution, BatchNorm, the compiled sphere kernels, ...): what the remaining cost is.

Usage:
    python benchmarks/bench_train_step.py            # full benchmark, writes docs/benchmarks.md
    python benchmarks/bench_train_step.py --quick    # smallest width, fewer steps
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC, machine, write_section  # noqa: E402

from torchsphere.functional.conv import sphere_conv1d, sphere_conv2d, sphere_conv3d  # noqa: E402
from torchsphere.functional.linear import sphere_linear  # noqa: E402
from torchsphere.models import create_model  # noqa: E402
from torchsphere.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear  # noqa: E402

OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
WIDTHS = {0.25: (32, 48, 64), 0.5: (64, 96, 128), 1.0: (128, 192, 256)}
INPUTS = {"28x28x1": (1, 28), "32x32x3": (3, 32)}
BATCH = 128


@contextlib.contextmanager
def sphere_impl(impl: str):
    """Makes the sphere layers call the functional core with ``impl``; restores the defaults on exit."""
    layers = {SphereConv1d: sphere_conv1d, SphereConv2d: sphere_conv2d, SphereConv3d: sphere_conv3d}
    saved = {cls: cls.__dict__["_fn"] for cls in layers}
    linear_forward = SphereLinear.forward
    try:
        for cls, fn in layers.items():
            cls._fn = staticmethod(partial(fn, impl=impl))

        def forward(self, input):
            return sphere_linear(input, self.weight, self.bias, operator=self.operator,
                                 sigmoid_k=self.effective_k(), eps=self.eps, impl=impl,
                                 memory_efficient=self.memory_efficient and impl == "fused")
        SphereLinear.forward = forward
        yield
    finally:
        for cls, fn in saved.items():
            cls._fn = fn
        SphereLinear.forward = linear_forward


def variants(width: float, reference_max_width: float) -> list[tuple[str, str | None, str, bool]]:
    """(label, operator or None for the CNN, impl, memory_efficient)."""
    out = [("cnn", None, "fused", True)]
    for op in OPERATORS:
        out += [(op, op, "fused", True), (f"{op}/save-z", op, "fused", False)]
        if width <= reference_max_width:
            out.append((f"{op}/reference", op, "reference", False))
    return out


def build(operator: str | None, width: float, channels: int, size: int, memory_efficient: bool = True):
    torch.manual_seed(0)
    if operator is None:
        model = create_model("cnn9", width_mult=width, in_channels=channels, input_size=size, num_classes=10)
    else:
        model = create_model("spherenet9", operator=operator, width_mult=width, in_channels=channels,
                             input_size=size, num_classes=10)
        for layer in model.modules():
            if isinstance(layer, SphereConv2d):
                layer.memory_efficient = memory_efficient
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, channels, size, size)
    y = torch.randint(0, 10, (BATCH,))
    return model, opt, x, y


def train_step(model, opt, x, y, impl: str) -> None:
    with sphere_impl(impl):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def time_config(width: float, channels: int, size: int, rounds: int, todo: list) -> dict[str, float]:
    """Median step time (s) of every variant, interleaved in this process."""
    runs = []
    for label, op, impl, mem in todo:
        model, opt, x, y = build(op, width, channels, size, mem)
        train_step(model, opt, x, y, impl)  # warm-up
        runs.append((label, model, opt, x, y, impl))
    times: dict[str, list[float]] = {r[0]: [] for r in runs}
    for i in range(rounds):
        order = runs[i % len(runs):] + runs[:i % len(runs)]
        for label, model, opt, x, y, impl in order:
            t0 = time.perf_counter()
            train_step(model, opt, x, y, impl)
            times[label].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(label: str, width: float, channels: int, size: int) -> None:
    """Runs in a fresh process: prints the peak RSS (MiB) of one step above the RSS before it."""
    op, impl, mem = dict((v[0], v[1:]) for v in variants(width, width))[label]
    model, opt, x, y = build(op, width, channels, size, mem)
    train_step(model, opt, x, y, impl)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    train_step(model, opt, x, y, impl)
    print(json.dumps({"step_mib": (_status_kib("VmHWM") - before) / 1024, "total_mib": _status_kib("VmHWM") / 1024}))


def memory_config(label: str, width: float, channels: int, size: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--memory-child", label, str(width), str(channels), str(size)]
    # tensors above 64 KiB are mmap-ed and unmapped when freed, so the RSS follows the live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


# what each profiled op belongs to, by name (first match); the compiled graphs are the fused sphere kernels
CATEGORIES = (("convolution (forward + backward)", ("convolution",)),
              ("BatchNorm", ("batch_norm",)),
              ("sphere pointwise kernels (compiled tail and channel square-sum)", ("CompiledFxGraph",)),
              ("patch-norm window sum (avg-pool / all-ones conv) and rsqrt", ("avg_pool", "rsqrt")),
              ("max-pool, ReLU", ("max_pool", "threshold", "clamp_min", "relu")),
              ("other (elementwise, copies, optimizer, autograd)", ("",)))


def profile_step(operator: str | None, width: float, channels: int, size: int) -> dict[str, float]:
    """Self CPU time (ms) of one step of the model-default variant, summed per category."""
    model, opt, x, y = build(operator, width, channels, size)
    train_step(model, opt, x, y, "fused")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(model, opt, x, y, "fused")
    totals = {name: 0.0 for name, _ in CATEGORIES}
    for event in prof.key_averages():
        name = next(n for n, keys in CATEGORIES if any(k in event.key for k in keys))
        totals[name] += event.self_cpu_time_total / 1e3
    return totals


def profiles(width: float) -> str:
    """A table: where one step's time goes, CNN against every operator (model-default variant), 32x32x3."""
    cols = [("CNN", None)] + [(op, op) for op in OPERATORS]
    data = {label: profile_step(op, width, 3, 32) for label, op in cols}
    lines = [f"Where one step goes (self CPU time of a `torch.profiler` profile, ms; widths {WIDTHS[width]}, "
             "32x32x3, batch 128; sphere models as built by `create_model`):", "",
             "| category | " + " | ".join(label for label, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, _ in CATEGORIES:
        lines.append(f"| {name} | " + " | ".join(f"{data[label][name]:.0f}" for label, _ in cols) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(data[label].values()):.0f}" for label, _ in cols) + " |")
    return "\n".join(lines)


def profile_into_partial_section(width: float) -> None:
    """Completes the section of an interrupted run: a note on what is missing, then the profiles."""
    start, end = "<!-- bench_train_step:start -->", "<!-- bench_train_step:end -->"
    text = DOC.read_text()
    section = text[text.index(start) + len(start):text.index(end)].strip()
    note = "Widths not listed above were not measured: the run was stopped for lack of time (the script runs them)."
    write_section("bench_train_step", section.replace("(profile pending: run incomplete)",
                                                      note + "\n\n" + profiles(width)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest width, fewer steps")
    parser.add_argument("--rounds", type=int, default=None, help="measured steps per model (default 5, quick 3)")
    parser.add_argument("--widths", type=float, nargs="+", choices=list(WIDTHS), default=list(WIDTHS),
                        help="width multipliers to run (default all); the profile uses the largest")
    parser.add_argument("--profile-only", type=float, choices=list(WIDTHS), default=None,
                        help="only profile one step at this width and add it to an interrupted run's section")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's); 1 avoids OpenMP barrier stalls on a shared machine")
    parser.add_argument("--reference-max-width", type=float, default=0.5,
                        help="run the slow eager reference variant only up to this width multiplier (default 0.5)")
    parser.add_argument("--no-write", action="store_true", help="print only, do not touch docs/benchmarks.md")
    parser.add_argument("--memory-child", nargs=4, metavar=("LABEL", "WIDTH", "C", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        label, width, channels, size = args.memory_child
        memory_child(label, float(width), int(channels), int(size))
        return
    if args.profile_only is not None:
        profile_into_partial_section(args.profile_only)
        return
    rounds = args.rounds or (3 if args.quick else 5)
    widths = [0.25] if args.quick else sorted(args.widths)
    cmd = " ".join(["benchmarks/bench_train_step.py", *sys.argv[1:]])
    head = [f"## Training step: SphereNet-9 vs CNN-9 (`{cmd}`)",
            "", f"Machine: {machine()}.", "",
            f"Batch {BATCH}, forward + cross-entropy + backward + Adam step. Time: median of {rounds} interleaved "
            "steps per model in one process (after one warm-up step). Memory: peak RSS of one step above the RSS "
            "before it (VmHWM after `clear_refs`, a fresh subprocess per configuration, after one warm-up step, "
            "blocks above 64 KiB mmap-ed so that freed tensors leave the RSS). Variants: the operator's name alone "
            "= the model as `create_model` builds it (fused path, `memory_efficient=True`: the output is saved and "
            "written over the convolution's buffer); `save-z` = the fused path saving z (the layers' default, "
            "`memory_efficient=False`); `reference` = the eager composition (the path before the fused one; up to "
            "width "
            f"multiplier {args.reference_max_width}). Targets: time <= 1.10x, memory <= 1.3x the CNN.", ""]
    rows = ["| width | input | variant | step (ms) | time / CNN | step peak (MiB) | memory / CNN |",
            "|---|---|---|---:|---:|---:|---:|"]
    for width in widths:
        for input_name, (channels, size) in INPUTS.items():
            todo = variants(width, args.reference_max_width)
            times = time_config(width, channels, size, rounds, todo)
            mems = {label: memory_config(label, width, channels, size)["step_mib"] for label, *_ in todo}
            for label, *_ in todo:
                rows.append(f"| {WIDTHS[width]} | {input_name} | {label} | {1e3 * times[label]:.0f} | "
                            f"{times[label] / times['cnn']:.2f}x | {mems[label]:.0f} | "
                            f"{mems[label] / mems['cnn']:.2f}x |")
                print(rows[-1], flush=True)
            if not args.no_write:  # partial results survive an interrupted run
                write_section("bench_train_step", "\n".join([*head, *rows, "", "(profile pending: run incomplete)"]))
    text = "\n".join([*head, *rows, "", profiles(widths[-1])])
    print(text)
    if not args.no_write:
        write_section("bench_train_step", text)


if __name__ == "__main__":
    main()
