"""The lab when something is off: unfinished or missing runs, runs on other data, overrides,
None and over-precise --set values, damaged checkpoints and data files, an experiment that needs
no data set, and two processes on one runs directory. Each case once gave a traceback, a wrong
run, or a report that misstated it (the last: a run trained twice into the same files)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from _lab_idx import write_dataset, write_idx
from bnlab.cli import main
from bnlab.lab import runs
from bnlab.lab.config import apply_overrides
from bnlab.lab.data import load, read_idx
from bnlab.lab.experiments.ioffe2015.fig1 import Fig1Config
from bnlab.lab.registry import get, run_experiment
from bnlab.lab.report import write_report


@pytest.fixture(scope="module")
def fig1_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    data = write_dataset(root / "idx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(get("ioffe2015.fig1"), preset="smoke", seeds=2, data_dir=str(data),
                       sets=["optim.lr=0.05"], out=root / "runs", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root, data


def _section(md: str) -> str:
    return md.split("## ioffe2015.fig1", 1)[1].split("\n## ", 1)[0]


def test_the_report_discloses_data_overrides_and_unfinished_or_missing_runs(fig1_runs,
                                                                           tmp_path):
    root, data = fig1_runs
    runs_dir = tmp_path / "runs"
    shutil.copytree(root / "runs", runs_dir)
    write_report(runs_dir, tmp_path / "full")
    full = _section((tmp_path / "full" / "report.md").read_text())
    assert f"used the IDX data in `{data.resolve()}`" in full  # (it said Fashion-MNIST)
    assert "Overrides of the preset: `--set optim.lr=0.05`." in full
    assert "Verdict: inconclusive" not in full
    # an interrupted run (no summary) and a variant that never started at seed 1
    (tag,) = [p.name for p in (runs_dir / "ioffe2015.fig1").iterdir()]
    (runs_dir / "ioffe2015.fig1" / tag / "nobn" / "seed0" / "summary.json").unlink()
    shutil.rmtree(runs_dir / "ioffe2015.fig1" / tag / "bn" / "seed1")
    write_report(runs_dir, tmp_path / "partial")
    part = _section((tmp_path / "partial" / "report.md").read_text())
    assert ("**Verdict: inconclusive.** 2 run(s) of this preset are unfinished or missing "
            "(bn seed1, nobn seed0)") in part  # it graded the runs that were left


def test_set_none_is_checked_against_the_fields_type() -> None:
    for item, needle in (("optim.lr=None", "optim.lr: expected float like 0.1, got None"),
                         ("sweep=None", "sweep: expected tuple"),
                         ("data.dir=123", "data.dir: expected str or None, got int 123")):
        with pytest.raises(ValueError, match=needle):  # (a TypeError deep in the run)
            apply_overrides(Fig1Config(), [item])
    assert apply_overrides(Fig1Config(), ["data.dir=None"]).data.dir is None


def test_sweep_values_run_names_cannot_tell_apart_are_refused(tmp_path, capsys) -> None:
    # 0.30000004 was named nobn_lr0.3 and trained at 0.3
    argv = ["run", "ioffe2015.fig1", "--preset", "smoke", "--set", "sweep=(0.30000004,)",
            "--out", str(tmp_path / "runs")]
    assert main(argv) == 2
    assert "0.30000004 has more significant digits than run names keep" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_damaged_checkpoint_is_named_with_the_way_out(tmp_path) -> None:
    run, _ = runs.prepare(tmp_path / "r", {"experiment": "x", "preset": "smoke", "variant": "v",
                                           "seed": 0, "config": {}})
    run.checkpoint_path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be read .*delete .* and run the "
                       r"command again"):
        run.load_checkpoint()
    run.save_checkpoint({"step": 3})
    assert run.load_checkpoint() == {"step": 3}


def test_damaged_or_swapped_data_files_are_named(tmp_path, capsys) -> None:
    path = write_idx(tmp_path / "a-idx1-ubyte", np.arange(50), gz=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="a damaged gzip file"):  # (an EOFError)
        read_idx(path)
    data = write_dataset(tmp_path / "idx", n_train=40, n_test=20)
    for split in ("train", "t10k"):  # images and labels swapped
        x, y = (data / f"{split}-images-idx3-ubyte.gz", data / f"{split}-labels-idx1-ubyte.gz")
        tmp = x.read_bytes()
        x.write_bytes(y.read_bytes())
        y.write_bytes(tmp)
    with pytest.raises(ValueError, match=r"must hold images \(N, H, W\), got an array of shape "
                       r"\(40,\)"):
        load(apply_overrides(Fig1Config(), [f"data.dir={str(data)!r}"]).data)
    argv = ["run", "ioffe2015.fig1", "--preset", "smoke", "--data-dir", str(data),
            "--out", str(tmp_path / "runs")]
    assert main(argv) == 2 and "must hold images" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # (an unfinished run directory was left)


def test_an_experiment_on_synthetic_data_needs_no_data_set(tmp_path) -> None:
    done = run_experiment(get("santurkar2018.dln"), preset="smoke",
                          data_dir=str(tmp_path / "none"), out=tmp_path / "runs", progress=False)
    assert all(r.finished for r in done)
    assert [p.name for p in (tmp_path / "runs" / "santurkar2018.dln").iterdir()] == ["smoke"]


_HOLDER = """
import sys
from pathlib import Path
from bnlab.lab import runs
with runs.claimed(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_a_run_another_process_is_training_is_left_to_it(tmp_path, capsys) -> None:
    """Two `bnlab run`s on one --out share the runs (one process per run, by flock) instead of
    training a run twice into the same files; --force from the second one deletes nothing."""
    exp, out = get("santurkar2018.dln"), tmp_path / "runs"
    held = runs.run_path(out, exp.name, "smoke", "dln-bn-lr1e-06", 0)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(held)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(runs.RunBusyError, match=f"pid {holder.pid}"), runs.claimed(held):
            pass
        (held / "metrics.jsonl").write_text('{"step": 1}\n')  # the holder's work so far
        for force in (False, True):
            done = run_experiment(exp, preset="smoke", out=out, force=force, progress=False)
            assert [r.path for r in done] == [held.parent.parent / "dln-none-lr1e-06" / "seed0"]
            err = capsys.readouterr().err
            assert f"pid {holder.pid}" in err and "1 left to other processes" in err
            assert (held / "metrics.jsonl").read_text() == '{"step": 1}\n'
            assert not (held / "summary.json").exists()
    finally:
        holder.communicate("")  # closes its stdin: it exits and the kernel drops its lock
    assert holder.returncode == 0
    done = run_experiment(exp, preset="smoke", out=out, progress=False)
    assert len(done) == 2 and all(r.finished for r in done)
    assert "left to other" not in capsys.readouterr().err
    with runs.claimed(held):  # released after the run: this process can take it again
        pass
