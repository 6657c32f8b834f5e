"""Frozen BN: the inference transform of Alg. 2 as a module with no trainable state.

y = γ(x − E[x])/√(Var[x] + ε) + β with γ, β, E[x], Var[x] all buffers, in train() and eval()
alike (torchvision/detectron2 ``FrozenBatchNorm2d``, for fine-tuning with small batches). For a
BN that stays a BN but stops learning statistics, use `bnlab.freeze` instead.

Better than the peers where they hurt (peers.md, torchvision): ε defaults to 1e-5, not 0 (ε = 0
turned tiny fp16 variances into NaN, vision#2599; it is still taken, as torch's BN takes it in
eval mode); any rank >= 2; statistics math in float32 for half/bfloat16 input; state_dict keys
are BN's (``num_batches_tracked`` included), so BN checkpoints load into it and its
checkpoints load back into BN.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from bnlab import functional as F
from bnlab._checks import (
    FxLeaf,
    check_eps,
    check_input,
    check_num_features,
    no_torchscript,
    plain,
)
from bnlab.variants.noisy import eval_factor

__all__ = ["FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _BatchNormLike(Protocol):
    """What `FrozenBatchNorm.from_batchnorm` reads of every BN layer (bnlab's or torch's, or a
    FrozenBatchNorm): it takes any module with BN's attributes, not one class."""

    num_features: int
    eps: float
    running_var: Tensor | None


class FrozenBatchNorm(FxLeaf, nn.Module):
    """BN's eval transform with γ, β and the statistics as buffers; (N, C, *) input.

    Args:
        num_features: C.
        eps: ε ≥ 0 added to ``running_var`` (default 1e-5, BN's; 0 is taken, as torch's BN
            takes it in eval mode, but a zero variance then divides by zero).

    Buffers (state_dict keys as `torch.nn.BatchNorm2d`): ``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked`` (kept for round trips; unused).
    """

    _ranks: tuple[int, ...] = (2, 3, 4, 5)
    # Declared for type checkers (nn.Module's __getattr__ types every buffer Tensor | Module):
    # all five are buffers that __init__ registers, never None.
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__()
        who = type(self).__name__
        check_num_features(num_features, who)
        check_eps(eps, who, allow_zero=True)  # eval only: torch evaluates ε = 0
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self.eps = plain(eps)
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked",
                             torch.tensor(0, dtype=torch.long, device=device))

    def reset_parameters(self) -> None:
        """The identity transform's state (γ = 1, β = 0, μ = 0, σ² = 1), as built: what a
        meta-device initialization calls after ``to_empty()``."""
        self.weight.fill_(1)
        self.bias.zero_()
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    @classmethod
    @torch.no_grad()
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm:
        """A frozen copy of any BN module (bnlab's or torch's) with its current statistics (and
        its eval transform: a NoisyBatchNorm's factor E[s] is folded into γ and β).

        Raises:
            ValueError: ``bn`` is not a BN layer (e.g. an LpNorm: its scale is no variance) or
                has no running statistics (``track_running_stats=False``).
        """
        if not hasattr(bn, "running_var"):
            raise ValueError(f"FrozenBatchNorm.from_batchnorm: expected a BatchNorm layer (with "
                             f"running_mean and running_var), got {type(bn).__name__}")
        src = cast(_BatchNormLike, bn)  # duck-typed: a BN layer of any class
        rm, rv = getattr(bn, "running_mean", None), src.running_var
        if rm is None or rv is None:
            raise ValueError(f"FrozenBatchNorm.from_batchnorm: {type(bn).__name__} has no "
                             "running statistics (track_running_stats=False); recalibrate "
                             "it with running statistics first")
        frozen = cls(src.num_features, src.eps, device=rm.device, dtype=rm.dtype)
        frozen.running_mean.copy_(rm)
        frozen.running_var.copy_(rv)
        if (weight := getattr(bn, "weight", None)) is not None:
            frozen.weight.copy_(weight)
        if (bias := getattr(bn, "bias", None)) is not None:
            frozen.bias.copy_(bias)
        if (nbt := getattr(bn, "num_batches_tracked", None)) is not None:
            frozen.num_batches_tracked.copy_(nbt)
        # A NoisyBatchNorm's eval transform ends with its noise's expectation E[s]: into γ, β.
        k = eval_factor(bn)
        if k != 1.0:
            frozen.weight.mul_(k)
            frozen.bias.mul_(k)
        frozen.train(bn.training)
        return frozen

    def __prepare_scriptable__(self) -> nn.Module:
        no_torchscript(self, foldable=True)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def forward(self, input: Tensor) -> Tensor:
        check_input(input, f"{type(self).__name__}({self.num_features})", self._ranks,
                    self.num_features)
        return F.normalize(input, self.running_mean, self.running_var, self.weight, self.bias,
                           self.eps)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        # torchvision's FrozenBatchNorm2d checkpoints have no num_batches_tracked: default it
        # (to 0 for a module on the meta device, which has no value to keep).
        nbt = self.num_batches_tracked
        state_dict.setdefault(prefix + "num_batches_tracked",
                              torch.tensor(0, dtype=torch.long) if nbt.is_meta else nbt)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


class FrozenBatchNorm1d(FrozenBatchNorm):
    """`FrozenBatchNorm` for (N, C) or (N, C, L) input."""

    _ranks = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """`FrozenBatchNorm` for (N, C, H, W) input (torchvision's ``FrozenBatchNorm2d``)."""

    _ranks = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """`FrozenBatchNorm` for (N, C, D, H, W) input."""

    _ranks = (5,)
