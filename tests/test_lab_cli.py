"""The `bnlab` command: list, errors that list the valid names/presets/keys, overrides, bench."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bnlab.cli import main
from bnlab.lab.config import OptimConfig, TrainConfig, apply_overrides, flat_keys
from bnlab.lab.experiments.ioffe2015.fig1 import Fig1Config

NAMES = ("ioffe2015.fig1", "ioffe2015.fig2", "ioffe2015.alg2", "ioffe2015.ensemble")


def test_list_shows_every_experiment_with_claim_and_runtime(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out
    assert "claim:" in out and "runtime:" in out and "paper" in out


@pytest.mark.parametrize(("argv", "needle", "valid"), [
    (["run", "ioffe2015.nope"], "unknown experiment", "ioffe2015.fig1"),
    (["run", "ioffe2015.fig1", "--preset", "huge"], "unknown preset", "smoke, quick, paper"),
    (["run", "ioffe2015.fig1", "--set", "optim.learning_rate=1"], "unknown key", "optim.lr"),
    (["run", "ioffe2015.fig1", "--set", "optim.lr=fast"], "expected float", "optim.lr"),
    (["run", "ioffe2015.fig1", "--set", "optim.lr"], "key=value", ""),
    (["run", "ioffe2015.fig1", "--set", "train.steps=0"], "--set train.steps: steps must be "
     "an integer >= 1, got 0", ""),
    (["run", "ioffe2015.fig1", "--set", "optim.lr=-0.1"], "--set optim.lr: lr must be a finite "
     "number > 0, got -0.1", ""),
    (["run", "ioffe2015.fig1", "--set", "train.eval_every=0"], "eval_every must be", ""),
])
def test_cli_errors_name_the_valid_choices(capsys, tmp_path, argv, needle, valid):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and valid in err
    assert not any(tmp_path.iterdir())  # nothing was started


@pytest.mark.parametrize(("argv", "needle"), [
    (["run", "ioffe2015.fig1", "--seeds", "0"], "argument --seeds: expected an integer >= 1, "
     "got 0"),
    (["run", "ioffe2015.fig1", "--threads", "0"], "argument --threads: expected an integer"),
    (["bench", "--rounds", "0"], "argument --rounds: expected an integer >= 1, got 0"),
    (["bench", "--e2e-steps", "-1"], "argument --e2e-steps"),
])
def test_counts_must_be_positive(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_unusable_output_directories_are_named_before_any_work(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for argv, needle in [
        (["run", "ioffe2015.fig1", "--out", str(a_file)], "exists and is not a directory"),
        (["run", "ioffe2015.fig1", "--out", str(a_file / "runs")],
         f"cannot create it: {a_file} is not a writable directory"),
        (["report", "--runs", str(tmp_path / "none")], "--runs"),
        (["report", "--runs", str(tmp_path), "--out", str(a_file)], "--out"),
        (["bench", "--json", str(tmp_path / "no" / "x.json")], "--json"),
    ]:
        assert main(argv) == 2
        assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_missing_data_set_prints_the_install_command(capsys, tmp_path):
    argv = ["run", "ioffe2015.fig1", "--preset", "smoke", "--data-dir", str(tmp_path / "none"),
            "--out", str(tmp_path / "runs")]
    assert main(argv) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_overrides_are_dotted_typed_and_checked():
    cfg = apply_overrides(Fig1Config(), ["optim.lr=1", "sweep=(0.1, 0.2)", "train.steps=7",
                                         "data.binarize=False", "data.dir='/x'"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int widens to float
    assert cfg.sweep == (0.1, 0.2) and cfg.train.steps == 7 and cfg.data.dir == "/x"
    assert Fig1Config().optim.lr == 0.1  # the preset is untouched (frozen)
    with pytest.raises(ValueError, match="expected int"):
        apply_overrides(Fig1Config(), ["train.steps=2.5"])
    with pytest.raises(ValueError, match="expected bool"):
        apply_overrides(Fig1Config(), ["data.binarize=1"])
    keys = flat_keys(Fig1Config())
    assert {"optim.lr", "train.steps", "data.dir", "init_std"} <= set(keys)
    assert set(flat_keys(TrainConfig())) == {f.name for f in TrainConfig.__dataclass_fields__
                                              .values()}
    assert flat_keys(OptimConfig())["lr"] == 0.1


def test_python_dash_m_bnlab_works():
    out = subprocess.run([sys.executable, "-m", "bnlab", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "report" in out.stdout and "run" in out.stdout


def test_bench_hands_its_arguments_to_the_kernels_bench(monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("bnlab.kernels.bench")

    def add_arguments(p):
        p.add_argument("--size", type=int, default=1)
        p.add_argument("--e2e", action="store_true")
    fake.add_arguments = add_arguments
    fake.run = lambda args, e2e_nets=None: seen.setdefault("size", args.size) and 0
    import bnlab.kernels

    monkeypatch.setitem(sys.modules, "bnlab.kernels.bench", fake)
    monkeypatch.setattr(bnlab.kernels, "bench", fake, raising=False)
    assert main(["bench", "--size", "7"]) == 0
    assert seen == {"size": 7}


@pytest.mark.parametrize(("sets", "needle"), [
    (["probe_unit=500"], "--set probe_unit: probe_unit must be an integer in [0, 99], got 500"),
    (["sweep=(-1.0,)"], "sweep must be finite numbers > 0, got (-1.0,)"),
    (["sweep=('a',)"], "--set sweep: expected a tuple of float, got str 'a'"),
    (["optim.momentum=1.0"], "momentum must be a number in [0, 1), got 1.0"),
])
def test_experiment_settings_are_checked_when_set(sets, needle):
    """A value the experiment cannot use is refused where it is set, not as an IndexError in
    its report (probe_unit=500) or after the other variants trained (sweep=(-1.0,))."""
    with pytest.raises(ValueError) as err:
        apply_overrides(Fig1Config(), sets)
    assert needle in str(err.value)
    assert apply_overrides(Fig1Config(), ["sweep=(1, 2)"]).sweep == (1.0, 2.0)  # ints widen


def test_the_default_data_directory_named_explicitly_is_the_default():
    """--data-dir /usr/share/datasets/fashion-mnist is the same config (and run directory) as
    no --data-dir; any other directory is recorded, resolved."""
    from bnlab.lab.data import DEFAULT_DIR
    from bnlab.lab.registry import get

    exp = get("ioffe2015.fig1")
    assert exp.config("smoke", data_dir=DEFAULT_DIR) == exp.config("smoke")
    assert exp.config("smoke", data_dir="rel/dir").data.dir.endswith("/rel/dir")


def test_ctrl_c_outside_a_run_is_a_word_not_a_traceback(capsys, monkeypatch):
    import bnlab.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_list", interrupted)
    assert cli.main(["list"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_resume_and_force_together_are_refused(capsys, tmp_path):
    """--force deletes the checkpoint --resume would continue from: never both."""
    argv = ["run", "ioffe2015.fig1", "--preset", "smoke", "--out", str(tmp_path / "r"),
            "--resume", "--force"]
    assert main(argv) == 2
    assert "--resume and --force conflict" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("text", ["{[]}", "{[1]: 2}", "{{1}}"])
def test_a_set_value_python_cannot_hash_is_a_typed_error_not_a_traceback(text):
    with pytest.raises(ValueError, match=r"--set optim.lr: expected float like 0.1, got str"):
        apply_overrides(Fig1Config(), [f"optim.lr={text}"])


@pytest.mark.parametrize("name", ["ioffe2015.lr_init", "ioffe2015.jacobian"])
def test_an_unknown_activation_is_refused_with_the_config(name, capsys, tmp_path):
    """It was refused inside the run, after its directory was made (and a name holding "/.."
    made one outside --out, which --force then emptied)."""
    argv = ["run", name, "--preset", "smoke", "--set", "acts=('/../../x',)",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "acts must hold names from ['relu', 'sigmoid', 'tanh'], got '/../../x'" in (
        capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_run_directories_stay_under_out(tmp_path):
    from bnlab.lab.runs import run_path

    assert run_path(tmp_path, "e", "p", "v", 0) == tmp_path / "e" / "p" / "v" / "seed0"
    for bad in ("..", "a/../../b", ""):
        with pytest.raises(ValueError, match="must be a plain name"):
            run_path(tmp_path, "e", "p", bad, 0)


def test_a_data_dir_that_is_a_file_says_so(capsys, tmp_path):
    (tmp_path / "f").write_text("")
    argv = ["run", "ioffe2015.fig1", "--preset", "smoke", "--data-dir", str(tmp_path / "f"),
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_too_many_threads_are_refused(capsys, tmp_path):
    import os

    argv = ["run", "ioffe2015.fig1", "--preset", "smoke", "--threads",
            str(4 * (os.cpu_count() or 1) + 1), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "--threads must be at most 4 ×" in capsys.readouterr().err


def test_a_reader_that_leaves_early_is_no_error(capsys, monkeypatch):
    """`bnlab list | head -1` exited 2 with "Broken pipe" when the pipe closed first."""
    import bnlab.cli as cli

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_list", closed)
    assert cli.main(["list"]) == 0
    assert "Broken pipe" not in capsys.readouterr().err


def test_a_relative_data_dir_set_is_recorded_resolved(tmp_path, monkeypatch):
    """`bnlab report` repeats the overrides in its resume command, which may run elsewhere."""
    import json

    from _lab_idx import write_dataset

    monkeypatch.chdir(tmp_path)
    write_dataset(tmp_path / "syn")
    assert main(["run", "ioffe2015.fig1", "--preset", "smoke", "--set", "data.dir=syn",
                 "--set", "train.steps=4", "--out", "r", "--quiet", "--threads", "1"]) == 0
    cfg = json.loads(next((tmp_path / "r").glob("**/config.json")).read_text())
    assert cfg["overrides"] == ["train.steps=4", f"data.dir={str(tmp_path / 'syn')!r}"]


def test_a_data_parallel_run_without_sync_bn_is_not_one_process_run(monkeypatch):
    """Its BN layers normalize by each shard's statistics: a finished one-process run of the
    same config was skipped as if it were the same run (and the other way round)."""
    from bnlab.lab import parallel
    from bnlab.lab.config import to_dict
    from bnlab.lab.registry import run_config

    cfg = Fig1Config()
    assert run_config(cfg) == to_dict(cfg)
    monkeypatch.setattr(parallel, "_STATE", parallel.Parallel(rank=0, world=2, sync_bn=True))
    assert run_config(cfg) == to_dict(cfg)  # equal to one process's: the same runs
    monkeypatch.setattr(parallel, "_STATE", parallel.Parallel(rank=0, world=2, sync_bn=False))
    assert run_config(cfg) == {**to_dict(cfg), "processes_without_sync_bn": 2}
