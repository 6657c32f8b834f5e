"""Swap a model's norm layers: torch's BN for bnlab's drop-ins and back, or any BN for a variant.

`replace_norm(model)` is the drop-in conversion: every ``nn.BatchNorm{1,2,3}d`` and
``nn.SyncBatchNorm`` becomes bnlab's layer of the same rank with the same configuration (ε,
momentum, ``affine``, ``bias``, ``track_running_stats``, process group) and state, so the model
computes the same function in both modes. ``replace_norm(model, "torch")`` is the way back, for
tools that match torch's classes (eager-mode quantization's ``fuse_modules``, FLOP counters,
weight-decay exclusion lists). With a factory, every BN becomes ``factory(num_features)``
(Batch Renorm, Ghost or Frozen BN, ...), whose own arguments (momentum included) are the
factory's.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from bnlab._checks import check_materialized, plain
from bnlab.convert import _pairs
from bnlab.convert.freeze import carry_hooks, freeze, is_frozen
from bnlab.layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU
from bnlab.stats import is_batchnorm
from bnlab.variants.frozen import FrozenBatchNorm

__all__ = ["NormFactory", "replace_norm"]

NormFactory = Callable[[int], nn.Module]
# What a layer holds and how it computes; a factory that takes these gets the old layer's.
_STRUCTURE = ("affine", "track_running_stats")


def _same_kind(target: str) -> dict[type, type]:
    """Exact class → its counterpart of the same rank in the other library."""
    from bnlab.distributed import SyncBatchNorm  # imports bnlab.convert: not at module level

    pairs = [(nn.BatchNorm1d, BatchNorm1d), (nn.BatchNorm2d, BatchNorm2d),
             (nn.BatchNorm3d, BatchNorm3d), (nn.SyncBatchNorm, SyncBatchNorm)]
    return dict(pairs) if target == "bnlab" else {b: t for t, b in pairs}


def _holds_stats(m: nn.Module) -> bool:
    """Whether ``m`` has running statistics, which its eval mode normalizes with. Not its
    ``track_running_stats`` flag: turned off on a trained layer, the flag stops the updates
    and eval keeps the statistics (and deleted by hand, they are gone with the flag on)."""
    return getattr(m, "running_mean", None) is not None


def _same_config(old: nn.Module, cls: type) -> nn.Module:
    # Built to hold statistics where ``old`` holds them; ``old``'s flag is set after the state
    # is loaded (`_carry_over`).
    kwargs: dict[str, Any] = {"eps": old.eps, "momentum": old.momentum, "affine": old.affine,
                              "track_running_stats": _holds_stats(old)}
    if old.affine and _takes(cls, "bias"):
        kwargs["bias"] = old.bias is not None
    if hasattr(old, "process_group"):
        kwargs["process_group"] = old.process_group
    return cls(old.num_features, **kwargs)


def _takes(factory: NormFactory, name: str) -> bool:
    """Whether ``factory`` accepts the keyword ``name`` that a partial has not already bound."""
    if isinstance(factory, functools.partial) and name in factory.keywords:
        return False
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read (some builtins)
        return False
    return name in params


def _structure(m: nn.Module) -> dict[str, bool]:
    # FrozenBatchNorm has no ``affine``: γ and β always.
    return {"affine": bool(getattr(m, "affine", True)), "track_running_stats": _holds_stats(m)}


def _loses(old: nn.Module, new: nn.Module) -> bool:
    """Whether ``new`` cannot compute ``old``'s function: it uses running statistics where
    ``old`` has none (or the reverse), or ``old``'s γ and β have nowhere to go. (A new γ = 1,
    β = 0 where ``old`` had none computes the same.)"""
    had, has = _structure(old), _structure(new)
    return (had["track_running_stats"] != has["track_running_stats"]
            or (had["affine"] and not has["affine"]))


def _build(old: _pairs.Norm, factory: NormFactory) -> nn.Module:
    had = _structure(old)
    kwargs: dict[str, Any] = {k: had[k] for k in _STRUCTURE if _takes(factory, k)}
    if had["affine"] and getattr(old, "bias", True) is None and _takes(factory, "bias"):
        kwargs["bias"] = False  # γ without β (torch 2.13's bias=False): no β to learn either
    return factory(old.num_features, **kwargs)


@torch.no_grad()
def _match_dtypes(old: nn.Module, new: nn.Module) -> None:
    """Give each floating parameter and buffer of ``new`` the dtype of ``old``'s of the same
    name: mixed-precision recipes keep BN's statistics (or all of BN) in float32 beside
    bfloat16 parameters, which one ``new.to(dtype)`` would round."""
    olds = {**dict(old.named_parameters()), **dict(old.named_buffers())}
    for prefix, mod in new.named_modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                o = olds.get(f"{prefix}.{k}" if prefix else k)
                if (t is not None and o is not None and t.is_floating_point()
                        and o.is_floating_point() and t.dtype != o.dtype):
                    t.data = t.data.to(o.dtype)


def _carry_over(old: nn.Module, new: nn.Module, copy_eps: bool,
                device: torch.device | None, hooks: bool = True) -> None:
    """State, ε, ``track_running_stats``, frozen flag, requires_grad, forward hooks (unless
    not ``hooks``) and mode of ``old`` onto ``new`` (on ``device``, the model's, where ``old``
    holds no tensor to take it from)."""
    ref = next(iter([*old.parameters(), *old.buffers()]), None)
    if ref is not None:
        new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        _match_dtypes(old, new)
    elif device is not None:
        new.to(device=device)
    old_state, new_state = old.state_dict(), new.state_dict()
    new.load_state_dict({k: (old_state[k] if k in old_state and old_state[k].shape == v.shape
                             else v) for k, v in new_state.items()})
    old_params = dict(old.named_parameters())
    for k, p in new.named_parameters():
        if k in old_params:
            p.requires_grad_(old_params[k].requires_grad)
    if copy_eps and hasattr(new, "eps"):
        new.eps = plain(old.eps)  # (torch's layer keeps a tensor ε as given)
    if (hasattr(old, "track_running_stats") and hasattr(new, "track_running_stats")
            and _holds_stats(old) == _holds_stats(new)):
        new.track_running_stats = old.track_running_stats  # (built from _holds_stats)
    if is_frozen(old) and not is_frozen(new) and is_batchnorm(new) and _holds_stats(new):
        freeze(new, stats=True, affine=False)
    if hooks:
        carry_hooks(old, new)
    new.train(old.training)


@torch.no_grad()
def replace_norm(model: nn.Module,
                 factory: NormFactory | Literal["bnlab", "torch"] = "bnlab", *,
                 match: Callable[[str, nn.Module], bool] | None = None, copy_eps: bool = True,
                 inplace: bool = False) -> nn.Module:
    """Replace BN layers: torch's by bnlab's drop-ins (the default), bnlab's by torch's, or
    every BN (bnlab's, torch's, variants, frozen) by ``factory(num_features)``.

    ``"bnlab"``: ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` become `bnlab.BatchNorm1d/2d/3d`
    and `bnlab.SyncBatchNorm` with the same ε, momentum, ``affine``, ``bias``,
    ``track_running_stats`` and process group; bnlab's layers stay. ``"torch"``: the reverse.
    Layers with no counterpart (a subclass of torch's BN, bnlab's rank-agnostic `BatchNorm`,
    fused BN+ReLU and the variants, for ``"torch"``) are left as they are and named in a warning.
    With a factory, a layer whose class has a ``forward`` of its own (e.g. timm's BN +
    activation) is left as it is, and named in a warning, unless ``match`` selects it; a fused
    `BatchNormReLU` whose replacement is not one becomes ``nn.Sequential(new, nn.ReLU())``.

    A factory gets the old layer's ``affine`` and ``track_running_stats`` when it takes them
    (and a ``functools.partial`` has not bound them); its other arguments, momentum included,
    are its own. A new BN that cannot compute the old layer's function (running statistics
    where the old layer had none or the reverse, e.g. a `FrozenBatchNorm2d` for a layer built
    with ``track_running_stats=False``; or no γ, β where it had them) is named in a warning.

    Every conversion copies each state_dict entry the new layer has with the same shape (γ, β,
    running statistics, ``num_batches_tracked``), γ's and β's ``requires_grad``, the device and
    dtype, the train/eval mode, the frozen state (`bnlab.freeze`), forward hooks and, with
    ``copy_eps``, ε.

    Args:
        model: any module, or a BN itself.
        factory: ``"bnlab"``, ``"torch"``, or ``(num_features) -> nn.Module``, e.g.
            ``bnlab.variants.FrozenBatchNorm2d`` or
            ``functools.partial(bnlab.variants.GhostBatchNorm, virtual_batch_size=32)``.
        match: ``(name, module) -> bool`` to choose which norms to replace (default: all).
        copy_eps: copy ε from the old layer (a factory's layer; the named targets always do).
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The converted model (the new module if ``model`` itself was a BN).
    """
    if isinstance(factory, str):
        if factory not in ("bnlab", "torch"):
            raise ValueError(f"replace_norm: factory must be 'bnlab', 'torch' or a callable "
                             f"(num_features) -> nn.Module, got {factory!r}")
    elif not callable(factory):
        raise TypeError(f"replace_norm: factory must be 'bnlab', 'torch' or a callable "
                        f"(num_features) -> nn.Module, got {type(factory).__name__}")
    check_materialized(model, "replace_norm")
    if not inplace:  # process groups are shared, not copied (nor copyable, for real ones)
        model = _pairs.copy_model(model)
    kinds = _same_kind(factory) if isinstance(factory, str) else {}
    device = next((t.device for t in [*model.parameters(), *model.buffers()]), None)
    left: list[str] = []
    changed: list[str] = []
    custom: list[str] = []
    out = model
    for name, old in [(n, m) for n, m in model.named_modules()
                      if _pairs.is_norm(m) and (match is None or match(n, m))]:
        label = f"{name or '<root>'} ({type(old).__name__})"
        if isinstance(factory, str):
            cls = kinds.get(type(old))
            if cls is None:
                mine = isinstance(old, (BatchNorm, FrozenBatchNorm))
                if mine != (factory == "bnlab"):  # not already the target library's
                    left.append(label)
                continue
            new = _same_config(old, cls)
            _carry_over(old, new, True, device)
        else:
            if _pairs.custom_forward(old) and match is None:
                custom.append(label)
                continue
            new = _build(old, factory)
            wrap = isinstance(old, BatchNormReLU) and not isinstance(new, BatchNormReLU)
            _carry_over(old, new, copy_eps, device, hooks=not wrap)
            if _pairs.is_norm(new) and _loses(old, new):
                changed.append(f"{label} -> {type(new).__name__}")
            if wrap:  # the fused layer's ReLU stays, and its hooks see the ReLU's output
                new = nn.Sequential(new, nn.ReLU())
                carry_hooks(old, new)
                new.train(old.training)
        if not name:
            out = new
        else:
            _pairs.set_module(model, name, new)
    if left:
        warnings.warn(f"replace_norm: no {factory} counterpart, left as they are: "
                      + ", ".join(left), UserWarning, stacklevel=3)
    if custom:
        warnings.warn("replace_norm: left as they are, their classes' forward being their own "
                      "(the new layer would not run it; select them with match= to replace "
                      "them anyway): " + ", ".join(custom), UserWarning, stacklevel=3)
    if changed:
        warnings.warn("replace_norm: these new layers do not compute the old ones' function "
                      "(running statistics or affine γ, β differ): "
                      + ", ".join(changed), UserWarning, stacklevel=3)
    return out
