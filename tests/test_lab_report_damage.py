"""The report and the run command when what they read is damaged, stray or partial: files that
are not JSON, another tool's config.json under --runs, a section whose code fails, runs that
were all interrupted, table cells holding "|", and data or overrides that used to be taken
silently (non-uint8 pixels, empty sweeps, --set data.dir, a data set smaller than a batch)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from _lab_idx import idx_bytes, write_dataset
from bnlab.cli import main
from bnlab.lab import registry, runs
from bnlab.lab.data import load
from bnlab.lab.experiments.ioffe2015._heatmap import Grid, grid_figure
from bnlab.lab.experiments.ioffe2015.fig1 import Fig1Config
from bnlab.lab.models.inception import Inception
from bnlab.lab.models.mlp import MLP
from bnlab.lab.models.vgg import VGG
from bnlab.lab.registry import Experiment, get, run_experiment
from bnlab.lab.report import Table, _html, _md_table, write_report


@pytest.fixture(scope="module")
def fig1_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    data = write_dataset(root / "idx", n_train=200, n_test=60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(get("ioffe2015.fig1"), preset="smoke", data_dir=str(data),
                       out=root / "runs", progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "runs", data


def _copy(fig1_runs, tmp_path: Path) -> tuple[Path, Path]:
    runs_dir = tmp_path / "runs"
    shutil.copytree(fig1_runs[0], runs_dir)
    (tag,) = (runs_dir / "ioffe2015.fig1").iterdir()
    return runs_dir, tag


def test_damaged_and_stray_run_files_are_skipped_and_named(fig1_runs, tmp_path, capsys):
    runs_dir, tag = _copy(fig1_runs, tmp_path)
    (runs_dir / "other").mkdir()
    (runs_dir / "other" / "config.json").write_text('{"model_type": "bert"}')  # another tool's
    (tag / "nobn_lr0.1" / "seed0" / "summary.json").write_text('{"final_acc": 0.')  # cut
    assert main(["report", "--runs", str(runs_dir), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert "not a bnlab run (its config.json has no experiment, preset, variant, seed)" in err
    assert f"skipped {tag / 'nobn_lr0.1' / 'seed0'}: " in err and "summary.json is not JSON" in err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## ioffe2015.fig1" in md and "## Problems" in md
    # the damaged run counts as missing: the section says so and how to finish it
    assert "nobn_lr0.1 seed0" in md and "--resume --out" in md
    with pytest.raises(ValueError, match=r"summary.json is not JSON .*delete .*seed0 and run the "
                       r"command again to redo that run"):
        runs.Run(tag / "nobn_lr0.1" / "seed0").summary  # noqa: B018
    art = tag / "bn" / "seed0" / "broken.pt"
    art.write_bytes(b"PK\x03")
    with pytest.raises(ValueError, match=r"broken.pt cannot be read"):
        runs.Run(tag / "bn" / "seed0").load_artifact("broken")


def test_a_failing_section_leaves_the_others_and_exits_1(fig1_runs, tmp_path, capsys,
                                                         monkeypatch):
    runs_dir, _ = _copy(fig1_runs, tmp_path)
    exp = get("ioffe2015.fig1")

    def broken(_inputs):
        raise ZeroDivisionError("a bug in a report")

    fake = {**registry.all_experiments(), "ioffe2015.fig1": Experiment(
        exp.title, exp.claim, exp.presets, exp.runtime, exp.variants, exp.run, broken,
        name=exp.name)}
    monkeypatch.setattr(registry, "all_experiments", lambda: fake)
    assert main(["report", "--runs", str(runs_dir), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err
    assert "section ioffe2015.fig1 (preset smoke-" in err and "ZeroDivisionError" in err
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Not run yet" in md and "- section ioffe2015.fig1" in md


def test_the_report_cites_the_papers_and_refuses_an_unknown_verdict(fig1_runs, tmp_path,
                                                                   monkeypatch):
    runs_dir, _ = _copy(fig1_runs, tmp_path)
    exp = get("ioffe2015.fig1")

    def typo(inputs):  # a verdict the report's rules (and readers) do not know
        sec = exp.report(inputs)
        sec.verdict = "reproducd"
        return sec

    fake = {**registry.all_experiments(), "ioffe2015.fig1": Experiment(
        exp.title, exp.claim, exp.presets, exp.runtime, exp.variants, exp.run, typo,
        name=exp.name)}
    monkeypatch.setattr(registry, "all_experiments", lambda: fake)
    problems: list[str] = []
    write_report(runs_dir, tmp_path / "rep", problems)
    md = (tmp_path / "rep" / "report.md").read_text()
    html_text = (tmp_path / "rep" / "index.html").read_text()
    for text in (md, html_text):
        assert "arXiv:1502.03167v3" in text and "arXiv:1805.11604v3" in text
    assert len(problems) == 1 and "verdict must be one of" in problems[0]
    assert "'reproducd'" in problems[0]


def test_experiments_with_only_unfinished_runs_say_how_to_finish_them(fig1_runs, tmp_path):
    runs_dir, tag = _copy(fig1_runs, tmp_path)
    for summary in tag.glob("*/seed*/summary.json"):
        summary.unlink()
    write_report(runs_dir, tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    unfinished = md.split("## Unfinished", 1)[1].split("\n## ", 1)[0]
    data = str(fig1_runs[1].resolve())
    assert (f"`bnlab run ioffe2015.fig1 --preset smoke --seeds 1 --resume --out {runs_dir} "
            f"--data-dir {data}`") in unfinished
    assert "`ioffe2015.fig1`: `bnlab run" not in md.split("## Not run yet", 1)[1]


def test_tables_and_prose_survive_markdown_and_html():
    md = _md_table(Table(["layer", "median |log10 s|"], [["1", "|x|"]]))
    header, rule, row = md.splitlines()
    cells = lambda line: len(line.replace("\\|", "").split("|")) - 2  # noqa: E731
    assert cells(header) == cells(rule) == cells(row) == 2
    assert _html("run `bnlab report` <now>") == "run <code>bnlab report</code> &lt;now&gt;"


def test_a_heatmap_at_or_below_chance_is_drawn():
    grid = Grid("below chance", [0.1, 1.0], [1.0], [[0.08, 0.05]], [[0, 1]])
    assert grid_figure([grid], 0.01)[:4] == b"\x89PNG"


def test_pixels_other_than_uint8_are_refused(tmp_path):
    data = write_dataset(tmp_path / "idx", n_train=40, n_test=20, gz=False)
    images = data / "train-images-idx3-ubyte"
    floats = np.zeros((40, 28, 28), ">f4")  # IDX type 0x0d, big-endian float32
    images.write_bytes(bytes([0, 0, 0x0D, 3]) + b"".join(
        int(d).to_bytes(4, "big") for d in floats.shape) + floats.tobytes())
    cfg = Fig1Config().data.__class__(dir=str(data))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte must hold uint8 pixels "
                       r"\(IDX type 0x08\), as MNIST-format images do, got >f4"):
        load(cfg)
    assert idx_bytes(np.zeros((1, 2, 2)))[2] == 0x08  # the helper writes uint8


@pytest.mark.parametrize("argv, message", [
    (["ioffe2015.dropout", "--set", "rates=()"], "rates must be a non-empty tuple, got ()"),
    (["santurkar2018.fig4", "--set", "vgg_multipliers=()"], "vgg_multipliers must be a "
     "non-empty tuple"),
    (["ioffe2015.fig1", "--set", "data.dir=''"], "--set data.dir: expected a directory, got ''"),
])
def test_overrides_that_would_run_nothing_are_refused_up_front(argv, message, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["run", *argv, "--preset", "smoke", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_set_data_dir_is_data_dir(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "idx", n_train=40, n_test=20)
    exp = get("ioffe2015.fig1")
    monkeypatch.chdir(tmp_path)
    by_flag = exp.config("smoke", [], str(data))
    assert exp.config("smoke", ["data.dir='idx'"]) == by_flag  # relative, resolved
    default = registry.data_mod.DEFAULT_DIR
    assert exp.config("smoke", [f"data.dir={default!r}"]) == exp.presets["smoke"]
    with pytest.raises(ValueError, match=r"--data-dir .* and --set data.dir=.* name different"):
        exp.config("smoke", [f"data.dir={str(data)!r}"], str(tmp_path))


def test_a_variant_free_config_and_a_data_set_smaller_than_a_batch(tmp_path, monkeypatch):
    exp = get("ioffe2015.fig1")
    data = write_dataset(tmp_path / "idx", n_train=10, n_test=20)
    with pytest.raises(ValueError, match=r"train.batch_size is 20, more than the 10 training "
                       r"examples in .*idx; lower it with --set train.batch_size"):
        run_experiment(exp, preset="smoke", data_dir=str(data), out=tmp_path / "runs",
                       progress=False)
    assert not (tmp_path / "runs").exists()
    empty = Experiment(exp.title, exp.claim, exp.presets, exp.runtime, lambda cfg: [], exp.run,
                       exp.report, name=exp.name, uses_data=False)
    with pytest.raises(ValueError, match=r"the config gives no variant to run"):
        run_experiment(empty, preset="smoke", out=tmp_path / "runs", progress=False)


def test_the_lab_leaves_the_matplotlib_backend_alone(tmp_path):
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); import bnlab.lab.registry as r; "
            "r.all_experiments(); from bnlab.lab.experiments.ioffe2015._heatmap import Grid, "
            "grid_figure; grid_figure([Grid('g', [1.0], [1.0], [[0.5]], [[0]])], 0.01); "
            "print(matplotlib.get_backend())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"MPLBACKEND": "TkAgg", "PATH": "/usr/bin:/bin",
                                          "HOME": str(tmp_path)})
    assert out.stdout.strip() == "svg"  # (importing the lab switched it to Agg)


def test_train_mode_evaluation_takes_a_last_batch_of_one_and_keeps_module_modes():
    from torch import nn

    from bnlab.lab.train import evaluate
    from bnlab.variants import NoisyBatchNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), NoisyBatchNorm(6, seed=0), nn.Linear(6, 3))
    model.train()
    model[1].noise.eval()  # the documented way to switch the noise off
    x, y = torch.randn(21, 4), torch.randint(0, 3, (21,))
    acc, loss = evaluate(model, x, y, batch_size=10, train_mode=True)  # 10, 11 (not 10, 10, 1)
    assert 0 <= acc <= 1 and loss == loss
    evaluate(model, x, y)
    assert model.training and model[1].training and not model[1].noise.training


@pytest.mark.parametrize("build, message", [
    (lambda: Inception(width=0), r"Inception: width must be a finite number > 0, got 0"),
    (lambda: VGG(config="vgg16"), r"VGG: config must be one of vgg11, .*got 'vgg16'"),
    (lambda: VGG(hidden=0), r"VGG: hidden must be an integer >= 1, got 0"),
    (lambda: VGG(width=float("inf")), r"VGG: width must be a finite number > 0, got inf"),
    (lambda: MLP(hidden=(100, 0)), r"MLP: hidden\[1\] must be an integer >= 1, got 0"),
    (lambda: MLP(in_features=0), r"MLP: in_features must be an integer >= 1, got 0"),
])
def test_model_builders_name_bad_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_the_vgg_takes_non_square_images():
    torch.manual_seed(0)
    net = VGG(10, image_size=(28, 64), width=0.125)
    assert net(torch.randn(2, 1, 28, 64)).shape == (2, 10)
    square = VGG(10, image_size=(28, 28), width=0.125)
    torch.manual_seed(1)
    a = VGG(10, image_size=28, width=0.125)
    torch.manual_seed(1)
    b = VGG(10, image_size=(28, 28), width=0.125)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert square(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"VGG: image_width must be an integer >= 1, got 0"):
        VGG(10, image_size=(28, 0))
