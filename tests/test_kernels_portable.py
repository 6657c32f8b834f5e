"""The kernels built for CPUs without AVX-512: the vector width follows the target (8 lanes
with AVX2, 4 with SSE; `csrc/simd.h`), so those builds take code paths this machine's native
(AVX-512) build never runs. Each target is built in a subprocess (about a minute the first
time, then cached) and must pass the kernel test modules against the reference path."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnlab import kernels

MODULES = ["test_kernels.py", "test_kernels_fused.py", "test_kernels_strided.py",
           "test_kernels_rows.py"]

pytestmark = [
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                       reason="the -march targets below are x86-64 ones"),
    pytest.mark.skipif(not kernels.available(),
                       reason="bnlab CPU kernels could not be built here"),
]


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 + FMA (8 lanes); SSE2 (4)
def test_kernel_tests_pass_when_built_for_another_target(march: str) -> None:
    here = Path(__file__).parent
    env = {**os.environ, "BNLAB_KERNELS_MARCH": march}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                          *(str(here / m) for m in MODULES)],
                         capture_output=True, text=True, env=env, timeout=900, cwd=here.parent)
    tail = out.stdout[-3000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    assert "could not be built" not in out.stdout, tail  # the modules skip without a build
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed is not None and int(passed.group(1)) >= 50, tail
