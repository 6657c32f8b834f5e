"""Report helpers of the Santurkar et al. (2018) experiments: nested metrics as curves (mean and
std over seeds), per-run scalars, the verdict rule, and the figure helpers they share. Reads run
directories only (through `bnlab.lab.report.Inputs`).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bnlab.diagnostics import distribution_shift
from bnlab.lab import plots
from bnlab.lab.plots import Curve
from bnlab.lab.report import Inputs

__all__ = ["get", "label", "mean_curve", "per_run", "verdict"]


def get(rec: dict[str, Any], path: Sequence[str]) -> Any:
    """``rec[path[0]][path[1]]…`` or None where a key is missing."""
    for key in path:
        if not isinstance(rec, dict) or key not in rec:
            return None
        rec = rec[key]
    return rec


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else None


def mean_curve(inp: Inputs, variant: str, path: Sequence[str],
               fn: Callable[[Any], Any] | None = None) -> Curve:
    """Mean and std over seeds of the metric at ``path`` (optionally mapped by ``fn``) at every
    step where some seed logged it."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in inp.runs.get(variant, []):
        for rec in run.metrics():
            v = get(rec, path)
            v = _num(fn(v) if (fn is not None and v is not None) else v)
            if v is not None:
                by_step[rec["step"]].append(v)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps],
            [statistics.pstdev(by_step[s]) for s in steps])


def per_run(inp: Inputs, variant: str, fn: Callable[[list[dict[str, Any]]], float | None],
            *, keep_inf: bool = False) -> list[float]:
    """``fn(metrics)`` of every seed of ``variant`` (None and non-finite results dropped; +inf
    kept with ``keep_inf``, where it counts against the net: a blown-up loss)."""
    out = []
    for run in inp.runs.get(variant, []):
        raw = fn(run.metrics())
        v = _num(raw)
        if v is not None:
            out.append(v)
        elif keep_inf and isinstance(raw, (int, float)) and raw == math.inf:
            out.append(math.inf)
    return out


def median_of(path: Sequence[str], *, skip_first: bool = True
              ) -> Callable[[list[dict[str, Any]]], float | None]:
    """A `per_run` function: the median of the metric at ``path`` over the logged steps."""

    def fn(metrics: list[dict[str, Any]]) -> float | None:
        got = [_num(get(m, path)) for m in metrics if not (skip_first and m["step"] == 0)]
        vals = [v for v in got if v is not None]
        return statistics.median(vals) if vals else None

    return fn


def verdict(held: int, total: int) -> str:
    """The stated rule of every section: all checks hold → "reproduced"; at least half →
    "partly"; fewer → "not reproduced"; no check could be made → "inconclusive"."""
    if total == 0:
        return "inconclusive"
    if held == total:
        return "reproduced"
    return "partly" if 2 * held >= total else "not reproduced"


def label(variant: str) -> str:
    """A legend label: "vgg-bn-lr0.1" → "BN, lr 0.1"."""
    _, norm, lr = variant.split("-", 2)
    names = {"none": "Standard", "bn": "BN", "noisy_bn": "noisy BN", "noise": "Standard + noise",
             "l1": "ℓ1", "l2": "ℓ2", "linf": "ℓ∞"}
    return f"{names.get(norm, norm)}, {lr.replace('lr', 'lr ')}"


def band(ax: Any, steps: Sequence[float], lo: Sequence[float], hi: Sequence[float], *,
         name: str, log: bool = False) -> None:
    """A shaded min–max band over steps (the landscape plots of Fig. 4)."""
    (line,) = ax.plot(steps, hi, lw=0.8, label=name)
    ax.plot(steps, lo, lw=0.8, color=line.get_color())
    ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.3, lw=0)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def percentile_panel(ax: Any, inp: Inputs, variant: str, layer: str, title: str) -> None:
    """5/15/50/85/95th percentiles of a layer's pre-activation over training, seed 0."""
    runs = inp.runs.get(variant, [])
    recs = [m for m in runs[0].metrics() if get(m, ("dist", layer)) is not None] if runs else []
    steps = [m["step"] for m in recs]
    qs = [m["dist"][layer]["q"] for m in recs]
    if qs:
        for j, (lo, hi) in enumerate(((0, 4), (1, 3))):
            ax.fill_between(steps, [q[lo] for q in qs], [q[hi] for q in qs], color="C0",
                            alpha=0.2 + 0.2 * j, lw=0)
        ax.plot(steps, [q[2] for q in qs], color="C0", lw=1.2)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("steps")
    ax.grid(alpha=0.3)


def curves_figure(inp: Inputs, variants: Sequence[str], keys: Sequence[tuple[str, str]],
                  title: str, *, ylim: tuple[float, float] | None = (0.0, 1.0),
                  log: bool = False) -> bytes:
    """One panel per (metric key, y label), one curve per variant (mean ± std over seeds)."""
    fig, axes = plots.figure(len(keys), width=5.0)
    for ax, (key, ylabel) in zip(axes, keys, strict=True):
        curves = {label(v): mean_curve(inp, v, (key,)) for v in variants if v in inp.runs}
        plots.plot_curves(ax, curves, ylabel=ylabel, title=f"{title}: {ylabel}", ylim=ylim)
        if log:
            ax.set_yscale("log")
    return plots.to_png(fig)


def grid(rows: int, cols: int, *, width: float = 3.2, height: float = 2.6) -> tuple[Any, Any]:
    """A rows × cols figure (axes indexed [r][c]), made without pyplot (`bnlab.lab.plots`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows))
    return fig, fig.subplots(rows, cols, squeeze=False)


def stability(layer: str) -> Callable[[list[dict[str, Any]]], float | None]:
    """A `per_run` function: the mean over recorded steps and channels of |μ_{t+1} − μ_t| of a
    layer's pre-activation (Santurkar Fig. 8, `bnlab.diagnostics.distribution_shift`)."""
    return _step_change(layer, "mean")


def var_stability(layer: str) -> Callable[[list[dict[str, Any]]], float | None]:
    """As `stability`, for |σ²_{t+1} − σ²_t|."""
    return _step_change(layer, "var")


def _step_change(layer: str, key: str) -> Callable[[list[dict[str, Any]]], float | None]:
    def fn(metrics: list[dict[str, Any]]) -> float | None:
        recs = [m["dist"][layer] for m in metrics if get(m, ("dist", layer)) is not None]
        if len(recs) < 2:
            return None
        hist = {"channel_mean": torch.tensor([r["mean"] for r in recs]),  # (T, C)
                "channel_var": torch.tensor([r["var"] for r in recs])}
        return float(distribution_shift(hist)[f"{key}_step"].mean())

    return fn
