"""Santurkar et al. 2018, Figure 1 (Sec. 2, App. A.1): a VGG with and without BN at learning
rates 0.1 and 0.5, training and test accuracy against steps, and the distribution of layer #3's
and #11's inputs over training (Fig. 1c).

Claim: BN trains faster and to higher accuracy, and allows lr 0.5 at which the standard net does
not train; yet the layer distributions of the two nets differ "much less" than ICS would predict.

Paper's numbers (CIFAR-10, 15k steps, batch 128): test accuracy 83% with BN, 80% without, at lr
0.1; at lr 0.5 the standard VGG stays near 10% (chance) while BN trains (read from plot).

Substitution and scaling (Fashion-MNIST instead of CIFAR-10, said in every output): the VGG-13-style
net of `bnlab.lab.models.VGG` at width 0.125 (channels 8…64, hidden 64; ≈0.15M parameters) on
28×28 grey images; paper preset 1,500 steps (3.2 epochs) instead of 15,000; plain SGD (no
momentum or weight decay), batch 128, no augmentation, Glorot init — the paper's settings.
Training accuracy: eval mode on a fixed 2,000-image training subset; test accuracy on 2,000
held-out images every 100 steps, and on 10,000 at the end (the summary's ``train_acc``,
``test_acc``). Distributions: 5/15/50/85/95th percentiles of the pre-activations (norm output)
of layers #3 and #11 on a fixed batch of 256 training images, in training mode, every 100 steps.

Runtime here (2 shared cores, ``--threads 1``, ≈0.07 s per step quiet, ≈0.2 s under the load of
four helpers): paper ≈8–20 min (4 runs × 1,500 steps; a diverging run stops early), quick ≈2–5
min, smoke seconds. With ``--threads 2`` on a quiet machine the paper preset took 215 s
(2026-11-22).

Command: ``bnlab run santurkar2018.fig1 --preset paper --threads 1 [--seeds 3]`` then
``bnlab report``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from bnlab.lab import plots
from bnlab.lab.config import (
    DataConfig,
    OptimConfig,
    TrainConfig,
    at_least,
    nonempty,
    positive,
    within,
)
from bnlab.lab.data import Dataset
from bnlab.lab.experiments.santurkar2018._common import (
    SMOKE_DATA,
    SMOKE_VGG,
    VGGSpec,
    run_vgg,
    variant_name,
    vgg_substitution,
)
from bnlab.lab.experiments.santurkar2018._probes import LayerDistributions, vgg_layer_outputs
from bnlab.lab.experiments.santurkar2018._report import (
    curves_figure,
    per_run,
    percentile_panel,
    verdict,
)
from bnlab.lab.registry import Experiment, RunContext
from bnlab.lab.report import Inputs, Section, Table, mean_std
from bnlab.lab.train import Probe


@dataclass(frozen=True)
class Fig1Config:
    data: DataConfig = DataConfig(eval_examples=2_000)
    train: TrainConfig = TrainConfig(steps=1_500, batch_size=128, eval_every=100,
                                     checkpoint_every=500)
    optim: OptimConfig = OptimConfig(lr=0.1, momentum=0.0)  # "standard SGD"; lr per variant
    vgg: VGGSpec = VGGSpec()
    lrs: tuple[float, ...] = (0.1, 0.5)
    layers: tuple[int, ...] = (3, 11)  # Fig. 1c
    dist_examples: int = 256

    def __post_init__(self) -> None:
        nonempty(self, "lrs layers")
        positive(self, "lrs")
        within(self, "layers", 1, 13)  # the VGG's 13 layers: 10 conv, 3 linear
        at_least(self, "dist_examples", 1)


PRESETS = {
    "paper": Fig1Config(),
    "quick": Fig1Config(train=TrainConfig(steps=400, batch_size=128, eval_every=50,
                                          checkpoint_every=200)),
    "smoke": Fig1Config(data=SMOKE_DATA,
                        train=TrainConfig(steps=12, batch_size=32, eval_every=6,
                                          checkpoint_every=6),
                        vgg=SMOKE_VGG,
                        dist_examples=32),
}


def variants(cfg: Fig1Config) -> list[str]:
    return [variant_name("vgg", n, lr) for lr in cfg.lrs for n in ("bn", "none")]


def run(cfg: Fig1Config, variant: str, ctx: RunContext) -> dict[str, Any]:
    def probes(model: nn.Module, data: Dataset) -> list[Probe]:
        return [LayerDistributions(model, vgg_layer_outputs(model, cfg.layers),
                                   data.train_x[-cfg.dist_examples:])]

    return run_vgg(cfg.data, cfg.train, cfg.optim, cfg.vgg, variant, ctx, probes)


def _auc(metrics: list[dict[str, Any]]) -> float | None:
    """Mean training accuracy over the logged steps (area under the curve / length)."""
    vals = [m["train_acc"] for m in metrics if "train_acc" in m]
    return statistics.fmean(vals) if vals else None


def _drift(layer: str) -> Callable[[list[dict[str, Any]]], float | None]:
    """How far the layer's distribution travels: the mean over the 5/15/50/85/95th percentiles
    of |late − early| (averages over the last and first 20% of the records), in units of the
    late 5–95% spread."""

    def fn(metrics: list[dict[str, Any]]) -> float | None:
        recs = [m["dist"][layer]["q"] for m in metrics if "dist" in m and layer in m["dist"]]
        if len(recs) < 5:
            return None
        k = max(1, len(recs) // 5)
        early = [statistics.fmean(q[j] for q in recs[:k]) for j in range(5)]
        late = [statistics.fmean(q[j] for q in recs[-k:]) for j in range(5)]
        move = statistics.fmean(abs(a - b) for a, b in zip(early, late, strict=True))
        return move / max(late[4] - late[0], 1e-8)

    return fn


def report(inp: Inputs) -> Section:
    cfg = inp.config
    lo, hi = cfg["lrs"][0], cfg["lrs"][-1]
    names = variants(Fig1Config(lrs=tuple(cfg["lrs"])))
    figures = [("Figure 1(a, b) on Fashion-MNIST (not CIFAR-10): training accuracy (fixed "
                f"{cfg['vgg']['train_acc_examples']:,} training images, eval mode) and test "
                "accuracy against steps, mean ± std over seeds",
                curves_figure(inp, names, [("train_acc", "training accuracy"),
                                           ("acc", "test accuracy")], "Fig. 1"))]
    fig, axes = plots.figure(2 * len(cfg["layers"]), width=3.4)
    i = 0
    for layer in cfg["layers"]:
        for norm, name in (("none", "Standard"), ("bn", "BN")):
            percentile_panel(axes[i], inp, variant_name("vgg", norm, lo), str(layer),
                             f"{name}, layer #{layer}, lr {lo:g}")
            i += 1
    figures.append((f"Figure 1(c) on Fashion-MNIST: 5/15/50/85/95th percentiles (bands, median "
                    f"line) of the pre-activations of layers {cfg['layers']} over training, "
                    "fixed batch of training images in training mode, seed 0",
                    plots.to_png(fig)))
    v = {(n, lr): variant_name("vgg", n, lr) for n in ("bn", "none") for lr in (lo, hi)}
    # A diverged seed counts as chance accuracy (`Inputs.scored`), in the table and the checks.
    tr = {k: inp.scored(name, "train_acc") for k, name in v.items()}
    te = {k: inp.scored(name, "test_acc") for k, name in v.items()}
    div = {k: inp.diverged(name) for k, name in v.items()}
    auc = {k: per_run(inp, name, _auc) for k, name in v.items()}
    rows = [[f"{'BN' if n == 'bn' else 'Standard'}, lr {lr:g}", mean_std(tr[(n, lr)]),
             mean_std(te[(n, lr)]), mean_std(auc[(n, lr)]), str(div[(n, lr)])]
            for (n, lr) in v]
    checks = []
    mean = statistics.fmean
    if tr[("bn", hi)] and tr[("none", hi)]:
        bn_trains = mean(tr[("bn", hi)]) >= 0.5
        std_fails = mean(tr[("none", hi)]) < 0.2
        checks.append((bn_trains and std_fails,
                       f"at lr {hi:g} BN {'trains' if bn_trains else 'does not train'} and the "
                       f"standard net {'does not' if std_fails else 'does'} "
                       f"(final training accuracy {mean_std(tr[('bn', hi)])} vs "
                       f"{mean_std(tr[('none', hi)])}, {div[('none', hi)]} diverged)"))
    if te[("bn", lo)] and te[("none", lo)]:
        ok = mean(te[("bn", lo)]) > mean(te[("none", lo)])
        checks.append((ok, f"at lr {lo:g} BN's final test accuracy is "
                       f"{'higher' if ok else 'not higher'} ({mean_std(te[('bn', lo)])} vs "
                       f"{mean_std(te[('none', lo)])})"))
    if auc[("bn", lo)] and auc[("none", lo)]:
        ok = mean(auc[("bn", lo)]) > mean(auc[("none", lo)])
        checks.append((ok, f"BN trains {'faster' if ok else 'not faster'} (mean training "
                       f"accuracy over the run {mean_std(auc[('bn', lo)])} vs "
                       f"{mean_std(auc[('none', lo)])})"))
    drift_rows = [[f"#{layer}", mean_std(per_run(inp, v[("none", lo)], _drift(str(layer))),
                                         "{:.3f}"),
                   mean_std(per_run(inp, v[("bn", lo)], _drift(str(layer))), "{:.3f}")]
                  for layer in cfg["layers"]]
    held = sum(ok for ok, _ in checks)
    return Section(grades_divergence=True,
        title="Figure 1: VGG with and without BN (Fashion-MNIST)",
        claim="BN trains faster and better, and trains at lr 0.5 where the standard VGG does "
              "not; the layer distributions with and without BN differ only mildly.",
        paper="CIFAR-10, 15k steps of 128: test accuracy 83% with BN vs 80% without at lr 0.1; "
              "at lr 0.5 the standard VGG stays at ≈10% (chance) while BN trains (read from "
              "plot); Fig. 1c: histograms of layers #3 and #11 look alike with and without BN.",
        substitution=vgg_substitution(cfg),
        verdict=verdict(held, len(checks)),
        why="Rule: every check below must hold for 'reproduced', at least half for 'partly'. "
            + "; ".join(text for _, text in checks) + ".",
        tables=[Table(["variant", "final training acc", "final test acc",
                       "mean training acc over the run", "diverged seeds"], rows,
                      "Fashion-MNIST VGG, mean ± std over seeds, a diverged seed's final "
                      "accuracy counting as chance, 0.1 (final accuracies on "
                      f"{cfg['vgg']['final_examples']:,} images)"),
                Table(["layer", "Standard", "BN"], drift_rows,
                      f"Distribution drift at lr {lo:g}: mean |percentile, last 20% − first 20% "
                      "of training| / final 5–95% spread (not in the verdict: the paper's "
                      "claim here is qualitative; –: fewer than 5 distribution records, as in "
                      "a short run)")],
        figures=figures)


EXPERIMENT = Experiment(
    title="Figure 1: VGG with and without BN at lr 0.1 and 0.5 (Fashion-MNIST)",
    claim="BN trains faster, better and at lr 0.5 where the standard VGG fails",
    presets=PRESETS, runtime={"smoke": "5 s", "quick": "2-5 min", "paper": "3.5-20 min"},
    variants=variants, run=run, report=report)
