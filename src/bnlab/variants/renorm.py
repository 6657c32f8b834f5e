"""Batch Renormalization (Ioffe 2017, Alg. 1): BN whose training output matches inference.

Training normalizes with the batch statistics and then corrects towards the moving ones::

    σ_B = √(σ²_B + ε),  σ = √(running_var + ε)
    r = clip(σ_B / σ, 1/r_max, r_max),   d = clip((μ_B − running_mean) / σ, −d_max, d_max)
    y = γ·((x − μ_B)/σ_B · r + d) + β       # r, d are constants in backward (stop_gradient)

With r = σ_B/σ and d = (μ_B − μ)/σ unclipped this is exactly the inference transform
γ(x − μ)/σ + β; with r_max = 1 and d_max = 0 it is exactly BN (Ioffe & Szegedy 2015, Alg. 1).
Holds the math (`renorm_limits`, `renorm_factors`, `batch_renorm`) and the drop-in modules.

Deviation from the paper, for drop-in compatibility: the paper averages σ, we average σ² in
PyTorch's ``running_var`` (unbiased, as the core does). A `BatchNorm2d` state_dict therefore
loads unchanged and eval mode is BN's eval mode, so `bnlab.fold` and Alg. 2 recalibration work.
Training and inference stay consistent (σ is what eval divides by), but r = σ_B/σ, with the
biased σ_B over the unbiased σ, centres below 1 at small m, so the clip of small r binds sooner
than in the paper (mean r on Gaussian data: 0.80 at m = 4, 0.90 at m = 8, 0.98 at m = 32).

References:
    S. Ioffe. Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
    Models. NIPS 2017, arXiv:1702.03275.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bnlab import functional as F
from bnlab._checks import check_args, check_training, check_training_size, is_integer, is_real
from bnlab._layer_state import count_batch
from bnlab.layers import BatchNorm
from bnlab.variants._common import train_transform, values_per_channel

__all__ = [
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "batch_renorm",
    "renorm_affine",
    "renorm_factors",
    "renorm_limits",
]


def renorm_limits(step: Tensor | int, r_max: float = 3.0, d_max: float = 5.0, *,
                  warmup_steps: int = 5000, r_max_steps: int = 40000,
                  d_max_steps: int = 25000) -> tuple[Tensor, Tensor]:
    """The paper's warm-up of the clipping bounds (Ioffe 2017, Sec. 4.1), at training ``step``.

    r_max = 1 and d_max = 0 (plain BN) for the first ``warmup_steps`` steps, then both relaxed
    linearly to reach ``r_max`` at ``r_max_steps`` and ``d_max`` at ``d_max_steps`` (the paper:
    5k, 40k, 25k steps; r_max = 3, d_max = 5). All three steps 0: the final bounds from step 0.
    ``step`` may be a 0-d tensor (``num_batches_tracked``): the result stays on its device and
    needs no host synchronisation.
    """
    check_bounds(r_max, d_max, "renorm_limits")
    for name, v in (("warmup_steps", warmup_steps), ("r_max_steps", r_max_steps),
                    ("d_max_steps", d_max_steps)):
        if not is_integer(v) or v < 0:
            raise ValueError(f"renorm_limits: {name} must be an integer >= 0, got {v!r}")
    step_t = torch.as_tensor(step).to(torch.float64)

    def ramp(start: float, end: float, at: int) -> Tensor:
        # Tensors, not Python floats, which torch.where would round through float32.
        start_t, end_t = step_t.new_tensor(start), step_t.new_tensor(end)
        if at <= warmup_steps:
            return torch.where(step_t >= warmup_steps, end_t, start_t)
        frac = ((step_t - warmup_steps) / (at - warmup_steps)).clamp(0.0, 1.0)
        # Not start + (end − start)·frac alone: an unbounded end (inf) gives inf·0 = nan there.
        return torch.where(frac > 0, start_t + (end_t - start_t) * frac, start_t)

    return ramp(1.0, r_max, r_max_steps), ramp(0.0, d_max, d_max_steps)


def check_bounds(r_max: Any, d_max: Any, who: str) -> None:
    """r_max >= 1 and d_max >= 0, numbers (inf: no clipping); a tensor (the schedule's) passes."""
    for name, v, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(v, Tensor):
            continue
        if isinstance(v, bool) or not is_real(v) or not v >= low:  # (NaN fails >=)
            raise ValueError(f"{who}: {name} must be a number >= {low:g}, got {v!r}")


@torch.no_grad()
def renorm_factors(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                   eps: float, r_max: Tensor | float,
                   d_max: Tensor | float) -> tuple[Tensor, Tensor]:
    """(r, d) of Ioffe 2017, Alg. 1, clipped and detached (they are constants in backward).

    Shape:
        mean, var (batch μ_B, biased σ²_B), running_mean, running_var: (C,); returns two (C,).
    """
    ct = mean.dtype
    r_max = torch.as_tensor(r_max, dtype=ct, device=mean.device)
    d_max = torch.as_tensor(d_max, dtype=ct, device=mean.device)
    sigma = torch.sqrt(running_var.to(ct) + eps)
    r = torch.sqrt(var + eps) / sigma
    r = torch.minimum(torch.maximum(r, 1.0 / r_max), r_max)
    d = (mean - running_mean.to(ct)) / sigma
    d = torch.minimum(torch.maximum(d, -d_max), d_max)
    return r, d


def renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor,
                  d: Tensor) -> tuple[Tensor, Tensor]:
    """(γ·r, γ·d + β): γ·(x̂·r + d) + β is BN's affine step with these, differentiable in γ, β.
    Computed in r's dtype (the statistics' float32 or wider): in a bfloat16 or half module's
    dtype the products were rounded once more before the normalization (about twice the
    output error of the plain BN)."""
    w = r if weight is None else weight.to(r.dtype) * r
    b = d if weight is None else weight.to(d.dtype) * d
    return w, (b if bias is None else b + bias.to(b.dtype))


def batch_renorm(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.01,
    eps: float = 1e-5,
    r_max: Tensor | float = 3.0,
    d_max: Tensor | float = 5.0,
    *,
    update: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Batch Renormalization of ``input`` per channel (Ioffe 2017, Alg. 1).

    Training: y = γ·(x̂·r + d) + β with x̂ = (x − μ_B)/σ_B the BN transform, computed as
    `BN_train(x; γ·r, γ·d + β)` through the core's dispatch (kernels or the hand-written
    backward), so gradients flow through μ_B and σ²_B while r and d stay constant. Then, when
    ``update``, the running statistics move with PyTorch's momentum, storing the unbiased
    m/(m−1)·σ²_B, and a non-finite batch leaves them untouched. Eval: BN's eval transform.

    Returns:
        (y, finite): ``finite`` is the 0-d bool flag of the running update, or None if none ran.
    """
    who = "batch_renorm"
    check_training(training, who)
    if not training:
        return F.batch_norm_with_flag(input, running_mean, running_var, weight, bias, False,
                                      0.0, eps, who)
    if running_mean is None or running_var is None:
        raise ValueError(f"{who}: running_mean and running_var are required (r and d are "
                         f"computed from them), got running_mean={type(running_mean).__name__}, "
                         f"running_var={type(running_var).__name__}")
    check_args(input, running_mean, running_var, weight, bias, True, momentum, eps, who)
    check_bounds(r_max, d_max, who)
    if input.numel() == 0:
        return F.empty_batch(input, weight, bias), None  # no statistics: no r, d, no update
    mean, var = F.batch_stats(input.detach())
    r, d = renorm_factors(mean, var, running_mean, running_var, eps, r_max, d_max)
    y, mean, var = train_transform(input, *renorm_affine(weight, bias, r, d), eps)
    finite = None
    if update:
        finite = F.update_running_stats(running_mean, running_var, mean, var,
                                        values_per_channel(input), momentum)
    return y, finite


class BatchRenorm(BatchNorm):
    """Batch Renormalization over dimension 1 of an (N, C, *) input (Ioffe 2017).

    A drop-in for `bnlab.BatchNorm` (same arguments, buffers and state_dict keys; eval mode is
    BN's eval mode). The clipping bounds follow `renorm_limits` driven by
    ``num_batches_tracked``, so they survive checkpoint/resume. See `batch_renorm`.

    Args:
        num_features, eps, affine, bias: as `bnlab.BatchNorm`.
        momentum: update rate α of the moving statistics; default 0.01 as Keras
            (``renorm_momentum=0.99``) and torchrl: the correction is only as good as the
            moving averages, which must not follow single batches. None: cumulative average.
        track_running_stats: must be True: r and d are defined by the moving statistics.
        r_max, d_max: final bounds of r ∈ [1/r_max, r_max] and |d| <= d_max (paper: 3, 5).
        warmup_steps, r_max_steps, d_max_steps: the schedule of `renorm_limits` (paper: 5000,
            40000, 25000 steps); all 0 applies ``r_max``/``d_max`` from the first step.
    """

    num_batches_is_clock = True  # the schedule's step: `recalibrate` leaves it as it is

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 5000, r_max_steps: int = 40000,
                 d_max_steps: int = 25000, bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        who = type(self).__name__
        if not track_running_stats:
            raise ValueError(f"{who}: track_running_stats must be True (r and d are defined by "
                             "the moving statistics), got False")
        check_bounds(r_max, d_max, who)
        for name, v in (("warmup_steps", warmup_steps), ("r_max_steps", r_max_steps),
                        ("d_max_steps", d_max_steps)):
            if not is_integer(v) or v < 0:
                raise ValueError(f"{who}: {name} must be an integer >= 0, got {v!r}")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.r_max_steps, self.d_max_steps = (int(warmup_steps),
                                                                 int(r_max_steps),
                                                                 int(d_max_steps))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, "
                f"d_max_steps={self.d_max_steps}")

    def limits(self) -> tuple[Tensor, Tensor]:
        """The current (r_max, d_max) of the warm-up schedule at step ``num_batches_tracked``."""
        if self.num_batches_tracked is None:  # __init__ registers it; only a user unsets it
            raise ValueError(f"{self._who()}: Batch Renorm needs num_batches_tracked, the clock "
                             "of its r_max/d_max schedule; got None")
        return renorm_limits(self.num_batches_tracked, self.r_max, self.d_max,
                             warmup_steps=self.warmup_steps, r_max_steps=self.r_max_steps,
                             d_max_steps=self.d_max_steps)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats, update = self._mode()
        if not use_batch_stats:
            return self._inference(input)
        r_max, d_max = self.limits()
        y, finite = self._renorm_train(input, r_max, d_max, update)
        if finite is not None:
            count_batch(self, finite)
        return y

    def _renorm_train(self, input: Tensor, r_max: Tensor, d_max: Tensor,
                      update: bool) -> tuple[Tensor, Tensor | None]:
        """The training transform and running update; `bnlab.SyncBatchRenorm` syncs it."""
        check_training_size(input, self._who())
        momentum = self._momentum() if update else 0.0
        running_mean, running_var = self.running_stats()
        return batch_renorm(input, running_mean, running_var, self.weight, self.bias,
                            True, momentum, self.eps, r_max, d_max, update=update)

    def running_stats(self) -> tuple[Tensor, Tensor]:
        """(running_mean, running_var), which r and d are computed from in training too."""
        if self.running_mean is None or self.running_var is None:
            # __init__ registers both (track_running_stats is required); only a user unsets them
            raise ValueError(f"{self._who()}: Batch Renorm needs running_mean and running_var "
                             "(r and d are computed from them); got None")
        return self.running_mean, self.running_var


class BatchRenorm1d(BatchRenorm):
    """Drop-in for `torch.nn.BatchNorm1d` with Batch Renormalization: (N, C) or (N, C, L)."""

    _ranks = (2, 3)


class BatchRenorm2d(BatchRenorm):
    """Drop-in for `torch.nn.BatchNorm2d` with Batch Renormalization: (N, C, H, W)."""

    _ranks = (4,)


class BatchRenorm3d(BatchRenorm):
    """Drop-in for `torch.nn.BatchNorm3d` with Batch Renormalization: (N, C, D, H, W)."""

    _ranks = (5,)
