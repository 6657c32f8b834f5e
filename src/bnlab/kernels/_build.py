"""Just-in-time build of the C++ kernels (`csrc/*.cpp`) with `torch.utils.cpp_extension`.

The library is compiled once per machine kind and cached in torch's extensions directory
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); later imports load it in well
under a second. `-march=native` is used because the vector width follows the target's widest
ISA (16 lanes with AVX-512, 8 with AVX2, 4 otherwise: `csrc/simd.h`); the extension's name
carries a hash of the CPU's feature flags and the target, so a cache shared between different
machines never loads a binary built for another CPU. `BNLAB_KERNELS_MARCH` overrides the target
(e.g. `x86-64-v3`; `tests/test_kernels_portable.py` builds and tests that one and `x86-64`),
and an empty value drops the flag.

A failed build (no compiler, no headers) is not an error for users: `load()` returns None, warns
once, and `bnlab.kernels.supports` then sends everything down the reference path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path
from types import ModuleType

__all__ = ["build_error", "load"]

_CSRC = Path(__file__).with_name("csrc")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_tag() -> str:
    """A short hash of what decides the generated code: CPU flags, target and compiler."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    key = "|".join([flags, platform.machine(), _march(), os.environ.get("CXX", "")])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _march() -> str:
    return os.environ.get("BNLAB_KERNELS_MARCH", "native")


def _flags() -> list[str]:
    # No automatic FMA contraction: y = (x − μ)·scale + β rounds like the reference path's two
    # ops, so outputs match it bit for bit when the statistics do. The sums and dx ask for
    # fused multiply-adds explicitly (simd.h fmadd).
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if _march():
        flags.append(f"-march={_march()}")
    return flags


def _do_load() -> ModuleType | None:
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    name = f"bnlab_kernels_{_cpu_tag()}"
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_CSRC)],
        is_python_module=False,
        verbose=os.environ.get("BNLAB_KERNELS_VERBOSE", "0") not in ("", "0"),
    )


def load() -> bool:
    """Build (first time) and load the kernels; True when `torch.ops.bnlab.*` are available."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        try:
            _do_load()
            _state["ok"] = True
        except Exception as exc:  # any failure means: use the reference path
            _state["ok"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "bnlab: building the CPU batch-norm kernels failed, so the (slower) reference "
                f"path is used. Cause: {_state['error'][:500]}. This warning is shown once.",
                RuntimeWarning,
                stacklevel=3,
            )
        return bool(_state["ok"])


def build_error() -> str | None:
    """Why the build failed (None if it did not fail or was not tried)."""
    err = _state.get("error")
    return None if err is None else str(err)
