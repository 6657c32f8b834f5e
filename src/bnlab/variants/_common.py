"""Helpers the variants share with the core: the dispatched training transform and buffer updates.

Variants never re-derive Alg. 1: they call the same entry points as `bnlab.layers` (the CPU
kernels when `bnlab.kernels` supports the input, the reference path with the hand-written
backward otherwise), so a faster kernel speeds every variant up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import _autograd
from bnlab import functional as F


def train_transform(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, μ_B, σ²_B) of Alg. 1 on ``x`` through the same dispatch as `F.batch_norm`.

    ``weight`` and ``bias`` may be any differentiable (C,) tensors (Batch Renorm passes γ·r and
    γ·d + β): the hand-written backward gives their gradients, autograd carries them on.
    """
    if F._use_kernels(x):
        from bnlab import kernels

        return kernels._train(x, weight, bias, eps)
    return _autograd.batch_norm_train(x, weight, bias, eps)


def values_per_channel(x: Tensor) -> int:
    """m = N·(spatial size): the values one channel's statistics reduce over (Sec. 3.2)."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def unbiased(var: Tensor, count: Tensor | int) -> Tensor:
    """m/(m−1)·σ²_B, the stored estimate (Alg. 2). No host sync. For a count known only on the
    device (a synchronized batch) m <= 1 gives NaN, the undefined estimate, so the running
    update skips that batch as non-finite; a Python count <= 1 gives σ²_B itself."""
    if isinstance(count, Tensor):
        c = count.to(var.dtype)
        return torch.where(c > 1, var * c / (c - 1).clamp_min(1), torch.nan)
    return var * (count / (count - 1)) if count > 1 else var


def store_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                        var_to_store: Tensor, momentum: float | Tensor) -> Tensor:
    """r ← (1 − momentum)·r + momentum·s with s already the value to store (no Bessel factor).

    `F.update_running_stats` applies m/(m−1) itself; with ``count=1`` it applies none, which is
    what callers that pooled their own unbiased estimate (ghost, sync) need. Non-finite
    statistics leave the buffers untouched, as in the core.
    """
    return F.update_running_stats(running_mean, running_var, mean, var_to_store, 1, momentum)


