"""The ``bnlab`` command: parses arguments and dispatches, nothing else.

    bnlab list                                    experiments, claims, expected runtimes
    bnlab run NAME [--preset P] [--seeds N] [--set k=v ...] [--data-dir D] [--out D]
                   [--resume] [--force] [--threads N] [--sync-bn]
    torchrun --nproc-per-node K -m bnlab run NAME ... [--sync-bn]   data-parallel (rank 0 writes)
    bnlab report [--runs D] [--out D]             finished runs -> report/index.html + report.md
    bnlab bench ...                               kernel benchmarks (bnlab.kernels.bench)
    bnlab kernels                                 build the CPU kernels now; where they are
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bnlab._checks import positive_int


def _list(args: argparse.Namespace) -> int:
    from bnlab.lab.registry import all_experiments

    for name, exp in all_experiments().items():
        times = ", ".join(f"{p} {t}" for p, t in exp.runtime.items())
        print(f"{name:<24} {exp.title}\n{'':<24} claim: {exp.claim}\n{'':<24} runtime: {times}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from bnlab.lab.registry import get, run_experiment

    if args.resume and args.force:
        raise ValueError("--resume and --force conflict: --resume continues the unfinished "
                         "runs, --force deletes every run of the command and starts over")
    exp = get(args.name)
    _writable_dir(args.out, "--out")
    if args.threads is not None:
        if args.threads > 4 * (os.cpu_count() or 1):
            raise ValueError(f"--threads must be at most 4 × this machine's {os.cpu_count()} "
                             f"CPUs, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from bnlab.lab import parallel

    par = parallel.init(sync_bn=args.sync_bn)  # joins torchrun's group; no-op otherwise
    try:
        run_experiment(exp, preset=args.preset, seeds=args.seeds, sets=args.set,
                       data_dir=args.data_dir, out=args.out, resume=args.resume,
                       force=args.force, progress=not args.quiet and par.main)
        parallel.teardown(sync=True)  # every rank done: leave together
    except KeyboardInterrupt as e:
        print(f"\ninterrupted: {e}" if str(e) else "\ninterrupted (the same command with "
              "--resume continues from the last checkpoint)", file=sys.stderr)
        return 130
    finally:
        parallel.teardown()
    return 0


def _report(args: argparse.Namespace) -> int:
    from bnlab.lab.report import write_report

    if not Path(args.runs).is_dir():
        raise ValueError(f"--runs {args.runs}: no such directory (where `bnlab run --out` "
                         "wrote its runs; default: runs)")
    _writable_dir(args.out, "--out")
    problems: list[str] = []
    path = write_report(args.runs, args.out, problems)
    for problem in problems:
        print(f"bnlab report: {problem}", file=sys.stderr)
    print(f"report written: {path.resolve()} (and {path.with_name('report.md').resolve()})")
    # Skipped run directories are the user's to mend; a section that fails is a bug: exit 1.
    return 1 if any(p.startswith("section ") for p in problems) else 0


def _bench(args: argparse.Namespace) -> int:
    # Imported only here: the kernels may build on first import; other commands never pay.
    try:
        from bnlab.kernels import bench
    except ImportError as e:
        print(f"bnlab bench is not available in this build ({e}); it needs bnlab.kernels.bench",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="bnlab bench", description="Benchmark the kernels.")
    bench.add_arguments(parser)
    ns = parser.parse_args(args.rest)
    nets = None
    if ns.e2e:  # the stand-ins and the lab's own nets (the kernels' package cannot import them)
        from bnlab.kernels.e2e import STAND_INS
        from bnlab.lab.models import e2e_nets

        nets = {**STAND_INS, **e2e_nets()}
    return int(bench.run(ns, nets))


def _kernels(args: argparse.Namespace) -> int:
    import warnings

    from bnlab import functional, kernels
    from bnlab.kernels import _build

    with warnings.catch_warnings():  # the failure is printed below, not warned
        warnings.simplefilter("ignore", RuntimeWarning)
        kernels.available()  # loaded as a BN call loads them: fake kernels, eager entry points
        info = _build.info()
    for key, value in info.items():
        if value is not None:
            print(f"{key + ':':<11}{value}")
    if info["available"] and functional._force_reference():
        print("note:      BNLAB_FORCE_REFERENCE is set, so bnlab's layers use the reference path")
    return 0 if info["available"] else 1


def _writable_dir(path: str, option: str) -> None:
    """Fail now, naming the option, if ``path`` cannot become an output directory (a file, or
    under one, or under a directory this user cannot write), not after the work is done.
    Nothing is created here: a run that stops on another error leaves no directory behind."""
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a directory")
    base = next(a for a in (p, *p.parents) if a.exists())
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot create it: {base} is not a writable "
                         "directory")
    if base != p:  # (os.access says yes to root everywhere, /proc included: try it)
        # A directory of a unique name, removed at once: torchrun's ranks check the same
        # --out at the same time (creating --out itself raced: one rank found it existing).
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".bnlab-check-", dir=base))
        except OSError as e:
            raise ValueError(f"{option} {path}: cannot create it: {e.strerror}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bnlab", description="Batch normalization lab: "
                                     "reproduce Ioffe & Szegedy 2015 and Santurkar et al. 2018.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the experiments").set_defaults(func=_list)
    p = sub.add_parser("run", help="run an experiment (all variants, seeds 0..N-1)")
    p.add_argument("name", help="experiment, e.g. ioffe2015.fig1 (see `bnlab list`)")
    p.add_argument("--preset", default="quick", help="smoke | quick | paper (default: quick)")
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="run seeds 0..N-1 (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")
    p.add_argument("--data-dir", default=None, help="MNIST-format IDX directory "
                   "(default: /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default="runs", help="runs directory (default: runs)")
    p.add_argument("--resume", action="store_true", help="continue unfinished runs")
    p.add_argument("--force", action="store_true", help="delete and redo every run of the "
                   "command, finished ones included (to redo one run, delete its directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads "
                   "(default: torch's; 1 is much faster on a machine shared with other jobs)")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: synchronize BN "
                   "statistics over the processes (bnlab.SyncBatchNorm)")
    p.set_defaults(func=_run)
    p = sub.add_parser("report", help="write report/index.html and report/report.md")
    p.add_argument("--runs", default="runs", help="runs directory (default: runs)")
    p.add_argument("--out", default="report", help="output directory (default: report)")
    p.set_defaults(func=_report)
    p = sub.add_parser("bench", help="benchmark the batch-norm kernels (bnlab.kernels.bench)",
                       add_help=False, prefix_chars="\0")  # every argument goes to the bench
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    sub.add_parser("kernels", help="build the CPU kernels now (cached; about a minute the first "
                   "time) and print where they are; exit 1 if they cannot be built"
                   ).set_defaults(func=_kernels)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `bnlab list | head -1`: the reader left, nothing went wrong
        # nor at exit, when Python flushes stdout into the closed pipe (ValueError: a stdout
        # without a file descriptor)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError, RuntimeError) as e:  # OSError: FileNotFoundError and kin
        print(f"bnlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a run's own handling (start-up, a kernel build, report)
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
