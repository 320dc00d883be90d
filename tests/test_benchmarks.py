"""The benchmark scripts (benchmarks/): their harness, argument checks, tables, docs sections and gpu.sh's CPU side.

No timing is asserted anywhere: the figures themselves belong to docs/benchmarks.md. Every run here writes into a
temporary docs file, never into the real docs/benchmarks.md.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
GPU_SH = BENCH / "gpu.sh"
sys.path.insert(0, str(BENCH))

import _harness as H  # noqa: E402
import _report  # noqa: E402
import bench_floor  # noqa: E402
import bench_kernels  # noqa: E402
import bench_node  # noqa: E402
import bench_ops  # noqa: E402
import bench_train_step  # noqa: E402
import gpu_report  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
HAVE_BASH = shutil.which("bash") is not None and shutil.which("timeout") is not None


def gpu_sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, env=ENV, timeout=timeout)


# ------------------------------------------------------------------ the harness


def test_interleaved_rotates_the_order_and_warms_up_every_step():
    calls: list[str] = []
    steps = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = H.interleaved(steps, rounds=4, device="cpu", inner=2, warmup=3)
    assert calls[:9] == ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # warm-up, then the rounds
    rounds = ["".join(calls[9:][i:i + 6:2]) for i in range(0, 24, 6)]  # inner=2: every call twice in a row
    assert rounds == ["abc", "bca", "cab", "abc"]
    assert all(len(t) == 4 and all(s >= 0 for s in t) for t in times.values())


def test_paired_median_is_the_median_of_per_round_ratios():
    times = {"base": [1.0, 2.0, 4.0], "x": [1.5, 2.2, 100.0]}  # ratios 1.5, 1.1, 25
    assert H.paired_median(times, "x", "base") == pytest.approx(1.5)
    # not the ratio of the medians (2.2 / 2.0), which a slow round of one candidate alone would distort
    assert H.paired_median(times, "x", "base") != pytest.approx(1.1)


def test_ratio_cell_marks_values_over_target():
    assert H.ratio_cell(1.04, 1.10) == "1.04x"
    assert H.ratio_cell(1.10, 1.10) == "1.10x"  # at the target is within it
    assert H.ratio_cell(1.156, 1.10) == f"**1.16x** {H.OVER}"
    assert H.ratio_cell(3.0, None) == "3.00x"
    assert H.ratio_cell(None, 1.10) == "—"


def test_check_threads():
    assert H.check_threads(None, "cpu") == [1, 2]
    assert H.check_threads([2], "cpu") == [2]
    with pytest.raises(ValueError, match="--threads must be >= 1; got 0"):
        H.check_threads([1, 0], "cpu")
    with pytest.raises(ValueError, match=r"--threads lists a value twice; got \[2, 2\]"):
        H.check_threads([2, 2], "cpu")


def test_markdown_table_and_load_line():
    lines = H.markdown_table(["a", "b", "n"], [["x", "y", "1"]], numeric_from=2)
    assert lines == ["| a | b | n |", "|---|---|---:|", "| x | y | 1 |"]
    line = H.load_line(0.5, 2.5, [{"load_start": 1.0, "load_end": 3.0}], 2)
    assert "0.5 at the start and 2.5 at the end" in line and "between 1.0 and 3.0" in line


def test_cpu_model_names_the_processor_and_falls_back_to_the_architecture(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    arch = _report.cpu_model(tmp_path / "missing")
    assert arch and "EPYC" not in arch
    assert _report.cpu_model(info) == f"{arch}, AMD EPYC 9654 96-Core Processor"
    info.write_text("processor\t: 0\nmodel name\t:   \n")  # an empty name: the architecture alone
    assert _report.cpu_model(info) == arch
    assert _report.cpu_model(tmp_path / "missing") in _report.machine("cpu")


def test_write_section_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "bench.md"
    _report.write_section("one", "first", doc)
    _report.write_section("two", "second", doc)
    _report.write_section("one", "FIRST", doc)
    text = doc.read_text()
    assert text.startswith(_report.HEADER)
    assert "FIRST" in text and "first" not in text and "second" in text
    assert text.index("<!-- one:start -->") < text.index("<!-- two:start -->")


def test_run_child_measures_in_a_fresh_process_with_the_thread_count():
    job = dict(shape=[2, 3, 5, 4], operators=["linear"], modes=["default", "memory_efficient"], reference=True,
               rounds=2, inner=1, compile=False, backend="inductor", device="cpu", autocast="none")
    result = H.run_child(BENCH / "bench_ops.py", job, threads=2, timeout_s=120)
    assert result["threads"] == 2
    assert set(result["times"]) == {"eager|nn.Conv2d", "eager|SphereConv2d linear default",
                                    "eager|SphereConv2d linear memory_efficient", "eager|unfold reference (linear)"}
    assert all(len(t) == 2 for t in result["times"].values())


def test_env_runs_get_a_section_and_title_of_their_own():
    assert H.env_suffix({}) == "" and H.env_label({}) == ""
    env = {"MALLOC_TOP_PAD_": "1073741824", "A": "1"}
    assert H.env_suffix(env) == "_a_malloc_top_pad"
    assert H.env_label(env) == ", with A=1 MALLOC_TOP_PAD_=1073741824"


def test_bench_train_step_with_env_keeps_the_default_section(tmp_path, monkeypatch):
    monkeypatch.setattr(H.Deadline, "expired", lambda self: True)
    doc = tmp_path / "bench.md"
    doc.write_text("# B\n\n<!-- bench_train_step:start -->\ndefault run\n<!-- bench_train_step:end -->\n")
    argv = ["--widths", "0.0625", "--inputs", "28x28x1", "--threads", "1", "--operators", "cosine",
            "--env", "MALLOC_TOP_PAD_=1073741824", "--doc", str(doc)]
    assert bench_train_step.main(argv) == 0
    text = doc.read_text()
    assert "default run" in text and "<!-- bench_train_step_malloc_top_pad:start -->" in text
    assert "(bench_train_step, cpu, float32, with MALLOC_TOP_PAD_=1073741824)" in text


def test_parse_env_and_run_child_pass_variables_to_the_child_only(tmp_path):
    assert H.parse_env(["A=1", "B_C=x=y", "D="]) == {"A": "1", "B_C": "x=y", "D": ""}
    assert H.parse_env(None) == {}
    with pytest.raises(ValueError, match="--env takes KEY=VALUE items; got '=1'"):
        H.parse_env(["=1"])
    script = tmp_path / "child.py"
    script.write_text("import json, os, sys\njob = json.loads(sys.argv[2])\n"
                      "open(job['out'], 'w').write(json.dumps({'v': os.environ.get('TORCHSPHERE_BENCH_TEST')}))\n")
    assert H.run_child(script, {}, 1, 60, {"TORCHSPHERE_BENCH_TEST": "42"}) == {"v": "42"}
    assert "TORCHSPHERE_BENCH_TEST" not in os.environ


def test_run_child_reports_a_failing_child():
    with pytest.raises(H.ChildError, match="exit code 1"):
        H.run_child(BENCH / "bench_ops.py", {"shape": "not a shape"}, threads=1, timeout_s=120)


def test_unfold_reference_matches_sphere_conv2d_in_float64():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    layer = bench_ops.SphereConv2d(3, 5, 3, padding=1, operator="linear", dtype=torch.float64)
    layer.weight.data.copy_(w)
    torch.testing.assert_close(bench_ops.unfold_sphere_conv2d(x, w), layer(x), rtol=0, atol=1e-10)


# ------------------------------------------------------------------ argument checks of the Python scripts


@pytest.mark.parametrize("module", [bench_ops, bench_train_step, bench_floor])
@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be > 0; got 0"),
    (["--threads", "0"], "--threads must be >= 1; got 0"),
    (["--threads", "1", "1"], r"--threads lists a value twice"),
    (["--max-minutes", "-1"], "--max-minutes must be > 0; got -1"),
    (["--batch", "0"], "--batch must be > 0; got 0"),
])
def test_common_argument_errors_exit_2_with_a_message(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(argv + ["--no-write"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("module", [bench_ops, bench_train_step])
@pytest.mark.parametrize("argv, message", [
    (["--inner", "0"], "--inner must be > 0; got 0"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--autocast", "fp16"], "invalid choice: 'fp16'"),
    (["--operators", "tanh"], "invalid choice: 'tanh'"),
])
def test_script_argument_errors_exit_2_with_a_message(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(argv + ["--no-write"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
@pytest.mark.parametrize("module", [bench_ops, bench_train_step])
def test_scripts_refuse_cuda_without_a_gpu(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--device", "cuda", "--no-write"])
    assert exc.value.code == 2
    assert "--device cuda was requested but torch.cuda.is_available() is False" in capsys.readouterr().err


def test_script_specific_argument_errors(capsys):
    with pytest.raises(SystemExit):
        bench_ops.main(["--shapes", "1,2,3", "--no-write"])
    assert "a shape is BATCH,C_IN,HW,C_OUT of positive ints; got '1,2,3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_train_step.main(["--widths", "0", "--no-write"])
    assert "a width multiplier is a number > 0; got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_train_step.main(["--env", "MALLOC_TOP_PAD_", "--no-write"])
    assert "--env takes KEY=VALUE items; got 'MALLOC_TOP_PAD_'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_floor.main(["--widths", "-1", "--no-write"])
    assert "a width multiplier is a number > 0; got '-1'" in capsys.readouterr().err


def test_section_names_keep_cpu_cuda_and_bf16_apart():
    assert bench_ops.section_name("cpu", "none") == "bench_ops"
    assert bench_ops.section_name("cuda", "bf16") == "bench_ops_cuda_bf16"
    assert bench_train_step.section_name("cpu", "bf16") == "bench_train_step_bf16"
    assert bench_train_step.section_name("cuda", "none") == "bench_train_step_cuda"


def test_bench_floor_figures_are_medians_of_per_round_ratios():
    times = {"base": [1.0, 2.0, 4.0], "cosine": [1.5, 2.2, 40.0], "out": [0.1, 0.4, 0.4], "in": [0.1, 0.0, 0.4],
             "in_step": [1.1, 2.6, 4.4]}
    f = bench_floor.figures(times)
    assert f["floor"] == pytest.approx(1.2)  # rounds: 1.2, 1.2, 1.2
    assert f["floor_in"] == pytest.approx(1.1)  # rounds: 1.1, 1.0, 1.1
    assert f["in_step"] == pytest.approx(1.1)  # rounds: 1.1, 1.3, 1.1
    assert f["measured"] == pytest.approx(1.5)  # rounds: 1.5, 1.1, 10
    assert f["extra"] == pytest.approx(0.5)  # rounds: 0.5, 0.2, 36
    assert f["base"] == 2.0 and f["passes"] == pytest.approx(0.4)


def test_bench_floor_in_step_passes_sit_where_the_tail_makes_them_and_change_nothing():
    """The in-step floor's hooks: per convolution one pass pair over the output and one over the input in the
    forward, two over the output's gradient, one over the input's gradient where the input needs one; the CNN's
    loss and gradients stay exactly those of the same CNN without the hooks."""
    (plain, _, x, y), (hooked, _, _, _) = [bench_train_step.build(None, 0.0625, 1, 28, False, 2, "cpu")
                                           for _ in range(2)]
    passes = bench_floor.InStepPasses(hooked)
    convs = [m for m in hooked.modules() if isinstance(m, torch.nn.Conv2d)]
    calls = []
    real_mul = torch.mul
    try:
        torch.mul = lambda a, s, out: calls.append(tuple(a.shape)) or real_mul(a, s, out=out)
        grads = {}
        for name, model in (("plain", plain), ("hooked", hooked)):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            grads[name] = [loss.detach(), *torch.autograd.grad(loss, list(model.parameters()))]
    finally:
        torch.mul = real_mul
    for a, e in zip(grads["hooked"], grads["plain"]):
        assert torch.equal(a, e)
    # forward: the input read of each conv (the in-place pass over the output is a Tensor.mul_, not counted);
    # backward: two over each output's gradient and one over each input's that needs one (all but the first)
    assert len(calls) == len(convs) + 2 * len(convs) + (len(convs) - 1)
    assert calls.count(tuple(x.shape)) == 1  # the first layer's input: forward read only
    passes.remove()
    assert all(not m._forward_hooks for m in convs)


def test_bench_floor_passes_cover_every_sphere_layer_once_per_pass():
    model = bench_train_step.build("cosine", 0.0625, 1, 28, True, 2, "cpu")[0]
    shapes = bench_floor.layer_shapes(model, torch.randn(2, 1, 28, 28))
    convs = [m for m in model.modules() if isinstance(m, bench_floor.SphereConv2d)]
    assert len(shapes) == len(convs) == 10  # nine stage layers and fc6
    assert shapes[0] == ((2, 1, 28, 28), (2, convs[0].out_channels, 28, 28))
    calls = []
    real_mul = torch.mul
    try:
        torch.mul = lambda a, s, out: calls.append(tuple(a.shape)) or real_mul(a, s, out=out)
        bench_floor.passes_fn(shapes, "out")()
        bench_floor.passes_fn(shapes, "in")()
    finally:
        torch.mul = real_mul
    # one multiplication = one read + one write: 6 passes over each output, 4 over each input
    assert calls == [o for _, o in shapes for _ in range(bench_floor.PASSES_OUT // 2)] + \
        [i for i, _ in shapes for _ in range(bench_floor.PASSES_IN // 2)]


# ------------------------------------------------------------------ real tiny runs into a temporary docs file


def test_bench_ops_writes_one_column_per_thread_count_and_kind(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    rc = bench_ops.main(["--shapes", "2,3,5,4", "--rounds", "2", "--threads", "1", "--operators", "linear",
                         "--modes", "default", "--compile", "--compile-backend", "eager", "--doc", str(doc)])
    assert rc == 0
    text = doc.read_text()
    assert "kept" in text and "<!-- bench_ops:start -->" in text and "Run incomplete" not in text
    section = text[text.index("<!-- bench_ops:start -->"):]
    assert "| (batch, C_in, H=W, C_out) | candidate | mode | 1 thr eager | 1 thr compiled |" in section
    assert re.search(r"\| \(2, 3, 5, 4\) \| nn.Conv2d \| — \| [\d.]+ ms \| [\d.]+ ms \|", section)
    assert re.search(r"\| \(2, 3, 5, 4\) \| SphereConv2d linear \| default \| (\*\*)?[\d.]+x", section)
    assert re.search(r"\| unfold reference \(linear\) \| — \| [\d.]+x \| — \|", section)  # eager only
    assert re.search(r"1-minute load average [\d.]+ at the start and [\d.]+ at the end", section)
    assert re.search(r"Over target: linear \d of 2 cells", section)


def test_bench_ops_budget_leaves_shapes_out_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(H.Deadline, "expired", lambda self: True)
    doc = tmp_path / "bench.md"
    assert bench_ops.main(["--shapes", "2,3,5,4", "--threads", "1", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "| (2, 3, 5, 4) | nn.Conv2d | — | budget |" in text and "Run incomplete" in text


def test_bench_kernels_writes_a_row_per_operator_and_kernel(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    rc = bench_kernels.main(["--quick", "--backend", "eager", "--threads", "1", "--operators", "cosine",
                             "learnable_sigmoid", "--doc", str(doc)])
    assert rc == 0
    text = doc.read_text()
    assert "kept" in text and "<!-- bench_kernels:start -->" in text and "Run incomplete" not in text
    section = text[text.index("<!-- bench_kernels:start -->"):]
    assert ("| operator | kernel | 1 thr | 1 thr, passes | 1 thr, floats as inputs | 1 thr, no contraction |"
            in section)
    assert re.search(r"\| one pass \(`torch.mul\(a, s, out=b\)`\) \| — \| [\d.]+ ms \| 1.0 \| — \| — \|", section)
    for operator in ("cosine", "learnable_sigmoid"):
        for kernel in bench_kernels.KERNELS:
            assert re.search(rf"\| {operator} \| {kernel} \| [\d.]+ ms \| [\d.]+ \| [\d.]+ ms \| [\d.]+ ms \|",
                             section)
    assert "linear" not in section.split("| operator |")[1]  # only the operators asked for


def test_bench_kernels_modes_keep_their_own_kernels_and_restore_the_library():
    fused = bench_kernels.fused
    caches = {mode: {} for mode in bench_kernels.MODES}
    seen = {}
    before = (fused._COMPILED, fused._CAN_SPECIALIZE_FLOATS, fused.KERNEL_OPTIONS)
    for mode in bench_kernels.MODES:
        bench_kernels.in_mode(lambda m=mode: seen.setdefault(m, (fused._COMPILED, fused._CAN_SPECIALIZE_FLOATS,
                                                                 dict(fused.KERNEL_OPTIONS))), mode, caches)()
    contract = "cpp.enable_floating_point_contract_flag"
    assert seen["constants"] == (caches["constants"], before[1], before[2]) and before[2][contract] == "fast"
    assert seen["inputs"] == (caches["inputs"], False, before[2])
    assert seen["uncontracted"] == (caches["uncontracted"], before[1], {**before[2], contract: "off"})
    assert (fused._COMPILED, fused._CAN_SPECIALIZE_FLOATS, fused.KERNEL_OPTIONS) == before


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be > 0; got 0"),
    (["--threads", "0"], "--threads must be >= 1; got 0"),
    (["--shape", "8", "0", "4", "4"], "--shape must be > 0; got 0"),
    (["--shape", "8", "4"], "--shape: expected 4 arguments"),
    (["--backend", "tvm"], "invalid choice: 'tvm'"),
    (["--operators", "tanh"], "invalid choice: 'tanh'"),
])
def test_bench_kernels_argument_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_kernels.main(argv + ["--no-write"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bench_floor_writes_its_section(tmp_path):
    doc = tmp_path / "bench.md"
    rc = bench_floor.main(["--widths", "0.0625", "--inputs", "28x28x1", "--batch", "2", "--rounds", "1",
                           "--threads", "1", "--doc", str(doc)])
    assert rc == 0
    text = doc.read_text()
    assert "<!-- bench_floor:start -->" in text and "Run incomplete" not in text
    assert re.search(r"\| SphereNet-9 \(8, 12, 16\) step \| 28x28x1 \| 1 \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+x \| "
                     r"[\d.]+x \| [\d.]+x \| [\d.]+x \| [+-][\d.]+ \|", text)
    for shape in bench_ops.SHAPES:
        assert f"| SphereConv2d {(2, *shape[1:])} | — | 1 |" in text
    # the breakdown table: the kernels' times, then the signed parts (that each kernel ran: the next test)
    assert ("| widths | input | threads | patch norm | forward | backward | patch grad | kernels total | "
            "rest of the node | step − CNN step | outside the nodes | floor in the step |") in text
    assert re.search(r"\| \(8, 12, 16\) \| 28x28x1 \| 1 \|( [\d.]+ \|){5}( -?[\d.]+ \|){4}", text)


@pytest.mark.parametrize("numel", [0, 1 << 62])  # every kernel compiled (the CPU training path) / all eager
def test_bench_floor_step_breakdown_times_every_part_and_restores_the_layer(monkeypatch, numel):
    monkeypatch.setattr(bench_floor.fused, "COMPILE_MIN_NUMEL", numel)
    monkeypatch.setattr(bench_floor.fused, "_COMPILED", {})
    monkeypatch.setattr(bench_floor.fused, "compile_kernel",
                        functools.partial(bench_floor.fused.compile_kernel, backend="eager"))
    fn_cls = bench_floor.fused_conv.SphereConvFn
    originals = (bench_floor.fused._kernel, bench_floor.fused_conv._CONV, bench_floor.fused_conv._CONV_BACKWARD,
                 fn_cls.__dict__["forward"], fn_cls.__dict__["backward"])
    model, opt, x, y = bench_train_step.build("cosine", 0.0625, 1, 28, True, 2, "cpu")
    parts = bench_floor.step_breakdown(lambda: bench_train_step.train_step(model, opt, x, y, "fused"), 2)
    for names in bench_floor.KERNELS.values():  # each column's kernel ran, under one of its names
        assert sum(parts.get(name, 0.0) for name in names) > 0
    assert {"node", "conv"} <= set(parts) and parts["node"] > parts["conv"] > 0
    assert (bench_floor.fused._kernel, bench_floor.fused_conv._CONV, bench_floor.fused_conv._CONV_BACKWARD,
            fn_cls.__dict__["forward"], fn_cls.__dict__["backward"]) == originals
    assert bench_floor.fused_conv._kernel is originals[0]


def test_bench_floor_budget_leaves_thread_counts_out_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(H.Deadline, "expired", lambda self: True)
    doc = tmp_path / "bench.md"
    assert bench_floor.main(["--quick", "--threads", "1", "--doc", str(doc)]) == 1
    text = doc.read_text()
    assert "| 0.25 | 28x28x1 | 1 | budget |" in text and "Run incomplete" in text


class _Event:  # the fields of torch.autograd.profiler_util.FunctionEvent that categorize reads
    def __init__(self, name, ms, parent=None):
        self.name, self.self_cpu_time_total, self.cpu_parent = name, ms * 1e3, parent


def test_bench_train_step_categorize_sums_self_time_per_row_and_phase():
    fwd, bwd = _Event("bench_train_step:forward", 1.0), _Event("bench_train_step:backward", 1.0)
    graph = _Event("## Call CompiledFxGraph abc", 5.0, bwd)
    events = [fwd, bwd, _Event("aten::mkldnn_convolution", 2.0, fwd), _Event("aten::convolution_backward", 3.0, bwd),
              graph, _Event("aten::empty", 0.5, graph), _Event("## Call CompiledFxGraph def", 4.0, fwd),
              _Event("Optimizer.step#Adam.step", 7.0)]
    got = bench_train_step.categorize(events, bench_train_step.COMPILED_CATEGORIES)
    assert got == {"convolution, forward": 2.0, "convolution, backward": 3.0,
                   "Inductor's kernels, forward graph": 4.0, "Inductor's kernels, backward graph": 5.0,
                   "other (optimizer, autograd, Python)": 7.5}  # the phase ranges' own time is left out
    eager = bench_train_step.categorize(events, bench_train_step.CATEGORIES)
    assert eager["convolution (forward + backward)"] == 5.0 and sum(eager.values()) == 21.5


def test_bench_train_step_profile_puts_the_convolution_backward_in_the_backward_phase():
    got = bench_train_step.profile_step("cosine", 0.0625, 2, compiled=True, backend="eager")
    assert got["convolution, forward"] > 0 and got["convolution, backward"] > 0
    # the eager backend traces only: no Inductor graph to count
    assert got["Inductor's kernels, forward graph"] == got["Inductor's kernels, backward graph"] == 0


def test_bench_train_step_budget_leaves_configurations_out_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(H.Deadline, "expired", lambda self: True)
    doc = tmp_path / "bench.md"
    argv = ["--widths", "0.0625", "--inputs", "28x28x1", "--threads", "1", "2", "--operators", "linear", "cosine",
            "--compile", "--memory", "--profile", "--doc", str(doc)]
    assert bench_train_step.main(argv) == 0
    text = doc.read_text()
    assert "| widths | input | operator | mode | 1 thr eager | 1 thr compiled | 2 thr eager | 2 thr compiled |" in text
    assert "| x0.0625 | 28x28x1 | CNN-9 | — | budget | budget | budget | budget |" in text
    assert "| x0.0625 | 28x28x1 | cosine | memory_efficient | budget | budget | budget | budget |" in text
    assert "Over target: eager 0 of 0, compiled 0 of 0 cells." in text and "Run incomplete" in text
    assert "| step peak (MiB) | memory / CNN |" in text
    assert "| x0.0625 | 28x28x1 | linear | default | budget | budget |\n" in text  # the memory table's row
    assert "Profile not run: the --max-minutes budget was spent." in text


@pytest.mark.slow
def test_gpu_sh_cpu_quick_runs_every_part_into_a_temporary_doc(tmp_path):
    """gpu.sh's CPU mode: every part for real with tiny sizes (about 30-60 s on a loaded 2-core machine)."""
    if not HAVE_BASH:
        pytest.skip("needs bash and GNU timeout")
    doc, out = tmp_path / "bench.md", tmp_path / "out"
    real = (ROOT / "docs" / "benchmarks.md").read_bytes()
    res = gpu_sh("--device", "cpu", "--quick", "--compile-backend", "eager", "--out", str(out), "--doc", str(doc),
                 timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (ROOT / "docs" / "benchmarks.md").read_bytes() == real
    parts = gpu_report.read_parts(out / "parts.tsv")
    assert [(name, rc) for name, rc, *_ in parts] == [("tests", 0), ("bench_ops", 0), ("bench_train_step", 0),
                                                      ("train", 0)]
    text = doc.read_text()
    for name in ("bench_ops_bf16", "bench_train_step_bf16", "gpu_sh_cpu"):
        assert f"<!-- {name}:start -->" in text
    assert "| 1 thr eager | 1 thr compiled |" in text
    assert re.search(r"Tests: \d+ skipped in [\d.]+s", text) or re.search(r"Tests: \d+ passed", text)
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["data"]["in_channels"] == 3 and summary["data"]["image_size"] == [32, 32]


# ------------------------------------------------------------------ gpu.sh: arguments, CUDA check, dry run

pytestmark_bash = pytest.mark.skipif(not HAVE_BASH, reason="needs bash and GNU timeout")


@pytestmark_bash
def test_gpu_sh_help():
    res = gpu_sh("--help")
    assert res.returncode == 0 and "Usage: benchmarks/gpu.sh" in res.stdout and "--minutes M" in res.stdout


@pytestmark_bash
@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--out"], "--out needs a value"),
    (["--minutes", "0"], "--minutes must be a number > 0; got '0'"),
    (["--minutes", "ten"], "--minutes must be a number > 0; got 'ten'"),
    (["--steps", "-3"], "--steps must be an integer >= 1; got '-3'"),
    (["--device", "tpu"], "--device must be cpu or cuda; got 'tpu'"),
    (["--python", "/no/such/python"], "--python: '/no/such/python' is not an executable"),
    (["--doc", "/no/such/dir/b.md"], "--doc: the folder of '/no/such/dir/b.md' does not exist"),
])
def test_gpu_sh_bad_arguments_exit_2(args, message):
    res = gpu_sh(*args)
    assert res.returncode == 2 and message in res.stderr and res.stdout == ""


@pytestmark_bash
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit of a machine without a GPU")
def test_gpu_sh_without_cuda_exits_3(tmp_path):
    res = gpu_sh("--out", str(tmp_path / "out"), "--doc", str(tmp_path / "b.md"))
    assert res.returncode == 3
    assert "no CUDA device: torch.cuda.is_available() is False" in res.stderr
    assert not (tmp_path / "b.md").exists() and not (tmp_path / "out").exists()


@pytestmark_bash
def test_gpu_sh_dry_run_prints_the_cuda_commands_within_the_budget(tmp_path):
    res = gpu_sh("--dry-run", "--out", str(tmp_path / "out"), "--doc", str(tmp_path / "b.md"))
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "b.md").exists()  # nothing run, nothing written
    lines = res.stdout.splitlines()
    limits = [int(m.group(1)) for m in map(re.compile(r"^# \w+ \(limit (\d+) s\)").match, lines) if m]
    assert len(limits) == 4 and sum(limits) < 8 * 60
    commands = [line for line in lines if not line.startswith("#")]
    tests, ops, step, train = commands
    assert "TORCHSPHERE_TEST_DEVICE=cuda" in tests and "test_fused_matches_reference_on_cuda" in tests
    for cmd in (ops, step):
        assert "--device cuda --autocast bf16 --compile" in cmd and "--max-minutes" in cmd
    assert "bench_ops.py" in ops and "--shapes" not in ops  # the official shapes, batch 128
    assert "bench_train_step.py" in step and "--widths 1.0" in step
    assert "-m torchsphere train" in train and "--steps 300" in train and "--device cuda" in train


@pytestmark_bash
def test_gpu_sh_minutes_scales_the_limits(tmp_path):
    res = gpu_sh("--dry-run", "--minutes", "20", "--out", str(tmp_path / "o"))
    limits = [int(v) for v in re.findall(r"\(limit (\d+) s\)", res.stdout)]
    assert sum(limits) <= 20 * 60 and sum(limits) > 8 * 60


# ------------------------------------------------------------------ gpu_report


def test_gpu_report_reads_parts_tests_and_training(tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "parts.tsv").write_text("tests\t0\t12.5\t54\nbench_ops\t124\t112.0\t112\n")
    (out / "tests.log").write_text("....\n======= 7 passed, 1 skipped in 3.21s =======\n")
    (out / "train" / "summary.json").write_text(json.dumps(dict(
        model="spherenet9", operator=None, dataset_source="synthetic(...)", steps=300, batch_size=128,
        time_per_step_s=0.0123, train_time_s=3.69, final=dict(test_acc=0.5), data=dict(num_classes=10))))
    doc = tmp_path / "b.md"
    assert gpu_report.main(["--out", str(out), "--device", "cpu", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "| CUDA tests (pytest) | ok | 12 | 54 |" in text  # 12.5 rounds half to even
    assert "| bench_ops (SphereConv2d vs nn.Conv2d) | stopped at its time limit | 112 | 112 |" in text
    assert "Tests: 7 passed, 1 skipped in 3.21s." in text
    assert "300 steps of batch 128: 12.3 ms per step" in text and "final test accuracy 0.5000" in text


def test_gpu_report_without_a_training_run_says_so(tmp_path):
    (tmp_path / "parts.tsv").write_text("")
    text = gpu_report.render(tmp_path, "cpu", "benchmarks/gpu.sh")
    assert "wrote no summary.json" in text and "Tests: no test log." in text


@pytestmark_bash
def test_gpu_sh_default_doc_is_the_docs_on_cuda_and_the_output_folder_on_cpu(tmp_path):
    cuda = gpu_sh("--dry-run", "--out", str(tmp_path / "o")).stdout.splitlines()[0]
    cpu = gpu_sh("--dry-run", "--device", "cpu", "--out", str(tmp_path / "o")).stdout.splitlines()[0]
    assert cuda.endswith(f"figures into {ROOT / 'docs' / 'benchmarks.md'}")
    assert cpu.endswith(f"figures into {tmp_path / 'o' / 'benchmarks.md'}")


def test_bench_node_writes_a_row_per_part_and_a_column_per_thread_count(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    rc = bench_node.main(["--quick", "--backend", "eager", "--threads", "1", "--widths", "0.25", "0.5",
                          "--doc", str(doc)])
    assert rc == 0
    text = doc.read_text()
    assert "kept" in text and "<!-- bench_node:start -->" in text and "Run incomplete" not in text
    section = text[text.index("<!-- bench_node:start -->"):]
    assert "| part | 1 thr |" in section
    for width in ("0.25", "0.5"):
        for part in ("forward", "backward"):
            assert re.search(rf"\| weight normalization, width {width}, {part}, 10 layers \(ms / step\) \| [\d.]+ \|",
                             section)
    for mode in bench_node.MODES:
        for kernels in bench_node.KERNELS:
            assert re.search(rf"\| fixed cost per layer, {mode}, {kernels} kernels \(µs\) \| -?\d+ \|", section)
    for call in bench_node.CALLS:
        assert re.search(rf"\| one forward-tail call, {call} \(µs\) \| [\d.]+ \|", section)


def test_bench_node_restores_the_compile_threshold():
    fused = bench_node.fused
    before, seen = fused.COMPILE_MIN_NUMEL, []
    for kernels in bench_node.KERNELS:
        bench_node.with_kernels(lambda: seen.append(fused.COMPILE_MIN_NUMEL), kernels)()
    assert seen == [0, before] and fused.COMPILE_MIN_NUMEL == before
    with pytest.raises(RuntimeError):
        bench_node.with_kernels(lambda: (_ for _ in ()).throw(RuntimeError("boom")), "compiled")()
    assert fused.COMPILE_MIN_NUMEL == before


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "0"], "--rounds must be > 0; got 0"),
    (["--threads", "0"], "--threads must be >= 1; got 0"),
    (["--widths", "0"], "--widths must be > 0; got 0"),
    (["--backend", "tvm"], "invalid choice: 'tvm'"),
])
def test_bench_node_argument_errors_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_node.main(argv + ["--no-write"])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
