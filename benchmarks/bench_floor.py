"""The memory floor of the SphereConv tail on this machine, against the measured cosine layer (docs/benchmarks.md).

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189). A SphereConv layer built on PyTorch's
convolution (the filter norm folded into the weight, so the convolution costs what a plain one does) adds a tail
that no implementation outside the convolution kernel can skip. Counted in passes over memory (one pass = reading or
writing one full-size tensor), for the cosine operator, whose g is a single multiplication:

- over the output (N, C_out, H', W'): the forward reads z and writes g = z r; the backward reads dL/dg, writes
  dL/dz = dL/dg r, and reads dL/dg with the saved tensor again for dL/dr = sum over the channels of dL/dg z: 6 passes
  (the backward's two reads of dL/dg and of the saved tensor counted once each, as one fused loop could);
- over the input (N, C_in, H, W): the forward reads x for the patch norms; the backward reads the convolution's
  dL/dx and x and writes dL/dx plus the patch norms' gradient: 4 passes.

This script measures those 10 passes as the cheapest loop PyTorch has, a broadcast multiplication into a preallocated
tensor (``torch.mul(a, s, out=b)``: one read and one write, so 3 of them over the output and 2 over the input), in
the same process and rounds as what it is compared with: for every layer shape of SphereNet-9 (``create_model``, as
in ``bench_train_step.py``), the CNN-9 training step and the cosine SphereNet-9 step (``memory_efficient``, as the
models are built); for the three shapes of ``bench_ops.py``, ``nn.Conv2d`` forward + backward and cosine
``SphereConv2d``. The floor is 1 + (time of the passes) / (time of the baseline), per round, median over rounds; the
measured ratio beside it is the cosine layer's or model's over the same baseline. The other operators add arithmetic
on top (see ``bench_ops.py``).

Timed apart, the passes run over the same tensors again and again, and a layer's tensors of a few MB then come
partly from the CPU's cache. Inside a step they do not: the convolution and BatchNorm loops between two passes over a
tensor push it out. So the script also makes the same passes inside the baseline's own step (:class:`InStepPasses`:
hooks on its convolutions, in the forward and on the gradients, where the tail makes them) and reports that step
over the plain one, the *floor in the step*: what a SphereConv layer built on PyTorch's convolution costs at the
least on this machine. What neither floor contains: the Python and autograd cost of the layer (tens of microseconds
per op), the small ops on the weight and on the (N, 1, H', W') patch norms, and the channel reduction's own cost
beyond its reads. The second table splits the cosine step's extra time into those parts (:func:`step_breakdown`).

Each thread count is measured in a fresh process (``OMP_NUM_THREADS=N``, ``torch.set_num_threads(N)``) with two
warm-up calls of everything, then interleaved rounds in a rotated order. About 3 minutes per thread count on an idle
2-core x86_64 CPU at the default sizes.

Usage:
    python benchmarks/bench_floor.py                  # threads 1 and 2, writes the section bench_floor
    python benchmarks/bench_floor.py --quick          # width 0.25, batch 8, 2 rounds: checks that it runs
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
import bench_ops  # noqa: E402
import bench_train_step as S  # noqa: E402
from _report import DOC, machine, write_section  # noqa: E402

from torchsphere.functional import fused, fused_conv  # noqa: E402
from torchsphere.nn import SphereConv2d  # noqa: E402

PASSES_OUT, PASSES_IN = 6, 4  # passes of the cosine tail over the layer's output and its input (module docstring)
SECTION = "bench_floor"


def layer_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, output shape) of every SphereConv2d of ``model`` on ``x``, in call order."""
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((tuple(inp[0].shape), tuple(out.shape))))
             for m in model.modules() if isinstance(m, SphereConv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def passes_fn(shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], which: str):
    """A callable making the floor's passes over every layer's output (``"out"``) or input (``"in"``) once."""
    bufs = []
    for in_shape, out_shape in shapes:
        shape, reps = (out_shape, PASSES_OUT // 2) if which == "out" else (in_shape, PASSES_IN // 2)
        a = torch.randn(shape)
        s = torch.rand(shape[0], 1, *shape[2:]) + 0.5
        bufs.append((a, s, torch.empty_like(a), reps))

    def run() -> None:
        for a, s, b, reps in bufs:
            for _ in range(reps):
                torch.mul(a, s, out=b)
    return run


class InStepPasses:
    """The floor's passes made inside a CNN's training step, where the step's own loops leave the cache.

    Hooks on every ``nn.Conv2d`` of ``model`` make, with broadcast multiplications by ones (the values do not
    change) into buffers kept per layer, where the cosine tail makes them: in the forward one pass pair over the
    output (in place, as the tail writes g over z) and one over the input (the patch norms' read of x); in the
    backward, on the output's gradient, two pairs over the output (dL/dz, and the read of the saved tensor for
    dL/dr), and on the input's gradient, when the input needs one, one pair over it (the patch norms' gradient).
    That is the 6 + 4 passes of :func:`passes_fn`, less the input's backward passes of a first layer whose input
    needs no gradient (the SphereConv layer skips them too).
    """

    def __init__(self, model: nn.Module) -> None:
        self.bufs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._forward) for m in model.modules()
                        if isinstance(m, nn.Conv2d)]

    def _pair(self, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(shape)
        if key not in self.bufs:
            self.bufs[key] = (torch.ones(shape[0], 1, *shape[2:]), torch.empty(shape))
        return self.bufs[key]

    def _forward(self, module: nn.Module, inputs, out: torch.Tensor) -> None:
        x = inputs[0]
        with torch.no_grad():
            s_out, _ = self._pair(out.shape)
            out.mul_(s_out)  # the tail: read z, write g over it
            s_in, b_in = self._pair(x.shape)
            torch.mul(x, s_in, out=b_in)  # the patch norms' read of x
        if out.requires_grad:
            saved = out.detach()

            def backward(grad: torch.Tensor) -> None:
                s, b = self._pair(grad.shape)
                torch.mul(grad, s, out=b)  # dL/dz = dL/dg r
                torch.mul(saved, s, out=b)  # dL/dr's read of the saved tensor
            out.register_hook(backward)
        if x.requires_grad:
            def backward_input(grad: torch.Tensor) -> None:
                s, b = self._pair(grad.shape)
                torch.mul(grad, s, out=b)  # the patch norms' gradient added into dL/dx
            x.register_hook(backward_input)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# the cosine layer's pointwise kernels, as ``create_model`` builds it: column -> the names it runs under (the CPU
# training path's backward kernel, or the plain one on small tensors and other devices)
KERNELS = {"patch norm": ("patch_rnorm",), "forward": ("forward_inplace",),
           "backward": ("backward_from_output_into", "backward_from_output"), "patch grad": ("patch_grad",)}


def step_breakdown(step, steps: int) -> dict[str, float]:
    """Seconds per step in each part of the SphereConv layers (all layers, wall time around each call): their
    pointwise kernels (by ``fused._kernel`` name), their convolutions (``conv``, forward and backward) and their
    whole autograd node, forward and backward (``node``)."""
    totals: dict[str, float] = {}

    def timed(name: str, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return out
        return run

    fn_cls = fused_conv.SphereConvFn
    saved = (fused._kernel, fused_conv._CONV, fused_conv._CONV_BACKWARD, fn_cls.__dict__["forward"],
             fn_cls.__dict__["backward"])
    original = fused._kernel
    fused._kernel = fused_conv._kernel = lambda name, fn, numel, inference=False, **options: timed(
        name, original(name, fn, numel, inference, **options))
    fused_conv._CONV = tuple(timed("conv", f) for f in saved[1])
    fused_conv._CONV_BACKWARD = timed("conv", saved[2])
    fn_cls.forward = staticmethod(timed("node", saved[3].__func__))
    fn_cls.backward = staticmethod(timed("node", saved[4].__func__))
    try:
        for _ in range(steps):
            step()
    finally:
        fused._kernel = fused_conv._kernel = saved[0]
        fused_conv._CONV, fused_conv._CONV_BACKWARD = saved[1], saved[2]
        fn_cls.forward, fn_cls.backward = saved[3], saved[4]
    return {name: t / steps for name, t in totals.items()}


def conv_step(fn, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    fn(x).backward(grad)


def child(job: dict) -> None:
    with H.child_context(job) as result:
        cases = {}
        for width, inp in job["configs"]:
            channels, size = S.INPUTS[inp]
            cnn = S.build(None, width, channels, size, False, job["batch"], "cpu")
            floor = S.build(None, width, channels, size, False, job["batch"], "cpu")
            InStepPasses(floor[0])
            sph = S.build("cosine", width, channels, size, True, job["batch"], "cpu")
            shapes = layer_shapes(sph[0], sph[2])
            steps = {"base": partial(S.train_step, *cnn, "fused"), "cosine": partial(S.train_step, *sph, "fused"),
                     "out": passes_fn(shapes, "out"), "in": passes_fn(shapes, "in"),
                     "in_step": partial(S.train_step, *floor, "fused")}
            cases[f"step|{width}|{inp}"] = {"widths": S.stage_widths(sph[0]),
                                            "times": H.interleaved(steps, job["rounds"], "cpu"),
                                            "breakdown": step_breakdown(steps["cosine"], job["rounds"])}
        for batch, c_in, hw, c_out in job["shapes"]:
            torch.manual_seed(0)
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            floor = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            InStepPasses(floor)
            layer = SphereConv2d(c_in, c_out, 3, padding=1, operator="cosine", memory_efficient=True)
            layer.weight = floor.weight = conv.weight
            x = torch.randn(batch, c_in, hw, hw, requires_grad=True)
            grad = torch.randn(batch, c_out, hw, hw)
            shapes = [((batch, c_in, hw, hw), (batch, c_out, hw, hw))]
            steps = {"base": partial(conv_step, conv, x, grad), "cosine": partial(conv_step, layer, x, grad),
                     "out": passes_fn(shapes, "out"), "in": passes_fn(shapes, "in"),
                     "in_step": partial(conv_step, floor, x, grad)}
            cases[f"layer|{batch}|{c_in}|{hw}|{c_out}"] = {"times": H.interleaved(steps, job["rounds"], "cpu")}
        result["cases"] = cases


def figures(times: dict[str, list[float]]) -> dict[str, float]:
    """Median baseline time (s), median passes time (s), the floor ratios and the measured ratio (medians of
    per-round ratios); ``in_step``: the baseline with the passes made inside it (:class:`InStepPasses`) over the
    baseline, and ``extra``: the cosine layer's or model's time minus the baseline's (s), median over rounds."""
    rounds = list(zip(times["base"], times["cosine"], times["out"], times["in"], times["in_step"]))
    return {"base": statistics.median(times["base"]),
            "passes": statistics.median(o + i for _, _, o, i, _ in rounds),
            "floor": statistics.median(1 + (o + i) / b for b, _, o, i, _ in rounds),
            "floor_in": statistics.median(1 + i / b for b, _, _, i, _ in rounds),
            "in_step": statistics.median(f / b for b, _, _, _, f in rounds),
            "measured": statistics.median(c / b for b, c, _, _, _ in rounds),
            "extra": statistics.median(c - b for b, c, _, _, _ in rounds)}


def breakdown_columns(case: dict) -> list[float]:
    """Seconds per step: each kernel column of :data:`KERNELS`, the kernels' total, the rest of the nodes, the step's
    extra over the CNN, the part of it outside the nodes and the in-step floor's passes."""
    parts = case["breakdown"]
    kernels = [sum(parts.get(name, 0.0) for name in names) for names in KERNELS.values()]
    rest = parts.get("node", 0.0) - parts.get("conv", 0.0) - sum(kernels)
    f = figures(case["times"])
    return [*kernels, sum(kernels), rest, f["extra"], f["extra"] - sum(kernels) - rest,
            (f["in_step"] - 1) * f["base"]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="width 0.25, one input, batch 8, 2 rounds: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 7, quick 2)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="thread counts, each measured in a fresh process (default 1 2)")
    p.add_argument("--widths", type=S.positive_float, nargs="+", default=None,
                   help="SphereNet-9 width multipliers (default 0.25 0.5)")
    p.add_argument("--inputs", nargs="+", choices=list(S.INPUTS), default=None)
    p.add_argument("--batch", type=int, default=None, help=f"batch size (default {S.BATCH}, quick 8)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: thread counts not started in time are left out (marked)")
    p.add_argument("--env", nargs="+", metavar="KEY=VALUE", default=None,
                   help="environment variables for the measuring processes, e.g. glibc's MALLOC_TOP_PAD_=1073741824; "
                        "the figures go to a section of their own, named after the keys")
    H.add_output_arguments(p, DOC)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = H.parse_or_run_child(parser, argv, child)
    if args is None:  # this process was a measuring child
        return 0
    try:
        rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
        for name, value in (("--rounds", rounds), ("--batch", args.batch), ("--max-minutes", args.max_minutes)):
            H.check_positive(name, value)
        threads = H.check_threads(args.threads, "cpu")
        child_env = H.parse_env(args.env)
    except ValueError as err:
        parser.error(str(err))
    batch = args.batch or (8 if args.quick else S.BATCH)
    widths = args.widths or ([0.25] if args.quick else [0.25, 0.5])
    inputs = args.inputs or (["28x28x1"] if args.quick else list(S.INPUTS))
    configs = [[w, i] for w in widths for i in inputs]
    shapes = [[batch, c, hw, co] for _, c, hw, co in bench_ops.SHAPES]
    command = " ".join(["python benchmarks/bench_floor.py", *(sys.argv[1:] if argv is None else argv)])
    deadline = H.Deadline(args.max_minutes)
    start, load_start = time.perf_counter(), H.load1()
    done: dict[int, dict] = {}
    missing: dict[int, str] = {}
    for t in threads:
        if deadline.expired():
            missing[t] = "budget"
            continue
        job = dict(configs=configs, shapes=shapes, batch=batch, rounds=rounds)
        try:
            done[t] = H.run_child(Path(__file__), job, t, deadline.left(), child_env)
        except H.ChildError as err:
            print(f"bench_floor: {t} thread(s) failed: {err}", file=sys.stderr)
            missing[t] = "failed"
        print(f"bench_floor: {t} thread(s): {'failed' if t in missing else 'done'}", flush=True)

    rows = []
    keys = [(f"step|{w}|{i}", w, i) for w, i in configs] + \
        [(f"layer|{b}|{c}|{hw}|{co}", (b, c, hw, co), None) for b, c, hw, co in shapes]
    for key, what, inp in keys:
        for t in threads:
            res = done.get(t)
            if res is None:
                rows.append([str(what), inp or "—", str(t)] + [missing[t]] * 7)
                continue
            case = res["cases"][key]
            f = figures(case["times"])
            label = f"SphereNet-9 {tuple(case['widths'])} step" if inp else f"SphereConv2d {what}"
            rows.append([label, inp or "—", str(t), f"{1e3 * f['base']:.1f} ms", f"{1e3 * f['passes']:.1f} ms",
                         f"{f['floor']:.2f}x", f"{f['floor_in']:.2f}x", f"{f['in_step']:.2f}x",
                         f"{f['measured']:.2f}x", f"{f['measured'] - f['in_step']:+.2f}"])
    kernel_rows = []
    for key, what, inp in keys[:len(configs)]:
        for t in threads:
            if t in done:
                case = done[t]["cases"][key]
                kernel_rows.append([f"{tuple(case['widths'])}", inp, str(t)]
                                   + [f"{1e3 * v:.1f}" for v in breakdown_columns(case)])
    wall = time.perf_counter() - start
    headers = ["case", "input", "threads", "baseline", "floor passes", "floor", "input passes only",
               "floor in the step", "cosine measured", "measured − floor in the step"]
    text = "\n".join([
        f"## The memory floor of the SphereConv tail (bench_floor, cpu, float32{H.env_label(child_env)})",
        "",
        f"Command: `{command}`. Machine: {machine('cpu')}. "
        + H.load_line(load_start, H.load1(), list(done.values()), os.cpu_count())
        + f" Wall time {wall / 60:.1f} min.",
        "",
        f"Batch {batch}, {rounds} interleaved rounds per case in one process per thread count. `baseline`: the CNN-9 "
        "training step (forward, cross-entropy, backward, Adam) or `nn.Conv2d` forward + backward. `floor passes`: "
        f"the {PASSES_OUT} passes over every SphereConv layer's output and {PASSES_IN} over its input that the "
        "cosine tail cannot avoid outside the convolution kernel, timed apart as broadcast multiplications into "
        "preallocated tensors (repeated over the same tensors, so partly from the cache). `floor` = 1 + passes / "
        "baseline; `input passes only` = that floor if the output passes were fused into the following "
        "BatchNorm's loops (which read and write the output anyway); `floor in the step` = the baseline with the "
        "same passes made inside it, where the tail makes them (hooks on its convolutions, between the step's own "
        "loops, which leave the cache cold), over the baseline: the lowest step (or layer) ratio any SphereConv "
        "built on PyTorch's convolution reaches here; `cosine measured`: the cosine SphereNet-9 (`memory_efficient`, "
        "as `create_model` builds it) or `SphereConv2d` over the same baseline.",
        "",
        *H.markdown_table(headers, rows, 3),
        "",
        f"Where the cosine SphereNet-9 step's extra time goes, ms per step (all ten layers, wall time around each "
        f"call, mean over {rounds} steps after the rounds above). The layers' pointwise kernels (compiled at these "
        "sizes): the patch norms (channel square-sum, window sum, reciprocal square root), the forward tail "
        "(written over z), the backward tail from the saved output (dL/dz, with dL/dr summed in the loop) and the "
        "patch norms' gradient added into dL/dx. `rest of the node`: the layers' autograd nodes (forward and "
        "backward) less their convolutions and kernels: the weight normalization and its gradient, the small ops "
        "on the (N, 1, H', W') patch norms, the kernels' Python and Dynamo entry, the node's Python. `step − CNN "
        "step`: the median over the rounds above of the difference; `outside the nodes`: that difference less the "
        "nodes' own extra (kernels and rest), i.e. autograd, the modules' Python and any difference between the two "
        "models' convolutions and other layers (the allocator's page faults among them); `floor in the step`: the "
        "in-step floor's passes, (floor in the step − 1) x baseline.",
        "",
        *H.markdown_table(["widths", "input", "threads", *KERNELS, "kernels total", "rest of the node",
                           "step − CNN step", "outside the nodes", "floor in the step"], kernel_rows, 3),
    ]) + H.status_note(True, bool(missing))
    print(text)
    if not args.no_write:
        write_section(SECTION + H.env_suffix(child_env), text, args.doc)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
