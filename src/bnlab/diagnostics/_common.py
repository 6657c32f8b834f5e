"""Shared machinery of the probes: evaluating a model at other weights without side effects.

`SideEffectGuard` snapshots what a forward pass may change besides the weights (every buffer,
e.g. BN running statistics and counters; every `torch.Generator` held by a module, e.g.
`ActivationNoise`; the global CPU/CUDA RNG, e.g. dropout and data shuffling) and puts it back.
`loss_and_grad` evaluates the loss at a parameter dict with `torch.func.functional_call`, so
the module's parameters and their ``.grad`` are never touched, on `fresh` copies of the batch's
tensors, so a forward that edits its input in place changes neither the user's batch nor what
the next evaluation sees.
"""

from __future__ import annotations

import sys
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


def check_probe_model(model: nn.Module, who: str, *, grad: bool = True) -> None:
    """Refuse what `functional_call` and hooks cannot evaluate, naming the fix: DataParallel-style
    wrappers (probe ``model.module``), a `torch.compile`d module (probe ``model._orig_mod``) and,
    with ``grad``, inference mode (its tensors cannot need grad)."""
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(f"{who}: model is a {type(model).__name__}; probe the wrapped module "
                        f"(model.module) instead")
    # Dynamo traces a compiled module's forward, with the probes' hooks and swapped-in
    # parameters in it, and fails inside its tracer. Looked up, not imported: importing
    # torch._dynamo costs seconds, and without it no module is compiled.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        raise TypeError(f"{who}: model is a torch.compile'd OptimizedModule; probe the module "
                        f"it compiles (model._orig_mod) instead")
    if grad and torch.is_inference_mode_enabled():
        raise RuntimeError(f"{who}: called inside torch.inference_mode(), where no gradient "
                           f"can be taken; call it outside (torch.no_grad() is fine)")


def check_not_str(value: Any, arg: str, what: str) -> None:
    """Refuse a str where a list is expected: a str is iterable, and one name "12" would read as
    the names '1' and '2'."""
    if isinstance(value, str):
        raise TypeError(f"{arg}: expected a list of {what}, got the str {value!r} "
                        f"(write [{value!r}])")


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
    check_not_str(names, "params", "parameter names")
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown or not names:
        raise ValueError(f"params: expected names of the model's parameters (e.g. "
                         f"{next(iter(params), 'none')!r}), got {unknown or names!r}")
    return {n: params[n].detach() for n in names}


def fresh(x: Any) -> Any:
    """``x`` with every tensor cloned, inside tuples (named ones too), lists and dicts: what one
    evaluation of the model gets, so that a forward editing its input in place (``x.div_(255)``)
    leaves the caller's batch as it was, and every evaluation sees the same values."""
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, tuple):
        items = [fresh(v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    if isinstance(x, list):
        return [fresh(v) for v in x]
    if isinstance(x, Mapping):
        return {k: fresh(v) for k, v in x.items()}
    return x


def loss_at(model: nn.Module, params: Mapping[str, Tensor], loss_fn: LossFn,
            batch: Any) -> Tensor:
    """L(params; batch) = loss_fn(model(*inputs), target) with ``params`` swapped in, on `fresh`
    copies of the batch's tensors."""
    inputs, target = split_batch(fresh(batch))
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
    out = {n: _dense(g, params[n]) for n, g in zip(wrt, grads, strict=True)}
    return loss.detach(), out


def _dense(g: Tensor | None, p: Tensor) -> Tensor:
    """A parameter's gradient as a strided tensor of its shape: zeros where it is unused, dense
    where autograd gives a sparse one (``nn.Embedding(sparse=True)``), which `flat` and the
    updates' arithmetic cannot reshape."""
    if g is None:
        return torch.zeros_like(p)
    return g.to_dense() if g.layout != torch.strided else g


def flat(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one float64 vector (norms and dot products over many layers)."""
    ts = tensors.values() if isinstance(tensors, Mapping) else tensors
    return torch.cat([t.reshape(-1).to(torch.float64) for t in ts])
