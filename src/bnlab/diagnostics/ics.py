"""Gradient-based internal covariate shift (Santurkar et al. 2018, Definition 2.1, Fig. 3).

For layers W_1..W_k and the batch (x, y) of step t::

    G_i  = ∇_{W_i} L(W_1,    ..., W_{i−1},    W_i, ..., W_k; x, y)
    G′_i = ∇_{W_i} L(W_1^+,  ..., W_{i−1}^+,  W_i, ..., W_k; x, y)     W^+ = updated weights

    ICS_i = ‖G_i − G′_i‖₂  (ideally 0)      cos(G_i, G′_i)  (ideally 1)

where the update W^+ is computed from the gradient of the whole loss at step t. Works on any
module through `torch.func.functional_call`; no plotting, no training loop.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.diagnostics._common import (
    LossFn,
    SideEffectGuard,
    check_not_str,
    check_probe_model,
    current_params,
    flat,
    fresh,
    loss_and_grad,
    split_batch,
    submodule,
)
from bnlab.stats import is_batchnorm
from bnlab.variants import LpNorm

__all__ = ["LAYER_KINDS", "NORM_KINDS", "ICSResult", "default_layers", "gradient_ics", "sgd_update"]

UpdateFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], Mapping[str, Tensor]]


@dataclass
class ICSResult:
    """Per-layer ICS at one step; index k−1 is the paper's "layer #k"."""

    names: list[str]  # module name of each layer, in forward order
    layers: list[int]  # 1-based numbers of the measured layers
    l2: Tensor  # (len(layers),) ‖G − G′‖₂
    cosine: Tensor  # (len(layers),) cos(G, G′); nan where G or G′ is 0
    grad_norm: Tensor  # (len(layers),) ‖G‖₂, to read l2 relative to the gradient's size
    loss: float = field(default=float("nan"))  # L at the current weights

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values, keyed "layer_<k>"."""
        out: dict[str, Any] = {"loss": self.loss}
        for j, k in enumerate(self.layers):
            out[f"layer_{k}"] = {"name": self.names[k - 1], "l2": float(self.l2[j]),
                                 "cosine": float(self.cosine[j]),
                                 "grad_norm": float(self.grad_norm[j])}
        return out


def _check_lr(lr: Any) -> float:
    """A learning rate: a finite real number > 0 (lr = 0 would report "no ICS" for any model)."""
    ok = isinstance(lr, numbers.Real) and not isinstance(lr, bool)
    if not (ok and math.isfinite(float(lr)) and float(lr) > 0):
        raise ValueError(f"lr: expected a finite number > 0, got {lr!r}")
    return float(lr)


def sgd_update(lr: float) -> UpdateFn:
    """The plain SGD step W^+ = W − lr·G (what Santurkar et al. train with)."""
    lr = _check_lr(lr)
    return lambda params, grads: {n: p - lr * grads[n] for n, p in params.items()}


# What `default_layers` counts as a layer W_i, and which normalization modules join the layer
# before them (their γ, β move with it in a training step).
LAYER_KINDS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
    nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag)
NORM_KINDS: tuple[type[nn.Module], ...] = (
    LpNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm)


def default_layers(model: nn.Module, example_inputs: Tensor | Sequence[Any], *,
                   with_norms: bool = False) -> list[str] | list[list[str]]:
    """Names of every layer module (`LAYER_KINDS`: Linear, Conv and ConvTranspose, Embedding,
    ...) in the order the forward pass calls them; with ``with_norms``, each as a group with the
    normalization layers (BN, LpNorm, LayerNorm, GroupNorm, ...: `NORM_KINDS`) called after it
    and before the next layer: a layer's parameters W_i, γ_i and β_i included (a norm layer
    called before the first layer is a layer of its own).

    Forward order is recorded with hooks (registration order can differ from it), in one no-grad
    forward of ``example_inputs`` (a tensor, or a tuple of positional arguments, as the other
    probes take them).
    """
    check_probe_model(model, "default_layers", grad=False)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) \
        else (example_inputs,)
    kinds = LAYER_KINDS
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    watched = [m for m in model.modules() if isinstance(m, kinds)
               or (with_norms and (is_batchnorm(m) or isinstance(m, NORM_KINDS)))]
    hooks = [m.register_forward_pre_hook(lambda mod, _a: order.append(names[mod]))
             for m in watched]
    try:
        with SideEffectGuard(model), torch.no_grad():
            model(*fresh(inputs))
    finally:
        for h in hooks:
            h.remove()
    order = list(dict.fromkeys(order))  # first call of each module
    if not with_norms:
        return order
    groups: list[list[str]] = []
    for name in order:
        if isinstance(model.get_submodule(name), LAYER_KINDS) or not groups:
            groups.append([name])
        else:
            groups[-1].append(name)  # a norm layer joins the layer before it
    return groups


def _trainable(model: nn.Module) -> dict[int, str]:
    """The name `current_params` gives each trainable parameter, by the parameter's id."""
    return {id(p): n for n, p in model.named_parameters() if p.requires_grad}


def _layer_params(model: nn.Module, layers: Sequence[str | nn.Module | Sequence[Any]]
                  ) -> tuple[list[str], list[list[str]]]:
    """(display name, parameter names) of each layer; a layer may be a group of modules."""
    mod_names = {m: n for n, m in model.named_modules()}
    # Parameters by object: a tied one (an output head sharing the embedding's weight) is
    # listed by named_parameters under its first name only.
    trainable = _trainable(model)
    shown, groups = [], []
    for i, layer in enumerate(layers):
        parts = layer if isinstance(layer, (list, tuple)) else [layer]
        names: list[str] = []
        pnames: list[str] = []
        for part in parts:
            name = part if isinstance(part, str) else mod_names.get(part)
            mod = submodule(model, name)
            if name is None or mod is None:
                raise ValueError(f"layers[{i}]: expected a submodule of the model or its name, "
                                 f"got {part!r}")
            names.append(name)
            pnames += [trainable[id(p)] for p in mod.parameters()
                       if id(p) in trainable and trainable[id(p)] not in pnames]
        if not pnames:
            raise ValueError(f"layers[{i}] ({'+'.join(names)}) has no trainable parameters")
        shown.append("+".join(names))
        groups.append(pnames)
    return shown, groups


def _warn_unmeasured(trainable: dict[int, str], groups: list[list[str]]) -> None:
    """Warn about trainable parameters that the default layers leave out: they never move,
    so ICS is measured as if those layers were frozen."""
    grouped = {n for g in groups for n in g}
    left = [n for n in trainable.values() if n not in grouped]
    if left:
        shown = ", ".join(left[:6]) + (f", ... ({len(left)} in all)" if len(left) > 6 else "")
        warnings.warn(f"gradient_ics: trainable parameters in no default layer never move: "
                      f"{shown}; pass layers= to include their modules", stacklevel=3)


def _check_update(new: Any, params: Mapping[str, Tensor]) -> None:
    """``update`` must return a tensor of the same shape for every parameter of the layers."""
    if not isinstance(new, Mapping):
        raise TypeError(f"update: expected it to return a dict name -> tensor, got "
                        f"{type(new).__name__}")
    for n, p in params.items():
        t = new.get(n)
        if not isinstance(t, Tensor) or t.shape != p.shape:
            got = "nothing" if t is None else (f"shape {tuple(t.shape)}"
                                               if isinstance(t, Tensor) else type(t).__name__)
            raise ValueError(f"update: expected a tensor of shape {tuple(p.shape)} for "
                             f"parameter {n!r}, got {got}")


def _layer_numbers(measure: Any, k: int) -> list[int]:
    """``measure`` as a non-empty list of layer numbers in 1..k."""
    if measure is None:
        return list(range(1, k + 1))
    one = isinstance(measure, numbers.Number) or (isinstance(measure, Tensor)
                                                  and measure.dim() == 0)
    # (a str is iterable too: "12" would read as layers 1 and 2, or fail on its characters)
    if one or isinstance(measure, str) or not isinstance(measure, Iterable):
        raise TypeError(f"measure: expected a list of layer numbers in 1..{k}, got the "
                        f"{type(measure).__name__} {measure!r}"
                        + (f" (write [{measure!r}])" if one else ""))
    chosen = [_layer_number(i, k) for i in measure]
    if not chosen:
        raise ValueError("measure: expected at least one layer number, got none")
    return chosen


def _layer_number(i: Any, k: int) -> int:
    """``i`` as a layer number in 1..k (NumPy and torch integers too; not a bool)."""
    try:
        n = operator.index(i)
    except TypeError:
        n = None
    if n is None or isinstance(i, bool) or not 1 <= n <= k:
        raise ValueError(f"measure: expected layer numbers, integers in 1..{k}, got {i!r}")
    return n


def gradient_ics(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    lr: float | None = None,
    update: UpdateFn | None = None,
    layers: Sequence[str | nn.Module | Sequence[Any]] | None = None,
    measure: Sequence[int] | None = None,
) -> ICSResult:
    """Measure ICS (Def. 2.1) of each layer at the current weights, on one batch.

    The model keeps its train/eval mode (Santurkar et al. measure in training mode, BN using
    batch statistics). Weights, ``.grad``, buffers (BN running statistics), module generators and
    the global RNG are exactly as before when this returns, and every evaluation sees the same
    randomness (dropout masks, noisy-BN draws), so G and G′ differ only through W_1..W_{i−1}.

    Args:
        model: any module; ``model(*inputs)`` must work.
        loss_fn: ``loss_fn(model(*inputs), target) -> scalar``.
        batch: ``(inputs, target)``, inputs a tensor or a tuple of positional arguments.
        lr: plain SGD learning rate (used when ``update`` is None).
        update: ``update(params, grads) -> new params`` (a dict over all trainable parameters),
            e.g. to mimic SGD with momentum from the optimizer's buffers, without changing them.
        layers: W_1..W_k in forward order: modules, module names, or groups of them (a group's
            parameters form one W_i, e.g. ``[conv, bn]`` to count BN's γ, β with the conv).
            Default: every layer module (`LAYER_KINDS`) with trainable parameters, in forward
            order, each grouped with the normalization layers after it (`default_layers` with
            ``with_norms``; one extra no-grad forward per call: pass ``layers`` when probing
            often), so that "the previous layers" move with their γ, β as in a training step.
            Trainable parameters outside the layers are never moved (a warning names them
            when the default leaves some out, e.g. an RNN's or attention's: pass ``layers``).
        measure: 1-based layer numbers to report (default all). Every layer before a measured
            one is still moved, as the definition requires.

    Returns:
        An `ICSResult`. Cost: one gradient plus one per measured layer.
    """
    check_probe_model(model, "gradient_ics")
    users = update is not None  # the caller's update may write into its arguments
    if update is None:
        if lr is None:
            raise ValueError("gradient_ics: give lr (plain SGD) or update, got neither")
        update = sgd_update(lr)
    elif lr is not None:
        raise ValueError("gradient_ics: give lr (plain SGD) or update, not both")
    with SideEffectGuard(model) as guard:
        if layers is None:  # frozen layers are no W_i: nothing would move them
            trainable = _trainable(model)
            names: list[str | nn.Module | Sequence[Any]] = [
                g for g in default_layers(model, split_batch(batch)[0], with_norms=True)
                if any(id(p) in trainable for n in g
                       for p in model.get_submodule(n).parameters())]
            if not names:
                raise ValueError("gradient_ics: the model has no layer (Linear, Conv, ...: "
                                 "LAYER_KINDS) with trainable parameters to measure; pass layers")
        else:
            check_not_str(layers, "layers", "modules, module names or groups of them")
            names = list(layers)
        shown, groups = _layer_params(model, names)
        if layers is None:
            _warn_unmeasured(trainable, groups)
        measure = _layer_numbers(measure, len(groups))
        params = current_params(model)
        guard.reset()
        loss, grads = loss_and_grad(model, params, loss_fn, batch, params.keys())
        if users:
            # Clones: params are views of the live weights, and an optimizer-style update may
            # write into either argument in place (sgd_update makes new tensors).
            new = update({n: p.clone() for n, p in params.items()},
                         {n: g.clone() for n, g in grads.items()})
            _check_update(new, {n: params[n] for g in groups for n in g})
        else:
            new = update(params, grads)
        l2, cos, gnorm = [], [], []
        for i in measure:
            moved = dict(params)
            for group in groups[: i - 1]:  # W_i itself stays, even where tied to an earlier W_j
                moved.update({n: new[n].detach() for n in group if n not in groups[i - 1]})
            guard.reset()
            _, g2 = loss_and_grad(model, moved, loss_fn, batch, groups[i - 1])
            g, gp = flat({n: grads[n] for n in groups[i - 1]}), flat(g2)
            l2.append(torch.linalg.vector_norm(g - gp))
            denom = torch.linalg.vector_norm(g) * torch.linalg.vector_norm(gp)
            cos.append(torch.dot(g, gp) / denom if denom > 0 else torch.tensor(float("nan")))
            gnorm.append(torch.linalg.vector_norm(g))
    return ICSResult(names=shown, layers=measure, l2=torch.stack(l2).cpu(),
                     cosine=torch.stack([c.cpu() for c in cos]), grad_norm=torch.stack(gnorm).cpu(),
                     loss=float(loss))

