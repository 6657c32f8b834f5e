"""Smoke runs of every registered experiment on synthetic IDX data, the report built from them,
and the lab's models (norm_layer injected, the paper's placement of BN)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _lab_idx import write_dataset
from bnlab import BatchNorm1d, BatchNorm2d
from bnlab.lab.models import MLP, Inception, norm_factory
from bnlab.lab.registry import PRESETS, all_experiments, run_experiment
from bnlab.lab.report import write_report

EXPERIMENTS = all_experiments()


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every experiment's smoke preset, seeds 0 and 1 for fig1 (the report aggregates them)."""
    root = tmp_path_factory.mktemp("lab")
    data = write_dataset(root / "idx")
    out = root / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and robust on a shared machine
    try:
        done = {name: run_experiment(exp, preset="smoke",
                                     seeds=2 if name.endswith("fig1") else 1,
                                     data_dir=str(data), out=out, progress=False)
                for name, exp in EXPERIMENTS.items()}
    finally:
        torch.set_num_threads(threads)
    return out, done, data


def test_every_experiment_is_registered_with_three_presets_and_a_docstring():
    assert {"ioffe2015.fig1", "ioffe2015.fig2", "ioffe2015.alg2", "ioffe2015.ensemble"} <= set(
        EXPERIMENTS)
    import importlib

    for name, exp in EXPERIMENTS.items():
        assert set(PRESETS) <= set(exp.presets) and set(PRESETS) <= set(exp.runtime), name
        doc = importlib.import_module(f"bnlab.lab.experiments.{name}").__doc__
        assert doc and f"bnlab run {name}" in doc and "Runtime here" in doc, name


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_smoke_run_finishes_every_variant(smoke_runs, name):
    _, done, _ = smoke_runs
    exp = EXPERIMENTS[name]
    cfg = exp.config("smoke")
    seeds = 2 if name.endswith("fig1") else 1
    assert len(done[name]) == seeds * len(exp.variants(cfg))
    for run in done[name]:
        s = run.summary
        assert run.finished and not run.checkpoint_path.exists()
        # regression runs (the deep linear network) have no accuracy
        assert s["steps"] > 0 and (s["diverged"] or (s["final_acc"] is None and "final_loss" in s)
                                   or 0.0 <= s["final_acc"] <= 1.0)
        assert (run.path / "env.json").exists() and run.metrics()[0]["step"] == 0


def test_alg2_records_every_inference_estimator(smoke_runs):
    _, done, _ = smoke_runs
    for run in done["ioffe2015.alg2"]:
        last = [m for m in run.metrics() if "acc_alg2" in m][-1]
        for key in ("acc_ema", "acc_alg2", "acc_cumulative", "acc_train_mode"):
            assert 0.0 <= last[key] <= 1.0, (run.path, key)


def test_rerunning_a_finished_experiment_skips_it(smoke_runs, capsys):
    out, _, data = smoke_runs
    exp = EXPERIMENTS["ioffe2015.alg2"]
    again = run_experiment(exp, preset="smoke", data_dir=str(data), out=out, progress=False)
    assert all(r.finished for r in again)
    assert "skip" in capsys.readouterr().err


def test_report_from_finished_smoke_runs(smoke_runs, tmp_path):
    out, _, _ = smoke_runs
    html_path = write_report(out, tmp_path / "report")
    html = html_path.read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    for name in EXPERIMENTS:
        assert name in md and name in html
    assert html.count("data:image/png;base64,") >= 4  # fig1 (2), fig2 (1), alg2 (1)
    assert "src='figures" not in html  # self-contained
    assert md.count("**Verdict: ") == len(EXPERIMENTS)
    assert "Fashion-MNIST" in md and "Paper's numbers" in md
    assert " ± " in md  # fig1 ran two seeds: mean ± std
    assert len(list((tmp_path / "report" / "figures").glob("*.png"))) >= 4


def test_mlp_places_bn_before_each_sigmoid_without_bias():
    m = MLP(norm_layer=norm_factory("bn", conv=False), activation=nn.Sigmoid)
    kinds = [type(x) for x in m.hidden]
    assert kinds == [nn.Linear, BatchNorm1d, nn.Sigmoid] * 3
    assert all(x.bias is None for x in m.hidden if isinstance(x, nn.Linear))
    plain = MLP()
    assert [type(x) for x in plain.hidden] == [nn.Linear, nn.Sigmoid] * 3
    assert all(x.bias is not None for x in plain.hidden if isinstance(x, nn.Linear))
    assert m(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert len(m.nonlinearities()) == 3


def test_inception_takes_norm_and_activation():
    bn = Inception(norm_layer=BatchNorm2d, width=0.5, dropout=0.1)
    convs = [x for x in bn.modules() if isinstance(x, nn.Conv2d)]
    norms = [x for x in bn.modules() if isinstance(x, BatchNorm2d)]
    assert len(convs) == len(norms) and all(c.bias is None for c in convs)
    plain = Inception(activation=nn.Sigmoid, lrn=True, width=0.5)
    assert not any(isinstance(x, BatchNorm2d) for x in plain.modules())
    assert any(isinstance(x, nn.LocalResponseNorm) for x in plain.modules())
    assert any(isinstance(x, nn.Sigmoid) for x in plain.modules())
    assert bn(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    with pytest.raises(ValueError, match="norm must be one of"):
        norm_factory("layer", conv=True)
