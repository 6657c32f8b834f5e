"""Shared machinery of the probes: evaluating a model at other weights without side effects.

`SideEffectGuard` snapshots what a forward pass may change besides the weights (every buffer,
e.g. BN running statistics and counters; every `torch.Generator` held by a module, e.g.
`ActivationNoise`; the global CPU/CUDA RNG, e.g. dropout and data shuffling) and puts it back.
`loss_and_grad` evaluates the loss at a parameter dict with `torch.func.functional_call`, so
the module's parameters and their ``.grad`` are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bnlab.stats import BufferSnapshot

LossFn = Callable[[Any, Any], Tensor]

# True while a probe evaluates the model at other weights: hooks that accumulate training
# statistics (e.g. `bnlab.lab.probes.CumulativeBatchStats`) skip those forwards.
_PROBING: ContextVar[bool] = ContextVar("bnlab_probing", default=False)


def probing() -> bool:
    """Whether the current forward pass is a probe's evaluation (inside a `SideEffectGuard`),
    not a training step: hooks that count training batches should ignore it."""
    return _PROBING.get()


def _generators_in(v: Any) -> Iterator[torch.Generator]:
    """Generators held directly or one container deep (a dict per device, a list of streams)."""
    if isinstance(v, torch.Generator):
        yield v
    elif isinstance(v, Mapping):
        yield from (g for g in v.values() if isinstance(g, torch.Generator))
    elif isinstance(v, (list, tuple)):
        yield from (g for g in v if isinstance(g, torch.Generator))


def _module_generators(model: nn.Module) -> list[torch.Generator]:
    gens: list[torch.Generator] = []
    for m in model.modules():
        for v in vars(m).values():
            gens.extend(g for g in _generators_in(v) if all(g is not h for h in gens))
    return gens


def check_probe_model(model: nn.Module, who: str) -> None:
    """Refuse what `functional_call` cannot evaluate, naming the fix: DataParallel-style
    wrappers (probe ``model.module``) and inference mode (its tensors cannot need grad)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"{who}: model is a {type(model).__name__}; probe the wrapped module "
                        f"(model.module) instead")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{who}: called inside torch.inference_mode(), where no gradient "
                           f"can be taken; call it outside (torch.no_grad() is fine)")


class SideEffectGuard:
    """Context manager: on `reset()` and on exit, buffers and RNG states are as on entry.

    Calling `reset()` before every evaluation also makes stochastic layers (dropout, noisy BN)
    draw the same randomness in every evaluation, so two evaluations differ only by weights.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> SideEffectGuard:
        self.buffers = BufferSnapshot(self.model)
        self.generators = [(g, g.get_state()) for g in _module_generators(self.model)]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._token = _PROBING.set(True)
        return self

    @torch.no_grad()
    def reset(self) -> None:
        self.buffers.restore()
        for g, state in self.generators:
            g.set_state(state)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def __exit__(self, *exc: object) -> None:
        try:
            self.reset()
        finally:
            _PROBING.reset(self._token)


def split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """(inputs, target) of a batch: ``(x, y)`` -> ((x,), y); ``((x1, x2), y)`` -> ((x1, x2), y)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"batch must be a pair (inputs, target), got {type(batch).__name__}"
                         + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    return (tuple(x) if isinstance(x, (tuple, list)) else (x,)), y


def submodule(model: nn.Module, name: str | None) -> nn.Module | None:
    """The submodule at dotted ``name`` (any name it is registered under, not only the first
    that ``named_modules`` lists), or None."""
    if name is None:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def current_params(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Detached views of the named parameters (all that require grad by default): they share
    memory with the model, so anything handed to user code gets clones."""
    params = dict(model.named_parameters())
    if names is None:
        return {n: p.detach() for n, p in params.items() if p.requires_grad}
    if isinstance(names, str):  # a str is iterable: "0.weight" would read as '0', '.', ...
        raise TypeError(f"params: expected a list of parameter names, got the str {names!r} "
                        f"(write [{names!r}])")
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"params: expected names of the model's parameters (e.g. "
                         f"{next(iter(params), 'none')!r}), got {unknown or names!r}")
    return {n: params[n].detach() for n in names}


def loss_at(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn,
            batch: Any) -> Tensor:
    """L(params; batch) = loss_fn(model(*inputs), target) with ``params`` swapped in."""
    inputs, target = split_batch(batch)
    return loss_fn(functional_call(model, dict(params), inputs), target)


def loss_and_grad(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn, batch: Any,
                  wrt: Iterable[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """(L, ∇_wrt L) at ``params``; the other parameters enter as constants."""
    wrt = list(wrt)
    leaves = {n: params[n].detach().requires_grad_(True) for n in wrt}
    full = {**params, **leaves}
    with torch.enable_grad():
        loss = loss_at(model, full, loss_fn, batch)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, [leaves[n] for n in wrt], allow_unused=True)
    out = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(wrt, grads,
                                                                                   strict=True)}
    return loss.detach(), out


def flat(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one float64 vector (norms and dot products over many layers)."""
    ts = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1).to(torch.float64) for t in ts])
