"""Santurkar et al. 2018, the deep linear network (App. A.1; its training-loss curves sit beside
Fig. 3 and in Fig. 5b): training loss of the 25-layer DLN with and without BN under full-batch
gradient descent.

Claim: BN optimizes the DLN faster and to a lower loss, although the network is linear (no
saturation) and BN's ICS is larger (Fig. 3).

Paper's numbers (read from plot, lr 1e-6, 10k steps): standard plateaus at ≈2.8e3 and drops to
≈1.6e3 near 6k steps; BN reaches ≈1e3 by 4k steps and ≈5e2 after.

Setup, as the paper (no substitution, no scaling in the paper preset): minimize
‖W_25 ⋯ W_1 x − A x‖² summed over 1000 samples, A 10×10 and x Gaussian (drawn from the run
seed), square 10×10 bias-free layers, Glorot init, full-batch GD at lr 1e-6 for 10,000 steps; BN
after every linear layer but the last (the paper does not say where it sits). The loss is logged
every 50 steps on the full batch in training mode (the loss of the next GD step).

Runtime here (2 shared cores, ``--threads 1``, quiet machine, CPU kernels on; 2026-11-22): paper
49 s (the BN run ≈15 ms per step, the standard one ≈9 ms; with the reference BN path the BN run
took ≈30–60 ms a step and the preset 6–12 min), quick 13 s, smoke seconds. A loaded machine
takes 2–3× longer.

Command: ``bnlab run santurkar2018.dln --preset paper --threads 1 [--seeds 3]`` then
``bnlab report``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bnlab.lab import plots
from bnlab.lab.config import DataConfig, positive
from bnlab.lab.experiments.santurkar2018._common import (
    SMOKE_DLN,
    DLNSpec,
    dln_substitution,
    run_dln,
    variant_name,
)
from bnlab.lab.experiments.santurkar2018._report import label, mean_curve, per_run, verdict
from bnlab.lab.registry import Experiment, RunContext
from bnlab.lab.report import Inputs, Section, Table, mean_std, scored_text

PAPER = {"none": 1.6e3, "bn": 5e2}  # final training loss at 10k steps, read from plot


@dataclass(frozen=True)
class DLNConfig:
    data: DataConfig = DataConfig()  # unused: the DLN's data is synthetic (uses_data=False)
    dln: DLNSpec = DLNSpec()
    lr: float = 1e-6

    def __post_init__(self) -> None:
        positive(self, "lr")


PRESETS = {
    "paper": DLNConfig(),
    "quick": DLNConfig(dln=DLNSpec(steps=2_500, eval_every=50, checkpoint_every=500)),
    "smoke": DLNConfig(dln=SMOKE_DLN),
}


def variants(cfg: DLNConfig) -> list[str]:
    return [variant_name("dln", n, cfg.lr) for n in ("bn", "none")]


def run(cfg: DLNConfig, variant: str, ctx: RunContext) -> dict[str, Any]:
    return run_dln(cfg.dln, variant, ctx)


def _at(frac: float) -> Callable[[list[dict[str, Any]]], float | None]:
    def fn(metrics: list[dict[str, Any]]) -> float | None:
        recs = [m for m in metrics if isinstance(m.get("loss"), float)]
        if not recs:
            return None
        target = frac * recs[-1]["step"]
        return next(m["loss"] for m in recs if m["step"] >= target)

    return fn


def report(inp: Inputs) -> Section:
    cfg = inp.config
    v = {n: variant_name("dln", n, cfg["lr"]) for n in ("bn", "none")}
    fig, axes = plots.figure(1, width=6)
    plots.plot_curves(axes[0], {label(v[n]): mean_curve(inp, v[n], ("loss",))
                                for n in ("none", "bn")},
                      ylabel="training loss (sum over 1000 samples)",
                      title="Deep linear network, full-batch GD")
    axes[0].set_yscale("log")
    figures = [("DLN training loss with and without BN (synthetic Gaussian data as in the "
                "paper), mean ± std over seeds", plots.to_png(fig))]
    fin = {n: inp.scored(v[n], "final_loss", math.inf) for n in v}  # diverged: ∞
    mid = {n: per_run(inp, v[n], _at(0.4)) for n in v}
    rows = [[label(v[n]).split(",")[0], mean_std(mid[n], "{:.4g}"),
             scored_text(fin[n], inp.diverged(v[n]), "{:.4g}"), f"≈{PAPER[n]:.2g}",
             str(inp.diverged(v[n]))] for n in ("none", "bn")]
    checks = []
    if fin["bn"] and fin["none"]:
        b, s = statistics.fmean(fin["bn"]), statistics.fmean(fin["none"])
        lower, half = b < s, math.isfinite(b) and b <= 0.5 * s  # (∞ ≤ ∞ is no win)
        checks.append((lower, f"BN's final loss is {'below' if lower else 'not below'} the "
                       f"standard net's ({b:.4g} vs {s:.4g})"))
        checks.append((half, f"{'at least' if half else 'less than'} 2× lower "
                       f"(ratio {s / b:.3g}; paper ≈3×)"))
    held = sum(ok for ok, _ in checks)
    return Section(grades_divergence=True,
        title="Deep linear network with and without BN",
        claim="BN trains the 25-layer deep linear network faster and to a lower loss.",
        paper="lr 1e-6, 10k steps (read from plot): standard ≈2.8e3 plateau, ≈1.6e3 at the end; "
              "BN ≈1e3 by 4k steps, ≈5e2 at the end.",
        substitution=dln_substitution(cfg["dln"]),
        verdict=verdict(held, len(checks)),
        why="Rule: BN below standard and at least 2× lower → reproduced; below only → partly. "
            + "; ".join(text for _, text in checks) + ".",
        tables=[Table(["net", "loss at 40% of training", "final loss",
                       "paper final (read from plot)", "diverged seeds"], rows,
                      "Mean ± std over seeds")],
        figures=figures)


EXPERIMENT = Experiment(
    title="Deep linear network: training loss with and without BN",
    claim="BN trains the deep linear network faster and lower",
    presets=PRESETS, runtime={"smoke": "2 s", "quick": "15-45 s", "paper": "1-3 min"},
    variants=variants, run=run, report=report, uses_data=False)
