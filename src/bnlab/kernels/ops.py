"""torch.library registration of the C++ kernels: fake (meta) kernels.

The C++ library defines five operators (schemas in `csrc/bn_ops.cpp`, `csrc/bn_autograd.cpp`):

* ``bnlab::bn_train_fwd(input, weight?, bias?, eps, residual?, relu, save_mask)
  -> (y, mean, var, mask)`` — Alg. 1 of Ioffe & Szegedy (2015) with the biased σ²_B, optionally
  fused with ``+ residual`` and ReLU (``mask`` is the saved ReLU mask, empty when not asked);
* ``bnlab::bn_bwd(grad_y, input, mean, var, weight?, eps, mask?, training, need_dx, need_dz)
  -> (dx, dweight, dbias, dresidual)`` — the paper's backward (Sec. 3), float32 dweight/dbias;
* ``bnlab::bn_eval_fwd(input, running_mean, running_var, weight?, bias?, eps, residual?, relu,
  save_mask) -> (y, mask)`` — the inference transform of Alg. 2;
* ``bnlab::bn_update_running(running_mean!, running_var!, mean, var, count, momentum,
  momentum_tensor?) -> finite`` — `bnlab.functional.update_running_stats` in one call;
* ``bnlab::bn_train_fwd_update(input, weight?, bias?, eps, running_mean!, running_var!, count,
  momentum, momentum_tensor?) -> (y, mean, var, finite)`` — both, for the eager layers.

Autograd of ``bn_train_fwd`` and ``bn_eval_fwd`` is registered in C++ (``Autograd`` key, in
`csrc/bn_autograd.cpp`; its backward is ``bn_bwd``, or differentiable ATen ops recomputing μ_B
and σ²_B under ``create_graph=True``). Here they get fake kernels (shapes only), so
`torch.compile` and AOTAutograd can trace them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import functional as _F

__all__ = ["register"]

_registered = False


def _prepared(x: Tensor) -> Tensor:
    """``x`` in the layout the kernels compute in and give their outputs (`prepare` in
    `csrc/bn_tensors.h`): x itself where it is contiguous or, for 4-/5-d input, channels_last;
    a channels_last copy of a view whose strides torch reads as channels_last (a crop); else a
    contiguous copy (a transposed (N, L, C) sequence, say). Fake outputs made with
    `torch.empty_like` of anything else would carry strides the real ones lack, which
    torch.compile's stride checks reject."""
    if x.is_contiguous():
        return x
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c) if n * c > 0 else 1
    cl = [0, *range(2, x.dim()), 1]
    if s != 1 and x.dim() in (4, 5) and x.permute(cl).is_contiguous():
        return x
    fmt = _F.suggest_memory_format(x)  # a channels_last tensor's view: a channels_last copy
    if s != 1 and x.dim() in (4, 5) and fmt is not torch.contiguous_format:
        return x.contiguous(memory_format=fmt)
    return x.contiguous()


def _empty_mask(x: Tensor, wanted: bool) -> Tensor:
    if wanted:
        return torch.empty_like(_prepared(x), dtype=torch.uint8)
    return x.new_empty((0,), dtype=torch.uint8)


def _fake_train_fwd(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                    residual: Tensor | None, relu: bool,
                    save_mask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = input.shape[1]
    stat = input.new_empty((c,), dtype=torch.float32)
    return (torch.empty_like(_prepared(input)), stat, torch.empty_like(stat),
            _empty_mask(input, relu and save_mask))


def _fake_bwd(grad_y: Tensor, input: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
              eps: float, mask: Tensor | None, training: bool, need_dx: bool,
              need_dz: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    c = input.shape[1]
    stat = input.new_empty((c,), dtype=torch.float32)
    empty = input.new_empty((0,))
    x = _prepared(input)
    return (torch.empty_like(x) if need_dx else empty, stat, torch.empty_like(stat),
            torch.empty_like(x) if need_dz else empty.clone())


def _fake_eval_fwd(input: Tensor, running_mean: Tensor, running_var: Tensor,
                   weight: Tensor | None, bias: Tensor | None, eps: float,
                   residual: Tensor | None, relu: bool, save_mask: bool) -> tuple[Tensor, Tensor]:
    return torch.empty_like(_prepared(input)), _empty_mask(input, relu and save_mask)


def _fake_update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         count: int, momentum: float, momentum_tensor: Tensor | None) -> Tensor:
    return mean.new_empty((), dtype=torch.bool)


def _fake_train_fwd_update(input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                           running_mean: Tensor, running_var: Tensor, count: int,
                           momentum: float,
                           momentum_tensor: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, var, _ = _fake_train_fwd(input, weight, bias, eps, None, False, False)
    return y, mean, var, mean.new_empty((), dtype=torch.bool)


def register() -> None:
    """Attach fake kernels to the loaded `bnlab::*` ops (idempotent; their autograd is
    registered in C++)."""
    global _registered
    if _registered:
        return
    lib = "bnlab::"
    torch.library.register_fake(lib + "bn_train_fwd")(_fake_train_fwd)
    torch.library.register_fake(lib + "bn_bwd")(_fake_bwd)
    torch.library.register_fake(lib + "bn_eval_fwd")(_fake_eval_fwd)
    torch.library.register_fake(lib + "bn_update_running")(_fake_update_running)
    torch.library.register_fake(lib + "bn_train_fwd_update")(_fake_train_fwd_update)
    _registered = True
