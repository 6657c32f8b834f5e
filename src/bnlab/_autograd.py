"""The hand-written backward of the training-mode BN transform (Ioffe & Szegedy 2015, Sec. 3).

The paper's six chain-rule equations, simplified with Σ(x_i − μ_B) = 0 (which kills the second
term of ∂ℓ/∂μ_B) and x̂ = (x − μ_B)/√(σ²_B + ε), collapse to::

    ∂ℓ/∂β = Σ g_i                       ∂ℓ/∂γ = Σ g_i x̂_i           (g = ∂ℓ/∂y)
    ∂ℓ/∂x_i = γ/√(σ²_B + ε) · (g_i − (1/m)Σ g_j − x̂_i · (1/m)Σ g_j x̂_j)

The forward-mode derivative (a tangent ẋ, γ̇, β̇ pushed through the same transform) is the same
projection, since the Jacobian of x ↦ x̂ is symmetric::

    ẏ_i = γ/√(σ²_B + ε) · (ẋ_i − (1/m)Σ ẋ_j − x̂_i · (1/m)Σ ẋ_j x̂_j) + γ̇ x̂_i + β̇
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnlab import functional as F


def batch_norm_backward(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
    needs: tuple[bool, bool, bool], bias_dtype: torch.dtype | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(∂ℓ/∂x, ∂ℓ/∂γ, ∂ℓ/∂β) from the simplified equations; computed in the statistics' dtype."""
    ct = F.compute_dtype(x.dtype)
    dims = F.reduce_dims(x)
    m = x.numel() // x.shape[1]
    g = grad_y.to(ct)
    x_hat = (x.to(ct) - F.channel_view(mean, x)) * F.channel_view(invstd, x)
    sum_g = g.sum(dims)  # (N, C, *) -> (C,)
    sum_g_xhat = (g * x_hat).sum(dims)
    dx = None
    if needs[0]:
        scale = invstd if weight is None else invstd * weight.to(ct)
        dx = (g - F.channel_view(sum_g / m, x) - x_hat * F.channel_view(sum_g_xhat / m, x))
        dx = (dx * F.channel_view(scale, x)).to(x.dtype)
    dw = sum_g_xhat.to(weight.dtype) if needs[1] and weight is not None else None
    db = sum_g.to(bias_dtype or ct) if needs[2] else None
    return dx, dw, db


def batch_norm_jvp(x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                   x_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None) -> Tensor:
    """ẏ, the tangent of the training-mode output for tangents ẋ, γ̇, β̇ (any may be None:
    zero); computed in the statistics' dtype, returned in x's dtype (see the module's
    docstring)."""
    ct = F.compute_dtype(x.dtype)
    dims = F.reduce_dims(x)
    x_hat = (x.to(ct) - F.channel_view(mean, x)) * F.channel_view(invstd, x)
    y_t = torch.zeros_like(x_hat)
    if x_t is not None:
        xt = x_t.to(ct)
        scale = invstd if weight is None else invstd * weight.to(ct)
        proj = xt - F.channel_view(xt.mean(dims), x) - x_hat * F.channel_view(
            (xt * x_hat).mean(dims), x)
        y_t = proj * F.channel_view(scale, x)
    if w_t is not None:
        y_t = y_t + x_hat * F.channel_view(w_t.to(ct), x)
    if b_t is not None:
        y_t = y_t + F.channel_view(b_t.to(ct), x)
    return y_t.to(x.dtype)


def _setup(ctx: Any, inputs: tuple, output: tuple) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """`BatchNormTrain`'s context (eps, β's dtype, μ_B and σ²_B non-differentiable) and the
    tensors its backward and jvp read: x, γ, μ_B, 1/√(σ²_B + ε)."""
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, var)
    return x, weight, mean, torch.rsqrt(var + eps)


class BatchNormTrain(torch.autograd.Function):
    """y, μ_B, σ²_B = BN_train(x, γ, β, ε); μ_B and σ²_B are non-differentiable outputs.

    Saves x (not x̂) and recomputes x̂ in backward, as PyTorch does: one tensor of memory.
    Under `create_graph=True` the backward recomputes μ_B and σ²_B from x with differentiable
    ops, so double backward (gradient penalties, Hessian-vector products) is exact. This is the
    class torch.compile traces (see `batch_norm_train`); eager code uses `BatchNormTrainJvp`.
    """

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        mean, var = F.batch_stats(x)
        return F.normalize(x, mean, var, weight, bias, eps), mean, var

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        # forward/setup_context split (not forward(ctx, ...)) so torch.func transforms work
        ctx.save_for_backward(*_setup(ctx, inputs, output))

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _gm: Tensor,
                 _gv: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # double backward: make μ_B and σ²_B functions of x again
            mean, var = F.batch_stats(x)
            invstd = torch.rsqrt(var + ctx.eps)
        if grad_y is None:
            grad_y = torch.zeros_like(x)
        dx, dw, db = batch_norm_backward(grad_y, x, mean, invstd, weight,
                                         tuple(ctx.needs_input_grad[:3]), ctx.bias_dtype)
        return dx, dw, db, None


class BatchNormTrainJvp(BatchNormTrain):
    """`BatchNormTrain` with forward mode and vmap. Forward mode (`torch.autograd.forward_ad`,
    `torch.func.jvp`) pushes tangents through `jvp`; μ_B and σ²_B get none (they only feed the
    running statistics, which carry no tangent). Under `torch.func.vmap` (model ensembles,
    per-sample gradients) functorch batches forward, backward and jvp itself: they are written
    with batchable ops only. (Dynamo cannot trace a Function with a custom jvp.)
    """

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        saved = _setup(ctx, inputs, output)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def jvp(ctx: Any, x_t: Tensor | None, w_t: Tensor | None, b_t: Tensor | None,
            _eps_t: None) -> tuple[Tensor, None, None]:
        x, weight, mean, invstd = ctx.saved_tensors
        return batch_norm_jvp(x, mean, invstd, weight, x_t, w_t, b_t), None, None


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, μ_B, σ²_B) of Alg. 1 with the hand-written backward: `BatchNormTrainJvp` in eager
    code, `BatchNormTrain` under torch.compile, which cannot trace a custom jvp (and
    differentiates the compiled graph itself)."""
    fn = BatchNormTrain if torch.compiler.is_compiling() else BatchNormTrainJvp
    return fn.apply(x, weight, bias, eps)
