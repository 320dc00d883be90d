"""Time and peak memory of the hyperspherical regularizers, fast forms vs the naive (official-style) forms.

Each case runs forward + backward of one layer's term for a weight of N neurons x d, in a fresh subprocess, so the
peak memory of one case cannot leak into another. Memory method: after building the inputs and a small warm-up, the
child resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) and reports VmHWM - VmRSS from
``/proc/self/status`` after the first full forward + backward, i.e. the extra resident memory of that step (torch's
CPU allocations included, which ``tracemalloc`` cannot see). Time: the best of up to 5 runs (at least one, repeats
stop after ~2 s).

Naive forms follow the official code: the full N x N term matrix (with the identity added to the distance matrix
before the kernel) masked to its strict upper triangle, half-space by concatenating [W; -W], MGD by one 2N x 2N
logdet, MHS by a masked minimum over the concatenated matrix. They are skipped where they do not fit (estimated
above ``NAIVE_LIMIT_GB``).

Usage:
    python benchmarks/bench_regularizers.py            # full grid, writes its section of docs/benchmarks.md
    python benchmarks/bench_regularizers.py --quick    # small grid, prints only
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

from torchsphere.functional import orthonormal_penalty  # noqa: E402
from torchsphere.regularizers import hyperspherical_energy, mgd, mhc, mhp, mhs, r_mhp  # noqa: E402

EPS = 1e-4
S = 2.0  # MHE power of the benchmark
NAIVE_LIMIT_GB = 4.0
THREADS = 1
METHODS = ("mhe", "mhe_half", "mhe_angular", "mhs", "mgd", "mhp", "mhc", "r_mhp", "orthonormal")
HALF = {"mhe_half", "mhs", "mgd", "mhp", "mhc"}  # half-space as on hidden layers (official)


# ----------------------------------------------------------------------------------------------- naive forms
def _naive_cos(w: torch.Tensor, half: bool) -> torch.Tensor:
    if half:
        w = torch.cat([w, -w])
    n = (w.square().sum(1) + EPS).sqrt()
    return (w @ w.t()) / torch.outer(n, n)


def naive_mhe(w: torch.Tensor, half: bool, angular: bool) -> torch.Tensor:
    c = _naive_cos(w, half)
    n = c.shape[0]
    eye = torch.eye(n, dtype=c.dtype)
    if angular:
        f = (torch.acos(c.clamp(-1 + 1e-6, 1 - 1e-6)) / math.pi + 1e-4).pow(-S)
    else:
        f = (2.0 - 2.0 * c + eye).pow(-S / 2)
    return torch.triu(f, 1).sum() / (n * (n - 1) / 2)


def naive_mhs(w: torch.Tensor) -> torch.Tensor:
    c = _naive_cos(w, True)
    d = torch.triu(2.0 - 2.0 * c, 1)
    m = torch.where(d != 0, d, math.inf).min()
    return -torch.where(d == m, d, 0.0).sum()


def naive_mgd(w: torch.Tensor) -> torch.Tensor:
    c = _naive_cos(w, True)
    return -torch.logdet(torch.exp(2.0 * c - 2.0) + 1e-6 * torch.eye(c.shape[0]))


def naive_pole(w: torch.Tensor, pole: torch.Tensor, kind: str) -> torch.Tensor:
    w = torch.cat([w, -w])
    c = (pole @ w.t()) / ((pole.square().sum() + EPS).sqrt() * (w.square().sum(1) + EPS).sqrt())
    if kind == "mhp":
        return -(1.0 / (2.0 - 2.0 * c)).mean()
    return -torch.log(torch.exp(-10.0 * (2.0 - 2.0 * c)).mean()) / 10.0


def term(method: str, impl: str, w: torch.Tensor, pole: torch.Tensor) -> torch.Tensor:
    if impl == "naive":
        if method.startswith("mhe"):
            return naive_mhe(w, method == "mhe_half", method == "mhe_angular")
        if method == "mhs":
            return naive_mhs(w)
        if method == "mgd":
            return naive_mgd(w)
        return naive_pole(w, pole, method)
    if method.startswith("mhe"):
        return hyperspherical_energy(w, S, half_space=method == "mhe_half", angular=method == "mhe_angular")
    return {"mhs": lambda: mhs(w, half_space=True), "mgd": lambda: mgd(w, half_space=True),
            "mhp": lambda: mhp(w, pole, half_space=True), "mhc": lambda: mhc(w, pole, half_space=True),
            "r_mhp": lambda: r_mhp(w), "orthonormal": lambda: orthonormal_penalty(w)}[method]()


def has_naive(method: str) -> bool:
    return method in ("mhe", "mhe_half", "mhe_angular", "mhs", "mgd", "mhp", "mhc")


def naive_fits(method: str, n: int) -> bool:
    """About 8 live N' x N' float32 matrices (N' = 2N for half-space) under autograd."""
    n2 = 2 * n if method in HALF else n
    if method in ("mhp", "mhc"):
        return True
    return 8 * 4 * n2 * n2 / 2**30 <= NAIVE_LIMIT_GB and not (method == "mgd" and n2 > 8192)


# ----------------------------------------------------------------------------------------------- one case (child)
def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_case(method: str, impl: str, n: int, d: int) -> dict:
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(n, d, generator=gen) * math.sqrt(2.0 / d)).requires_grad_()
    pole = torch.randn(1, d, generator=gen)
    small = w[:8].detach().clone().requires_grad_()  # warm-up: kernels, thread pool
    term(method, impl, small, pole).backward()

    def step() -> float:
        w.grad = None
        t0 = time.perf_counter()
        term(method, impl, w, pole).backward()
        return time.perf_counter() - t0

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    base = _status("VmRSS")
    times = [step()]
    extra = _status("VmHWM") - base
    while len(times) < 5 and sum(times) < 2.0:
        times.append(step())
    return {"time_s": min(times), "extra_mb": extra / 2**20}


# ----------------------------------------------------------------------------------------------- driver
def spawn(method: str, impl: str, n: int, d: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--case", method, impl, str(n), str(d)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout {timeout:.0f} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(r: dict | None) -> tuple[str, str]:
    if r is None:
        return "—", "—"
    if "error" in r:
        return r["error"], "—"
    t = r["time_s"]
    return (f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"), f"{r['extra_mb']:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N in {64, 512}, d = 576; print only")
    p.add_argument("--case", nargs=4, metavar=("METHOD", "IMPL", "N", "D"), help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    args = p.parse_args()
    if args.case:
        method, impl, n, d = args.case
        print(json.dumps(run_case(method, impl, int(n), int(d))))
        return
    sizes = [64, 512] if args.quick else [64, 512, 4096, 10000]
    dims = [576] if args.quick else [576, 4096]
    rows = []
    header = ("| method | N | d | fast: time | fast: extra MB | naive: time | naive: extra MB |\n"
              "|---|---|---|---|---|---|---|")
    print(header, flush=True)
    for d in dims:
        for n in sizes:
            for method in METHODS:
                fast = spawn(method, "fast", n, d, args.timeout)
                naive = spawn(method, "naive", n, d, args.timeout) if has_naive(method) and naive_fits(method, n) \
                    else None
                row = f"| {method} | {n} | {d} | {' | '.join(fmt(fast))} | {' | '.join(fmt(naive))} |"
                rows.append(row)
                print(row, flush=True)
    accept = spawn("mhe", "fast", 10000, 512, args.timeout)
    accept_naive = spawn("mhe", "naive", 10000, 512, args.timeout)
    verdict = ("within" if "extra_mb" in accept and accept["extra_mb"] <= 2048 else "NOT within")
    summary = (f"Acceptance: full MHE (s = {S:g}, forward + backward) at N = 10,000, d = 512: fast (chunked) "
               f"{' / '.join(fmt(accept))} MB extra — {verdict} 2 GB; naive {' / '.join(fmt(accept_naive))} MB extra.")
    print(summary, flush=True)
    if args.quick:
        return
    md = "\n".join([
        "## Regularizers (`benchmarks/bench_regularizers.py`)",
        "",
        f"Machine: {machine()}; each case in a fresh process with {THREADS} thread(s) (the 2 cores were shared with "
        "other jobs, so times are indicative).",
        "One layer's term, forward + backward, weight N x d at He init, float32. `fast` = torchsphere "
        "(half-space from the N x N matrix, MGD block logdet, MHE/MHS in 2048-row blocks with checkpointing for "
        f"N > 2048); `naive` = official-style full matrices with [W; -W] concatenated. MHE s = {S:g}. "
        "Half-space (as on hidden layers) for mhe_half, mhs, mgd, mhp, mhc.",
        "Peak memory: extra resident memory of the step, VmHWM − VmRSS from /proc/self/status after resetting the "
        "peak counter (clear_refs 5) in a fresh subprocess. Time: best of up to 5 runs. "
        f"`—`: naive form not run (estimated > {NAIVE_LIMIT_GB:g} GB, or a 2N x 2N Cholesky with 2N > 8192).",
        "",
        summary,
        "",
        header,
        *rows,
    ])
    write_section("bench_regularizers", md)


if __name__ == "__main__":
    main()
