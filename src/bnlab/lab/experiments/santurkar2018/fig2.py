"""Santurkar et al. 2018, Figure 2 (Sec. 2.1, App. A.2.1, Algorithm 1; stability as in Fig. 8):
the standard VGG, VGG with BN and VGG with "noisy" BN (BN followed by Algorithm 1's per-step,
per-channel random shift and scale), plus the paper's control: the same noise added to the
standard net (variant ``noise``).

Claim: noisy BN has *less* stable layer distributions than even the standard net, yet trains
about as well as BN, and both train better than the standard net; the same noise on the standard
net "prevents it from training entirely".

Paper's numbers (CIFAR-10): the training-accuracy difference between BN and noisy BN "is almost
non-existent"; Fig. 8's per-layer |μ_{t+1} − μ_t| and |σ²_{t+1} − σ²_t| are much larger (up to
≈1) for noisy BN than for standard or BN (read from plot). No numbers for the noise control.

Substitution and scaling: as ``santurkar2018.fig1`` (Fashion-MNIST instead of CIFAR-10; VGG
width 0.125; paper preset 1,500 steps instead of 15,000; plain SGD at lr 0.1, batch 128). Noise
constants n_μ = 0.5, n_σ = 1.25, r_μ = r_σ = 0.1 (r_σ read as a std), seeds derived from the run
seed; the noise is drawn in training mode, and accuracy (eval mode) applies its expectation
E[s] = 1.125 per layer (runs before 2026-12-07 evaluated without it, which understated noisy
BN by 12–38 points). Distributions: per-channel mean and variance and the
5/15/50/85/95th percentiles of every layer's pre-activation (norm + noise output; the logits for
layer #13) on a fixed batch of 256 training images, in training mode (so with the noise, as the
next layer sees it), every 100 steps. Stability = mean over records and channels of
|μ_{t+1} − μ_t| and |σ²_{t+1} − σ²_t| (`bnlab.diagnostics.distribution_shift`).

Runtime here (2 shared cores, ``--threads 1``): paper ≈8–20 min (4 runs × 1,500 steps; quiet vs
loaded machine), quick ≈2–5 min, smoke seconds. With ``--threads 2`` on a quiet machine the paper
preset took 296 s (2026-11-22).

Command: ``bnlab run santurkar2018.fig2 --preset paper --threads 1 [--seeds 3]`` then
``bnlab report``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from torch import nn

from bnlab.lab import plots
from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig, at_least, nonempty, within
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
    grid,
    label,
    per_run,
    percentile_panel,
    stability,
    var_stability,
    verdict,
)
from bnlab.lab.registry import Experiment, RunContext
from bnlab.lab.report import Inputs, Section, Table, mean_std
from bnlab.lab.train import Probe

NORMS = ("none", "bn", "noisy_bn", "noise")


@dataclass(frozen=True)
class Fig2Config:
    data: DataConfig = DataConfig(eval_examples=2_000)
    train: TrainConfig = TrainConfig(steps=1_500, batch_size=128, eval_every=100,
                                     checkpoint_every=500)
    optim: OptimConfig = OptimConfig(lr=0.1, momentum=0.0)
    vgg: VGGSpec = VGGSpec()
    layers: tuple[int, ...] = tuple(range(1, 14))  # all 13 for stability
    shown: tuple[int, ...] = (2, 9, 13)  # the layers of Fig. 2
    dist_examples: int = 256

    def __post_init__(self) -> None:
        nonempty(self, "layers shown")
        within(self, "layers shown", 1, 13)  # the VGG's 13 layers: 10 conv, 3 linear
        at_least(self, "dist_examples", 1)
        if not set(self.shown) <= set(self.layers):
            raise ValueError(f"shown must be among layers {self.layers}, got {self.shown}")


PRESETS = {
    "paper": Fig2Config(),
    "quick": Fig2Config(train=TrainConfig(steps=400, batch_size=128, eval_every=50,
                                          checkpoint_every=200)),
    "smoke": Fig2Config(data=SMOKE_DATA,
                        train=TrainConfig(steps=12, batch_size=32, eval_every=6,
                                          checkpoint_every=6),
                        vgg=SMOKE_VGG,
                        dist_examples=32),
}


def variants(cfg: Fig2Config) -> list[str]:
    return [variant_name("vgg", n, cfg.optim.lr) for n in NORMS]


def run(cfg: Fig2Config, variant: str, ctx: RunContext) -> dict[str, Any]:
    def probes(model: nn.Module, data: Dataset) -> list[Probe]:
        return [LayerDistributions(model, vgg_layer_outputs(model, cfg.layers),
                                   data.train_x[-cfg.dist_examples:])]

    return run_vgg(cfg.data, cfg.train, cfg.optim, cfg.vgg, variant, ctx, probes)


def report(inp: Inputs) -> Section:
    cfg = inp.config
    lr = cfg["optim"]["lr"]
    v = {n: variant_name("vgg", n, lr) for n in NORMS}
    shown = [str(k) for k in cfg["shown"]]
    figures = [("Figure 2 on Fashion-MNIST (not CIFAR-10): training accuracy (fixed "
                f"{cfg['vgg']['train_acc_examples']:,} training images, eval mode, the noise's "
                "expectation) and test "
                "accuracy, mean ± std over seeds",
                curves_figure(inp, list(v.values()), [("train_acc", "training accuracy"),
                                                      ("acc", "test accuracy")], "Fig. 2"))]
    fig, axes = grid(len(shown), len(NORMS))
    for r, layer in enumerate(shown):
        for c, n in enumerate(NORMS):
            percentile_panel(axes[r][c], inp, v[n], layer, f"{label(v[n])}: layer #{layer}")
    figures.append(("Figure 2 on Fashion-MNIST: 5/15/50/85/95th percentiles of the "
                    f"pre-activations of layers {cfg['shown']} over training (training mode, "
                    "noise included), seed 0", plots.to_png(fig)))
    stab = {(n, k): per_run(inp, v[n], stability(k)) for n in NORMS for k in map(str,
                                                                              cfg["layers"])}
    vstab = {(n, k): per_run(inp, v[n], var_stability(k)) for n in NORMS for k in shown}
    fig, axes = plots.figure(1, width=7)
    layers = [str(k) for k in cfg["layers"]]
    for i, n in enumerate(NORMS):
        xs = [j + (i - 1.5) * 0.2 for j in range(len(layers))]
        ys = [statistics.fmean(stab[(n, k)]) if stab[(n, k)] else 0.0 for k in layers]
        axes[0].bar(xs, ys, width=0.2, label=label(v[n]))
    axes[0].set_xticks(range(len(layers)), [f"#{k}" for k in layers])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean |μ(t+1) − μ(t)|")
    axes[0].legend(fontsize=8)
    axes[0].set_title("Fig. 8-style stability per layer (Fashion-MNIST VGG)", fontsize=10)
    figures.append(("Distribution stability (Fig. 8 style): mean over records and channels of "
                    "|μ_{t+1} − μ_t| per layer, mean over seeds; higher = less stable",
                    plots.to_png(fig)))
    # A diverged seed counts as chance accuracy (`Inputs.scored`), in the table and the checks.
    tr = {n: inp.scored(v[n], "train_acc") for n in NORMS}
    te = {n: inp.scored(v[n], "test_acc") for n in NORMS}
    div = {n: inp.diverged(v[n]) for n in NORMS}

    def avg(d: dict[tuple[str, str], list[float]], n: str) -> float | None:
        vals = [statistics.fmean(d[(n, k)]) for k in shown if d.get((n, k))]
        return statistics.fmean(vals) if vals else None

    rows = [[label(v[n]), mean_std(tr[n]), mean_std(te[n]),
             *(mean_std(stab[(n, k)], "{:.4f}") for k in shown),
             *(mean_std(vstab[(n, k)], "{:.4f}") for k in shown), str(div[n])] for n in NORMS]
    mean = statistics.fmean
    checks = []
    if tr["bn"] and tr["noisy_bn"]:
        ok = mean(tr["noisy_bn"]) >= mean(tr["bn"]) - 0.02
        checks.append((ok, f"noisy BN trains {'about as well as' if ok else 'worse than'} BN "
                       f"(final training accuracy {mean_std(tr['noisy_bn'])} vs "
                       f"{mean_std(tr['bn'])}; rule: no more than 2 points below BN)"))
    if tr["bn"] and tr["noisy_bn"] and tr["none"]:
        ok = min(mean(tr["bn"]), mean(tr["noisy_bn"])) > mean(tr["none"])
        checks.append((ok, f"BN and noisy BN {'both beat' if ok else 'do not both beat'} the "
                       f"standard net ({mean_std(tr['none'])})"))
    a_noisy, a_bn, a_none = (avg(stab, n) for n in ("noisy_bn", "bn", "none"))
    if a_noisy is not None and a_bn is not None and a_none is not None:
        ok = a_noisy > max(a_bn, a_none)
        checks.append((ok, f"noisy BN's distributions are {'less' if ok else 'not less'} stable "
                       f"than both others' (mean |Δμ| over layers {cfg['shown']}: "
                       f"{a_noisy:.4f} vs BN {a_bn:.4f}, standard {a_none:.4f})"))
    if tr["noise"]:
        ok = mean(tr["noise"]) < 0.3
        checks.append((ok, f"the standard net with the same noise {'does not' if ok else 'does'}"
                       f" train (final training accuracy {mean_std(tr['noise'])}, "
                       f"{div['noise']} diverged; rule: < 0.3, a diverged seed counting as "
                       "chance, 0.1)"))
    held = sum(ok for ok, _ in checks)
    return Section(grades_divergence=True,
        title="Figure 2: noisy BN vs BN vs standard (Fashion-MNIST)",
        claim="Noisy BN has less stable distributions than even the standard net, yet trains "
              "about as well as BN, both better than standard; the same noise stops the "
              "standard net from training.",
        paper="CIFAR-10 VGG, lr 0.1: BN and noisy BN training curves almost identical, both "
              "above standard; Fig. 8: noisy BN's per-layer |Δμ|, |Δσ²| much larger (up to ≈1) "
              "than standard's or BN's (read from plot). Standard + noise: does not train.",
        substitution=vgg_substitution(cfg) + " Noise: Algorithm 1 with n_μ = 0.5, n_σ = 1.25, "
                     "r_μ = r_σ = 0.1 (r_σ a std), per channel, every step, drawn in training; "
                     "accuracy (eval mode) applies its expectation E[s] = 1.125 per layer.",
        verdict=verdict(held, len(checks)),
        why="Rule: every check must hold for 'reproduced', at least half for 'partly'. "
            + "; ".join(text for _, text in checks) + ".",
        tables=[Table(["variant", "final training acc", "final test acc",
                       *(f"mean Δμ #{k}" for k in shown), *(f"mean Δσ² #{k}" for k in shown),
                       "diverged seeds"], rows,
                      "Fashion-MNIST VGG, mean ± std over seeds (a diverged seed's final "
                      "accuracy counting as chance, 0.1); mean Δμ, Δσ²: mean absolute "
                      "change between consecutive records (every eval step) of the per-channel "
                      "mean and variance of the layer's pre-activation")],
        figures=figures)


EXPERIMENT = Experiment(
    title="Figure 2: noisy BN, BN and standard VGG (Fashion-MNIST)",
    claim="noisy BN: less stable distributions, yet trains like BN, better than standard",
    presets=PRESETS, runtime={"smoke": "5 s", "quick": "2-5 min", "paper": "5-20 min"},
    variants=variants, run=run, report=report)
