"""Writes the ``gpu.sh`` section of docs/benchmarks.md from a run's folder (called by benchmarks/gpu.sh).

The folder holds ``parts.tsv`` (one line per part: name, exit code, seconds, time limit), ``tests.log`` (pytest's
output), ``train.log`` and ``train/summary.json`` (the ``torchsphere train`` run). The section names the device
(``torch.cuda.get_device_name()`` on CUDA) and points at the benchmark sections the same run wrote.

Usage:
    python benchmarks/gpu_report.py --out DIR --device cuda [--doc docs/benchmarks.md] [--command "..."]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H  # noqa: E402
from _report import DOC, machine, write_section  # noqa: E402

PART_TITLES = {"tests": "CUDA tests (pytest)", "bench_ops": "bench_ops (SphereConv2d vs nn.Conv2d)",
               "bench_train_step": "bench_train_step (SphereNet-9 vs CNN-9)", "train": "torchsphere train"}
# a pytest summary line, e.g. "4 passed, 2 skipped in 3.21s" or "== 1 failed, 3 passed in 9.8s =="
PYTEST_SUMMARY = re.compile(r"\d+ (passed|failed|skipped|error|errors|deselected|xfailed|xpassed)\b.* in [\d.]+s")


def read_parts(path: Path) -> list[tuple[str, int, float, float]]:
    """(name, exit code, seconds, limit in seconds) per line of ``parts.tsv``."""
    parts = []
    for line in path.read_text().splitlines():
        if line.strip():
            name, rc, secs, limit = line.split("\t")
            parts.append((name, int(rc), float(secs), float(limit)))
    return parts


def status(rc: int) -> str:
    return {0: "ok", 124: "stopped at its time limit", 137: "killed at its time limit"}.get(rc, f"failed (exit {rc})")


def pytest_summary(log: Path) -> str:
    """pytest's final summary line (``4 passed in 3.2s``), or a note when there is none."""
    if not log.is_file():
        return "no test log"
    lines = [m.group(0) for m in map(PYTEST_SUMMARY.search, log.read_text().splitlines()) if m]
    return lines[-1] if lines else "no pytest summary line (see tests.log)"


def train_lines(summary_path: Path) -> list[str]:
    if not summary_path.is_file():
        return ["The training run wrote no summary.json (see train.log)."]
    s = json.loads(summary_path.read_text())
    return [f"Training run: {s['model']} ({s['operator'] or 'the model’s operator'}), {s['dataset_source']}, "
            f"{s['steps']} steps of batch {s['batch_size']}: {1e3 * s['time_per_step_s']:.1f} ms per step "
            f"({s['train_time_s']:.1f} s of training, evaluations excluded); final test accuracy "
            f"{s['final']['test_acc']:.4f} (chance 1/{s['data'].get('num_classes', '?')})."]


def render(out: Path, device: str, command: str) -> str:
    parts = read_parts(out / "parts.tsv") if (out / "parts.tsv").is_file() else []
    rows = [[PART_TITLES.get(name, name), status(rc), f"{secs:.0f}", f"{limit:.0f}"] for name, rc, secs, limit in parts]
    total = sum(p[2] for p in parts)
    suffix = ("_cuda" if device == "cuda" else "") + "_bf16"  # gpu.sh runs the benchmarks under bf16 autocast
    return "\n".join([
        f"## GPU path: `benchmarks/gpu.sh` ({H.device_label(device)})",
        "",
        f"Command: `{command}`. Machine: {machine(device)}. Total {total / 60:.1f} min.",
        "",
        *H.markdown_table(["part", "result", "seconds", "limit (s)"], rows, 2),
        "",
        f"Tests: {pytest_summary(out / 'tests.log')}.",
        "",
        *train_lines(out / "train" / "summary.json"),
        "",
        f"The benchmark figures of this run are in the sections `bench_ops{suffix}` and "
        f"`bench_train_step{suffix}` of this file.",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="gpu.sh's output folder")
    p.add_argument("--device", choices=H.DEVICES, default="cuda")
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--command", default="benchmarks/gpu.sh", help="the gpu.sh command line, for the record")
    args = p.parse_args(argv)
    if not args.out.is_dir():
        p.error(f"--out must be gpu.sh's output folder; got {str(args.out)!r}, which is not a folder")
    text = render(args.out, args.device, args.command)
    print(text)
    write_section(f"gpu_sh_{args.device}", text, args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
