"""Ioffe & Szegedy 2015, Figures 2 and 3 (Sec. 4.2): BN-Inception and the learning-rate study.

Models (Sec. 4.2.2): Inception (no BN, dropout 0.4, L2, LRN, within-shard shuffling, its best
learning rate of a sweep); BN-Baseline (+ BN before every nonlinearity); BN-x5 and BN-x30 (BN +
the Sec. 4.2.1 changes: no dropout, L2 ÷ 5, learning-rate decay 6× faster, no LRN, thorough
shuffling; learning rate ×5 and ×30); BN-x5-Sigmoid; and the controls the paper states in words:
Inception at ×5 ("model parameters ... reach machine infinity") and Inception with sigmoid
("accuracy equivalent to chance").

Claim: BN-Baseline matches Inception in less than half the steps; BN-x5 needs 14× fewer steps;
BN-x30 trains slower at first but ends higher (74.8% vs 72.2%); BN makes sigmoid trainable.

Paper's numbers (Fig. 3; steps to 72.2% | max accuracy): Inception 31.0M | 72.2%; BN-Baseline
13.3M | 72.7%; BN-x5 2.1M | 73.0%; BN-x30 2.7M | 74.8%; BN-x5-Sigmoid – | 69.8%.

Scaling here: a ~0.1M-parameter Inception for 28×28 Fashion-MNIST, batch 32 as in the paper,
SGD momentum 0.9, exponential decay 0.96 per ``decay_steps`` (÷6 for BN-x5/x30). ``paper``
preset: 6,000 steps per model (≈3.2 epochs) for 7 models + a 2-point learning-rate sweep of
Inception, held-out accuracy on 2,000 test images every 250 steps. Base learning rate 0.01. The
quick preset's Inception sweep (1,500 steps; best held-out accuracy 0.005 → 0.797, 0.01 → 0.822,
0.02 → 0.835) favours the top of its range, so the paper preset sweeps {0.01, 0.02, 0.04}. The
report's reference "Inception" is the best no-BN ReLU run (the sweep and the ×5 control, which
differ only in their rate); the BN models' ×1/×5/×30 stay relative to 0.01.

Runtime here (2 cores, ``--threads 1``): on a quiet machine ≈33 ms per no-BN step and ≈60 ms
per BN step, so paper ≈45 min and quick ≈12 min (estimates); measured: paper 41 min for seed 0,
and 56 min for seeds 1 and 2 with ``--threads 2`` (2026-11-22, 18 runs of 2.5–4.5 min); quick
≈27 min with the machine shared by 3 other jobs. smoke ≈10 s.

Command: ``bnlab run ioffe2015.fig2 --preset paper`` then ``bnlab report``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bnlab.lab import plots
from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig, fraction, positive
from bnlab.lab.experiments.ioffe2015 import (
    SUBSTITUTION_IMAGENET,
    at_budget,
    steps_text,
    steps_to,
)
from bnlab.lab.experiments.ioffe2015._inception import RECIPES, build, settings
from bnlab.lab.registry import Experiment, RunContext
from bnlab.lab.report import Inputs, Section, Table, curve, mean_std
from bnlab.lab.train import fit, seed_all

MAIN = ("inception", "bn_baseline", "bn_x5", "bn_x30", "bn_x5_sigmoid")
CONTROLS = ("inception_x5", "inception_sigmoid")
PAPER = {"inception": ("31.0·10⁶", "72.2%"), "bn_baseline": ("13.3·10⁶", "72.7%"),
         "bn_x5": ("2.1·10⁶", "73.0%"), "bn_x30": ("2.7·10⁶", "74.8%"),
         "bn_x5_sigmoid": ("–", "69.8%"), "inception_x5": ("diverges", "–"),
         "inception_sigmoid": ("–", "chance")}


@dataclass(frozen=True)
class Fig2Config:
    data: DataConfig = DataConfig(normalize=True, eval_examples=2_000)
    train: TrainConfig = TrainConfig(steps=6_000, batch_size=32, eval_every=250,
                                     checkpoint_every=1_000, eval_batch_size=500)
    optim: OptimConfig = OptimConfig(lr=0.01, momentum=0.9, weight_decay=4e-5,
                                     decay_rate=0.96, decay_steps=300)  # Inception's settings
    width: float = 1.0  # channel multiplier of the small Inception
    dropout: float = 0.4  # Inception's dropout (removed by the Sec. 4.2.1 changes)
    sweep: tuple[float, ...] = (0.02, 0.04)  # extra Inception lrs, variants "inception_lr<x>"
    controls: bool = True  # also train inception_x5 and inception_sigmoid

    def __post_init__(self) -> None:
        positive(self, "width sweep")
        fraction(self, "dropout")


PRESETS = {
    "paper": Fig2Config(),
    "quick": Fig2Config(data=DataConfig(normalize=True, eval_examples=1_000),
                        train=TrainConfig(steps=1_500, batch_size=32, eval_every=100,
                                          checkpoint_every=500, eval_batch_size=500),
                        optim=OptimConfig(lr=0.01, momentum=0.9, weight_decay=4e-5,
                                          decay_rate=0.96, decay_steps=75),
                        sweep=(0.005, 0.02)),
    "smoke": Fig2Config(data=DataConfig(normalize=True, eval_examples=100),
                        train=TrainConfig(steps=8, batch_size=16, eval_every=4,
                                          checkpoint_every=4, eval_batch_size=100),
                        width=0.25, sweep=(0.02,)),
}


def variants(cfg: Fig2Config) -> list[str]:
    sweep = [f"inception_lr{lr:g}" for lr in cfg.sweep]
    return [*MAIN, *sweep, *(CONTROLS if cfg.controls else ())]


def run(cfg: Fig2Config, variant: str, ctx: RunContext) -> dict[str, Any]:
    lr = float(variant.removeprefix("inception_lr")) if variant.startswith("inception_lr") \
        else None
    recipe = RECIPES["inception" if lr else variant]
    optim, data_cfg, dropout, lrn = settings(recipe, cfg.optim, cfg.data, dropout=cfg.dropout,
                                             lr=lr)
    data = ctx.data(data_cfg)
    seed_all(ctx.seed)
    model = build(recipe, num_classes=data.num_classes, in_channels=data.train_x.shape[1],
                  width=cfg.width, dropout=dropout, lrn=lrn)
    return fit(model, data, ctx.run, train=cfg.train, optim=optim, data_cfg=data_cfg,
               seed=ctx.seed, progress=ctx.progress, desc=ctx.desc, resume=ctx.resume)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def report(inp: Inputs) -> Section:
    # Inception "at its best learning rate": the best of every no-BN ReLU run, the ×5 control
    # included (it differs from the sweep only in its rate).
    # In the checks a diverged seed's best accuracy counts as chance (`Inputs.scored`): a run
    # the paper calls a failure ("machine infinity") must not be graded by its peak before it.
    best = {v: _mean(inp.scored(v, "best_acc")) for v in inp.runs}
    names = [v for v in inp.runs if v.startswith("inception") and v != "inception_sigmoid"]
    ref = max(names, key=lambda v: best[v], default="inception")
    level = best.get(ref, math.nan)
    base = inp.config["optim"]["lr"]
    ref_lr = (float(ref.removeprefix("inception_lr")) if ref.startswith("inception_lr")
              else 5 * base if ref == "inception_x5" else base)
    fig, axes = plots.figure(2, width=6)
    sweep = [v for v in names if v not in ("inception", "inception_x5")]
    shown = [v for v in MAIN if v in inp.runs] + ([ref] if ref != "inception" else [])
    plots.plot_curves(axes[0], {v: curve(inp, v) for v in shown},
                      title="Fig. 2: held-out accuracy", hline=level)
    plots.plot_curves(axes[1], {v: curve(inp, v) for v in ("inception", *sweep, *CONTROLS)
                                if v in inp.runs},
                      title="controls and the Inception learning-rate sweep", ylim=(0.0, 1.0))
    rows, steps, budget = [], {}, inp.config["train"]["steps"]
    for v in (*MAIN, *sweep, *CONTROLS):
        if v not in inp.runs:
            continue
        raw = steps_to(inp, v, level)
        steps[v] = at_budget(raw, budget)
        div = [s.get("diverged_step") for s in inp.summaries(v) if s.get("diverged")]
        paper = PAPER.get(v, ("", ""))
        rows.append([v + (" (reference)" if v == ref else ""), paper[0],
                     steps_text(raw, budget),
                     paper[1], mean_std([100 * a for a in inp.values(v, "best_acc")],
                                        "{:.1f}%"),
                     f"{len(div)}/{len(inp.runs[v])}" + (f" (step {div[0]})" if div else "")])
    s_ref, s_x5 = _mean(steps.get(ref, [])), _mean(steps.get("bn_x5", []))
    ratio = s_ref / s_x5 if s_x5 and not math.isnan(s_x5) else math.nan
    checks = {
        "BN-Baseline reaches Inception's best in under half the steps":
            _mean(steps.get("bn_baseline", [])) < 0.5 * s_ref,
        "BN-x5 needs >= 14× fewer steps": ratio >= 14,
        "BN-x30 ends above Inception": best.get("bn_x30", 0) > level,
        "BN-x5-Sigmoid trains (> 0.5)": best.get("bn_x5_sigmoid", 0) > 0.5,
    }
    if "inception_x5" in inp.runs:  # (diverged seeds at chance pull its mean below)
        checks["Inception ×5 diverges or ends worse"] = best["inception_x5"] < level
    if "inception_sigmoid" in inp.runs:
        checks["Inception-sigmoid stays near chance (< 0.2)"] = best["inception_sigmoid"] < 0.2
    held = [k for k, ok in checks.items() if ok]
    verdict = ("reproduced" if len(held) == len(checks) else "partly"
               if 2 * len(held) >= len(checks) else "not reproduced")
    why = ("Rule: every check must hold for 'reproduced', at least half for 'partly' (until "
           "2026-12-07: at least two); a diverged seed's best accuracy counts as chance (0.1). "
           f"{len(held)}/{len(checks)} checks hold: " + "; ".join(
        f"{k}: {'yes' if ok else 'no'}" for k, ok in checks.items())
        + f". Step ratio Inception/BN-x5 = {ratio:.1f} (paper 14.8).")
    return Section(grades_divergence=True,
        title="Figures 2 and 3: BN-Inception and the learning-rate study",
        claim="BN-Baseline matches Inception in under half the steps; BN-x5 in 14× fewer; "
              "BN-x30 ends higher; BN makes sigmoid trainable; Inception ×5 diverges.",
        paper="ImageNet, steps to 72.2% | max: Inception 31.0M | 72.2%, BN-Baseline 13.3M | "
              "72.7%, BN-x5 2.1M | 73.0%, BN-x30 2.7M | 74.8%, BN-x5-Sigmoid – | 69.8%; "
              "BN-x5 needs 14 times fewer steps (31.0/2.1 = 14.8).",
        substitution=SUBSTITUTION_IMAGENET + f" Base learning rate {base:g}: BN-Baseline, BN-x5, "
        f"BN-x30 and the Inception ×5 control run at 1×, 5×, 30× and 5× it. The reference "
        f"'Inception' is the best no-BN ReLU run ({ref}, lr {ref_lr:g}), so relative to it they "
        f"run at {base / ref_lr:.3g}×, {5 * base / ref_lr:.3g}×, {30 * base / ref_lr:.3g}× and "
        f"{5 * base / ref_lr:.3g}× (the paper's ×5 and ×30 are of Inception's own rate). "
        f"{inp.config['train']['steps']} steps of "
        f"{inp.config['train']['batch_size']} per model; 'validation' = the first "
        f"{inp.config['data']['eval_examples']} Fashion-MNIST test images.",
        verdict=verdict, why=why,
        tables=[Table(["model", "paper: steps to Inception max", "ours: steps to Inception "
                       f"max ({level:.4f})", "paper: max acc", "ours: max acc", "diverged"],
                      rows, "Figure 3 (mean ± std over seeds; a seed that never reaches the "
                      "level counts as the step budget, "
                      f"{inp.config['train']['steps']:,}; step resolution = eval_every "
                      f"= {inp.config['train']['eval_every']})")],
        figures=[("Figure 2: held-out accuracy against steps; dotted line: Inception's best "
                  "accuracy", plots.to_png(fig))])


EXPERIMENT = Experiment(
    title="Figures 2 and 3: BN-Inception learning-rate study",
    claim="BN-x5 reaches Inception's accuracy in 14x fewer steps; BN-x30 ends higher",
    presets=PRESETS,
    runtime={"smoke": "10 s", "quick": "12 min", "paper": "28-45 min"},
    variants=variants, run=run, report=report)
