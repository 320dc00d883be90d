"""Training-step time of SphereNet-9 against its CNN-9 twin, eager and compiled (docs/benchmarks.md).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). One step = forward, cross-entropy,
backward, Adam step, batch 128, for the plain 9-layer net (``create_model("cnn9"/"spherenet9")``) at width
multipliers 0.25 and 0.5, i.e. stage widths (32, 48, 64) and (64, 96, 128) (``--widths 1.0``: the official
(128, 192, 256)), on 28x28x1 and 32x32x3 inputs. Every sphere operator runs in two modes: ``default`` = the layers'
default (``memory_efficient=False``: the fused path saving z) and ``memory_efficient`` (as ``create_model`` builds
the models: eager, the output is saved and written over the convolution's buffer; under ``torch.compile`` z is
saved, as in ``default``, and the compiler plans the memory); ``--reference`` adds the eager reference composition
(``impl="reference"``, the path before the fused one), eager only.

Time: a fresh process per (width, input, thread count, operator) -- ``OMP_NUM_THREADS=N`` and
``torch.set_num_threads(N)``, since the thread pool cannot be resized reliably in one process -- builds the CNN and
the operator's SphereNets (and, with ``--compile``, a second copy of each under ``torch.compile``, the CNN's too),
runs two warm-up steps of each (the compiled ones compile then), then one step of each in turn, the order rotated
every round. A cell is the median over rounds of the SphereNet's step time over the CNN's in the same round and
process (eager over eager, compiled over compiled); the CNN rows give the median of its median step times in the
operators' processes. One process per operator keeps a run that is cut off (``--max-minutes``) with the operators
it finished. Targets: <= 1.10x the CNN eager, <= 1.05x compiled vs compiled, for every operator, in
both modes, at 1 and 2 threads.

``--memory`` (optional, slow): a fresh subprocess per configuration builds the model, runs one warm-up step, resets
the peak counter and runs one more step. CPU: the peak RSS (``echo 5 > /proc/self/clear_refs``, then VmHWM from
/proc/self/status) minus the RSS just before the step, with glibc told to mmap every block above 64 KiB
(``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the RSS; CUDA: ``torch.cuda.max_memory_allocated`` minus the
allocated memory before the step. Target <= 1.3x the CNN. ``--profile`` (optional, CPU): a ``torch.profiler``
profile of one step per model (CNN and each operator as ``create_model`` builds it, largest width, 32x32x3) sums
the self CPU time per category of op: what the remaining cost is; with ``--compile`` a second table profiles
``torch.compile(model)`` of each, with the convolutions and Inductor's generated kernels apart for the forward
and the backward (the step's forward + loss and its backward run in named ``record_function`` ranges).

Time on an otherwise idle 2-core x86_64 CPU (from the step times of the earlier, eager-only figures: 0.35-2.3 s a
step at 1 thread for these widths; the ``--quick`` run at 1 thread took 20.9 min wall and 2.7 min CPU at load
5.5-7, its CNN stepping 4-5x slower than on an idle machine): the default full run (widths 0.25 and 0.5,
both inputs, 7 rounds, threads 1 and 2, eager, 32 processes) about 15 minutes; ``--compile`` about 1 to 1.5 hours
(Inductor compiles the CNN and 8 SphereNets per (width, input), roughly a minute each on such a machine, and the
compiled models step as long again; the second thread count reuses the on-disk cache); ``--memory`` adds about
10 minutes. ``benchmarks/gpu.sh`` runs the official width, 32x32x3, on CUDA within 48% of its budget (3.4 of its
default 7 minutes; not yet timed on a GPU).

Usage:
    python benchmarks/bench_train_step.py                  # eager, threads 1 and 2, writes docs/benchmarks.md
    python benchmarks/bench_train_step.py --compile        # + the compiled column (slow on CPU: see above)
    python benchmarks/bench_train_step.py --quick          # width 0.25, 3 rounds
    python benchmarks/bench_train_step.py --device cuda --autocast bf16 --compile --widths 1.0
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from _report import DOC, machine, write_section  # noqa: E402

from torchsphere.functional.conv import sphere_conv1d, sphere_conv2d, sphere_conv3d  # noqa: E402
from torchsphere.functional.linear import sphere_linear  # noqa: E402
from torchsphere.models import create_model  # noqa: E402
from torchsphere.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear  # noqa: E402

OPERATORS = ("linear", "cosine", "sigmoid", "learnable_sigmoid")
MODES = ("default", "memory_efficient")
WIDTHS = {0.25: (32, 48, 64), 0.5: (64, 96, 128), 1.0: (128, 192, 256)}
INPUTS = {"28x28x1": (1, 28), "32x32x3": (3, 32)}
BATCH = 128
TARGETS = {"eager": 1.10, "compiled": 1.05}  # SphereNet-9 step / CNN-9 step
MEMORY_TARGET = 1.3
CNN = "cnn"


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


def variants(operators, modes, reference: bool) -> list[tuple[str, str | None, str, bool]]:
    """(label, operator or None for the CNN, impl, memory_efficient); labels are ``op|mode``."""
    out = [(CNN, None, "fused", False)]
    for op in operators:
        out += [(f"{op}|{mode}", op, "fused", mode == "memory_efficient") for mode in modes]
        if reference:
            out.append((f"{op}|reference", op, "reference", False))
    return out


def build(operator: str | None, width: float, channels: int, size: int, memory_efficient: bool, batch: int,
          device: str):
    torch.manual_seed(0)
    if operator is None:
        model = create_model("cnn9", width_mult=width, in_channels=channels, input_size=size, num_classes=10)
    else:
        model = create_model("spherenet9", operator=operator, width_mult=width, in_channels=channels,
                             input_size=size, num_classes=10)
        for layer in model.modules():
            if isinstance(layer, SphereConv2d):
                layer.memory_efficient = memory_efficient
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, opt, x, y


def stage_widths(model) -> tuple[int, ...]:
    return tuple(stage[0].conv.out_channels for stage in model.stages)


def train_step(model, opt, x, y, impl: str, device: str = "cpu", autocast: str = "none") -> None:
    # the default (fused) path is the layers' own: no patching, which a compiled model would see as a new graph
    with sphere_impl(impl) if impl != "fused" else contextlib.nullcontext():
        opt.zero_grad(set_to_none=True)
        with H.autocast(device, autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def time_child(job: dict, result: dict) -> None:
    """Median-ready step times of every variant of one (width, input), eager and compiled, interleaved."""
    channels, size = INPUTS[job["input"]]
    device, steps = job["device"], {}
    for label, op, impl, mem in variants(job["operators"], job["modes"], job["reference"]):
        kinds = ["eager"] + (["compiled"] if job["compile"] and impl == "fused" else [])
        for kind in kinds:
            model, opt, x, y = build(op, job["width"], channels, size, mem, job["batch"], device)
            result["widths"] = stage_widths(model)
            fn = H.compile_fn(model, job["backend"]) if kind == "compiled" else model
            steps[f"{kind}|{label}"] = partial(train_step, fn, opt, x, y, impl, device, job["autocast"])
    result["times"] = H.interleaved(steps, job["rounds"], device, job["inner"])


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(job: dict, result: dict) -> None:
    """The memory one step needs above what is allocated before it (MiB), one variant, in a fresh process."""
    channels, size = INPUTS[job["input"]]
    device = job["device"]
    _, op, impl, mem = {v[0]: v for v in variants(OPERATORS, MODES, True)}[job["label"]]
    model, opt, x, y = build(op, job["width"], channels, size, mem, job["batch"], device)
    step = partial(train_step, model, opt, x, y, impl, device, job["autocast"])
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        result["step_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status_kib("VmRSS")
        step()
        result["step_mib"] = (_status_kib("VmHWM") - before) / 1024


def child(job: dict) -> None:
    with H.child_context(job) as result:
        (memory_child if job["kind"] == "memory" else time_child)(job, result)


# what each profiled op belongs to: (row, phase or None for any, name keys), first match; in the eager models the
# compiled graphs are the fused sphere kernels, in the compiled ones Inductor's kernels of the whole model
CATEGORIES = (("convolution (forward + backward)", None, ("convolution",)),
              ("BatchNorm", None, ("batch_norm",)),
              ("sphere pointwise kernels (compiled tail and channel square-sum)", None, ("CompiledFxGraph",)),
              ("patch-norm window sum (avg-pool / all-ones conv) and rsqrt", None, ("avg_pool", "rsqrt")),
              ("max-pool, ReLU", None, ("max_pool", "threshold", "clamp_min", "relu")),
              ("other (elementwise, copies, optimizer, autograd)", None, ("",)))
COMPILED_CATEGORIES = (("convolution, forward", "forward", ("convolution",)),
                       ("convolution, backward", "backward", ("convolution",)),
                       ("Inductor's kernels, forward graph", "forward", ("CompiledFxGraph",)),
                       ("Inductor's kernels, backward graph", "backward", ("CompiledFxGraph",)),
                       ("other (optimizer, autograd, Python)", None, ("",)))
PHASES = {"bench_train_step:forward": "forward", "bench_train_step:backward": "backward"}  # record_function ranges


def profiled_step(model, opt, x, y) -> None:
    """:func:`train_step` (fused, float32) with the forward + loss and the backward in named profiler ranges."""
    opt.zero_grad(set_to_none=True)
    with torch.profiler.record_function("bench_train_step:forward"):
        loss = F.cross_entropy(model(x), y)
    with torch.profiler.record_function("bench_train_step:backward"):
        loss.backward()
    opt.step()


def phase_of(event) -> str | None:
    """The profiler range of :data:`PHASES` that ``event`` ran in (its nearest such ancestor), or None."""
    while event is not None:
        if event.name in PHASES:
            return PHASES[event.name]
        event = event.cpu_parent
    return None


def categorize(events, categories) -> dict[str, float]:
    """Self CPU time (ms) of profiler ``events`` summed per row of ``categories`` (first match; the last matches
    all)."""
    totals = {name: 0.0 for name, _, _ in categories}
    for event in events:
        if event.name in PHASES:
            continue
        phase = phase_of(event.cpu_parent)
        name = next(n for n, want, keys in categories
                    if (want is None or want == phase) and any(k in event.name for k in keys))
        totals[name] += event.self_cpu_time_total / 1e3
    return totals


def profile_step(operator: str | None, width: float, batch: int, compiled: bool = False,
                 backend: str = "inductor") -> dict[str, float]:
    """Self CPU time (ms) of one step of the model as ``create_model`` builds it, summed per category
    (:data:`COMPILED_CATEGORIES` for ``torch.compile(model)``, which steps twice first to compile)."""
    model, opt, x, y = build(operator, width, 3, 32, operator is not None, batch, "cpu")
    fn = H.compile_fn(model, backend) if compiled else model
    for _ in range(2 if compiled else 1):
        profiled_step(fn, opt, x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        profiled_step(fn, opt, x, y)
    return categorize(prof.events(), COMPILED_CATEGORIES if compiled else CATEGORIES)


def profiles(width: float, batch: int, threads: int, compiled: bool = False, backend: str = "inductor") -> str:
    """A table: where one step's time goes, CNN against every operator (``memory_efficient``), 32x32x3."""
    torch.set_num_threads(threads)
    cols = [("CNN", None)] + [(op, op) for op in OPERATORS]
    categories = COMPILED_CATEGORIES if compiled else CATEGORIES
    data = {label: profile_step(op, width, batch, compiled, backend) for label, op in cols}
    how = (f"`torch.compile(model)` (backend {backend}) of the models" if compiled else
           "sphere models as built by `create_model`")
    lines = [f"Where one step goes (self CPU time of a `torch.profiler` profile, ms, {threads} thread(s); width "
             f"multiplier {width}, 32x32x3, batch {batch}; {how}):", "",
             "| category | " + " | ".join(label for label, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, _, _ in categories:
        lines.append(f"| {name} | " + " | ".join(f"{data[label][name]:.0f}" for label, _ in cols) + " |")
    lines.append("| **total** | " + " | ".join(f"{sum(data[label].values()):.0f}" for label, _ in cols) + " |")
    return "\n".join(lines)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a width multiplier is a number > 0; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="width 0.25, 3 rounds")
    p.add_argument("--rounds", type=int, default=None, help="measured steps per model (default 7, quick 3)")
    p.add_argument("--widths", type=positive_float, nargs="+", default=None,
                   help="width multipliers (default 0.25 0.5; 1.0 = the official widths)")
    p.add_argument("--inputs", nargs="+", choices=list(INPUTS), default=list(INPUTS))
    p.add_argument("--operators", nargs="+", choices=OPERATORS, default=list(OPERATORS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                   help="default (memory_efficient=False, the layers' default), memory_efficient (the models')")
    p.add_argument("--reference", action="store_true", help="add the eager reference composition (slow; eager only)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts, each measured in fresh processes (default: 1 2 on CPU, torch's on CUDA)")
    p.add_argument("--compile", action="store_true", help="add the column torch.compile(model) vs torch.compile(cnn)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default inductor; 'eager' only traces, for a quick check)")
    p.add_argument("--device", choices=H.DEVICES, default="cpu")
    p.add_argument("--autocast", choices=H.AUTOCASTS, default="none",
                   help="bf16: forward and loss under bfloat16 autocast (meant for CUDA; allowed on CPU)")
    p.add_argument("--inner", type=int, default=None,
                   help="steps per timed sample (default 1 on CPU, 5 on CUDA, where one step is too short)")
    p.add_argument("--memory", action="store_true", help="also measure each step's peak memory (slow)")
    p.add_argument("--profile", action="store_true", help="also profile one step per model (CPU only)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: configurations not started in time are left out (marked)")
    p.add_argument("--env", nargs="+", metavar="KEY=VALUE", default=None,
                   help="environment variables for the measuring processes, e.g. glibc's MALLOC_TOP_PAD_=1073741824; "
                        "the figures go to a section of their own, named after the keys")
    H.add_output_arguments(p, DOC)
    return p


def section_name(device: str, autocast: str) -> str:
    return "bench_train_step" + ("_cuda" if device == "cuda" else "") + ("_bf16" if autocast == "bf16" else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = H.parse_or_run_child(parser, argv, child)
    if args is None:  # this process was a measuring child
        return 0
    try:
        rounds = args.rounds if args.rounds is not None else (3 if args.quick else 7)
        for name, value in (("--rounds", rounds), ("--batch", args.batch), ("--inner", args.inner),
                            ("--max-minutes", args.max_minutes)):
            H.check_positive(name, value)
        H.check_device(args.device, args.autocast)
        threads = H.check_threads(args.threads, args.device)
        child_env = H.parse_env(args.env)
        if args.profile and args.device != "cpu":
            raise ValueError(f"--profile measures CPU time; it needs --device cpu, got --device {args.device}")
    except ValueError as err:
        parser.error(str(err))
    widths = args.widths or ([0.25] if args.quick else [0.25, 0.5])
    inner = args.inner or (5 if args.device == "cuda" else 1)
    kinds = ["eager", "compiled"] if args.compile else ["eager"]
    todo = variants(args.operators, args.modes, args.reference)
    configs = [(w, i) for w in widths for i in args.inputs]
    command = " ".join(["python benchmarks/bench_train_step.py", *(sys.argv[1:] if argv is None else argv)])
    deadline = H.Deadline(args.max_minutes)
    start, load_start = time.perf_counter(), H.load1()
    done: dict[tuple, dict] = {}
    missing: dict[tuple, str] = {}
    memory: dict[tuple, float] = {}
    failed = False

    def label_of(width: float) -> str:
        got = next((r["widths"] for key, r in done.items() if key[0] == width and "widths" in r), None)
        return str(tuple(got)) if got else str(WIDTHS.get(width, f"x{width}"))

    def cell(width: float, inp: str, t: int, kind: str, label: str, op: str | None, impl: str) -> str:
        if op is None:  # the CNN's step time: the median of its medians in the operators' processes
            got = [statistics.median(r["times"][f"{kind}|{CNN}"]) for key, r in done.items()
                   if key[:3] == (width, inp, t) and f"{kind}|{CNN}" in r["times"]]
            if not got:
                return next((why for key, why in missing.items() if key[:3] == (width, inp, t)), "…")
            return f"{1e3 * statistics.median(got):.0f} ms"
        res = done.get((width, inp, t, op))
        if res is None:
            return missing.get((width, inp, t, op), "…")
        if f"{kind}|{label}" not in res["times"]:
            return "—"
        ratio = H.paired_median(res["times"], f"{kind}|{label}", f"{kind}|{CNN}")
        if impl == "fused":  # the reference composition is shown, not targeted
            cells[kind] += 1
            over[kind] += ratio > TARGETS[kind]
        return H.ratio_cell(ratio, TARGETS[kind] if impl == "fused" else None)

    over, cells = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0)

    def render(final: bool, tail: str = "") -> str:
        headers = ["widths", "input", "operator", "mode"] + [f"{t} thr {k}" for t in threads for k in kinds]
        rows = []
        over.update(dict.fromkeys(kinds, 0))
        cells.update(dict.fromkeys(kinds, 0))
        for width, inp in configs:
            for label, op, impl, _ in todo:
                rows.append([label_of(width), inp, op or "CNN-9", "—" if op is None else label.split("|")[1]]
                            + [cell(width, inp, t, kind, label, op, impl) for t in threads for kind in kinds])
        wall = time.perf_counter() - start
        summary = ", ".join(f"{kind} {over[kind]} of {cells[kind]}" for kind in kinds)
        status = H.status_note(final, bool(missing))
        text = [
            f"## Training step: SphereNet-9 vs CNN-9 (bench_train_step, {H.device_label(args.device)}"
            f"{', bf16 autocast' if args.autocast == 'bf16' else ', float32'}{H.env_label(child_env)})",
            "",
            f"Command: `{command}`. Machine: {machine(args.device)}. "
            + H.load_line(load_start, H.load1(), list(done.values()), os.cpu_count())
            + f" Wall time {wall / 60:.1f} min, CPU time of the measuring processes "
              f"{H.child_cpu_seconds() / 60:.1f} min.",
            "",
            f"Batch {args.batch}, forward + cross-entropy + backward + Adam step. A fresh process per (widths, "
            "input, thread count, operator), each with the CNN; in it every model steps twice to warm up (compiling, for the compiled column), "
            f"then all step interleaved in a rotated order for {rounds} rounds ({inner} step(s) per timed sample). "
            "A cell is the median over rounds of the SphereNet's step time over the CNN's in the same round (eager "
            "over eager, `torch.compile(model)` over `torch.compile(cnn)`); the CNN-9 rows give the median of its "
            "median step times in those processes. Modes: `default` = the layers' default (`memory_efficient=False`, the fused path saving z); "
            "`memory_efficient` = as `create_model` builds the models (eager, the output is saved and written over "
            "the convolution's buffer; under `torch.compile` z is saved and the compiler plans the memory); `reference` = the eager composition (not targeted). Targets: "
            + ", ".join(f"{kind} <= {TARGETS[kind]:.2f}x" for kind in kinds)
            + f" the CNN; cells above target are marked {H.OVER}.",
            "",
            *H.markdown_table(headers, rows, 4),
            "",
            f"Over target: {summary} cells." + status,
        ]
        return "\n".join(text) + tail

    name = section_name(args.device, args.autocast) + H.env_suffix(child_env)
    for width, inp in configs:
        for t in threads:
            for op in args.operators:  # one process per operator (with the CNN): a cut-off run keeps the others
                key = (width, inp, t, op)
                if deadline.expired():
                    missing[key] = "budget"
                    continue
                job = dict(kind="time", width=width, input=inp, operators=[op], modes=args.modes,
                           reference=args.reference, rounds=rounds, inner=inner, compile=args.compile,
                           backend=args.compile_backend, device=args.device, autocast=args.autocast,
                           batch=args.batch)
                try:
                    done[key] = H.run_child(Path(__file__), job, t, deadline.left(), child_env)
                except H.ChildError as err:
                    print(f"bench_train_step: {width} {inp} {op} at {t} thread(s) failed: {err}", file=sys.stderr)
                    missing[key] = "failed"
                    failed = True
                print(f"bench_train_step: width {width}, {inp}, {op}, {t} thread(s): "
                      f"{'failed' if key in missing else 'done'}", flush=True)
                if not args.no_write:  # partial results survive an interrupted run
                    write_section(name, render(final=False), args.doc)

    tail = ""
    if args.memory:
        os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")  # inherited by the children
        rows = []
        for width, inp in configs:
            for label, op, impl, _ in todo:
                job = dict(kind="memory", width=width, input=inp, label=label, device=args.device,
                           autocast=args.autocast, batch=args.batch)
                if deadline.expired():
                    rows.append([label_of(width), inp, op or "CNN-9", "—" if op is None else label.split("|")[1],
                                 "budget", "budget"])
                    continue
                try:
                    memory[(width, inp, label)] = H.run_child(Path(__file__), job, threads[0],
                                                              deadline.left())["step_mib"]
                except H.ChildError as err:
                    print(f"bench_train_step: memory of {label} failed: {err}", file=sys.stderr)
                    failed = True
                mib, base = memory.get((width, inp, label)), memory.get((width, inp, CNN))
                ratio = None if mib is None or not base else mib / base
                rows.append([label_of(width), inp, op or "CNN-9", "—" if op is None else label.split("|")[1],
                             "—" if mib is None else f"{mib:.1f}",
                             H.ratio_cell(ratio, MEMORY_TARGET if impl == "fused" and op else None)])
        how = ("torch.cuda.max_memory_allocated above the allocation before the step" if args.device == "cuda" else
               "peak RSS above the RSS before the step (VmHWM after `clear_refs`; blocks above 64 KiB mmap-ed so "
               "that freed tensors leave the RSS)")
        tail += "\n\n" + "\n".join([
            f"Memory of one step ({how}; a fresh process per model, after one warm-up step, {threads[0]} "
            f"thread(s), eager). Target: <= {MEMORY_TARGET}x the CNN.", "",
            *H.markdown_table(["widths", "input", "operator", "mode", "step peak (MiB)", "memory / CNN"], rows, 4)])
    if args.profile and not deadline.expired():
        tail += "\n\n" + profiles(max(widths), args.batch, threads[0])
        if args.compile:
            tail += "\n\n" + profiles(max(widths), args.batch, threads[0], True, args.compile_backend)
    elif args.profile:
        tail += "\n\n(Profile not run: the --max-minutes budget was spent.)"
    text = render(final=True, tail=tail)
    print(text)
    if not args.no_write:
        write_section(name, text, args.doc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
