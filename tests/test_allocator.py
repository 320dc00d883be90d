"""torchsphere.train.tune_cpu_allocator: glibc's malloc settings for CPU training."""
from __future__ import annotations

import subprocess
import sys

import pytest

from torchsphere.train import allocator, tune_cpu_allocator

# rounds of eight CPU tensors of 12.8 MB (a SphereNet-9 stage's activations at batch 128) allocated and freed;
# the largest count of minor page faults over the last rounds
_PROBE = """
import resource, sys, torch
from torchsphere.train import tune_cpu_allocator
if sys.argv[1] != "default":
    tune_cpu_allocator()
def faults():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.ones(3_200_000) for _ in range(8)]
    del ts
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
print(max([faults() for _ in range(6)][-3:]))
"""


def _probe(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                              check=True).stdout)


def _glibc_available() -> bool:
    try:
        allocator._glibc()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _glibc_available(), reason="the C library is not glibc: the settings do not exist there")
def test_the_settings_keep_freed_memory_in_the_process():
    """In fresh processes: with glibc's defaults every round faults its 25,000 pages in again (measured); with the
    tuned settings the rounds after the first reuse the memory."""
    default = _probe("default")
    if default < 1000:
        pytest.skip(f"this glibc keeps the memory with its default settings ({default} faults): nothing to compare")
    tuned = _probe("tuned")
    assert tuned * 10 < default, (tuned, default)


@pytest.mark.parametrize("bad, err", [(1.5, TypeError), (True, TypeError), ("1", TypeError), (-1, ValueError),
                                      (1 << 31, ValueError)])
def test_bad_top_pad_is_rejected_naming_it(bad, err):
    with pytest.raises(err, match="top_pad"):
        tune_cpu_allocator(bad)


def test_a_c_library_other_than_glibc_gets_a_clear_error(monkeypatch):
    class NotGlibc:
        pass
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: NotGlibc())
    with pytest.raises(OSError, match="needs glibc's malloc"):
        tune_cpu_allocator()
