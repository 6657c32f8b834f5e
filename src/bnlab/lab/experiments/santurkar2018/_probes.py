"""Probes of the Santurkar et al. (2018) experiments: `bnlab.diagnostics` called from the
training loop's probe mechanism (`bnlab.lab.train.Probe`) every ``every`` steps, their numbers
returned as JSON-ready dicts for ``metrics.jsonl``. The diagnostics restore weights, ``.grad``,
buffers and RNG states, so a probed run trains exactly as an unprobed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.diagnostics import ActivationTracker, gradient_ics, landscape_probe
from bnlab.lab.train import ProbeContext

__all__ = ["ICSProbe", "LandscapeProbe", "LayerDistributions", "vgg_layer_outputs"]

QUANTILES = (0.05, 0.15, 0.5, 0.85, 0.95)
LossFn = Callable[[Tensor, Tensor], Tensor]


def _due(ctx: ProbeContext, every: int) -> bool:
    return ctx.batch is not None and ctx.step % every == 0


def _every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected an int >= 1 (probe every that many steps), "
                         f"got {every!r}")
    return every


def _lr(ctx: ProbeContext, who: str) -> float:
    """The step's learning rate, which the probes scale by: refused unless finite and > 0."""
    lr = float(ctx.lr)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"{who}: the learning rate at step {ctx.step} is {lr!r}; the probe "
                         f"needs a finite lr > 0 (its step sizes are multiples of it)")
    return lr


def vgg_layer_outputs(model: nn.Module, layers: Sequence[int]) -> dict[str, nn.Module]:
    """Module whose output is "layer #k"'s pre-activation: its norm (conv/linear → norm →
    nonlinearity; an Identity without a norm) for k < 13, the last linear layer (the logits)
    for k = 13."""
    norms, lin = model.norms(), model.layers()  # type: ignore[operator]
    bad = [k for k in layers if isinstance(k, bool) or not isinstance(k, int)
           or not 1 <= k <= len(lin)]
    if bad:
        raise ValueError(f"layers: expected layer numbers in 1..{len(lin)}, got {bad}")
    return {str(k): (norms[k - 1] if k <= len(norms) else lin[k - 1]) for k in layers}


class LayerDistributions:
    """Distribution of chosen layers' pre-activations on a fixed training batch (Santurkar
    Figs. 1c, 2, 8), measured in training mode: batch statistics, and for noisy BN the injected
    noise, exactly as the training forward sees them (buffers and RNG are restored).

    Records ``{"dist": {layer: {"q": [5/15/50/85/95th percentiles over all values],
    "mean": [per-channel mean], "var": [per-channel variance]}}}``.
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], x: Tensor, *,
                 every: int = 1) -> None:
        self.model, self.modules, self.x, self.every = model, dict(modules), x, _every(every)

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        if ctx.step % self.every:
            return {}
        tracker = ActivationTracker(self.model, self.modules, where="output", quantiles=QUANTILES,
                                    bins=1)
        tracker.record(self.x, step=ctx.step)
        out = {}
        for name, h in tracker.history().items():
            out[name] = {"q": [round(v, 5) for v in h["quantiles"][0, 0].tolist()],
                         "mean": [round(v, 5) for v in h["channel_mean"][0].tolist()],
                         "var": [round(v, 5) for v in h["channel_var"][0].tolist()]}
        return {"dist": out}


def layer_groups(model: nn.Module) -> list[list[nn.Module]]:
    """The lab models' layers for Def. 2.1: each conv/linear layer with the normalization
    module after it (Identity in a standard network), so that W_i holds a BN network's γ_i,
    β_i too and "the previous layers" move with them, as in the training step."""
    layers, norms = model.layers(), model.norms()  # type: ignore[operator]
    return [[layer, *norms[k:k + 1]] for k, layer in enumerate(layers)]


class ICSProbe:
    """Gradient ICS (Def. 2.1) at the paper's layers on step t's batch at W^(t), with the
    plain SGD step of the current lr: ``{"ics": {"layer_<k>": {"l2", "cosine", "grad_norm"}}}``.
    ``layers`` are modules or groups of them (`layer_groups`: a layer with its BN)."""

    def __init__(self, layers: Sequence[nn.Module | Sequence[nn.Module]], measure: Sequence[int],
                 loss_fn: LossFn, *, every: int = 1) -> None:
        self.layers, self.measure, self.loss_fn, self.every = list(layers), list(measure), \
            loss_fn, _every(every)

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        if not _due(ctx, self.every):
            return {}
        res = gradient_ics(ctx.model, self.loss_fn, ctx.batch, lr=_lr(ctx, "ICSProbe"),
                           layers=self.layers,
                           measure=self.measure)
        d = res.to_dict()
        return {"ics": {k: {kk: vv for kk, vv in v.items() if kk != "name"}
                        for k, v in d.items() if k.startswith("layer_")}}


class LandscapeProbe:
    """Loss range, gradient predictiveness and effective β-smoothness along −∇L(w_t) on step
    t's batch, at step sizes ``multipliers × lr`` (Sec. 3.2, Fig. 4): ``{"landscape": {...}}``
    with `LandscapeResult.to_dict`'s keys."""

    def __init__(self, multipliers: Sequence[float], loss_fn: LossFn, *, every: int = 1) -> None:
        self.multipliers = torch.tensor(list(multipliers), dtype=torch.float64)
        self.loss_fn, self.every = loss_fn, _every(every)

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        if not _due(ctx, self.every):
            return {}
        res = landscape_probe(ctx.model, self.loss_fn, ctx.batch,
                              _lr(ctx, "LandscapeProbe") * self.multipliers)
        return {"landscape": res.to_dict()}
