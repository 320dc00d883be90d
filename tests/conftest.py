"""Shared test settings: tolerances and the device live here and nowhere else.

The device comes from TORCHSPHERE_TEST_DEVICE (default "cpu"); inputs are drawn on the CPU RNG and then moved, so
CPU and GPU runs see identical data.
"""
from __future__ import annotations

import os

import pytest
import torch

# (rtol, atol) per dtype
TOL = {
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-7, 1e-10),
}
# absolute tolerance of the ops against their slow float64 references
REF_ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# float32 dg/dc recovered from the saved output (memory_efficient=True) vs the float64 gradient, as a fraction of
# the largest |dg/dc| of the operator (measured: at most 2e-4; see torchsphere.functional.fused, item 5)
SAVE_OUTPUT_GRAD_RTOL_OF_MAX = 5e-4
# low-precision autocast vs float32, for values in [-1, 1]
AUTOCAST_ATOL = 3e-2

DEVICE = torch.device(os.environ.get("TORCHSPHERE_TEST_DEVICE", "cpu"))

# Test tensors are tiny: intra-op threads only add synchronization, which stalls badly when the cores are busy
# (measured here: 50 small forward+backward passes 0.11 s with 1 thread, 14.6 s with 2 on a loaded machine).
torch.set_num_threads(1)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw) -> None:
    """torch.testing.assert_close with the tolerances of ``dtype`` (default: actual's dtype)."""
    rtol, atol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=kw.pop("rtol", rtol),
                               atol=kw.pop("atol", atol), **kw)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)

# learning curves (torchsphere.analysis): noise-free recovery in float64, and the band that the 95% delta-method
# intervals must cover on 300 seeded synthetic curves (binomial SD at 95% over 300 trials: 1.3 points)
LC_EXACT_ATOL = 1e-8
LC_COVERAGE_E = (0.90, 0.99)
LC_COVERAGE_BETA = (0.88, 0.99)
