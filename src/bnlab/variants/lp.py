"""ℓp normalization (Santurkar et al. 2018, Sec. 3.3): centre by the batch mean, divide by the
batch average of the ℓp norm of the uncentred values, for p = 1, 2, ∞.

Holds the functional op `lp_norm` and the drop-in module `LpNorm` (BN's arguments and buffer
layout, with ``running_scale`` in place of ``running_var``). No training code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from bnlab._checks import (
    FxLeaf,
    check_eps,
    check_input,
    check_momentum,
    check_num_features,
    is_real,
    no_torchscript,
    plain,
)
from bnlab._layer_state import (
    count_untracked,
    has_stats,
    reset_stats,
    running_momentum,
    stats_mode,
)
from bnlab.functional import (
    channel_view,
    check_args,
    compute_dtype,
    empty_batch,
    lerp_buffer_,
    output_memory_format,
    reduce_dims,
)

__all__ = ["LpNorm", "lp_norm", "lp_stats"]


def _check_p(p: Any, who: str) -> float:
    if isinstance(p, str) and p.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(p, bool) or not is_real(p) or p not in (1, 2, math.inf):
        raise ValueError(f"{who}: p must be 1, 2 or math.inf ('inf'), got {p!r}")
    return float(p)


def lp_stats(x: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean μ_B and ℓp scale s_p of the *uncentred* values.

    s_p = ((1/m) Σ_i |x_i|^p)^(1/p) for p = 1, 2 (the power mean, i.e. ‖x‖_p / m^(1/p)) and
    s_∞ = max_i |x_i|, over the m = N·(spatial size) values of each channel.

    Shape:
        x: (N, C, *); returns two (C,) tensors in `compute_dtype(x.dtype)`.
    """
    xc = x.to(compute_dtype(x.dtype))
    dims = reduce_dims(x)
    mean = xc.mean(dims)  # (N, C, *) -> (C,)
    if p == 1:
        scale = xc.abs().mean(dims)
    elif p == 2:
        # ‖x‖₂/√m rather than √(mean(x²)): sqrt's backward at 0 is inf, and inf·0 made the
        # gradient of an all-zero channel (a dead ReLU's, a zero-initialized filter's) NaN;
        # the norm's backward is 0 there.
        m = x.numel() // x.shape[1] if x.shape[1] else 0
        scale = torch.linalg.vector_norm(xc, 2, dim=dims) * (m ** -0.5 if m else math.nan)
    else:
        scale = xc.abs().amax(dims)
    return mean, scale


def lp_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_scale: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | Tensor = 0.1,
    eps: float = 1e-5,
    p: float = 2,
) -> Tensor:
    r"""ℓp-normalize ``input`` per channel (Santurkar et al. 2018, Sec. 3.3).

    The paper fixes "the first order moment of the activations, as BatchNorm does, and then
    normalizes them by the average of their ℓp-norm (before shifting the mean)" without a
    formula. bnlab's reading, per channel over the m = N·(spatial size) values::

        μ_B = (1/m) Σ x_i
        s_p = ((1/m) Σ |x_i|^p)^(1/p)   (p = 1, 2);   s_∞ = max_i |x_i|   # uncentred x
        y_i = γ·(x_i − μ_B)/(s_p + ε) + β

    ε is added to s_p (not under a root). For p = 2, s_2 = √(σ²_B + μ_B²) ≥ σ_B, so unlike BN
    the output variance is below 1 when the mean is non-zero. In training, when buffers are given,
    they follow PyTorch's momentum ``r ← (1 − momentum)·r + momentum·s`` with s = μ_B and s_p (no
    m/(m−1) correction: s_p is not a variance); a batch with non-finite statistics leaves them
    untouched, and an empty batch (N = 0) returns an empty output. Evaluation uses the buffers:
    y = γ·(x − running_mean)/(running_scale + ε) + β, deterministic and independent of the batch.
    Statistics in float32 for half/bfloat16 input; the gradient is autograd's (for p = ∞ it
    flows to the arg-max element(s) only).

    Shape:
        input: (N, C, *); running_mean, running_scale, weight, bias: (C,). Returns like input.
    """
    return _lp_norm(input, running_mean, running_scale, weight, bias, training, momentum, eps,
                    p)[0]


def _lp_norm(input: Tensor, running_mean: Tensor | None, running_scale: Tensor | None,
             weight: Tensor | None, bias: Tensor | None, training: bool,
             momentum: float | Tensor, eps: float, p: float,
             who: str = "lp_norm") -> tuple[Tensor, Tensor | None]:
    """`lp_norm`, and whether the batch's statistics were finite (None: no update); ``who``
    is named in errors."""
    p = _check_p(p, who)
    check_args(input, running_mean, running_scale, weight, bias, training, momentum, eps, who,
               var_name="running_scale")
    if training and input.numel() == 0:
        return empty_batch(input, weight, bias), None  # no statistics, as BN (no update)
    finite = None
    if training:
        mean, scale = lp_stats(input, p)
        if running_mean is not None or running_scale is not None:
            finite = _update(running_mean, running_scale, mean.detach(), scale.detach(),
                             momentum)
    else:
        # check_args raised above if either is None when not training
        assert running_mean is not None and running_scale is not None
        mean, scale = running_mean, running_scale
    ct = compute_dtype(input.dtype)
    inv = 1.0 / (scale.to(ct) + eps)
    if weight is not None:
        inv = inv * weight.to(ct)
    y = (input.to(ct) - channel_view(mean.to(ct), input)) * channel_view(inv, input)
    if bias is not None:
        y = y + channel_view(bias.to(ct), input)
    # the layout torch's BN returns (elementwise ops keep a permuted input's strides)
    return y.to(input.dtype).contiguous(memory_format=output_memory_format(input)), finite


@torch.no_grad()
def _update(running_mean: Tensor | None, running_scale: Tensor | None, mean: Tensor,
            scale: Tensor, momentum: float | Tensor) -> Tensor:
    finite = torch.isfinite(mean).all() & torch.isfinite(scale).all()
    for name, buf, stat in (("running_mean", running_mean, mean),
                            ("running_scale", running_scale, scale)):
        if buf is not None:
            lerp_buffer_(buf, stat, momentum, finite, name)
    return finite


class LpNorm(FxLeaf, nn.Module):
    """Drop-in ℓp normalization layer (Santurkar et al. 2018, Sec. 3.3); math in `lp_norm`.

    Any (N, C, *) input: for convolutions the statistics run over N·H·W values per channel, as
    BN's. Buffers ``running_mean`` (init 0), ``running_scale`` (init 1) and
    ``num_batches_tracked``; ``momentum=None`` keeps the cumulative average. Eval mode uses the
    running statistics (or the batch's when ``track_running_stats=False``), as BN.
    `bnlab.freeze` and `bnlab.no_stats_update` act on it as on BN (the ``frozen`` and
    ``_stats_update_blocked`` attributes below).

    Args:
        num_features: C.
        p: 1, 2 or ``math.inf`` (also ``"inf"``).
        eps: ε > 0 added to s_p.
        momentum: in [0, 1], or None for the cumulative average.
        affine: learn γ (``weight``, init 1) and β (``bias``, init 0).
        track_running_stats: keep running statistics for eval mode.
    """

    # Set by `bnlab.freeze` / `bnlab.no_stats_update`, as on `bnlab.BatchNorm`.
    frozen: bool = False
    _stats_update_blocked: int = 0
    # Declared for type checkers, as on `bnlab.BatchNorm` (nn.Module's __getattr__ types every
    # parameter and buffer Tensor | Module), which also makes this layer a `StatsLayer`: None
    # where affine / track_running_stats is off.
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_scale: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(self, num_features: int, p: float = 2, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        who = type(self).__name__
        check_num_features(num_features, who)
        check_eps(eps, who)
        check_momentum(momentum, who)
        self.p = _check_p(p, who)
        self.num_features, self.eps, self.momentum = num_features, plain(eps), plain(momentum)
        self.affine, self.track_running_stats = affine, track_running_stats
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_scale", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long, device=device))
        else:
            for name in ("running_mean", "running_scale", "num_batches_tracked"):
                self.register_buffer(name, None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            reset_stats(self.running_mean, self.running_scale, self.num_batches_tracked)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            assert self.weight is not None and self.bias is not None  # registered by __init__
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def __prepare_scriptable__(self) -> nn.Module:
        no_torchscript(self, foldable=False)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, p={self.p}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")

    def forward(self, input: Tensor) -> Tensor:
        who = f"{type(self).__name__}({self.num_features})"
        check_input(input, who, (2, 3, 4, 5), self.num_features)
        use_batch, update = stats_mode(
            self, has_stats(who, self.running_mean, self.running_scale, "running_scale"))
        # An empty batch has no statistics: no update, and it does not count (as in BN).
        update = update and input.numel() > 0
        momentum = running_momentum(self) if update else 0.0
        bufs = (self.running_mean, self.running_scale) if (update or not use_batch) \
            else (None, None)
        y, finite = _lp_norm(input, *bufs, self.weight, self.bias, use_batch, momentum,
                             self.eps, self.p, who)
        # counted once it is done, and only if it was used; not at all where the counter was
        # deleted by hand (as BN, `bnlab.layers.count_batch`)
        if finite is not None and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(finite)
        count_untracked(self, input)  # both buffers set to None: counted, as in BN
        return y
