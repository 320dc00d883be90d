"""Writes one benchmark's section of docs/benchmarks.md, leaving the other sections alone (atomic rewrite)."""
from __future__ import annotations

import os
import platform
import re
import tempfile
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun the script to refresh it.\n"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux: /proc/cpuinfo's ``model name``) with the architecture, e.g. ``x86_64, Intel(R)
    Xeon(R) Processor``; the architecture alone where the file is missing. Virtual machines of one name can run on
    different processors, whose ratios differ: the model says which one a figure comes from."""
    arch = platform.machine() or platform.processor()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return f"{arch}, {value.strip()}"
    except OSError:
        pass
    return arch


def machine(device: str | None = None) -> str:
    """One line naming the hardware and software a figure was measured on.

    Args:
        device: None: this process's thread count is part of the line (the figures were measured here);
            ``"cpu"``/``"cuda"``: the figures come from child processes that state their own thread counts, and a
            CUDA line names the GPU (``torch.cuda.get_device_name()``) and the CUDA version torch was built with.
    """
    cpu = f"{cpu_model()}, {os.cpu_count()} CPU cores"
    soft = f"torch {torch.__version__}, Python {platform.python_version()}"
    if device is None:
        return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), {cpu}, {soft}"
    return f"{cpu}, {soft}"


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replaces (or appends) the section delimited by ``<!-- name:start -->`` / ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}\n"
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=".benchmarks.", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, doc)


def publish(name: str, markdown: str, no_write: bool, doc: Path, complete: bool) -> int:
    """Prints a finished run's section and writes it to ``doc`` unless ``no_write``; the script's exit code (1 when
    some part of the run is missing)."""
    print(markdown)
    if not no_write:
        write_section(name, markdown, doc)
    return 0 if complete else 1
