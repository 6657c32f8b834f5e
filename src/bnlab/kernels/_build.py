"""Just-in-time build of the C++ kernels (`csrc/*.cpp`) with `torch.utils.cpp_extension`.

The library is compiled once per machine kind and cached in torch's extensions directory
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); later imports load it in well
under a second. `-march=native` is used because the vector width follows the target's widest
ISA (16 lanes with AVX-512, 8 with AVX, 4 otherwise: `csrc/simd.h`); the extension's name
carries a hash of the CPU's feature flags, the target and the source directory, so a cache
shared between different machines never loads a binary built for another CPU, and two checkouts
on one machine each keep their own build. `BNLAB_KERNELS_MARCH` overrides the target
(e.g. `x86-64-v3`; `tests/test_kernels_portable.py` builds and tests that one and `x86-64`),
and an empty value drops the flag.

The first build takes about a minute: `load()` says so on the ``bnlab`` logger (level WARNING, so
it shows by default) before it starts, and `bnlab kernels` builds ahead of time (a Dockerfile
step, a CI cache) and prints where the binary lives. A failed build (no compiler, no headers) is
not an error for users: `load()` returns False, warns once with the compiler's diagnostics, and
`bnlab.kernels.supports` then sends everything down the reference path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no stale-lock recovery
    fcntl = None  # type: ignore[assignment]

from bnlab._checks import user_stacklevel

__all__ = ["build_error", "info", "load", "module"]

_CSRC = Path(__file__).with_name("csrc")
_lock = threading.Lock()
_state: dict[str, object] = {}
_log = logging.getLogger("bnlab")


@functools.cache
def _cpu_flags() -> str:
    """The CPU's feature-flag line (read once: /proc/cpuinfo is long on many-core machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
        return ""
    except OSError:
        return platform.processor()


def _cpu_tag() -> str:
    """A short hash of what decides the binary: CPU flags, target, compiler, and the source
    directory. torch's extension versioner hashes the build arguments, which name that
    directory (an include path), under the extension's name: with one name for two checkouts
    (two virtualenvs, a fresh CI clone beside a working tree) each switch between them rebuilt
    the library (about a minute)."""
    key = "|".join([_cpu_flags(), platform.machine(), _march(), os.environ.get("CXX", ""),
                    str(_CSRC.resolve())])
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def _march() -> str:
    return os.environ.get("BNLAB_KERNELS_MARCH", "native")


def _flags() -> list[str]:
    # No automatic FMA contraction: the source says where a fused multiply-add is used (simd.h
    # fmadd: the sums, dx, and y = fma(x − μ, scale, β)), not the compiler's heuristics, so
    # results do not change with the optimizer's choices.
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    if _march():
        flags.append(f"-march={_march()}")
    return flags


def _name() -> str:
    return f"bnlab_kernels_{_cpu_tag()}"


def _binary() -> Path | None:
    """Where the built library is (or will be); None if torch's layout is not the expected one."""
    try:
        from torch.utils import cpp_extension

        return Path(cpp_extension._get_build_directory(_name(), verbose=False)) / f"{_name()}.so"
    except Exception:  # a private helper of torch: if it moves, we only lose the build notice
        return None


def _needs_build(so: Path | None) -> bool:
    """Whether `load()` will compile the binary `so` (see `_binary`): it does not exist, or a
    source (.cpp, .h) is newer than it (ninja's rule too)."""
    if so is None or not so.exists():
        return True
    built = so.stat().st_mtime
    return any(p.stat().st_mtime > built for p in _CSRC.iterdir() if p.suffix in (".cpp", ".h"))


def _summary(error: str, limit: int = 600) -> str:
    """The gist of a build error: the compiler's diagnostics without its long command lines."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if not lines:
        return error
    head = lines[0].split(": [", 1)[0]  # "RuntimeError: Error building extension '...'"
    notes = [line for line in lines[1:] if len(line) < 300 and not line.startswith("[")]
    text = " | ".join([head[:300], *dict.fromkeys(notes)])  # each diagnostic once, in order
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def _build_lock(so: Path | None) -> Iterator[None]:
    """Hold bnlab's own lock on the build directory of ``so`` while torch builds or loads there.

    torch's `cpp_extension` guards a build with a lock *file* it creates and deletes, and waits
    without a timeout while one exists: a first build killed part-way (the OOM killer, a CI
    timeout, kill -9) left it behind, and every later process hung at its first BN call. This
    lock is an flock, which the kernel releases when its holder dies; every process that loads
    these kernels takes it first, so whoever holds it knows that nobody is building, and a
    lock file of torch's found then is stale: it is removed."""
    if fcntl is None or so is None:
        yield
        return
    so.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(so.parent / "bnlab.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (waits for a build in progress, however long)
        stale = so.parent / "lock"
        if stale.exists():
            _log.warning("bnlab: removing %s, left by a build that was killed", stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: see lab.runs' lock)


def _do_load() -> ModuleType | None:
    from torch.utils import cpp_extension

    sources = sorted(str(p) for p in _CSRC.glob("*.cpp"))
    name = _name()
    return cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=_flags(),
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_CSRC)],
        # A Python module too: `csrc/bn_fast.cpp`'s entry points (the ops register either way).
        is_python_module=True,
        verbose=os.environ.get("BNLAB_KERNELS_VERBOSE", "0") not in ("", "0"),
    )


def load() -> bool:
    """Build (first time) and load the kernels; True when `torch.ops.bnlab.*` and the Python
    module of `csrc/bn_fast.cpp` (`module()`) are available."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        so = _binary()
        if _needs_build(so):
            _log.warning("bnlab: compiling the CPU batch-norm kernels for this machine (once, "
                         "about a minute on 2 cores; cached in %s)",
                         so.parent if so else "torch's extensions directory")
        try:
            with _build_lock(so):
                _state["module"] = _do_load()
            _state["ok"] = True
        except Exception as exc:  # any failure means: use the reference path
            _state["ok"] = False
            _state["error"] = f"{type(exc).__name__}: {exc}"
            cause = _summary(str(_state["error"])).rstrip(".")
            warnings.warn(
                "bnlab: building the CPU batch-norm kernels failed, so the (slower) reference "
                f"path is used. Cause: {cause}. This warning is shown once.",
                RuntimeWarning,
                stacklevel=user_stacklevel(),  # the user's line, e.g. the first model(x)
            )
        return bool(_state["ok"])


def module() -> ModuleType | None:
    """The loaded extension as a Python module (None before `load()` succeeds)."""
    mod = _state.get("module")
    return mod if isinstance(mod, ModuleType) else None


def build_error() -> str | None:
    """Why the build failed (None if it did not fail or was not tried)."""
    err = _state.get("error")
    return None if err is None else str(err)


def info() -> dict[str, object]:
    """What `bnlab kernels` prints: the target, the binary's path, whether it is loaded (this
    builds the kernels if needed) and why not."""
    ok = load()
    return {"available": ok, "target": _march() or "(compiler default)",
            "binary": str(_binary()) if ok else None,  # (no binary where the build failed)
            "error": None if ok else _summary(build_error() or "")}
