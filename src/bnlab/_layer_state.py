"""A BN layer's mode and counters, shared by `bnlab.layers` and the variants: which statistics a
forward uses and updates (PyTorch's rule), the averaging factor of the running update, and the
step counters, with torch's behaviour where a user has set a buffer to None."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from bnlab import functional as F

if TYPE_CHECKING:
    from bnlab.layers import BatchNorm

__all__ = ["StatsLayer", "count_batch", "count_untracked", "has_stats", "reset_stats",
           "running_momentum", "stats_mode"]


def _captured(buf: Tensor, value: Tensor) -> bool:
    """Whether ``buf`` is a plain tensor that a torch.func transform (grad, vmap) captured
    while ``value`` is one of its wrapped tensors: functorch refuses an in-place write of the
    one into the other. The non-persistent ``num_nonfinite_batches`` is captured so whenever
    a caller builds the buffers of `functional_call` from ``state_dict()`` (MAML-style code);
    it is a diagnostic, so that step goes uncounted rather than failing."""
    if torch.compiler.is_compiling():  # (Dynamo cannot trace the query; it sees no wrappers)
        return False
    from torch._C._functorch import is_functorch_wrapped_tensor

    return is_functorch_wrapped_tensor(value) and not is_functorch_wrapped_tensor(buf)


def count_batch(module: BatchNorm, finite: Tensor) -> None:
    """Advance a layer's counters after a training step: ``num_batches_tracked += finite`` (a
    skipped batch does not count, so the cumulative average of momentum=None stays the exact
    mean of the batches it used) and ``num_nonfinite_batches += not finite``.

    On the eager CPU path both adds run in C++ (`csrc/bn_fast.cpp`, ``count``): an in-place add
    on a 0-d tensor costs 10–13 µs between a layer's forward and autograd's backward."""
    tracked, nonfinite = module.num_batches_tracked, module.num_nonfinite_batches
    # (num_batches_tracked deleted by hand: torch's BN then trains on without counting; so
    # does this one, still counting the skipped batches)
    if tracked is not None:
        if F._fast is not None and F._fast_allowed() and F._fast.count(tracked, nonfinite, finite):
            return
        tracked.add_(finite)  # bool adds as 0/1
    if not F.host_readable(finite):  # no host sync, graph break or transform error
        if not _captured(nonfinite, finite):
            nonfinite.add_(finite.logical_not())
    elif not finite:  # on CPU in eager mode the value is at hand (the warning read it)
        nonfinite.add_(1)


def count_untracked(m: StatsLayer, input: Tensor, nonempty: Tensor | None = None) -> None:
    """torch's BN counts every training batch while ``track_running_stats`` is set and the
    counter exists, also where the running statistics were set to None (then nothing else is
    updated); so does this one. (Batches that update the statistics are counted by
    `count_batch`; an empty batch counts in neither, as documented for bnlab's BN.)
    ``nonempty``: whether the batch has values, as a 0-d bool tensor (a SyncBatchNorm's global
    batch, whose shard ``input`` may be empty); default: ``input`` has values."""
    if (m.training and m.running_mean is None and m.track_running_stats
            and m.num_batches_tracked is not None and not m._stats_update_blocked):
        if nonempty is not None:
            m.num_batches_tracked.add_(nonempty)  # (bool adds as 0/1, without a host sync)
        elif input.numel() > 0:
            m.num_batches_tracked.add_(1)


def reset_stats(mean: Tensor | None, spread: Tensor | None, count: Tensor | None) -> None:
    """Running statistics back to their initial values: the mean 0, the spread (BN's variance,
    LpNorm's scale) 1, the step count 0; each one that exists (a user may have set one to
    None, which torch's BN reports as an AttributeError half-way through)."""
    if mean is not None:
        mean.zero_()
    if spread is not None:
        spread.fill_(1)
    if count is not None:
        count.zero_()


class StatsLayer(Protocol):
    """What `stats_mode`, `running_momentum` and `count_untracked` read of a layer: BN's flags
    and counter (BN's layers and `bnlab.LpNorm`, which is not a BatchNorm)."""

    training: bool
    frozen: bool
    track_running_stats: bool
    _stats_update_blocked: int
    momentum: float | None
    running_mean: Tensor | None
    num_batches_tracked: Tensor | None


def has_stats(who: str, mean: Tensor | None, spread: Tensor | None, spread_name: str) -> bool:
    """Whether a layer's running statistics exist (the mean and its spread, ``spread_name``:
    BN's running_var, LpNorm's running_scale). One set to None without the other is an error,
    as in torch's BN."""
    if (mean is None) != (spread is None):
        raise ValueError(f"{who}: running_mean and {spread_name} must both be None or neither, "
                         f"got {spread_name if mean is not None else 'running_mean'} None only")
    return mean is not None


def stats_mode(m: StatsLayer, has_stats: bool) -> tuple[bool, bool]:
    """(use batch statistics, update the running statistics) for a forward of ``m``, a layer
    with BN's flags (``training``, ``frozen``, ``track_running_stats``,
    ``_stats_update_blocked``) whose running statistics exist iff ``has_stats``.

    PyTorch's rule, which reads the buffers, not the flag, for eval: batch statistics in
    training or where no running statistics exist; the running statistics are updated in
    training where the flag asks for it and they exist. (So turning track_running_stats off on
    a trained layer stops the updates and keeps eval on the running statistics, as in torch;
    deleting the buffers makes eval use the batch's.)"""
    training = m.training and not (m.frozen and has_stats)
    update = training and m.track_running_stats and has_stats and not m._stats_update_blocked
    return training or not has_stats, update


def running_momentum(m: StatsLayer) -> float | Tensor:
    """The averaging factor of ``m``'s next update: ``m.momentum``, or 1/n for the cumulative
    average (n counting this batch; a 0-d tensor: no host sync)."""
    if m.momentum is not None:
        return m.momentum
    if m.num_batches_tracked is None:
        # Deleted by hand: torch's BN then has no count to average over and uses a factor of
        # 0 (the running statistics stay as they are); so does this one.
        return 0.0
    assert m.running_mean is not None  # (an update is asked for only where it exists)
    # In the buffer's dtype, at least float32: long / int gives float32, which would cap
    # float64 layers' average at float32's precision (torch's own average is exact to float64),
    # and a count in float16 is inf from 65504 on (a factor of 0: the statistics would stop).
    # (reshape: a counter a user replaced by a 1-element 1-D tensor still gives a 0-d factor,
    # as torch's float(num_batches_tracked) does)
    dtype = torch.promote_types(m.running_mean.dtype, torch.float32)
    return 1.0 / (m.num_batches_tracked + 1).to(dtype).reshape(())
