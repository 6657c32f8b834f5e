"""`bnlab bench`: batch-norm time as a multiple of `x.clone()`, torch eager versus bnlab.

Every figure is a ratio to a copy of the same tensor timed in the same process, interleaved
(call after call: clone, torch, clone, bnlab), because this machine's memory bandwidth drifts up
to 2x between runs (`docs/design.md`, "Performance model"). The physical limit is ~1x copy for
inference, 1–1.5x for the training forward, 1.5–2.5x for the backward.

Allocator: glibc serves allocations above 32 MiB with fresh `mmap`s, so every large output
page-faults on each call (`research/perf.md` §5.1: a 51 MB clone at 4 GB/s). Unless
``--no-malloc-tune`` is given, the benchmark calls ``mallopt(M_MMAP_MAX=0)`` and raises the trim
threshold (the same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``) so freed memory is
reused, for torch, bnlab and the clone alike; no other allocator is needed.

The opt-in modes ``relu_fwd`` and ``relu_fwd_bwd`` time torch's BN then ReLU against bnlab's
fused BN+ReLU (`bnlab.kernels.bn_relu`, whose backward reads the saved mask).

``--e2e`` times a training step of small VGG-style and Inception-style nets with no
normalization, torch's BatchNorm2d, bnlab's BatchNorm2d and the fused BatchNormReLU2d, and
profiles BN's own ops per step (see `e2e.py`); ``--e2e-format channels_last`` runs the nets in
that memory format.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bnlab._checks import positive_int

__all__ = ["SHAPES", "add_arguments", "main", "run"]

# N = 32 ResNet-50 stage shapes, a wider batch, the paper's MLP layer and a wide 2-D layer.
SHAPES: dict[str, tuple[int, ...]] = {
    "r50-64x56": (32, 64, 56, 56),
    "r50-256x56": (32, 256, 56, 56),
    "r50-128x28": (32, 128, 28, 28),
    "r50-256x14": (32, 256, 14, 14),
    "r50-512x7": (32, 512, 7, 7),
    "r50-2048x7": (32, 2048, 7, 7),
    "b128-64x28": (128, 64, 28, 28),
    "mlp-60x100": (60, 100),
    "fc-256x1024": (256, 1024),
}
MODES = ("train_fwd", "bwd", "fwd_bwd", "eval")
# Opt-in: torch's BN then ReLU against bnlab's fused BN+ReLU (saved mask), training mode.
RELU_MODES = ("relu_fwd", "relu_fwd_bwd")
FORMATS = ("nchw", "channels_last")
# The targets the kernels were built to (fp32, 2 threads, over the whole shape set and both
# layouts): (mode, summary statistic, comparison, bound).
TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("train_fwd", "median_bnlab", "<=", 1.6),
    ("bwd", "median_bnlab", "<=", 2.5),
    ("eval", "median_bnlab", "<=", 1.3),
    ("fwd_bwd", "geomean_speedup", ">=", 3.0),
    ("fwd_bwd", "min_speedup", ">=", 0.95),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `bnlab bench` (also `python -m bnlab.kernels.bench`)."""
    parser.add_argument("--shapes", default="all",
                        help="comma-separated subset of: " + ", ".join(SHAPES) + " (or 'all')")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="subset of " + ",".join(MODES + RELU_MODES) + " (the relu_ modes "
                        "time torch's BN then ReLU against bnlab's fused BN+ReLU)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="subset of " + ",".join(FORMATS))
    parser.add_argument("--repeats", type=positive_int, default=15, help="timed calls per round")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="interleaved rounds (clone, torch, clone, bnlab); the median is "
                        "reported")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="per-round statistic of the repeats (min resists a busy machine)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, metavar="PATH", help="write results as JSON")
    parser.add_argument("--no-malloc-tune", action="store_true",
                        help="keep glibc's default mmap threshold (large outputs page-fault)")
    parser.add_argument("--e2e", action="store_true",
                        help="time training steps of small VGG/Inception-style nets instead")
    parser.add_argument("--e2e-steps", type=positive_int, default=8,
                        help="timed steps per round (e2e)")
    parser.add_argument("--e2e-format", choices=FORMATS, default="nchw",
                        help="memory format of the e2e nets and their input (the target's "
                        "figure is nchw; on CPU, channels_last runs torch's max-pool ~13x faster)")


def tune_malloc() -> bool:
    """Keep freed memory for reuse (glibc only): M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):
        return False


def machine_info(threads: int, malloc_tuned: bool) -> dict[str, Any]:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        for line in lines:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "malloc_tuned": malloc_tuned,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def _case(x: torch.Tensor, mode: str, impl: str) -> Callable[[], Any]:
    """A zero-argument callable running one BN mode on ``x`` with torch's or bnlab's functional.
    In the forward modes torch and bnlab read ``x`` itself (and the clone copies it); the
    gradient modes give each implementation its own leaf copy of ``x``, so each reads an input
    the other calls have pushed out of cache, as the clone's ``x`` is. (Leaves sharing ``x``
    made the clone read a cache-warm ``x``: every bwd and fwd_bwd ratio, torch's and bnlab's
    alike, rose by about 1.35x, and the speedups moved within the run-to-run noise.) The relu_
    modes run relu(BN(x)) in training mode: torch's BN then torch.relu, or
    bnlab.kernels.bn_relu (one sweep forward; the backward reads the saved ReLU mask)."""
    import bnlab.functional as bF
    from bnlab.kernels import bn_relu

    gen = torch.Generator().manual_seed(0)
    c = x.shape[1]
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    rm, rv = torch.zeros(c), torch.ones(c)
    g = torch.randn(x.shape, generator=gen).contiguous(memory_format=_fmt(x))
    bn = torch.nn.functional.batch_norm if impl == "torch" else bF.batch_norm

    def op(x_: torch.Tensor, w_: torch.Tensor, b_: torch.Tensor, training: bool) -> torch.Tensor:
        if mode not in RELU_MODES:
            return bn(x_, rm, rv, w_, b_, training, 0.1, 1e-5)
        if impl == "torch":
            return torch.relu(bn(x_, rm, rv, w_, b_, training, 0.1, 1e-5))
        return bn_relu(x_, rm, rv, w_, b_, training, 0.1, 1e-5)
    if mode in ("train_fwd", "eval", "relu_fwd"):
        training = mode != "eval"

        def fwd() -> Any:
            with torch.no_grad():
                return op(x, w, b, training)
        return fwd
    xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
    if mode == "bwd":
        y = op(xs, ws, bs, True)
        return lambda: torch.autograd.grad(y, (xs, ws, bs), g, retain_graph=True)

    def fwd_bwd() -> Any:  # fwd_bwd, relu_fwd_bwd
        return torch.autograd.grad(op(xs, ws, bs, True), (xs, ws, bs), g)
    return fwd_bwd


def _fmt(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def bench_case(shape: tuple[int, ...], fmt: str, mode: str, repeats: int, rounds: int,
               stat: str = "median") -> dict[str, float]:
    """Ratios (time / clone time) for torch and bnlab, and the clone time in ms.

    Calls are interleaved one by one (clone, torch, clone, bnlab, clone, ...) so that a slow
    phase of the machine hits all three; per round the ``stat`` (median or min) of ``repeats``
    calls is taken (of 2·``repeats`` for the clone), and the median over rounds is reported.
    Each implementation runs right after a clone: on cache-resident tensors a call's time
    depends on what ran just before it, and in the order (clone, torch, bnlab) bnlab's eval on
    (32, 256, 14, 14) measured 2.01x a copy and torch's 1.21x, against 1.11x and 1.43x with
    the two swapped.
    """
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    fns = {"clone": x.clone, "torch": _case(x, mode, "torch"), "bnlab": _case(x, mode, "bnlab")}
    for fn in fns.values():  # warm-up (and the first JIT load)
        fn()
        fn()
    pick = statistics.median if stat == "median" else min
    ratios: dict[str, list[float]] = {"torch": [], "bnlab": []}
    clones = []
    order = ("clone", "torch", "clone", "bnlab")  # the same predecessor for both
    for _ in range(rounds):
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k in order:
                fn = fns[k]
                t0 = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - t0)
        t = {k: pick(v) for k, v in samples.items()}
        clones.append(t["clone"])
        for k in ratios:
            ratios[k].append(t[k] / t["clone"])
    r_t, r_b = statistics.median(ratios["torch"]), statistics.median(ratios["bnlab"])
    return {"clone_ms": statistics.median(clones) * 1e3, "torch": r_t, "bnlab": r_b,
            "speedup": r_t / r_b}


def _geomean(v: list[float]) -> float:
    return math.exp(sum(math.log(a) for a in v) / len(v)) if v else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES + RELU_MODES:
        sel = [r for r in rows if r["mode"] == mode]
        if not sel:
            continue
        out[mode] = {
            "median_torch": statistics.median(r["torch"] for r in sel),
            "median_bnlab": statistics.median(r["bnlab"] for r in sel),
            "geomean_speedup": _geomean([r["speedup"] for r in sel]),
            "min_speedup": min(r["speedup"] for r in sel),
            "n": len(sel),
        }
    return out


def check_targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each of `TARGETS` whose mode was run: the measured value and whether it meets the bound."""
    out = []
    for mode, stat, op, bound in TARGETS:
        if mode in summary:
            v = summary[mode][stat]
            out.append({"mode": mode, "statistic": stat, "target": f"{op} {bound}", "value": v,
                        "met": v <= bound if op == "<=" else v >= bound})
    return out


def print_table(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print(f"{'shape':<13}{'format':<14}{'mode':<13}{'clone ms':>9}{'torch':>8}{'bnlab':>8}"
          f"{'speedup':>9}")
    for r in rows:
        print(f"{r['shape']:<13}{r['format']:<14}{r['mode']:<13}{r['clone_ms']:>9.3f}"
              f"{r['torch']:>7.2f}x{r['bnlab']:>7.2f}x{r['speedup']:>8.2f}x")
    print("\nmedian ratio to clone over the shape set (lower is better), speedup = torch/bnlab")
    for mode, s in summary.items():
        print(f"  {mode:<13} torch {s['median_torch']:.2f}x  bnlab {s['median_bnlab']:.2f}x  "
              f"geomean speedup {s['geomean_speedup']:.2f}x  min {s['min_speedup']:.2f}x  "
              f"({s['n']} cases)")


def print_targets(targets: list[dict[str, Any]], full: bool) -> None:
    if not targets:
        return
    print("\ntargets (fp32, 2 threads, whole shape set, both layouts)"
          + ("" if full else ": this run covers less, so only indicative"))
    for t in targets:
        print(f"  {t['mode']:<13} {t['statistic']:<16} {t['value']:.2f}x {t['target']}x: "
              f"{'met' if t['met'] else 'missed'}")


def _cases(args: argparse.Namespace) -> list[tuple[str, str, str]] | str:
    """The (shape, format, mode) cases the options select, or the error that says why they
    select nothing or are not for this kind of run (checked before any timing)."""
    per_shape = {"--shapes": args.shapes != "all", "--modes": args.modes != ",".join(MODES),
                 "--formats": args.formats != ",".join(FORMATS), "--repeats": args.repeats != 15,
                 "--stat": args.stat != "median"}
    if args.e2e:
        given = [k for k, v in per_shape.items() if v]
        return (f"{', '.join(given)}: apply to the per-shape benchmark, not --e2e's nets "
                "(--e2e takes --e2e-steps, --e2e-format, --rounds)") if given else []
    given = [k for k, v in {"--e2e-steps": args.e2e_steps != 8,
                            "--e2e-format": args.e2e_format != "nchw"}.items() if v]
    if given:
        return f"{', '.join(given)}: only apply with --e2e"
    # Each value once: a repeated one would time its cases twice and weigh them twice.
    names = list(SHAPES) if args.shapes == "all" else list(dict.fromkeys(args.shapes.split(",")))
    formats = list(dict.fromkeys(args.formats.split(",")))
    modes = list(dict.fromkeys(args.modes.split(",")))
    for option, got, allowed in (("--shapes", names, tuple(SHAPES)),
                                 ("--formats", formats, FORMATS),
                                 ("--modes", modes, MODES + RELU_MODES)):
        unknown = [v for v in got if v not in allowed]
        if unknown:
            return f"{option}: unknown value(s) {unknown}; choose from {list(allowed)}"
    cases = [(name, fmt, mode) for name in names for fmt in formats for mode in modes
             if fmt != "channels_last" or len(SHAPES[name]) == 4]  # (N, C) has one layout
    if not cases:
        return (f"--shapes {args.shapes} --formats {args.formats}: no case (channels_last "
                "applies to the 4-D shapes only)")
    return cases


def run(args: argparse.Namespace, e2e_nets: dict[str, Any] | None = None) -> int:
    """Run the benchmark described by parsed `add_arguments` options; returns an exit code.
    ``e2e_nets``: the nets ``--e2e`` times (default `bnlab.kernels.e2e.STAND_INS`)."""
    cases = _cases(args)
    if isinstance(cases, str):
        print(f"bnlab bench: {cases}", file=sys.stderr)
        return 2
    if args.json is not None:  # can it be written? Asked before the minutes of timing
        path = Path(args.json)
        existed = path.exists()
        try:
            with open(path, "a"):
                pass
        except OSError as e:
            print(f"bnlab bench: --json {args.json}: cannot write it ({e.strerror or e})",
                  file=sys.stderr)
            return 2
        if not existed:
            path.unlink()
    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tune else tune_malloc()
    info = machine_info(args.threads, tuned)
    from bnlab import kernels

    if not kernels.available():
        print("bnlab bench: the CPU kernels are not available; bnlab runs the reference path",
              file=sys.stderr)
    info["kernels"] = kernels.available()
    from bnlab.kernels import _build

    # what the figures depend on besides the machine: the vector width the build targets
    # (BNLAB_KERNELS_MARCH: 16, 8 or 4 lanes) and the sampling
    info["kernels_target"] = _build._march() or "(compiler default)"
    info["rounds"] = args.rounds
    if not args.e2e:
        info["repeats"] = args.repeats
    from bnlab import functional as F

    info["force_reference"] = F._force_reference()
    if info["force_reference"]:
        print("bnlab bench: BNLAB_FORCE_REFERENCE is on: the bnlab column times the reference "
              "path, not the kernels", file=sys.stderr)
    if not args.e2e:
        info["stat"] = args.stat
    if args.e2e:
        from bnlab.kernels import e2e

        result = e2e.run_e2e(args.e2e_steps, args.rounds, args.e2e_format, e2e_nets)
        e2e.print_e2e(result, args.e2e_format)
        payload: dict[str, Any] = {"machine": info, "e2e": result, "e2e_format": args.e2e_format}
    else:
        rows = []
        for name, fmt, mode in cases:
            shape = SHAPES[name]
            r = bench_case(shape, fmt, mode, args.repeats, args.rounds, args.stat)
            rows.append({"shape": name, "dims": list(shape), "format": fmt, "mode": mode, **r})
            print(f"  {name} {fmt} {mode}: torch {r['torch']:.2f}x bnlab {r['bnlab']:.2f}x",
                  file=sys.stderr, flush=True)
        summary = summarize(rows)
        print_table(rows, summary)
        targets = check_targets(summary)
        full = ({c[0] for c in cases} == set(SHAPES)
                and {c[1] for c in cases} == set(FORMATS) and args.threads == 2)
        print_targets(targets, full)
        payload = {"machine": info, "rows": rows, "summary": summary, "targets": targets,
                   "full_shape_set": full}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bnlab.kernels.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
