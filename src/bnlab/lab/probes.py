"""Probes: measurements taken at the evaluation steps of `bnlab.lab.train.fit` (see `Probe`).

Each is a small class called with a `ProbeContext`; it returns a dict merged into the metrics
record and leaves the model as it found it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.diagnostics import probing
from bnlab.distributed import SyncBatchNorm, sync_batch_stats
from bnlab.lab.train import ProbeContext
from bnlab.variants._common import unbiased

__all__ = ["InputPercentiles"]


class InputPercentiles:
    """Percentiles of the input of ``module`` (e.g. one sigmoid layer), per unit, on a fixed
    held-out batch in eval mode: Ioffe & Szegedy 2015, Fig. 1(b, c) ("{15, 50, 85}th
    percentiles" of the input to a typical sigmoid).

    Records ``{key: [[q-th percentile of unit j for j in units] for q in qs]}``.
    """

    def __init__(self, module: nn.Module, x: Tensor, *, key: str = "pct",
                 qs: Sequence[float] = (15, 50, 85)) -> None:
        q = torch.as_tensor(qs, dtype=torch.float64)
        if q.dim() != 1 or q.numel() == 0 or not bool(((q >= 0) & (q <= 100)).all()):
            raise ValueError(f"qs: expected a non-empty list of percentiles in [0, 100], "
                             f"got {qs!r}")
        if bool((q < 1).all()) and bool((q > 0).any()):
            raise ValueError(f"qs: expected percentiles in [0, 100] (15 for the 15th), got "
                             f"{qs!r}, which read as fractions of a percent")
        self.module, self.x, self.key = module, x, key
        self.q = (q / 100).float()

    @torch.no_grad()
    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        seen: list[Tensor] = []
        # A copy: an in-place module (ReLU(inplace=True)) would overwrite the input it records.
        hook = self.module.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach().clone()))
        modes = {m: m.training for m in ctx.model.modules()}  # a BN frozen with .eval() stays so
        try:
            ctx.model.eval()
            ctx.model(self.x)
        finally:
            hook.remove()
            for m, mode in modes.items():
                m.training = mode
        z = seen[0].flatten(1).float()  # (N, units)
        pct = torch.quantile(z, self.q.to(z.device), dim=0)  # (len(qs), units)
        return {self.key: [[round(v, 4) for v in row] for row in pct.tolist()]}


class CumulativeBatchStats:
    """The cumulative (simple) average of every BN layer's training batch statistics since step
    0: what ``momentum=None`` keeps. Forward pre-hooks record (μ_B, m/(m−1)·σ²_B) on training
    forwards with gradients enabled (so no_grad probes are not counted). A synchronized layer
    (`bnlab.SyncBatchNorm` under torchrun) records the global batch's, which it normalizes by
    (one more all_gather per layer and step); a local one its own shard's.
    """

    def __init__(self, model: nn.Module) -> None:
        from bnlab.stats import is_batchnorm

        self.layers = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
        self.sums: dict[str, list[Tensor]] = {}
        self.count = {n: 0 for n in self.layers}
        for name, m in self.layers.items():
            m.register_forward_pre_hook(lambda mod, args, n=name: self._add(n, mod, args[0]))

    def _add(self, name: str, mod: nn.Module, x: Tensor) -> None:
        # Checked before no_grad (inside it grad is always disabled); a probe's evaluations at
        # other weights (gradient ICS, landscape) run with grad but are no training batches.
        if not (mod.training and torch.is_grad_enabled()) or probing():
            return
        with torch.no_grad():
            if isinstance(mod, SyncBatchNorm) and mod._syncing(True):
                mean, var, m = sync_batch_stats(x.detach().float(), mod.process_group)
                var = unbiased(var, m)  # over the global batch's m values, as the layer stores
            else:
                dims = [0, *range(2, x.dim())]
                var, mean = torch.var_mean(x.detach().float(), dim=dims, correction=1)
        if name in self.sums:
            self.sums[name][0] += mean
            self.sums[name][1] += var
        else:
            self.sums[name] = [mean, var]
        self.count[name] += 1

    def load_into(self, model: nn.Module) -> None:
        """Write the averages into ``model``'s BN running buffers (a copy of the trained one)."""
        modules = dict(model.named_modules())
        for name, (s_mean, s_var) in self.sums.items():
            bn = modules[name]
            bn.running_mean.copy_(s_mean / self.count[name])
            bn.running_var.copy_(s_var / self.count[name])

    def state_dict(self) -> dict[str, Any]:
        return {"sums": {k: [t.clone() for t in v] for k, v in self.sums.items()},
                "count": dict(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = state["sums"], state["count"]


class InferenceStatistics:
    """Held-out accuracy of one trained state under four ways of normalizing at inference:

    * ``acc_ema``: the running averages (momentum 0.1, what the layers keep);
    * ``acc_alg2``: exact population statistics of Alg. 2 (E[x] = E_B[μ_B],
      Var[x] = m/(m−1)·E_B[σ²_B]) over ``batches`` training mini-batches of the training size m;
    * ``acc_cumulative``: the cumulative average since step 0 (`CumulativeBatchStats`);
    * ``acc_train_mode``: no inference transform, each held-out batch of size m normalized by
      its own statistics (the train-versus-eval gap).
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, train_x: Tensor, *,
                 batch_size: int, batches: int = 100, seed: int = 0) -> None:
        self.cumulative = CumulativeBatchStats(model)
        self.x, self.y, self.m = x, y, batch_size
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(train_x), generator=g)[:batches * batch_size]
        self.calib = list(train_x[idx].split(batch_size))  # fixed Alg. 2 sample

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        import copy

        from bnlab.lab.train import evaluate
        from bnlab.stats import recalibrate

        out = {"acc_ema": evaluate(ctx.model, self.x, self.y)[0],
               "acc_train_mode": evaluate(ctx.model, self.x, self.y, batch_size=self.m,
                                          train_mode=True)[0]}
        twin = copy.deepcopy(ctx.model)
        recalibrate(twin, self.calib, estimator="alg2")
        out["acc_alg2"] = evaluate(twin, self.x, self.y)[0]
        if self.cumulative.sums:
            self.cumulative.load_into(twin)
            out["acc_cumulative"] = evaluate(twin, self.x, self.y)[0]
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.cumulative.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cumulative.load_state_dict(state)
