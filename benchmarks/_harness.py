"""The benchmarks' measurement harness: one fresh process per thread count, interleaved rounds, paired ratios.

Why a fresh process: torch's intra-op pool (and OpenMP's, which Inductor's C++ kernels use) cannot be resized
reliably once it has run, so each thread count is measured in a child started with ``OMP_NUM_THREADS=N`` and
``torch.set_num_threads(N)``. Why paired ratios: a machine shared with other jobs speeds up and slows down by tens
of percent within a minute; candidates timed in turn (A, B, C, ... in an order rotated every round) see the same
load, and the median over rounds of A's time over the baseline's time *in the same round* cancels most of it.

The parent process runs :func:`run_child` for every (configuration, thread count); the child measures and writes
its results as JSON to the file the parent names. ``time.perf_counter`` brackets each sample, with
``torch.cuda.synchronize()`` on both sides on CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

DEVICES = ("cpu", "cuda")
AUTOCASTS = ("none", "bf16")
OVER = "✗"  # marks a ratio above its target in the tables


class ChildError(RuntimeError):
    """A measuring child process failed or ran past its time limit."""


def check_threads(values: Sequence[int] | None, device: str) -> list[int]:
    """The thread counts to measure: the given ones (each >= 1, no repeats), else 1 and 2 on CPU, torch's on CUDA."""
    if not values:
        return [1, 2] if device == "cpu" else [torch.get_num_threads()]
    bad = [v for v in values if v < 1]
    if bad:
        raise ValueError(f"--threads must be >= 1; got {bad[0]}")
    if len(set(values)) != len(values):
        raise ValueError(f"--threads lists a value twice; got {list(values)}")
    return list(values)


def check_device(device: str, autocast: str) -> None:
    """Raises ValueError when ``device`` is CUDA on a machine without one (CPU with bf16 autocast is allowed)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
    if autocast not in AUTOCASTS:
        raise ValueError(f"--autocast must be one of {AUTOCASTS}; got {autocast!r}")


def check_positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def set_compile_limits() -> None:
    """Lets Dynamo keep one graph per compiled model: many instances of one class share ``forward``'s code object,
    and past the default recompile limit (8) Dynamo would silently run the rest eagerly."""
    import torch._dynamo.config as cfg
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 512))


def compile_fn(module: torch.nn.Module, backend: str) -> Callable:
    """``torch.compile(module)`` with ``backend`` (``"inductor"``, the default compiler; ``"eager"`` only traces)."""
    return torch.compile(module, backend=backend)


def autocast(device: str, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``mode == "bf16"``, else a no-op context."""
    if mode == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, device: str, inner: int = 1,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of every step, ``rounds`` samples each, in an order rotated every round.

    Each step first runs ``warmup`` times (a compiled step compiles its forward on the first call, its backward on
    the first backward). A sample is the mean of ``inner`` back-to-back calls (on CUDA a step can be too short to
    time alone).
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return times


def paired_median(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of ``name``'s time over ``base``'s time in the same round."""
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def load1() -> float:
    """The 1-minute load average (runnable processes, averaged; above the core count the CPUs are oversubscribed)."""
    return os.getloadavg()[0]


def child_cpu_seconds() -> float:
    """User + system CPU seconds of the finished children of this process."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_env(items: Sequence[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--env``) as a dict; raises ValueError naming a malformed item."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ValueError(f"--env takes KEY=VALUE items; got {item!r}")
        out[key] = value
    return out


def env_suffix(env: dict[str, str]) -> str:
    """The section-name suffix of a run with ``--env`` (its keys, lowercased), so that it does not replace the run
    in the default environment: ``{"MALLOC_TOP_PAD_": ...}`` -> ``"_malloc_top_pad"``; ``""`` for none."""
    return "".join("_" + key.strip("_").lower() for key in sorted(env))


def env_label(env: dict[str, str]) -> str:
    """``", with MALLOC_TOP_PAD_=1073741824"`` for a section title; ``""`` for the default environment."""
    return ", with " + " ".join(f"{k}={v}" for k, v in sorted(env.items())) if env else ""


def run_child(script: Path, job: dict, threads: int, timeout_s: float | None,
              extra_env: dict[str, str] | None = None) -> dict:
    """Runs ``script --child JOB`` with ``threads`` intra-op threads; returns the JSON the child wrote.

    ``extra_env``: environment variables set for the child only (e.g. glibc's ``MALLOC_*`` tunables).

    Raises:
        ChildError: the child exited non-zero (its stderr's tail is in the message) or ran past ``timeout_s``.
    """
    env = {**os.environ, **(extra_env or {}), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    fd, out = tempfile.mkstemp(prefix="torchsphere-bench-", suffix=".json")
    os.close(fd)
    try:
        cmd = [sys.executable, str(script), "--child", json.dumps({**job, "threads": threads, "out": out})]
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise ChildError(f"timed out after {timeout_s:.0f} s") from err
        if res.returncode != 0:
            tail = "\n".join(res.stderr.strip().splitlines()[-15:])
            raise ChildError(f"exit code {res.returncode}:\n{tail}")
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def run_per_thread(script: Path, name: str, job: dict, threads: Sequence[int],
                   extra_env: dict[str, str] | None = None) -> dict[int, dict]:
    """Runs one :func:`run_child` of ``job`` per thread count, no time limit; returns the results of those that
    finished, by thread count. A failed child is reported on stderr and left out; progress goes to stdout."""
    done: dict[int, dict] = {}
    for t in threads:
        try:
            done[t] = run_child(script, job, t, None, extra_env)
        except ChildError as err:
            print(f"{name}: {t} thread(s) failed: {err}", file=sys.stderr)
        print(f"{name}: {t} thread(s): {'done' if t in done else 'failed'}", flush=True)
    return done


def finished_section(title: str, command: str, machine: str, start: float, load_start: float,
                     done: dict[int, dict], threads: Sequence[int], extra: str, body: Sequence[str]) -> str:
    """The markdown of a finished per-thread run: ``title``, the line on the command, machine, load and wall time
    since ``start`` (``perf_counter``) with ``extra`` appended, ``body``, and the note on missing thread counts."""
    wall = time.perf_counter() - start
    run = (f"Command: `{command}`. Machine: {machine}. "
           + load_line(load_start, load1(), list(done.values()), os.cpu_count())
           + f" Wall time {wall / 60:.1f} min.{extra}")
    return "\n".join([title, "", run, "", *body, status_note(True, len(done) < len(threads)).strip()])


def add_output_arguments(parser: argparse.ArgumentParser, doc: Path) -> None:
    """``--doc``, ``--no-write`` and the hidden ``--child`` (:func:`parse_or_run_child`) of a measuring script."""
    parser.add_argument("--doc", type=Path, default=doc, help="Markdown file to write the section into")
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs file alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def parse_or_run_child(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                       child: Callable[[dict], None]) -> argparse.Namespace | None:
    """The parsed arguments; or, for a ``--child JOB`` invocation (:func:`run_child`), runs ``child(JOB)`` and
    returns None."""
    args = parser.parse_args(argv)
    if getattr(args, "child", None):
        child(json.loads(args.child))
        return None
    return args


@contextlib.contextmanager
def child_context(job: dict) -> Iterator[dict]:
    """In the child: sets the thread count, yields a dict to fill, then writes it (with the load averages) to
    ``job["out"]``."""
    torch.set_num_threads(job["threads"])
    set_compile_limits()
    result: dict = {"threads": torch.get_num_threads(), "load_start": load1()}
    yield result
    result["load_end"] = load1()
    Path(job["out"]).write_text(json.dumps(result))


def ratio_cell(ratio: float | None, target: float | None) -> str:
    """``1.04x``, or ``**1.15x** ✗`` when above ``target``; ``—`` when not measured."""
    if ratio is None:
        return "—"
    if target is not None and ratio > target:
        return f"**{ratio:.2f}x** {OVER}"
    return f"{ratio:.2f}x"


def device_label(device: str) -> str:
    """``cpu`` or the CUDA device's name (``torch.cuda.get_device_name()``)."""
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


class Deadline:
    """A wall-clock budget: ``left()`` seconds remain (None without a budget)."""

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.monotonic() + 60 * minutes

    def left(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def expired(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int) -> list[str]:
    """A Markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    return ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def load_line(start: float, end: float, children: Sequence[dict], cores: int | None) -> str:
    """One sentence on the machine load: the 1-minute load average at the start and end of the run and its range
    over the measuring children."""
    seen = [v for c in children for v in (c.get("load_start"), c.get("load_end")) if v is not None]
    span = f" (between {min(seen):.1f} and {max(seen):.1f} at the children's starts and ends)" if seen else ""
    return (f"1-minute load average {start:.1f} at the start and {end:.1f} at the end{span}, on {cores} cores: "
            "above the core count other jobs shared the CPUs, and single cells carry that noise.")


def status_note(final: bool, missing: bool) -> str:
    """The note under a table: empty for a complete run, else what its placeholder cells mean."""
    legend = "'budget' = not started within --max-minutes; 'failed' = the child process failed (see stderr)"
    if not final:
        return f"\n\n*Run in progress: cells marked … are still being measured; {legend}.*"
    return f"\n\n*Run incomplete: {legend}.*" if missing else ""
