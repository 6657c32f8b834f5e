"""Experiments: the `Experiment` record, discovery of ``lab/experiments/<paper>/<name>.py``
modules (each exposes ``EXPERIMENT``), and the runner that expands seeds × variants into run
directories. Adding an experiment = adding a module; nothing here changes.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.lab import data as data_mod
from bnlab.lab import parallel, runs
from bnlab.lab.config import (
    DataConfig,
    apply_overrides,
    check_name_digits,
    config_hash,
    override_key,
    to_dict,
)

__all__ = ["PRESETS", "Experiment", "RunContext", "all_experiments", "get", "run_experiment"]

PRESETS = ("smoke", "quick", "paper")


@dataclass
class RunContext:
    """What an experiment's ``run`` gets for one (variant, seed)."""

    run: runs.Run
    variant: str
    seed: int
    progress: bool
    resume: bool  # True: continue from the run's checkpoint
    _cache: dict[DataConfig, data_mod.Dataset] = field(default_factory=dict)

    def data(self, cfg: DataConfig) -> data_mod.Dataset:
        """The data set of ``cfg``, loaded once per ``bnlab run`` invocation."""
        if cfg not in self._cache:
            self._cache[cfg] = data_mod.load(cfg)
        return self._cache[cfg]

    @property
    def desc(self) -> str:
        return f"{self.variant} s{self.seed}"


@dataclass(frozen=True)
class Experiment:
    """One paper figure or table.

    Attributes:
        name: "<paper>.<module>", e.g. "ioffe2015.fig1" (set by discovery when left empty).
        title: the figure or table reproduced.
        claim: the paper's claim in one line.
        presets: "smoke" (seconds; tests), "quick" (minutes), "paper" → a frozen dataclass config
            whose ``data`` field is a `DataConfig`.
        runtime: preset → expected wall time here (2 shared CPU cores), for ``bnlab list``.
        variants: config → the variant names to train (each gets a run directory per seed).
        run: (config, variant, ctx) → summary dict; trains through `bnlab.lab.train.fit`.
        report: `bnlab.lab.report.Inputs` → `bnlab.lab.report.Section`; reads run dirs only.
        uses_data: False for an experiment on synthetic data (its config's ``data`` is unused):
            no data set is required, and ``--data-dir`` is ignored.
    """

    title: str
    claim: str
    presets: Mapping[str, Any]
    runtime: Mapping[str, str]
    variants: Callable[[Any], Sequence[str]]
    run: Callable[[Any, str, RunContext], dict[str, Any]]
    report: Callable[[Any], Any]
    name: str = ""
    uses_data: bool = True

    def config(self, preset: str, sets: Sequence[str] = (), data_dir: str | None = None) -> Any:
        """The preset's config with ``--set`` overrides and ``--data-dir`` applied."""
        if preset not in self.presets:
            valid = sorted(self.presets, key=lambda p: (*PRESETS, p).index(p))
            raise ValueError(f"{self.name}: unknown preset {preset!r}; valid presets: "
                             f"{', '.join(valid)}")
        cfg = apply_overrides(self.presets[preset], list(sets))
        data = getattr(cfg, "data", None)
        if isinstance(data, DataConfig) and data.dir is not None:
            # `--set data.dir=D` is --data-dir D: the same resolved path and run directory.
            if not data.dir.strip():
                raise ValueError("--set data.dir: expected a directory, got ''")
            if data_dir is not None and Path(data_dir).resolve() != Path(data.dir).resolve():
                raise ValueError(f"--data-dir {data_dir} and --set data.dir={data.dir} name "
                                 "different directories; give one")
            data_dir = data.dir
            cfg = apply_overrides(cfg, ["data.dir=None"])
        # The default directory named explicitly stays None: the same config and run directory.
        given = None if data_dir is None else Path(data_dir).resolve()
        if given is not None and not self.uses_data:
            _say(f"{self.name} trains on synthetic data: --data-dir {data_dir} is ignored")
            given = None
        if given is not None and given != Path(data_mod.DEFAULT_DIR).resolve():
            cfg = apply_overrides(cfg, [f"data.dir={str(given)!r}"])
        return cfg


def all_experiments() -> dict[str, Experiment]:
    """Discover every ``bnlab.lab.experiments.<paper>.<module>`` that defines ``EXPERIMENT``."""
    import bnlab.lab.experiments as root

    found: dict[str, Experiment] = {}
    for paper in pkgutil.iter_modules(root.__path__):
        if not paper.ispkg:
            continue
        pkg = importlib.import_module(f"{root.__name__}.{paper.name}")
        for mod in pkgutil.iter_modules(pkg.__path__):
            if mod.name.startswith("_"):
                continue  # shared helpers of a paper's experiments, not experiments
            module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
            exp = getattr(module, "EXPERIMENT", None)
            if isinstance(exp, Experiment):
                name = f"{paper.name}.{mod.name}"
                found[name] = exp if exp.name == name else _named(exp, name)
    return dict(sorted(found.items()))


def _named(exp: Experiment, name: str) -> Experiment:
    object.__setattr__(exp, "name", name)  # discovery names the experiment after its module
    return exp


def get(name: str) -> Experiment:
    """The experiment called ``name``; unknown names list the valid ones."""
    exps = all_experiments()
    if name not in exps:
        raise ValueError(f"unknown experiment {name!r}; valid experiments: {', '.join(exps)}")
    return exps[name]


def _say(msg: str) -> None:
    if parallel.current().main:
        print(msg, file=sys.stderr, flush=True)


@contextmanager
def _claimed(path: Path) -> Iterator[None]:
    """`runs.claimed` on rank 0 alone; every rank raises `runs.RunBusyError` when it fails."""
    par = parallel.current()
    with ExitStack() as stack:
        busy = ""
        if par.main:
            try:
                stack.enter_context(runs.claimed(path))
            except runs.RunBusyError as e:
                busy = str(e)
        busy = parallel.broadcast(busy)
        if busy:
            raise runs.RunBusyError(busy)
        yield


def _prepare(path: Path, meta: dict[str, Any], *, resume: bool,
             force: bool) -> tuple[runs.Run, str]:
    """`runs.prepare` on rank 0 alone; the other ranks get its decision (or its error) and a
    `parallel.MemoryRun` that writes nothing."""
    par = parallel.current()
    if par.world == 1:
        return runs.prepare(path, meta, resume=resume, force=force)
    decision: tuple[str, str] = ("", "")
    if par.main:
        try:
            run, action = runs.prepare(path, meta, resume=resume, force=force)
            decision = ("ok", action)
        except runs.RunExistsError as e:
            decision = ("error", str(e))
    decision = parallel.broadcast(decision)
    if decision[0] == "error":
        raise runs.RunExistsError(decision[1])
    if par.main:
        return run, decision[1]
    return parallel.MemoryRun(path, resume=decision[1] == "resume"), decision[1]


def run_config(cfg: Any) -> dict[str, Any]:
    """The config a run is identified by: ``cfg``, and under torchrun without ``--sync-bn`` the
    number of processes, whose BN layers then normalize by each shard's statistics, another
    method than one process's (with ``--sync-bn`` the runs equal one process's and share its
    run directories). A finished run of the other kind is then refused, not skipped."""
    par = parallel.current()
    config = to_dict(cfg)
    if par.world > 1 and not par.sync_bn:
        config["processes_without_sync_bn"] = par.world
    return config


def run_experiment(exp: Experiment, *, preset: str = "quick", seeds: int = 1,
                   sets: Sequence[str] = (), data_dir: str | None = None,
                   out: str | Path = "runs", resume: bool = False, force: bool = False,
                   progress: bool = True) -> list[runs.Run]:
    """Train every variant of ``exp`` at seeds 0..seeds-1 into ``out``; return the runs.

    A run another process is training (it holds the run's lock, `runs.claimed`) is left to it
    and not returned, so two processes on one ``out`` share the runs.

    The run directory's preset part is the preset name, or ``<preset>-<hash>`` when ``--set``
    or ``--data-dir`` changed the config, so overrides never collide with the preset's runs.
    """
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    cfg = exp.config(preset, sets, data_dir)
    check_name_digits(cfg)
    if not list(exp.variants(cfg)):
        raise ValueError(f"{exp.name} --preset {preset}: the config gives no variant to run "
                         f"(--set {' '.join(sets)})")
    tag = preset if cfg == exp.presets[preset] else f"{preset}-{config_hash(cfg)}"
    cache: dict[DataConfig, data_mod.Dataset] = {}
    if exp.uses_data and isinstance(getattr(cfg, "data", None), DataConfig):
        # A missing or unreadable data set, or one smaller than a batch, fails before any
        # run directory exists.
        cache[cfg.data] = data = data_mod.load(cfg.data)
        batch = getattr(getattr(cfg, "train", None), "batch_size", None)
        if isinstance(batch, int) and batch > len(data.train_x):
            raise ValueError(f"train.batch_size is {batch}, more than the {len(data.train_x)} "
                             f"training examples in {data.source}; lower it with --set "
                             f"train.batch_size=...")
    # The overrides as `bnlab report`'s resume command repeats them: a relative data.dir would
    # name another directory from elsewhere, so it is given as the config holds it (resolved;
    # the default directory: dropped).
    data_dir_set = [s for s in sets if override_key(s) == "data.dir"]
    shown = [s for s in sets if s not in data_dir_set]
    if data_dir_set and getattr(getattr(cfg, "data", None), "dir", None) is not None:
        shown.append(f"data.dir={cfg.data.dir!r}")
    done: list[runs.Run] = []
    busy = 0
    t0 = time.perf_counter()
    for seed in range(seeds):
        for variant in exp.variants(cfg):
            meta = {"experiment": exp.name, "preset": preset, "tag": tag, "variant": variant,
                    "seed": seed, "overrides": shown, "config": run_config(cfg)}
            path = runs.run_path(out, exp.name, tag, variant, seed)
            try:
                with _claimed(path):  # one process per run: a second `bnlab run` moves on
                    run, action = _prepare(path, meta, resume=resume, force=force)
                    if action == "skip":
                        _say(f"skip {path}: finished with the same config (delete it to rerun "
                             "it; --force reruns every run of the command)")
                    else:
                        ctx = RunContext(run, variant, seed, progress, action == "resume", cache)
                        summary = exp.run(cfg, variant, ctx)
                        run.finish(summary)
                        _say(f"{exp.name} {variant} seed{seed}: " + _brief(summary))
                    done.append(run)
            except runs.RunBusyError as e:
                _say(f"skip {e}")
                busy += 1
    _say(f"{exp.name} --preset {preset}: {len(done)} run(s) in {time.perf_counter() - t0:.0f} s "
         f"under {Path(out) / exp.name / tag}"
         + (f"; {busy} left to other processes (`bnlab report` counts them once they finish)"
            if busy else ""))
    return done


def _brief(summary: dict[str, Any]) -> str:
    parts = []
    for key in ("final_acc", "best_acc", "diverged_step", "wall_s"):
        v = summary.get(key)
        if v is not None:
            parts.append(f"{key}={v:.4f}" if isinstance(v, float) and key != "wall_s"
                         else f"{key}={v}")
    return " ".join(parts)
