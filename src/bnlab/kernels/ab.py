"""A/B timing of two versions of the CPU kernels in one process: ``python -m bnlab.kernels.ab``.

This machine's speed drifts by up to 2x between runs (`docs/design.md`), and the same kernels
measure up to 15% apart within a run, so a kernel change is judged by timing both versions in
one process, call by call: A, the kernels this checkout loads, against B, a baseline's ``csrc``
(a git revision's, or a directory's) built under the op namespace ``bnlab_ab`` so that both
libraries load side by side. Each round interleaves clone, A, clone, B (A and B swap places
every other round); per round the least of ``--repeats`` calls is taken, and the figure is the
median over rounds of each ratio to the copy, and B/A (above 1: the baseline is slower); the
largest difference between the two versions' outputs is printed beside it.

Command (from a git checkout; the first build of a baseline takes about a minute)::

    python -m bnlab.kernels.ab --base HEAD~1 [--modes train,update,eval,bwd,fwd_bwd]
        [--shapes 32x512x7x7,256x1024] [--formats nchw,channels_last] [--rounds 7]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bnlab._checks import positive_int
from bnlab.kernels.bench import _fmt

__all__ = ["NAMESPACE", "main", "rename_namespace"]

NAMESPACE = "bnlab_ab"
MODES = ("train", "update", "eval", "bwd", "fwd_bwd")
_CSRC = "src/bnlab/kernels/csrc"
# The op namespace where the sources name it: schema lookups and the library macros.
_NS = re.compile(r'("bnlab::|TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?\(bnlab,)')


def rename_namespace(text: str, namespace: str = NAMESPACE) -> str:
    """The C++ source ``text`` with its ops moved from ``bnlab::`` to ``namespace::``."""
    return _NS.sub(lambda m: m.group(1).replace("bnlab", namespace), text)


def _baseline(base: str, dest: Path) -> Path:
    """The baseline's csrc, renamed into `NAMESPACE`, under ``dest``: ``base`` is a directory
    holding the sources, or a git revision of the checkout this module lives in."""
    out = dest / "csrc"
    out.mkdir(parents=True)
    if Path(base).is_dir():
        files = {p.name: p.read_text() for p in Path(base).iterdir() if p.suffix in (".cpp", ".h")}
    else:
        root = Path(__file__).resolve().parents[3]
        proc = subprocess.run(["git", "archive", "--format=tar", base, _CSRC], cwd=root,
                              capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"--base: expected a directory of kernel sources or a git revision "
                             f"of {root}, got {base!r} ({proc.stderr.decode().strip()})")
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
            files = {Path(m.name).name: tar.extractfile(m).read().decode()  # type: ignore[union-attr]
                     for m in tar.getmembers() if m.isfile()}
    if not any(name.endswith(".cpp") for name in files):
        raise SystemExit(f"--base: no .cpp kernel sources in {base!r}")
    for name, text in files.items():
        (out / name).write_text(rename_namespace(text))
    return out


def _build(src: Path) -> None:
    """Build and load the renamed sources in ``src``. They are first copied to a directory
    named by their hash (torch's versioner hashes the build arguments, an include path among
    them: from a fresh temporary directory every run would rebuild, about a minute)."""
    from torch.utils import cpp_extension

    from bnlab.kernels import _build as build

    files = sorted(src.iterdir())
    digest = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    home = Path(tempfile.gettempdir()) / f"bnlab_ab_{digest[:10]}"
    if not home.is_dir():
        shutil.copytree(src, home)
    cpp_extension.load(name=f"bnlab_ab_{digest[:10]}",
                       sources=sorted(str(p) for p in home.glob("*.cpp")),
                       extra_cflags=build._flags(), extra_ldflags=["-fopenmp"],
                       extra_include_paths=[str(home)], is_python_module=False)


def _call(ns: str, mode: str, x: torch.Tensor) -> Callable[[], Any]:
    ops = getattr(torch.ops, ns)
    c = x.shape[1]
    gen = torch.Generator().manual_seed(0)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    rm, rv = torch.zeros(c), torch.ones(c)
    if mode == "train":
        return lambda: ops.bn_train_fwd(x, w, b, 1e-5, None, False, False)
    if mode == "eval":
        return lambda: ops.bn_eval_fwd(x, rm, rv, w, b, 1e-5, None, False, False)
    # update, fwd_bwd: the layers' eager forward (train plus the running-statistics update), called
    # as bnlab.kernels calls it, through the overload (.default), which skips overload resolution
    if mode == "update":
        def update() -> tuple[torch.Tensor, ...]:
            y = ops.bn_train_fwd_update.default(x, w, b, 1e-5, rm, rv, x.numel() // c, 0.1,
                                                None)[0]
            return y, rm, rv
        return update
    g = torch.randn(x.shape, generator=gen).contiguous(memory_format=_fmt(x))
    if mode == "fwd_bwd":  # the layers' path: forward + running update, then autograd's backward
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        fwd_update = ops.bn_train_fwd_update.default
        return lambda: torch.autograd.grad(
            fwd_update(xs, ws, bs, 1e-5, rm, rv, x.numel() // c, 0.1, None)[0], (xs, ws, bs), g)
    _, mean, var, _ = ops.bn_train_fwd(x, w, b, 1e-5, None, False, False)
    return lambda: ops.bn_bwd(g, x, mean, var, w, 1e-5, None, True, True, False)


def compare(shape: tuple[int, ...], fmt: str, mode: str, rounds: int,
            repeats: int) -> dict[str, float]:
    """Ratios to a copy of A (``bnlab``) and B (`NAMESPACE`), and B/A (medians over rounds);
    max_diff: the largest difference between the two versions' outputs."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fns = {"clone": x.clone, "A": _call("bnlab", mode, x), "B": _call(NAMESPACE, mode, x)}
    # Whether the two versions compute the same: the largest difference of their outputs.
    diff = max((float((p - q).abs().max()) for p, q in zip(fns["A"](), fns["B"]())
                if p.numel() > 0), default=0.0)
    for fn in fns.values():
        fn()
        fn()
    ratios: dict[str, list[float]] = {"A": [], "B": []}
    for r in range(rounds):
        samples: dict[str, list[float]] = {k: [] for k in fns}
        order = ("clone", "A", "clone", "B") if r % 2 == 0 else ("clone", "B", "clone", "A")
        for _ in range(repeats):
            for k in order:
                t0 = time.perf_counter()
                fns[k]()
                samples[k].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in samples.items()}
        for k in ratios:
            ratios[k].append(best[k] / best["clone"])
    a, b = statistics.median(ratios["A"]), statistics.median(ratios["B"])
    return {"A": a, "B": b, "B/A": b / a, "max_diff": diff}


def _shapes(text: str, parser: argparse.ArgumentParser) -> list[tuple[int, ...]]:
    """``--shapes`` as tuples: each N x C [x spatial...], every size >= 1 (e.g. 32x64x7x7)."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(d) for d in item.split("x"))
        except ValueError:
            shape = ()
        if not 2 <= len(shape) <= 5 or min(shape) < 1:
            parser.error(f"--shapes: expected sizes >= 1 joined by x, 2 to 5 of them "
                         f"(e.g. 32x64x7x7), got {item!r}")
        shapes.append(shape)
    return shapes


def main(argv: list[str] | None = None) -> int:
    from bnlab import kernels
    from bnlab.kernels.bench import FORMATS, SHAPES, tune_malloc

    parser = argparse.ArgumentParser(prog="python -m bnlab.kernels.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="git revision or directory of csrc")
    parser.add_argument("--modes", default="train,eval,bwd",
                        help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--shapes", default="all", help="'all' (bench's set) or e.g. 32x64x7x7")
    parser.add_argument("--formats", default="nchw,channels_last")
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--repeats", type=positive_int, default=15)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    modes = list(dict.fromkeys(args.modes.split(",")))
    if bad := sorted(set(modes) - set(MODES)):
        parser.error(f"--modes: expected {', '.join(MODES)}, got {', '.join(bad)}")
    shapes = list(SHAPES.values()) if args.shapes == "all" else _shapes(args.shapes, parser)
    if bad := sorted(set(args.formats.split(",")) - set(FORMATS)):
        parser.error(f"--formats: expected {', '.join(FORMATS)}, got {', '.join(bad)}")
    formats = list(dict.fromkeys(args.formats.split(",")))
    if not any(fmt != "channels_last" or len(shape) == 4 for shape in shapes for fmt in formats):
        parser.error(f"--shapes {args.shapes} --formats {args.formats}: no case (channels_last "
                     "applies to 4-D shapes only)")
    if not kernels.available():
        raise SystemExit("bnlab's kernels are not available here: nothing to compare")
    torch.set_num_threads(args.threads)
    tune_malloc()
    tmp = Path(tempfile.mkdtemp(prefix="bnlab_ab_"))
    try:
        _build(_baseline(args.base, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"A = this checkout's kernels, B = {args.base}; ratios to x.clone(), B/A > 1: B slower")
    for mode in modes:
        for shape in shapes:
            for fmt in formats:
                if fmt == "channels_last" and len(shape) != 4:
                    continue
                r = compare(shape, fmt, mode, args.rounds, args.repeats)
                print(f"{mode:5s} {'x'.join(map(str, shape)):14s} {fmt:13s} A {r['A']:.2f}x  "
                      f"B {r['B']:.2f}x  B/A {r['B/A']:.2f}  max diff {r['max_diff']:.1e}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
