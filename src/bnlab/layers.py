"""Drop-in batch-normalization modules: `BatchNorm`, `BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d`,
and `BatchNormReLU*` (BN followed by ReLU, fused into one sweep on CPU).

They hold state (γ, β, running statistics) and validate input; the math is in
`bnlab.functional.batch_norm`. Constructor arguments, defaults, buffers and state_dict keys are
PyTorch's, so a `torch.nn.BatchNorm2d` state_dict loads unchanged and gives the same outputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from bnlab import functional as F
from bnlab._checks import (
    FxLeaf,
    check_eps,
    check_input,
    check_momentum,
    check_num_features,
    no_torchscript,
    plain,
)
from bnlab._layer_state import (
    count_batch,
    count_untracked,
    has_stats,
    reset_stats,
    running_momentum,
    stats_mode,
)

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


class BatchNorm(FxLeaf, nn.Module):
    """Batch normalization over dimension 1 of an (N, C, *) input (Ioffe & Szegedy 2015, Alg. 1).

    See `bnlab.functional.batch_norm` for the math and the conventions: biased σ²_B to normalize,
    unbiased m/(m−1)·σ²_B stored; PyTorch momentum ``r ← (1 − m)·r + m·s``; ``momentum=None``
    keeps the cumulative average of all batches (closest to Alg. 2's average over batches);
    statistics in float32 for half/bfloat16 input.

    Args:
        num_features: C, the number of channels (features) to normalize.
        eps: ε ≥ 0 added to the variance, > 0 when training (the paper gives no value;
            PyTorch's 1e-5).
        momentum: in [0, 1], or None for the cumulative average.
        affine: learn γ (``weight``, init 1) and β (``bias``, init 0).
        bias: keyword-only, as in torch 2.13: with ``affine``, False learns γ only.
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``; if
            False, batch statistics are used in eval mode too.

    Extra (non-persistent) buffer ``num_nonfinite_batches``: training batches whose statistics
    were not finite and so did not update the running statistics (not in the state_dict).
    """

    _version = 2
    _ranks: tuple[int, ...] = (2, 3, 4, 5)
    # Plain attributes (not in the state_dict), set by `bnlab.freeze` / `bnlab.no_stats_update`:
    # `frozen` normalizes with the running statistics even in train() mode and never updates
    # them (it survives `model.train()`); `_stats_update_blocked` > 0 keeps training-mode
    # forwards (batch statistics) from touching the running statistics.
    frozen: bool = False
    _stats_update_blocked: int = 0
    # True where num_batches_tracked also drives a schedule (Batch Renorm's r_max/d_max), so
    # `bnlab.recalibrate` must not set it to its count of batches.
    num_batches_is_clock: bool = False
    # Declared for type checkers, as torch's _NormBase does (nn.Module's __getattr__ types
    # every parameter and buffer Tensor | Module): None where affine / tracking is off.
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    num_nonfinite_batches: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        if not (num_features == 0 and isinstance(self, LazyModuleMixin)):  # 0: not inferred yet
            check_num_features(num_features, who)
        check_eps(eps, who, allow_zero=True)  # (> 0 is checked when training, as torch does)
        momentum = plain(momentum)
        check_momentum(momentum, who)
        factory = {"device": device, "dtype": dtype}
        self.num_features = int(num_features)
        self._who()  # cached now, not by the first forward (torch.export flags that write)
        self.eps = plain(eps)  # a NumPy scalar as a Python float, as torch stores it
        self.momentum = momentum  # (made plain above, before its check)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.register_buffer(
            "num_nonfinite_batches", torch.tensor(0, dtype=torch.long, device=device),
            persistent=False,
        )
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            reset_stats(self.running_mean, self.running_var, self.num_batches_tracked)
        # The count belongs to the statistics it describes (and after to_empty() it holds
        # whatever the memory held).
        self.num_nonfinite_batches.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:  # (as torch: a layer given γ after affine=False is not reset)
            if self.weight is not None:
                nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}"
        )

    def __prepare_scriptable__(self) -> nn.Module:
        no_torchscript(self, foldable=True)

    def _who(self) -> str:
        # Named in every error message; formatted once per class (it runs on every forward).
        cached = self.__dict__.get("_who_cache")
        if cached is None or cached[0] is not type(self):
            cached = self.__dict__["_who_cache"] = (type(self),
                                                    f"{type(self).__name__}({self.num_features})")
        return cached[1]

    def _check_input_dim(self, x: Tensor) -> None:
        check_input(x, self._who(), self._ranks, self.num_features)

    def _momentum(self) -> float | Tensor:
        """The averaging factor of this step (`running_momentum`)."""
        return running_momentum(self)

    def normalization_batches(self, input: Tensor) -> tuple[Tensor, ...]:
        """The mini-batches B of Alg. 1 that a training forward of ``input`` normalizes by, each
        with its own statistics: the whole input here (ghost batches in `GhostBatchNorm`);
        `bnlab.population_statistics` averages over these (Alg. 2)."""
        return (input,)

    def _mode(self) -> tuple[bool, bool]:
        """(use batch statistics, update the running statistics) for this forward (`stats_mode`).
        One running buffer set to None without the other is an error, as in torch."""
        return stats_mode(self, has_stats(self._who(), self.running_mean, self.running_var,
                                          "running_var"))

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        use_batch_stats, update = self._mode()
        buffers = (self.running_mean, self.running_var) if (update or not use_batch_stats) \
            else (None, None)
        momentum = self._momentum() if update else 0.0
        y, finite = self._normalize(input, *buffers, use_batch_stats, momentum)
        if finite is not None:
            count_batch(self, finite)
        else:
            count_untracked(self, input)
        return y

    def _normalize(self, input: Tensor, running_mean: Tensor | None,
                   running_var: Tensor | None, training: bool,
                   momentum: float | Tensor) -> tuple[Tensor, Tensor | None]:
        """The transform itself, (y, finite flag of the running update or None)."""
        return F.batch_norm_with_flag(input, running_mean, running_var, self.weight, self.bias,
                                      training, momentum, self.eps, self._who())

    def _inference(self, input: Tensor) -> Tensor:
        """Alg. 2's inference transform with the running statistics (the variants' eval mode)."""
        return self._normalize(input, self.running_mean, self.running_var, False, 0.0)[0]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str,
                              local_metadata: dict[str, Any], strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        # Checkpoints older than PyTorch's version 2 have no num_batches_tracked: default it to 0.
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = (self.num_batches_tracked if self.num_batches_tracked is not None
                               and self.num_batches_tracked.device != torch.device("meta")
                               else torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        # A module built on the meta device and loaded with assign=True gets every tensor of the
        # state_dict; the non-persistent counter is not among them: start it at 0 beside them.
        loaded = next((t for t in (self.running_mean, self.weight) if t is not None
                       and not t.is_meta), None)
        if self.num_nonfinite_batches.is_meta and loaded is not None:
            self.num_nonfinite_batches = torch.zeros((), dtype=torch.long, device=loaded.device)
        elif prefix + "running_mean" in state_dict and not self.num_nonfinite_batches.is_meta:
            # Loaded statistics start a new history; after meta -> to_empty() the counter is
            # uninitialized memory that no load would otherwise overwrite (non-persistent).
            self.num_nonfinite_batches.zero_()


class BatchNorm1d(BatchNorm):
    """Drop-in for `torch.nn.BatchNorm1d`: (N, C) or (N, C, L) input. See `BatchNorm`."""

    _ranks = (2, 3)


class BatchNorm2d(BatchNorm):
    """Drop-in for `torch.nn.BatchNorm2d`: (N, C, H, W) input, one (γ, β) per feature map and
    statistics over m' = N·H·W values (Sec. 3.2, convolutional BN). See `BatchNorm`."""

    _ranks = (4,)


class BatchNorm3d(BatchNorm):
    """Drop-in for `torch.nn.BatchNorm3d`: (N, C, D, H, W) input. See `BatchNorm`."""

    _ranks = (5,)


class BatchNormReLU(BatchNorm):
    """``relu(BatchNorm(x))`` as one layer: on CPU one fused sweep (`bnlab.kernels.bn_relu`)
    whose backward reads a 1-byte ReLU mask instead of a second tensor, elsewhere the two ops.

    Same arguments, parameters, buffers and state_dict keys as `BatchNorm`, so a
    ``BatchNorm2d`` + ``ReLU`` pair's state loads into it. `bnlab.fold` turns it into the
    folded layer followed by ``nn.ReLU``; `bnlab.convert_sync_batchnorm` turns it into
    `bnlab.distributed.SyncBatchNormReLU` (global statistics, then the ReLU).
    """

    def _normalize(self, input: Tensor, running_mean: Tensor | None,
                   running_var: Tensor | None, training: bool,
                   momentum: float | Tensor) -> tuple[Tensor, Tensor | None]:
        from bnlab.kernels import fused  # the kernels package builds lazily

        return fused.bn_relu_with_flag(input, running_mean, running_var, self.weight, self.bias,
                                       training, momentum, self.eps, self._who())


class BatchNormReLU1d(BatchNormReLU):
    """`BatchNorm1d` followed by ReLU, fused. See `BatchNormReLU`."""

    _ranks = (2, 3)


class BatchNormReLU2d(BatchNormReLU):
    """`BatchNorm2d` followed by ReLU, fused. See `BatchNormReLU`."""

    _ranks = (4,)


class BatchNormReLU3d(BatchNormReLU):
    """`BatchNorm3d` followed by ReLU, fused. See `BatchNormReLU`."""

    _ranks = (5,)


class _LazyBatchNorm(LazyModuleMixin, BatchNorm):
    """A `BatchNorm` whose C is the input's dimension 1 on the first forward (torch's
    ``LazyBatchNorm*d``): γ, β and the running statistics are uninitialized until then, and the
    module then becomes the plain layer (``cls_to_become``). Same arguments as `BatchNorm`
    without ``num_features``. A state_dict loaded before the first forward sets C instead.
    """

    cls_to_become: type[BatchNorm] | None = None

    def __init__(self, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device: Any = None, dtype: Any = None, *,
                 bias: bool = True) -> None:
        factory = {"device": device, "dtype": dtype}
        # No tensors yet: affine and track_running_stats are set after (as torch does).
        super().__init__(0, eps, momentum, False, False, device=device, dtype=dtype)
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:
            self.weight = UninitializedParameter(**factory)
            if bias:
                self.bias = UninitializedParameter(**factory)
        if track_running_stats:
            self.running_mean = UninitializedBuffer(**factory)
            self.running_var = UninitializedBuffer(**factory)
            self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def _who(self) -> str:
        return f"{type(self).__name__}(uninitialized)"

    def _infer_parameters(self, module: nn.Module, args: tuple[Any, ...],
                          kwargs: dict[str, Any] | None = None) -> None:
        # torch.fx: the module is recorded as one call_module node (FxLeaf) and initializes
        # when the graph first runs on a tensor, as torch's lazy BN (an fx leaf) does.
        if args and isinstance(args[0], fx.Proxy):
            return
        super()._infer_parameters(module, args, kwargs)

    @torch.no_grad()
    def initialize_parameters(self, input: Tensor) -> None:
        """C from ``input`` (checked like any input first, so a wrong rank or dtype
        materializes nothing), or from a state_dict loaded earlier; then γ = 1, β = 0, μ = 0,
        σ² = 1 for the tensors still uninitialized."""
        c = input.shape[1] if isinstance(input, Tensor) and input.dim() >= 2 else 0
        check_input(input, self._who(), self._ranks, c)
        loaded = [t for t in (self.weight, self.bias, self.running_mean, self.running_var)
                  if t is not None and not is_lazy(t)]
        if self.num_features == 0:
            self.num_features = loaded[0].shape[0] if loaded else c
        init = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}
        for name, value in init.items():
            t = getattr(self, name)
            if t is not None and is_lazy(t):
                t.materialize((self.num_features,))
                t.fill_(value)


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    """Drop-in for `torch.nn.LazyBatchNorm1d`: `BatchNorm1d` with C inferred from the first
    input. See `_LazyBatchNorm`."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    """Drop-in for `torch.nn.LazyBatchNorm2d`: `BatchNorm2d` with C inferred from the first
    input. See `_LazyBatchNorm`."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    """Drop-in for `torch.nn.LazyBatchNorm3d`: `BatchNorm3d` with C inferred from the first
    input. See `_LazyBatchNorm`."""

    cls_to_become = BatchNorm3d
