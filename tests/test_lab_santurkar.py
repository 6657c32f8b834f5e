"""Santurkar et al. (2018) experiments: smoke runs of all six on synthetic IDX data, their probes
in metrics.jsonl, the report sections, and the promises the experiments rely on (probes never
change training; a resumed noisy-BN run reproduces its noise; norm names and variant names)."""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F

from _lab_idx import write_dataset
from bnlab.lab import runs
from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig
from bnlab.lab.data import Dataset
from bnlab.lab.experiments.santurkar2018._common import (
    NORMS,
    make_norm,
    parse_variant,
    variant_name,
)
from bnlab.lab.experiments.santurkar2018._probes import (
    ICSProbe,
    LandscapeProbe,
    LayerDistributions,
    vgg_layer_outputs,
)
from bnlab.lab.models import VGG
from bnlab.lab.registry import all_experiments, run_experiment
from bnlab.lab.report import write_report
from bnlab.lab.train import fit
from bnlab.variants import ActivationNoise, LpNorm, NoisyBatchNorm

NAMES = ["santurkar2018.fig1", "santurkar2018.fig2", "santurkar2018.fig3", "santurkar2018.fig4",
         "santurkar2018.fig5", "santurkar2018.dln"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one thread is faster, and robust on a machine shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("santurkar")
    data = write_dataset(root / "idx")
    exps = all_experiments()
    done = {n: run_experiment(exps[n], preset="smoke", data_dir=str(data), out=root / "runs",
                              progress=False) for n in NAMES}
    return root, done


def _metrics(done, name, variant):
    (run,) = [r for r in done[name] if r.meta["variant"] == variant]
    return run, run.metrics()


def test_every_experiment_is_registered_with_docstring_and_presets():
    import importlib

    exps = all_experiments()
    for name in NAMES:
        assert {"smoke", "quick", "paper"} <= set(exps[name].presets), name
        doc = importlib.import_module(f"bnlab.lab.experiments.{name}").__doc__
        assert f"bnlab run {name}" in doc and "Runtime here" in doc, name
        if name != "santurkar2018.dln":
            assert "Fashion-MNIST" in doc, name  # the substitution is stated


def test_smoke_runs_finish_and_log_their_probes(smoke):
    _, done = smoke
    exps = all_experiments()
    for name in NAMES:
        cfg = exps[name].config("smoke")
        assert [r.meta["variant"] for r in done[name]] == exps[name].variants(cfg)
        assert all(r.finished for r in done[name])
    _, m = _metrics(done, "santurkar2018.fig1", "vgg-bn-lr0.1")
    assert {"3", "11"} <= set(m[-1]["dist"]) and len(m[-1]["dist"]["3"]["q"]) == 5
    assert 0.0 <= m[-1]["train_acc"] <= 1.0
    _, m = _metrics(done, "santurkar2018.fig2", "vgg-noisy_bn-lr0.1")
    assert set(m[-1]["dist"]) == {str(k) for k in range(1, 14)}
    _, m = _metrics(done, "santurkar2018.fig3", "dln-bn-lr1e-07")
    probed = [r for r in m if "ics" in r]
    assert probed and set(probed[-1]["ics"]) == {"layer_9", "layer_17"}
    assert "ics" not in m[0]  # step 0 has no batch to probe
    _, m = _metrics(done, "santurkar2018.fig4", "vgg-none-lr0.1")
    land = [r["landscape"] for r in m if "landscape" in r]
    assert land and land[-1]["step_sizes"] == pytest.approx([0.05, 0.1, 0.2, 0.4])
    assert land[-1]["loss_min"] <= land[-1]["loss_max"]
    run, m = _metrics(done, "santurkar2018.dln", "dln-bn-lr1e-06")
    assert all(isinstance(r["loss"], float) for r in m) and run.summary["final_loss"] > 0
    assert run.summary["final_acc"] is None  # a regression: no accuracy


def test_report_has_a_section_per_experiment(smoke, tmp_path):
    root, _ = smoke
    write_report(root / "runs", tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    for name in NAMES:
        assert f"## {name} — " in md, name
    sections = md.split("\n## ")[1:]
    ours = [s for s in sections if s.startswith("santurkar2018.")]
    assert len(ours) == len(NAMES)
    for s in ours:
        assert "**Verdict: " in s and "Paper's numbers" in s and "![" in s
        assert "Rule" in s  # the verdict states its rule
    vgg = [s for s in ours if not s.startswith("santurkar2018.dln")]
    assert all("Fashion-MNIST" in s and "CIFAR-10" in s for s in vgg)


def _tiny(norm: str, seed: int = 0) -> VGG:
    torch.manual_seed(seed)
    return VGG(10, image_size=12, config=(4, "M", 4, "M"), width=1.0, hidden=8,
               norm_layer=make_norm(norm, seed=seed))


def _data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 12, 12, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    return Dataset(x[:64], y[:64], x[64:], y[64:], "synthetic")


def _fit(model, data, path, probes, steps=8, resume=False):
    meta = {"experiment": "t", "preset": "t", "variant": "v", "seed": 0, "config": {}}
    run, _ = runs.prepare(path, meta, resume=resume)
    return fit(model, data, run, train=TrainConfig(steps=steps, batch_size=16, eval_every=2,
                                                   checkpoint_every=2),
               optim=OptimConfig(lr=0.1, momentum=0.0), data_cfg=DataConfig(), seed=0,
               probes=probes, progress=False, resume=resume), run


@pytest.mark.parametrize("norm", ["bn", "noisy_bn"])
def test_probes_do_not_change_training(tmp_path, norm):
    data = _data()
    plain = _tiny(norm)
    _fit(plain, data, tmp_path / "plain", [])
    probed = _tiny(norm)
    probes = [ICSProbe(probed.layers(), [2, 3], F.cross_entropy),
              LandscapeProbe([0.5, 1, 2, 4], F.cross_entropy),
              LayerDistributions(probed, vgg_layer_outputs(probed, [1, 2, 4]), data.train_x[:8])]
    _, run = _fit(probed, data, tmp_path / "probed", probes)
    assert any("ics" in m and "landscape" in m and "dist" in m for m in run.metrics())
    for (k, a), b in zip(plain.state_dict().items(), probed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


class _InterruptAt:
    """A probe that presses Ctrl-C at one step: `fit` then checkpoints and stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, ctx):
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return {}


@pytest.mark.parametrize("norm", ["noisy_bn", "noise"])
def test_resumed_noisy_run_reproduces_its_noise(tmp_path, norm):
    """`fit` keeps the noise modules' generators (in no state_dict) in its checkpoint."""
    data = _data()
    whole = _tiny(norm)
    _fit(whole, data, tmp_path / "whole", [])
    first = _tiny(norm)
    with pytest.raises(KeyboardInterrupt):
        _fit(first, data, tmp_path / "cut", [_InterruptAt(4)])
    again = _tiny(norm)
    _fit(again, data, tmp_path / "cut", [lambda ctx: {}], resume=True)
    for (k, a), b in zip(whole.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("noise_state", [True, False])
def test_a_checkpoint_of_the_old_layout_still_resumes(tmp_path, noise_state):
    """Checkpoints of bnlab before 2026-12-08 hold torch's global state alone as "rng", and the
    VGG runs kept the noise generators as a last probe's state (NoiseState): such a checkpoint
    resumes to the uninterrupted run; without that probe's state the noise restarts from its
    seeds, the run differs, and a warning says so."""
    data = _data()
    whole = _tiny("noisy_bn")
    _fit(whole, data, tmp_path / "whole", [])
    first = _tiny("noisy_bn")
    with pytest.raises(KeyboardInterrupt):
        _fit(first, data, tmp_path / "cut", [_InterruptAt(4)])
    run = runs.Run(tmp_path / "cut")
    state = run.load_checkpoint()
    rng = state["rng"][0]
    state["rng"] = rng["torch"]  # the old layout: one ByteTensor ...
    if noise_state:  # ... and the generators as NoiseState's state, after the other probes'
        state["probes"] = [*state["probes"], {"generators": rng["noise"]}]
    run.save_checkpoint(state)
    again = _tiny("noisy_bn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(again, data, tmp_path / "cut", [lambda ctx: {}], resume=True)
    same = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(),
                                                  again.state_dict().values(), strict=True))
    restart = [w for w in caught if "generators restart from their seeds" in str(w.message)]
    assert same == noise_state and bool(restart) != noise_state


def test_norm_names_build_the_right_layers_with_seeds_from_the_run_seed():
    assert make_norm("none", seed=0) is None
    assert isinstance(make_norm("noisy_bn", seed=0)(4), NoisyBatchNorm)
    assert isinstance(make_norm("noise", seed=0)(4), ActivationNoise)
    for name, p in (("l1", 1.0), ("l2", 2.0), ("linf", float("inf"))):
        layer = make_norm(name, seed=0)(4)
        assert isinstance(layer, LpNorm) and layer.p == p
    a, b, c = (make_norm("noise", seed=s) for s in (3, 3, 4))
    seeds = [[f(4).seed for _ in range(3)] for f in (a, b, c)]
    assert seeds[0] == seeds[1] == [3000, 3001, 3002] and seeds[2] == [4000, 4001, 4002]
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("batchnorm", seed=0)
    assert set(NORMS) == {"none", "bn", "noisy_bn", "noise", "l1", "l2", "linf"}


def test_variant_names_round_trip():
    for model, norm, lr in (("vgg", "noisy_bn", 0.1), ("dln", "bn", 1e-6), ("dln", "linf", 1e-7)):
        assert parse_variant(variant_name(model, norm, lr)) == (model, norm, lr)
    with pytest.raises(ValueError, match="variant must look like"):
        parse_variant("mlp-bn-lr0.1")
