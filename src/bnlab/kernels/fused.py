"""Fused BN+ReLU and BN+add+ReLU (the ResNet block tail), with PyTorch-style signatures.

``relu(BN(x))`` and ``relu(BN(x) + residual)`` in one sweep: the add and the ReLU ride on the
normalize pass, and the backward reads a 1-byte ReLU mask saved by the forward (instead of the
output) and folds the ReLU gradient into the BN reductions and the dx sweep. On inputs the
kernels do not support, the same functions compose the reference ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bnlab import functional as F

__all__ = ["bn_add_relu", "bn_relu", "bn_relu_with_flag"]


def _needs_grad(*ts: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _fused(input: Tensor, residual: Tensor | None, running_mean: Tensor | None,
           running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None,
           training: bool, momentum: float | Tensor, eps: float,
           who: str) -> tuple[Tensor, Tensor | None]:
    """(output, finite flag of the running update or None), as `F.batch_norm_with_flag`."""
    from bnlab import kernels

    # (The C++ entry declines a ``training`` that is not a bool; check_args then names it.)
    if F._fast is not None and F._fast_allowed():  # the C++ checks and routing of what follows
        got = F._fast.fused(input, residual, running_mean, running_var, weight, bias, training,
                            momentum, eps)
        if got is not None:
            y, finite, ok = got
            if not ok:
                F._warn_nonfinite()
            return y, finite
    F.check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, who)
    if residual is not None and residual.shape != input.shape:
        raise ValueError(f"{who}: residual must have the input's shape {tuple(input.shape)}, "
                         f"got {tuple(residual.shape)}")
    if residual is not None and residual.device != input.device:
        raise ValueError(f"{who}: residual must be on the input's device ({input.device}), got "
                         f"{residual.device}")
    if residual is not None and residual.dtype != input.dtype:  # (it promoted y silently)
        raise TypeError(f"{who}: residual must have the input's dtype {input.dtype}, got "
                        f"{residual.dtype}")
    if (not (kernels.supports(input) if training else
             F._use_kernels_eval(input) and not F.buffers_need_grad(running_mean, running_var))
            or (training and input.numel() == 0)):  # an empty batch: no statistics to compute
        y, finite = F.batch_norm_with_flag(input, running_mean, running_var, weight, bias,
                                           training, momentum, eps, who)
        return torch.relu(y if residual is None else y + residual), finite
    save = _needs_grad(input, residual, weight, bias)
    if not training:
        y, _ = torch.ops.bnlab.bn_eval_fwd(input, running_mean, running_var, weight, bias, eps,
                                           residual, True, save)
        return y, None
    y, mean, var, _ = torch.ops.bnlab.bn_train_fwd(input, weight, bias, eps, residual, True,
                                                   save)
    finite = None
    if running_mean is not None or running_var is not None:
        finite = kernels._update(running_mean, running_var, mean, var,
                                 input.numel() // input.shape[1], momentum)
    return y, finite


def bn_relu_with_flag(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                      weight: Tensor | None, bias: Tensor | None, training: bool,
                      momentum: float | Tensor, eps: float,
                      who: str = "bn_relu") -> tuple[Tensor, Tensor | None]:
    """`bn_relu` that also returns the running update's finite flag (None without an update),
    and takes a 0-d tensor momentum, for the layers (`bnlab.BatchNormReLU2d`)."""
    return _fused(input, None, running_mean, running_var, weight, bias, training, momentum, eps,
                  who)


def bn_relu(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
            weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
            momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``relu(batch_norm(input, ...))`` fused; arguments as `bnlab.functional.batch_norm`.

    Shape:
        input: (N, C, *); per-channel tensors (C,). Returns a tensor like ``input``.
    """
    return _fused(input, None, running_mean, running_var, weight, bias, training, momentum, eps,
                  "bn_relu")[0]


def bn_add_relu(input: Tensor, residual: Tensor, running_mean: Tensor | None,
                running_var: Tensor | None, weight: Tensor | None = None,
                bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
                eps: float = 1e-5) -> Tensor:
    """``relu(batch_norm(input, ...) + residual)`` fused (a ResNet block's tail).

    Shape:
        input, residual: (N, C, *) of the same shape; per-channel tensors (C,).
    """
    if not isinstance(residual, Tensor):  # (None would quietly compute bn_relu)
        raise TypeError("bn_add_relu: residual must be a torch.Tensor of the input's shape, got "
                        f"{type(residual).__name__}")
    return _fused(input, residual, running_mean, running_var, weight, bias, training, momentum,
                  eps, "bn_add_relu")[0]
