"""Run directories: ``<out>/<experiment>/<preset>/<variant>/seed<k>/`` holding

    config.json    the fully resolved config plus experiment, preset, variant, seed, overrides
    env.json       python/torch/numpy versions, threads, git commit, host, start time
    metrics.jsonl  one JSON object per evaluation step
    checkpoint.pt  model, optimizer, RNG and loop state (written atomically: tmp + os.replace)
    summary.json   written last; its presence marks the run finished
    *.pt           optional artefacts (e.g. held-out class probabilities)
    .lock          held (flock) by the process training the run, see `claimed`

A finished run is never silently overwritten, and a run is trained by one process at a time.
Holds no training or plotting code.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["Run", "RunBusyError", "RunExistsError", "claimed", "env_info", "find_runs",
           "prepare", "run_path"]

LOCK = ".lock"


class RunExistsError(RuntimeError):
    """A run directory exists and the requested action would overwrite it."""


class RunBusyError(RunExistsError):
    """Another process holds the run directory: it is training that run now."""


def run_path(out: str | os.PathLike, experiment: str, preset: str, variant: str,
             seed: int) -> Path:
    """``out/experiment/preset/variant/seed<k>``; a part that would leave its directory (a
    separator, "..", "") is refused: ``--force`` deletes what this path names."""
    for part in (experiment, preset, variant):
        if part in ("", ".", "..") or "/" in part or os.sep in part:
            raise ValueError(f"a run directory part must be a plain name, got {part!r}")
    return Path(out) / experiment / preset / variant / f"seed{seed}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info() -> dict[str, Any]:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "host": platform.node(), "git": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


@dataclass
class Run:
    """One run directory (see the module docstring)."""

    path: Path

    def _json(self, name: str) -> Any:
        p = self.path / name
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:  # an empty or cut file: name it
            raise ValueError(f"{p} is not JSON ({e}); delete {self.path} and run the command "
                             "again to redo that run (--force would redo every run of the "
                             "command)") from None

    @property
    def meta(self) -> dict[str, Any]:
        """config.json: {"experiment", "preset", "variant", "seed", "overrides", "config"}."""
        return self._json("config.json") or {}

    @property
    def config(self) -> dict[str, Any]:
        return self.meta.get("config", {})

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._json("summary.json")

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").exists()

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoint.pt"

    def metrics(self) -> list[dict[str, Any]]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        text = p.read_text()
        lines = text.splitlines()
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1 and not text.endswith("\n"):
                    break  # the last record, cut short by a kill mid-write: it is redone
                raise ValueError(f"{p}: line {i + 1} is not a JSON record ({e.msg})") from None
        return out

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run rewrites them exactly)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        _atomic_write(self.path / "metrics.jsonl",
                      "".join(json.dumps(r) + "\n" for r in kept).encode())

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        # fsynced before the rename, as the other files: a crash must not leave an empty one
        _atomic_write(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self) -> dict[str, Any] | None:
        if not self.checkpoint_path.exists():
            return None
        try:
            return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch.load raises anything from EOFError to pickle's errors
            raise ValueError(f"{self.checkpoint_path} cannot be read ({type(e).__name__}: {e}); "
                             f"the run cannot be resumed: delete {self.path} and run the command "
                             "again to redo it (--force would redo every run of the command)"
                             ) from None

    def save_artifact(self, name: str, obj: Any) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        # fsynced, as summary.json after it: a crash must not leave a summary beside an empty one
        _atomic_write(self.path / f"{name}.pt", buf.getvalue())

    def load_artifact(self, name: str) -> Any:
        p = self.path / f"{name}.pt"
        try:
            return torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e:  # torch.load raises anything from EOFError to pickle's errors
            raise ValueError(f"{p} cannot be read ({type(e).__name__}: {e}); rerun that run "
                             "with --force") from None

    def finish(self, summary: dict[str, Any], *, keep_checkpoint: bool = False) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=1).encode())
        if not keep_checkpoint and self.checkpoint_path.exists():
            self.checkpoint_path.unlink()  # the final state is in the summary and artefacts


@contextmanager
def claimed(path: Path) -> Iterator[None]:
    """Hold ``path/.lock`` (an exclusive `flock`) while the run at ``path`` is prepared and
    trained. A second ``bnlab run`` on the same runs directory then raises `RunBusyError`
    (naming the holder's pid) for this run instead of training it into the same files, so two
    processes can share one experiment's runs. The kernel drops the lock when its holder exits,
    however it exits: a lock is never stale. The lock file stays (deleting it would let two
    processes hold locks on two files of one name)."""
    if fcntl is None:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            raise RunBusyError(f"{path} is being trained by another process (pid {holder or '?'})"
                               "; it is left to that process") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _clear(path: Path) -> None:
    """Delete a run directory's contents, but not its lock (held by this process)."""
    for p in path.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def prepare(path: Path, meta: dict[str, Any], *, resume: bool = False,
            force: bool = False) -> tuple[Run, str]:
    """Create or reopen a run directory and say what to do: "new", "resume" or "skip".

    * no directory (or ``force``): a fresh run;
    * finished with the same config: "skip"; with another config: `RunExistsError`;
    * unfinished: "resume" when ``resume`` and the config matches, else `RunExistsError`;
      one that stopped before its first checkpoint simply starts again.
    """
    run = Run(Path(path))
    if force and run.path.exists():
        _clear(run.path)
    if run.path.exists() and (run.path / "config.json").exists():
        same = run.meta.get("config") == meta.get("config")
        if run.finished:
            if same:
                return run, "skip"
            raise RunExistsError(f"{run.path} holds a finished run with a different config; "
                                 "pass --out for another directory, or delete it (--force "
                                 "deletes and redoes every run of the command)")
        if not run.checkpoint_path.exists():
            pass  # it stopped before its first checkpoint: nothing to keep, start it again
        elif not resume:
            raise RunExistsError(f"{run.path} holds an unfinished run; pass --resume to continue "
                                 "it, or delete it to start it over (--force deletes and redoes "
                                 "every run of the command)")
        elif not same:
            raise RunExistsError(f"{run.path}: cannot resume, the config differs from the saved "
                                 "one; delete it to start it over (--force deletes and redoes "
                                 "every run of the command)")
        else:
            return run, "resume"
    run.path.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "checkpoint.pt"):
        (run.path / stale).unlink(missing_ok=True)
    _atomic_write(run.path / "config.json", json.dumps(meta, indent=1).encode())
    _atomic_write(run.path / "env.json", json.dumps(env_info(), indent=1).encode())
    return run, "new"


def find_runs(root: str | os.PathLike, experiment: str | None = None) -> Iterator[Run]:
    """Every run directory (finished or not) under ``root``, optionally of one experiment."""
    base = Path(root) / experiment if experiment else Path(root)
    for cfg in sorted(base.glob("**/config.json")):
        yield Run(cfg.parent)
