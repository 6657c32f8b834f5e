"""Probes: measurements taken at the evaluation steps of `bnlab.lab.train.fit` (see `Probe`).

Each is a small class called with a `ProbeContext`; it returns a dict merged into the metrics
record and leaves the model as it found it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.lab.train import ProbeContext

__all__ = ["InputPercentiles"]


class InputPercentiles:
    """Percentiles of the input of ``module`` (e.g. one sigmoid layer), per unit, on a fixed
    held-out batch in eval mode: Ioffe & Szegedy 2015, Fig. 1(b, c) ("{15, 50, 85}th
    percentiles" of the input to a typical sigmoid).

    Records ``{key: [[q-th percentile of unit j for j in units] for q in qs]}``.
    """

    def __init__(self, module: nn.Module, x: Tensor, *, key: str = "pct",
                 qs: Sequence[float] = (15, 50, 85)) -> None:
        self.module, self.x, self.key = module, x, key
        self.q = torch.tensor([q / 100 for q in qs])

    @torch.no_grad()
    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        seen: list[Tensor] = []
        hook = self.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        was = ctx.model.training
        try:
            ctx.model.eval()
            ctx.model(self.x)
        finally:
            hook.remove()
            ctx.model.train(was)
        z = seen[0].flatten(1).float()  # (N, units)
        pct = torch.quantile(z, self.q.to(z.device), dim=0)  # (len(qs), units)
        return {self.key: [[round(v, 4) for v in row] for row in pct.tolist()]}
