"""Freeze BN layers for fine-tuning, and keep extra forwards from moving running statistics.

`freeze(model, stats=True)` makes every BN normalize with its running statistics and never
update them, and that survives `model.train()` (in PyTorch `eval()` does it and `train()`
undoes it: pytorch#86590). `no_stats_update(model)` keeps batch-statistics normalization but
leaves the running statistics alone: probes, a second forward for a loss, the recomputation of
activation checkpointing (pytorch#96136, fairscale#1035), which `torch.no_grad()` does not stop.

Works on bnlab's layers, variants and `LpNorm` (flags checked in their forward) and on torch's
BN layers: ``freeze`` registers a forward pre-hook that runs them in eval mode for that call
(restored after it, so ``module.training`` keeps reporting the model's mode);
``no_stats_update`` sets their momentum to 0 for the duration of the context (r ← 1·r + 0·s
leaves r bit for bit) and restores ``num_batches_tracked`` (and, after a non-finite batch, the
statistics) on exit. The forward itself is unchanged, so activation checkpointing sees the
same saved tensors.
`FrozenBatchNorm` modules are frozen by construction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from bnlab._checks import check_materialized
from bnlab.layers import BatchNorm
from bnlab.variants.frozen import FrozenBatchNorm
from bnlab.variants.lp import LpNorm

__all__ = ["freeze", "is_frozen", "no_stats_update", "unfreeze"]

_TorchBN = nn.modules.batchnorm._BatchNorm
_HANDLES = "_bnlab_freeze_handles"


# Layers whose forward reads the `frozen` and `_stats_update_blocked` flags.
_FLAGGED = (BatchNorm, LpNorm)


def _bn_modules(model: nn.Module) -> list[tuple[str, BatchNorm | LpNorm | _TorchBN]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (*_FLAGGED, _TorchBN))]


def _has_running_stats(m: nn.Module) -> bool:
    second = m.running_scale if isinstance(m, LpNorm) else m.running_var
    return m.running_mean is not None and second is not None


def _eval_pre_hook(module: nn.Module, args: Any) -> None:
    module.__dict__["_bnlab_mode"] = module.training
    module.training = False


def _restore_hook(module: nn.Module, args: Any, output: Any) -> None:
    module.training = module.__dict__.pop("_bnlab_mode", module.training)


# freeze's own hooks, which only run a torch BN in eval mode: not a user's.
_OWN_HOOKS = (_eval_pre_hook, _restore_hook)


def user_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks other than `freeze`'s, hooks that may change what
    it returns."""
    return any(h not in _OWN_HOOKS
               for h in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()))


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Make ``new`` also run ``old``'s forward hooks (but `freeze`'s), in the same order, after
    any of its own: a replaced or folded layer keeps its users' hooks.

    ``new`` takes over ``old``'s hook dicts themselves (``old`` keeps them too, less
    `freeze`'s hooks, and leaves the model): the handles that registration returned point at
    those dicts, so ``handle.remove()`` still removes a hook from the new layer. (With copies
    of the entries, a removed hook kept running on it.)"""
    # `freeze`'s handles on ``new`` point at its own dicts, which are replaced below: its hooks
    # are registered again afterwards (a dead handle made the module impossible to deep-copy,
    # and `unfreeze` remove nothing)
    frozen = new.__dict__.pop(_HANDLES, None)
    for handle in frozen or ():
        handle.remove()
    for d in ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        shared, own = getattr(old, d), getattr(new, d)
        if shared is own:
            continue
        carried = [(k, h) for k, h in shared.items() if h not in _OWN_HOOKS]
        shared.clear()
        shared.update([*own.items(), *carried])  # new's own first
        setattr(new, d, shared)
    if frozen is not None:
        _register_freeze_hooks(new)
        for d in ("_forward_pre_hooks", "_forward_hooks"):  # first, as before the carry
            hooks = getattr(new, d)
            for k in [k for k, h in hooks.items() if h in _OWN_HOOKS]:
                hooks.move_to_end(k, last=False)


def _register_freeze_hooks(m: nn.Module) -> None:
    """Run a torch BN in eval mode for each call. always_call: a forward that raises (a bad
    shape, an OOM the caller retries) must not leave the layer in eval mode."""
    m.__dict__[_HANDLES] = (m.register_forward_pre_hook(_eval_pre_hook),
                            m.register_forward_hook(_restore_hook, always_call=True))


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with fixed running statistics whatever its mode."""
    if isinstance(module, FrozenBatchNorm):
        return True
    if isinstance(module, _FLAGGED):
        return bool(module.frozen)
    return _HANDLES in module.__dict__


def freeze(model: nn.Module, *, stats: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every BN layer of ``model`` in place; the effect survives ``model.train()``.

    Args:
        model: any module (bnlab or torch BN layers anywhere inside, or a BN itself).
        stats: normalize with the running statistics (Alg. 2's inference transform) in train()
            too, and never update them.
        affine: stop learning γ and β (``requires_grad=False``; optimizers skip them).

    Returns:
        ``model``.

    Raises:
        ValueError: ``stats=True`` on a layer without running statistics (it has nothing to
            freeze to); the message names the layer.
    """
    check_materialized(model, "freeze")
    layers = _bn_modules(model)
    for name, m in layers if stats else ():  # all checked first: an error changes nothing
        if not _has_running_stats(m):
            raise ValueError(f"freeze: layer {name or type(m).__name__!r} has no running "
                             "statistics (track_running_stats=False); pass stats=False or "
                             "recalibrate it with running statistics first")
    for _, m in layers:
        if stats:
            if isinstance(m, _FLAGGED):
                m.frozen = True
            elif _HANDLES not in m.__dict__:
                _register_freeze_hooks(m)
        if affine:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(False)
    return model


def unfreeze(model: nn.Module, *, stats: bool = True, affine: bool = True) -> nn.Module:
    """Undo `freeze` in place (``FrozenBatchNorm`` modules stay as they are). Returns ``model``."""
    check_materialized(model, "unfreeze")
    for _, m in _bn_modules(model):
        if stats:
            if isinstance(m, _FLAGGED):
                m.frozen = False
            for handle in m.__dict__.pop(_HANDLES, ()):
                handle.remove()
        if affine:
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(True)
    return model


@contextmanager
def no_stats_update(model: nn.Module) -> Iterator[nn.Module]:
    """A context in which training-mode forwards leave every running statistic untouched.

    Inside it BN layers still normalize with their batch statistics in train() mode (so the
    forward is the training forward), but ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` do not change; eval() forwards are unchanged. Nests; restores the
    previous state on exit, also after an exception.

    Example::

        with bnlab.no_stats_update(model):
            probe_loss = loss_fn(model(x_probe), y_probe)   # no effect on the statistics
        with bnlab.no_stats_update(model):
            loss.backward()      # activation checkpointing recomputes the forward here
    """
    ours = [m for _, m in _bn_modules(model) if isinstance(m, _FLAGGED)]
    # (a lazy BN's statistics do not exist yet: a forward inside creates them, at their initial
    # values, which momentum 0 keeps)
    theirs = [(m, m.momentum, [None if is_lazy(b) else b.clone() for b in m.buffers()])
              for _, m in _bn_modules(model) if not isinstance(m, _FLAGGED)]
    for m in ours:
        m._stats_update_blocked = m._stats_update_blocked + 1
    for bn, _, _ in theirs:
        bn.momentum = 0.0  # torch's update (1 − 0)·r + 0·s is r exactly for finite s
    try:
        yield model
    finally:
        for m in ours:
            m._stats_update_blocked = m._stats_update_blocked - 1
        for bn, momentum, saved in theirs:
            bn.momentum = momentum
            with torch.no_grad():
                for b, old in zip(bn.buffers(), saved, strict=True):
                    # num_batches_tracked; statistics after a NaN
                    if old is not None and not torch.equal(b, old):
                        b.copy_(old)
