"""glibc's malloc tuned for CPU training: freed tensor memory stays in the process.

On Linux with glibc, PyTorch's CPU tensors come from ``malloc``. With glibc's default settings, large freed blocks
go back to the kernel (unmapped, or trimmed from the top of the heap), and the next training step's tensors of the
same sizes are page-faulted in again. On the SphereNet-9 step of docs/benchmarks.md that is tens of thousands of
minor page faults per step, most of them in the convolutions' backward, and 0.07-0.28 of the step's time ratio to
its CNN twin (which faults less).

:func:`tune_cpu_allocator` sets, for the running process, the three settings that keep that memory:
``M_MMAP_THRESHOLD`` to 32 MiB (blocks below it come from the heap; glibc's own upper limit for its dynamic
threshold), ``M_TRIM_THRESHOLD`` to 2 GiB - 1 (the largest value ``mallopt`` takes) and ``M_TOP_PAD``. That is what
starting the process with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647
MALLOC_TOP_PAD_=1073741824`` does, for a process that cannot choose its environment (a notebook). Setting one of
them alone can be worse than none: each switches glibc's dynamic mmap threshold off, and with ``M_TOP_PAD`` alone
every block above 128 KiB is mapped and unmapped again. Measured in fresh processes, minor page faults per round
of allocating and freeing: 40 tensors of 2-8 MB, 48,850 with ``M_TOP_PAD`` alone, 0 with glibc's defaults once
they adapt, 0 with the three; eight tensors of 12.8 MB, about 25,000 with glibc's defaults every round, 0 with the
three.

The settings are process-wide and trade resident memory for speed: the process keeps up to ``top_pad`` bytes of
freed memory, and blocks up to 32 MiB that it frees may stay resident. The library never applies them by itself.
Other allocators (jemalloc, tcmalloc, loaded with ``LD_PRELOAD``, as PyTorch's CPU performance guide describes)
avoid the faults as well.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# glibc's <malloc.h>
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt's int
DEFAULT_TOP_PAD = 1 << 30


def _glibc() -> ctypes.CDLL:
    """The process's C library if it is glibc, else OSError."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        raise OSError("tune_cpu_allocator needs glibc's malloc (Linux with glibc); this process's C library is "
                      "not glibc. Use jemalloc or tcmalloc (LD_PRELOAD) instead, or leave the allocator as it is.")
    return libc


def tune_cpu_allocator(top_pad: int = DEFAULT_TOP_PAD) -> None:
    """Keeps freed CPU tensor memory in this process (glibc's malloc; see the module docstring).

    Args:
        top_pad: bytes of free memory kept at the top of the heap (``M_TOP_PAD``), 0 to 2**31 - 1; default 1 GiB.

    Raises:
        TypeError: ``top_pad`` is not an int.
        ValueError: ``top_pad`` is out of range.
        OSError: the C library is not glibc, or ``mallopt`` refused a setting.
    """
    if isinstance(top_pad, bool) or not isinstance(top_pad, int):
        raise TypeError(f"top_pad must be an int (bytes); got {type(top_pad).__name__} {top_pad!r}")
    if not 0 <= top_pad <= TRIM_THRESHOLD:
        raise ValueError(f"top_pad must be between 0 and 2**31 - 1 bytes (mallopt takes an int); got {top_pad}")
    libc = _glibc()
    for name, param, value in (("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                               ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                               ("M_TOP_PAD", M_TOP_PAD, top_pad)):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise OSError(f"glibc's mallopt({name}, {value}) failed")
