"""Ioffe & Szegedy 2015, abstract and Sec. 3.3: "Batch Normalization allows us to use much higher
learning rates and be less careful about initialization."

The paper shows this only through BN-x5/x30 (Fig. 2) and gives no grid. We train the Sec. 4.1
MLP (784-100-100-100-10, BN before each nonlinearity with the bias dropped) on a grid of
learning rate × weight-init scale, with and without BN, for sigmoid and ReLU, and read off the
final held-out accuracy of every cell. Init scale: every weight ~ N(0, (f · gain/√fan_in)²),
the usual LeCun (sigmoid, gain 1) or Kaiming (ReLU, gain √2) std times f ∈ {0.1, 0.3, 1, 3, 10}
(the output layer gets gain 1 and the same f). A cell whose loss or parameters become non-finite
is marked diverged (the paper's "machine infinity") and counts as chance accuracy.

The good region of a (norm, activation) panel is the set of cells within a tolerance (1 point,
and 5 points) of that panel's best accuracy; the report gives its size, the largest learning
rate in it and how many cells survive at the extreme init scales (f = 0.1 and 10). Verdict: per
activation and tolerance, three checks (BN's region is larger; its largest good learning rate is
at least 3× no-BN's; it keeps more good cells at the extreme init scales); all hold:
reproduced, at least half: partly, else not reproduced.

Scaling: each cell is a short run (``paper``: 1,000 steps of 60 = one epoch, SGD momentum 0.9,
constant learning rate, binarized Fashion-MNIST as in fig1, accuracy on 5,000 held-out images),
so the grid measures how fast and how safely each setting trains, not its asymptote. Every cell
is its own run directory (variant ``<norm>_<act>_lr<lr>_x<f>``): rerunning an interrupted grid
(with ``--resume``) skips the finished cells, never overwrites them, and continues with the
unfinished ones (a cell stopped by Ctrl-C resumes from its checkpoint).

Runtime here (2 cores, ``--threads 1``): paper 3 min a seed measured (513 s for 3 seeds of 140
cells, 2026-11-22, with one other run beside it; 597 s for one seed on a machine loaded 3–4× by
other jobs), quick 2 min (48 cells of 500 steps), smoke a few seconds.

Command: ``bnlab run ioffe2015.lr_init --preset paper --threads 1`` then ``bnlab report``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig, nonempty, one_of, positive
from bnlab.lab.experiments.ioffe2015 import SUBSTITUTION_MNIST, pixels
from bnlab.lab.experiments.ioffe2015._claims import build_mlp
from bnlab.lab.experiments.ioffe2015._heatmap import Grid, grid_figure, region
from bnlab.lab.models import ACTIVATIONS
from bnlab.lab.registry import Experiment, RunContext
from bnlab.lab.report import Inputs, Section, Table
from bnlab.lab.train import fit, seed_all

NORMS = ("none", "bn")
ACTS = ("sigmoid", "relu")


@dataclass(frozen=True)
class LrInitConfig:
    data: DataConfig = DataConfig(binarize=True, normalize=False, eval_examples=5_000)
    train: TrainConfig = TrainConfig(steps=1_000, batch_size=60, eval_every=500,
                                     checkpoint_every=1_000)  # == steps: cells never checkpoint
    optim: OptimConfig = OptimConfig(lr=0.1, momentum=0.9)  # lr replaced by each cell's
    lrs: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # 3 decades
    inits: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)  # × the fan-in std, 2 decades

    def __post_init__(self) -> None:
        nonempty(self, "lrs inits acts tolerances")
        one_of(self, "acts", ACTIVATIONS)
        positive(self, "lrs inits")
    acts: tuple[str, ...] = ACTS
    # The good region: within this of the panel's best accuracy. 1 point is the width asked
    # for; it is near the eval noise of one short run (binomial std on 5,000 images ≈ 0.6
    # points), so the verdict also counts the checks at 5 points.
    tolerances: tuple[float, ...] = (0.01, 0.05)


PRESETS = {
    "paper": LrInitConfig(),
    "quick": LrInitConfig(data=DataConfig(binarize=True, normalize=False, eval_examples=2_000),
                          train=TrainConfig(steps=500, batch_size=60, eval_every=250,
                                            checkpoint_every=500),
                          lrs=(0.01, 0.1, 1.0, 3.0), inits=(0.1, 1.0, 10.0)),
    "smoke": LrInitConfig(data=DataConfig(binarize=True, normalize=False, eval_examples=100),
                          train=TrainConfig(steps=6, batch_size=20, eval_every=3,
                                            checkpoint_every=6),
                          lrs=(0.1, 30.0), inits=(1.0, 10.0)),
}


def cell(norm: str, act: str, lr: float, factor: float) -> str:
    return f"{'bn' if norm == 'bn' else 'nobn'}_{act}_lr{lr:g}_x{factor:g}"


def parse(variant: str) -> tuple[str, str, float, float]:
    """(norm, act, lr, init factor) of a cell name made by `cell`."""
    norm, act, lr, factor = variant.split("_")
    return ("bn" if norm == "bn" else "none", act, float(lr.removeprefix("lr")),
            float(factor.removeprefix("x")))


def variants(cfg: LrInitConfig) -> list[str]:
    return [cell(n, a, lr, f) for a in cfg.acts for n in NORMS for f in cfg.inits
            for lr in cfg.lrs]


def run(cfg: LrInitConfig, variant: str, ctx: RunContext) -> dict[str, Any]:
    norm, act, lr, factor = parse(variant)
    data = ctx.data(cfg.data)
    seed_all(ctx.seed)
    model = build_mlp(data, norm, act, init_factor=factor)
    return fit(model, data, ctx.run, train=cfg.train, optim=dataclasses.replace(cfg.optim, lr=lr),
               data_cfg=cfg.data, seed=ctx.seed, progress=ctx.progress, desc=ctx.desc,
               resume=ctx.resume)


def grid(inp: Inputs, norm: str, act: str, chance: float) -> Grid:
    """The panel's accuracy (mean over seeds; a diverged seed counts as ``chance``) and the
    number of diverged seeds per (init, lr) cell."""
    cfg = inp.config
    lrs, inits = list(cfg["lrs"]), list(cfg["inits"])
    acc = [[math.nan] * len(lrs) for _ in inits]
    div = [[0] * len(lrs) for _ in inits]
    for i, f in enumerate(inits):
        for j, lr in enumerate(lrs):
            sums = inp.summaries(cell(norm, act, lr, f))
            got = [chance if s.get("diverged") else s.get("final_acc") for s in sums]
            vals = [v for v in got if v is not None]
            if vals:
                acc[i][j] = sum(vals) / len(vals)
                div[i][j] = sum(bool(s.get("diverged")) for s in sums)
    return Grid(f"{act}, {'BN' if norm == 'bn' else 'no BN'}", lrs, inits, acc, div)


def report(inp: Inputs) -> Section:
    cfg = inp.config
    tols, chance = list(cfg["tolerances"]), 0.1
    acts = [a for a in cfg["acts"] if any(v.split("_")[1] == a for v in inp.runs)]
    grids = {(n, a): grid(inp, n, a, chance) for a in acts for n in NORMS}
    rows, checks = [], {}
    for tol in tols:
        regions = {k: region(g, tol) for k, g in grids.items()}
        for (n, a), r in regions.items():
            g = grids[(n, a)]
            rows.append([f"{100 * tol:g}", g.title, f"{r['best']:.4f}", f"{r['count']}/{g.cells}",
                         f"{r['max_lr']:g}" if r["count"] else "–", f"{r['extreme']}",
                         f"{r['inits_ok']}/{len(g.inits)}", f"{r['diverged']}/{g.cells}",
                         "; ".join(f"×{f:g}: {span}" for f, span in r["spans"].items())])
        for a in acts:
            bn, nb = regions[("bn", a)], regions[("none", a)]
            at = f"{a}, {100 * tol:g} pt"
            checks[f"{at}: BN's good region is larger ({bn['count']} vs {nb['count']} cells)"] = (
                bn["count"] > nb["count"])
            checks[f"{at}: BN's largest good lr is >= 3× no-BN's ({bn['max_lr']:g} vs "
                   f"{nb['max_lr']:g})"] = bn["max_lr"] >= 3 * nb["max_lr"] * (1 - 1e-9)
            checks[f"{at}: BN keeps more good cells at the extreme init scales ({bn['extreme']} "
                   f"vs {nb['extreme']})"] = bn["extreme"] > nb["extreme"]
    held = sum(checks.values())
    verdict = ("reproduced" if held == len(checks) else "partly" if 2 * held >= len(checks)
               else "not reproduced")
    why = ("Rule: every check must hold for 'reproduced', at least half for 'partly'. "
           f"{held}/{len(checks)} checks hold: " + "; ".join(
        f"{k}: {'yes' if ok else 'no'}" for k, ok in checks.items()) + ".")
    steps, bs = cfg["train"]["steps"], cfg["train"]["batch_size"]
    return Section(grades_divergence=True,
        title="Higher learning rates and less careful initialization (learning rate × init "
              "scale grid)",
        claim="\"Batch Normalization allows us to use much higher learning rates and be less "
              "careful about initialization\" (abstract; Sec. 3.3).",
        paper="No grid in the paper: BN-Inception trains at 5× and 30× Inception's learning "
              "rate, and \"the same learning rate increase with original Inception caused the "
              "model parameters to reach machine infinity\" (Sec. 4.2.2).",
        substitution=SUBSTITUTION_MNIST + f" The Sec. 4.1 MLP, {pixels(cfg['data'])}, {steps} "
        f"steps of {bs} per cell (SGD momentum {cfg['optim']['momentum']:g}, constant lr); "
        f"init = f × the LeCun (sigmoid) or Kaiming (ReLU) std; accuracy on "
        f"{cfg['data']['eval_examples']} held-out images; a diverged seed counts as chance "
        "(0.1).",
        verdict=verdict, why=why,
        tables=[Table(["tolerance (pt)", "panel", "best acc", "good cells (within tolerance)",
                       "largest good lr", "good cells at f=min/max", "init scales with a good "
                       "cell", "diverged cells", "good lr range per init scale"], rows,
                      f"Good region per panel (mean over {inp.seeds} seed(s))")],
        figures=[("Final held-out accuracy (%) per learning rate × init scale; × = diverged "
                  f"(non-finite loss), black frame = within {100 * tols[0]:g} point(s) of the "
                  "panel's best", grid_figure([grids[(n, a)] for a in acts for n in NORMS],
                                              tols[0], ncols=2))])


EXPERIMENT = Experiment(
    title="Higher learning rates and careless init: lr × init-scale grid, ±BN, sigmoid/ReLU",
    claim="BN trains well over a wider range of learning rates and init scales",
    presets=PRESETS, runtime={"smoke": "8 s", "quick": "2 min", "paper": "3-10 min"},
    variants=variants, run=run, report=report)
