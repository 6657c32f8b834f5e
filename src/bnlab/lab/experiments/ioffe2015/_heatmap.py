"""The learning-rate × init-scale grid of ``ioffe2015.lr_init``: its good region (cells within a
tolerance of the best accuracy) and the heat-map figure. Reads summaries only; no training."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


@dataclass
class Grid:
    """One panel: accuracy[i][j] at init factor inits[i] and learning rate lrs[j] (mean over
    seeds, nan where no run finished) and the number of diverged seeds per cell."""

    title: str
    lrs: list[float]
    inits: list[float]
    acc: list[list[float]]
    diverged: list[list[int]]

    @property
    def cells(self) -> int:
        return len(self.lrs) * len(self.inits)


def region(g: Grid, tol: float) -> dict[str, Any]:
    """The good region: cells with accuracy >= best − ``tol``.

    Returns best accuracy, the region's size (``count``), its largest learning rate
    (``max_lr``, 0 when empty), its cells in the smallest and largest init rows (``extreme``),
    the init rows with a good cell (``inits_ok``), cells with a diverged seed, the good mask and,
    per init factor, the good learning-rate range as text (``spans``).
    """
    flat = [a for row in g.acc for a in row if not math.isnan(a)]
    best = max(flat) if flat else math.nan
    good = [[not math.isnan(a) and a >= best - tol for a in row] for row in g.acc]
    lrs_ok = [[lr for lr, ok in zip(g.lrs, row, strict=True) if ok] for row in good]
    spans = {f: (f"{min(ok):g}–{max(ok):g}" if len(ok) > 1 else f"{ok[0]:g}" if ok else "none")
             for f, ok in zip(g.inits, lrs_ok, strict=True)}
    return {"best": best, "good": good, "count": sum(map(sum, good)),
            "max_lr": max((lr for ok in lrs_ok for lr in ok), default=0.0),
            "extreme": sum(good[0]) + (sum(good[-1]) if len(good) > 1 else 0),
            "inits_ok": sum(any(row) for row in good),
            "diverged": sum(d > 0 for row in g.diverged for d in row), "spans": spans}


def grid_figure(grids: list[Grid], tol: float, *, ncols: int = 2) -> bytes:
    """Heat maps side by side (one colour scale): accuracy in % per cell, "×" where a seed
    diverged, a black frame around the good region."""
    nrows = math.ceil(len(grids) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows), layout="constrained")  # no pyplot
    axes = fig.subplots(nrows, ncols, squeeze=False)
    vals = [a for g in grids for row in g.acc for a in row if not math.isnan(a)]
    # From chance (10 classes) to the best cell; a grid at or below chance still gets a scale.
    vmin = min(0.1, *vals) if vals else 0.1
    vmax = max(vmin + 1e-3, *vals) if vals else 1.0
    image = None
    for ax, g in zip(axes.flat, grids, strict=False):
        image = ax.imshow(g.acc, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower",
                          aspect="auto")
        good = region(g, tol)["good"]
        for i in range(len(g.inits)):
            for j in range(len(g.lrs)):
                a, d = g.acc[i][j], g.diverged[i][j]
                text = "×" if d else ("" if math.isnan(a) else f"{100 * a:.0f}")
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if math.isnan(a) or a < (vmin + vmax) / 2 else "black")
                if good[i][j]:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.6,
                                           ec="black"))
        ax.set_xticks(range(len(g.lrs)), [f"{lr:g}" for lr in g.lrs], fontsize=7)
        ax.set_yticks(range(len(g.inits)), [f"×{f:g}" for f in g.inits], fontsize=7)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("init scale (× fan-in std)")
        ax.set_title(g.title, fontsize=10)
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="held-out accuracy")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
