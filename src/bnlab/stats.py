"""Population statistics for inference (Ioffe & Szegedy 2015, Alg. 2, steps 8–11) and recalibration.

`population_statistics` runs training mini-batches through the frozen network, with every BN
normalizing by its batch statistics as in training, and averages each layer's batch statistics:

    E[x]   = E_B[μ_B]                       (weighted by batch size m_B)
    Var[x] = Σ_B m_B σ²_B / Σ_B (m_B − 1)   (= m/(m−1) · E_B[σ²_B] when all batches have size m)

with m_B = N·H·W for convolutional layers (Sec. 3.2). ``estimator="population"`` instead gives
the exact unbiased variance of all values seen (a Chan merge of the batches, which also counts
the spread of the batch means); it does not depend on how the data is split into batches.
Holds no training code; works on torch's BN modules as well as bnlab's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bnlab._checks import call_input, check_materialized, is_integer
from bnlab.layers import BatchNorm

__all__ = [
    "BufferSnapshot",
    "PopulationStats",
    "is_batchnorm",
    "population_statistics",
    "recalibrate",
]

Estimator = Literal["alg2", "population"]


# What `is_batchnorm` accepts, as a tuple that isinstance narrows with.
_BN_TYPES = (BatchNorm, nn.modules.batchnorm._BatchNorm)


def is_batchnorm(module: nn.Module) -> bool:
    """True for bnlab's `BatchNorm*` and torch's `_BatchNorm` subclasses (incl. SyncBatchNorm)."""
    return isinstance(module, _BN_TYPES)


class BufferSnapshot:
    """Copies of every buffer of ``model``; `restore()` (and leaving the ``with`` block) puts them
    back. Used wherever training-mode forwards must not move running statistics.

    Only buffers that changed are written: an in-place copy bumps the version counter, and a
    forward may have saved an unchanged buffer for its backward (eval-mode BN kernels save
    ``running_var``), which must stay usable afterwards. A buffer that a forward replaced
    (``self.calls = self.calls + 1``) or removed gets its original tensor back; one it set
    from None (a lazily computed statistic) is None again, and one it registered is removed.
    """

    def __init__(self, model: nn.Module) -> None:
        # (module, its buffer names, those that were None)
        self.names = [(m, set(m._buffers), {n for n, b in m._buffers.items() if b is None})
                      for m in model.modules()]
        # (owning module, name, the buffer, a copy of its values)
        self.saved = [(m, name, b, b.detach().clone()) for m in model.modules()
                      for name, b in m._buffers.items() if b is not None]

    @torch.no_grad()
    def restore(self) -> None:
        for m, names, none in self.names:
            for name in [n for n in m._buffers if n not in names]:
                del m._buffers[name]
                m._non_persistent_buffers_set.discard(name)
            for name in none:
                m._buffers[name] = None
        for m, name, b, copy in self.saved:
            if m._buffers.get(name) is not b:
                m._buffers[name] = b  # keeps its persistence: the set is by name
            if not torch.equal(b, copy):
                b.copy_(copy)

    def __enter__(self) -> BufferSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@dataclass
class PopulationStats:
    """Per-channel inference statistics of one BN layer, in float64."""

    mean: Tensor  # (C,) E[x]
    var: Tensor  # (C,) Var[x], unbiased
    count: int  # values per channel seen (Σ m_B)
    batches: int  # mini-batches B averaged (a GhostBatchNorm's ghosts, each one)
    calls: int = 0  # forward calls of the layer that used batch statistics


class _Accumulator:
    """Merges per-batch (m_B, μ_B, σ²_B) in float64: sums for Alg. 2, Chan's merge for the exact
    population variance (no E[x²] − E[x]²)."""

    def __init__(self) -> None:
        self.n = 0
        self.batches = 0
        self.calls = 0
        self.sum_mean: Tensor | None = None  # Σ m_B μ_B
        self.sum_m2_within: Tensor | None = None  # Σ m_B σ²_B
        self.mean: Tensor | None = None  # running mean of all values (Chan)
        self.m2: Tensor | None = None  # Σ (x − mean)² over all values (Chan)

    def add(self, x: Tensor) -> None:
        """Add the batch ``x`` (N, C, *)."""
        x = x.detach().to(torch.float64)
        dims = [0, *range(2, x.dim())]
        m = x.numel() // x.shape[1]  # m_B = N·H·W values per channel
        if m == 0:
            return
        var, mu = torch.var_mean(x, dim=dims, correction=0)  # (N, C, *) -> (C,), (C,)
        self.add_stats(m, mu, var)

    def add_stats(self, m: int, mu: Tensor, var: Tensor) -> None:
        """Add a batch of m values per channel with mean ``mu`` and biased variance ``var``."""
        if m == 0:
            return
        if self.mean is None:
            self.sum_mean, self.sum_m2_within = m * mu, m * var
            self.mean, self.m2, self.n = mu, m * var, m
        else:
            # All four are set together, by the first batch.
            assert self.m2 is not None and self.sum_mean is not None
            assert self.sum_m2_within is not None
            n = self.n + m
            delta = mu - self.mean
            self.m2 = self.m2 + m * var + delta**2 * (self.n * m / n)
            self.mean = self.mean + delta * (m / n)
            self.sum_mean = self.sum_mean + m * mu
            self.sum_m2_within = self.sum_m2_within + m * var
            self.n = n
        self.batches += 1

    def result(self, estimator: Estimator) -> PopulationStats:
        # Called only for layers that saw a batch, which sets all four.
        assert self.mean is not None and self.m2 is not None
        assert self.sum_mean is not None and self.sum_m2_within is not None
        if estimator == "alg2":
            mean = self.sum_mean / self.n
            var = self.sum_m2_within / (self.n - self.batches)
        else:
            mean, var = self.mean, self.m2 / (self.n - 1)
        return PopulationStats(mean=mean, var=var, count=self.n, batches=self.batches,
                               calls=self.calls)


def _default_forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])
    else:
        model(batch)


def _uses_batch_stats(m: nn.Module) -> bool:
    """Whether a BN call now normalizes by the batch: a layer a model's ``train()`` keeps in
    eval mode (detection code's ``norm_eval``) uses its running statistics instead."""
    mode = getattr(m, "_mode", None)  # bnlab's layers: (use batch statistics, update)
    if callable(mode):
        return bool(mode()[0])
    return m.training or getattr(m, "running_mean", None) is None


def _synced(m: nn.Module) -> bool:
    """Whether layer ``m`` normalizes by the batch over several processes in training: bnlab's
    SyncBatchNorm (and SyncBatchRenorm) or torch's, with a process group of more than one."""
    from bnlab.distributed import SyncBatchNorm, SyncBatchRenorm, _sync_active

    return (isinstance(m, (SyncBatchNorm, SyncBatchRenorm, nn.SyncBatchNorm))
            and _sync_active(m.process_group))


_END = object()  # what the batches hold no more of


def _check_every_rank_has(has: bool, groups: list[Any], seen: int) -> None:
    """Raise unless every rank of the synchronized layers' process groups agrees on whether it
    fetched another batch (a collective per batch): a rank that ran out while others went on
    hung in the next SyncBatchNorm forward; now every rank raises instead."""
    import torch.distributed as dist

    from bnlab.ddp import collective_device

    for group in groups:
        t = torch.tensor([float(has), float(not has)], device=collective_device(group))
        dist.all_reduce(t, group=group)
        if t[0] > 0 and t[1] > 0:
            raise ValueError(f"population_statistics: the ranks of a SyncBatchNorm's process "
                             f"group fed different numbers of batches (after {seen}, "
                             f"{int(t[0])} had another and {int(t[1])} did not); every rank "
                             "must feed as many (pass num_batches= to cut them alike)")


@torch.no_grad()
def population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    estimator: Estimator = "alg2",
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, PopulationStats]:
    """Estimate every BN layer's inference statistics over training batches (Alg. 2).

    The model runs in training mode (each BN normalizes with its batch statistics, as during
    training) under ``torch.no_grad``; weights, running buffers and the train/eval mode of every
    module are exactly as before when this returns. Layers frozen by `bnlab.freeze` keep
    normalizing with their running statistics and are left out (they are not recalibrated),
    as are layers the model's own ``train()`` keeps in eval mode (``norm_eval``): the layers
    after them are measured under that normalization, which eval mode also uses.
    A SyncBatchNorm in a process group of several ranks contributes the global batch's
    statistics, the same on every rank; each rank feeds its shard, and all must run the same
    number of batches (the statistics are a collective, as in training): a rank that runs out
    before the others makes every rank raise (one small all_reduce per batch), not hang.

    Args:
        model: any module containing bnlab or torch BN layers.
        batches: an iterable of tensors, ``(x, y, ...)`` tuples (the first item is fed) or dicts
            (fed as keyword arguments); or anything ``forward`` accepts.
        num_batches: stop after this many batches (default: the whole iterable).
        estimator: ``"alg2"`` (the paper's mean of batch variances times m/(m−1), pooled over
            uneven batch sizes) or ``"population"`` (exact variance of all values seen).
        forward: ``forward(model, batch)`` for models with unusual inputs.

    Returns:
        Layer name → `PopulationStats` (float64).

    Layers the forward never calls (an unused head, a branch not taken) are left out too,
    named in a RuntimeWarning, as torch's ``swa_utils.update_bn`` leaves them.

    Raises:
        ValueError: no BN layer (or every one frozen), a bad argument, a layer that saw fewer
            than 2 values, or no layer called at all.
    """
    if estimator not in ("alg2", "population"):
        raise ValueError(f"estimator must be 'alg2' or 'population', got {estimator!r}")
    if num_batches is not None and (not is_integer(num_batches) or num_batches < 1):
        raise ValueError(f"num_batches must be an integer >= 1 or None, got {num_batches!r}")
    check_materialized(model, "population_statistics")
    # (bnlab.convert and bnlab.distributed import this module: not at its top)
    from bnlab.convert.freeze import is_frozen
    from bnlab.distributed import sync_batch_stats

    layers = {name: m for name, m in model.named_modules() if is_batchnorm(m)}
    if not layers:
        raise ValueError(f"population_statistics: {type(model).__name__} has no BatchNorm layer")
    # A frozen layer normalizes with its running statistics in training too, and keeps them:
    # the layers after it are measured with that normalization, which eval mode also uses.
    layers = {name: m for name, m in layers.items() if not is_frozen(m)}
    if not layers:
        raise ValueError(f"population_statistics: every BatchNorm layer of "
                         f"{type(model).__name__} is frozen (bnlab.freeze), so none has "
                         "statistics to estimate; unfreeze the ones to recalibrate")
    acc = {name: _Accumulator() for name in layers}
    modes = {m: m.training for m in model.modules()}
    snapshot = BufferSnapshot(model)  # the training-mode forwards move the running buffers

    # Decided once per call, not per batch: the process groups do not change meanwhile.
    synced = {m for m in layers.values() if _synced(m)}

    evaluated: set[nn.Module] = set()

    def observe(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                a: _Accumulator) -> None:
        x = call_input(args, kwargs)
        if not isinstance(x, Tensor) or x.dim() < 2:
            return  # the layer's own check names what is wrong with its input
        if not _uses_batch_stats(m):  # normalized by its running statistics: left as it is
            evaluated.add(m)
            return
        a.calls += 1
        if m in synced:
            # The global batch over the ranks, which a SyncBatchNorm normalizes by: every rank
            # accumulates the same statistics (a collective: every rank must run as many
            # batches, as in training).
            mu, var, count = sync_batch_stats(x.detach().to(torch.float64), m.process_group)
            a.add_stats(int(count.item()), mu, var)
            return
        # Each mini-batch B the layer normalizes by: the input, or GhostBatchNorm's ghosts.
        split = getattr(m, "normalization_batches", None)
        for b in (split(x) if split is not None else (x,)):
            a.add(b)

    hooks = [m.register_forward_pre_hook(
        lambda m, args, kwargs, a=acc[n]: observe(m, args, kwargs, a), with_kwargs=True)
        for n, m in layers.items()]
    seen = 0
    groups = list({id(m.process_group): m.process_group for m in synced}.values())
    try:
        model.train()
        it = iter(batches)
        # (stops before the fetch after the last batch wanted: a one-shot iterator loses none)
        while num_batches is None or seen < num_batches:
            batch = next(it, _END)
            if groups:
                _check_every_rank_has(batch is not _END, groups, seen)
            if batch is _END:
                break
            (forward or _default_forward)(model, batch)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        snapshot.restore()
        for m, mode in modes.items():
            m.train(mode)
    out = {}
    unreached = []
    for name, a in acc.items():
        if a.calls == 0 and layers[name] in evaluated:
            continue  # kept in eval mode by the model: no batch statistics to estimate
        if a.calls == 0 and seen:  # an unused head, a branch not taken: as torch's update_bn
            unreached.append(name)
            continue
        if a.n - a.batches < 1 or a.n < 2:
            raise ValueError(f"population_statistics: layer {name!r} saw {a.n} value(s) per "
                             f"channel in {a.batches} batch(es); need batches of >= 2 values")
        out[name] = a.result(estimator)
    if not out and unreached:
        raise ValueError(f"population_statistics: the forward called none of the BatchNorm "
                         f"layers of {type(model).__name__} ({', '.join(unreached)}) in {seen} "
                         "batch(es); pass forward= if the model needs another call")
    if not out:
        raise ValueError(f"population_statistics: every BatchNorm layer of "
                         f"{type(model).__name__} ran in eval mode under model.train() (a "
                         "train() that keeps them in eval), so none has batch statistics")
    if unreached:
        warnings.warn(f"population_statistics: the forward never called {', '.join(unreached)}"
                      " (left out; recalibrate leaves their statistics as they are)",
                      RuntimeWarning, stacklevel=2)
    return out


@torch.no_grad()
def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    estimator: Estimator = "alg2",
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, PopulationStats]:
    """Set every BN layer's ``running_mean``/``running_var`` to its population statistics.

    Same arguments as `population_statistics`. Afterwards eval mode performs Alg. 2's inference
    transform y = γ(x − E[x])/√(Var[x] + ε) + β. Layers without running statistics are skipped.
    ``num_batches_tracked`` becomes the number of batches averaged, as after torch's
    ``swa_utils.update_bn``: with ``momentum=None`` a later training batch then weighs as one
    more batch of the average (left as it was, often 0, the next batch replaced it). Batch
    Renorm's is left as it is: it is also the step of its r_max/d_max schedule, which a reset
    would send back to its warm-up (plain BN for another ``warmup_steps``).
    """
    stats = population_statistics(model, batches, num_batches=num_batches,
                                  estimator=estimator, forward=forward)
    # The layers population_statistics found (`is_batchnorm`; stats has their names).
    modules = {name: m for name, m in model.named_modules() if isinstance(m, _BN_TYPES)}
    for name, s in stats.items():
        bn = modules[name]
        if bn.running_mean is not None:
            assert bn.running_var is not None  # registered together (track_running_stats)
            bn.running_mean.copy_(s.mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(s.var.to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None and not getattr(bn, "num_batches_is_clock",
                                                                  False):
                # What training counts: one EMA step per batch B, or per call where the layer
                # pools its batches into one step (GhostBatchNorm's "per_batch").
                per_call = getattr(bn, "counts_calls", False)
                bn.num_batches_tracked.fill_(s.calls if per_call else s.batches)
    return stats
