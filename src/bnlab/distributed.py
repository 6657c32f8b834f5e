"""Synchronized BN over `torch.distributed`: statistics of the batch across all ranks.

Forward: each rank computes (m_r, μ_r, M2_r = m_r·σ²_r) of its shard; one ``all_gather``
brings all of them to every rank, where Chan's parallel merge gives the global statistics
exactly (in float64, never E[x²] − E[x]²)::

    m = Σ m_r,   μ = Σ m_r μ_r / m,   σ² = (Σ M2_r + Σ m_r (μ_r − μ)²) / m

Backward: one ``all_reduce`` of the two per-channel reductions Σ g and Σ g·x̂ turns the local
gradient into the gradient of BN over the concatenated batch (Ioffe & Szegedy 2015, Sec. 3).
Uneven shards and empty shards (m_r = 0) are exact: an empty rank still joins both
collectives, so no rank hangs; when every shard is empty the outputs are empty and the running
statistics stay as they are, as in single-process BN (under torch.compile or on GPU, where the
global count is not read on the host, such a batch is also counted in
``num_nonfinite_batches``, and a global count of 1 gives β instead of an error). Works with
gloo (CPU) and NCCL (GPU), and with process groups.

Semantics, chosen and documented (peers.md 1.2, pain point 8):
* eval mode never communicates (running statistics, or with ``track_running_stats=False`` the
  local batch statistics, as PyTorch);
* without an initialized process group, or in a group of one, the layers are plain BN;
* `convert_sync_batchnorm` keeps each variant's behaviour: BN → `SyncBatchNorm`, Batch Renorm
  → `SyncBatchRenorm`, BN+ReLU → `SyncBatchNormReLU`, noisy BN → `SyncNoisyBatchNorm`, Ghost
  and Frozen BN stay as they are (their statistics are local by definition), frozen flags
  carry over, and an unknown BN subclass is left alone with a warning instead of being
  downgraded to a bare SyncBN (timm#1254, pytorch#187298).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from bnlab import functional as F
from bnlab._checks import check_args, check_materialized
from bnlab._layer_state import count_untracked
from bnlab.convert.freeze import carry_hooks, is_frozen
from bnlab.layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
)
from bnlab.variants import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm,
    GhostBatchNorm,
    NoisyBatchNorm,
)
from bnlab.variants._common import (
    store_running_stats,
    unbiased,
    values_per_channel,
)
from bnlab.variants.noisy import _ROWS
from bnlab.variants.renorm import renorm_affine, renorm_factors

__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "SyncBatchRenorm", "SyncNoisyBatchNorm",
           "convert_sync_batchnorm", "register_sync_conversion", "sync_batch_stats"]


def _sync_active(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_gather(out: Tensor, local: Tensor, group: Any) -> None:
    # all_gather_single is torch 2.13's name (all_gather_into_tensor warns that it is
    # deprecated, on every rank and step)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, local,
                                                                               group=group)


@torch.no_grad()
def sync_batch_stats(x: Tensor, group: Any = None) -> tuple[Tensor, Tensor, Tensor]:
    """Global per-channel (μ, biased σ², m) of ``x`` over all ranks of ``group`` (a collective).

    Shape:
        x: (N_r, C, *) on each rank, N_r may differ and be 0; returns (C,), (C,) in the
        statistics dtype of x and m as a 0-d float64 tensor (the values per channel, all ranks).
    """
    ct = F.compute_dtype(x.dtype)
    m = values_per_channel(x)
    c = x.shape[1]
    if m > 0:
        mean, var = F.batch_stats(x)
    else:  # an empty shard contributes nothing but must still join the collective
        mean = var = torch.zeros(c, dtype=ct, device=x.device)
    f64 = torch.float64
    local = torch.cat([torch.full((1,), float(m), dtype=f64, device=x.device),
                       mean.to(f64), var.to(f64) * m])  # (1 + 2C,): m_r, μ_r, M2_r
    world = dist.get_world_size(group)
    gathered = torch.empty(world * local.numel(), dtype=f64, device=x.device)
    _all_gather(gathered, local, group)  # flat: gloo wants (W·(1+2C),)
    gathered = gathered.view(world, -1)  # (W, 1 + 2C)
    counts, means, m2 = gathered[:, :1], gathered[:, 1:1 + c], gathered[:, 1 + c:]
    total = counts.sum(0)  # (1,)
    denom = total.clamp_min(1)
    g_mean = (counts * means).sum(0) / denom
    g_var = (m2.sum(0) + (counts * (means - g_mean) ** 2).sum(0)) / denom  # Chan's merge
    return g_mean.to(ct), g_var.to(ct), total[0]


def _has_stats(count: Tensor, who: str) -> bool:
    """Whether the global batch has statistics to update with: False when every shard is empty
    (count 0; the output is empty on every rank, nothing is counted); one value per channel is
    an error. The global count lives on the device: it is read only where that costs no host
    sync (CPU, eager); elsewhere a count <= 1 reaches the update as a non-finite batch
    (`unbiased`), which leaves the buffers untouched."""
    if count.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    m = int(count.item())
    if m == 1:
        raise ValueError(f"{who}: expected more than 1 value per channel across all ranks when "
                         "training, got 1")
    return m > 0


class _SyncBatchNormFn(torch.autograd.Function):
    """y = γ(x − μ)/√(σ² + ε) + β with global (μ, σ², m); backward all-reduces Σg and Σg·x̂."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                var: Tensor, count: Tensor, eps: float, group: Any) -> Tensor:
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps), count)
        return F.normalize(x, mean, var, weight, bias, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd, count = ctx.saved_tensors
        ct = F.compute_dtype(x.dtype)
        dims = F.reduce_dims(x)
        g = grad_y.to(ct)
        x_hat = (x.to(ct) - F.channel_view(mean, x)) * F.channel_view(invstd, x)
        sum_g = g.sum(dims)  # (N_r, C, *) -> (C,), this rank's share
        sum_g_xhat = (g * x_hat).sum(dims)
        dx = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_g, sum_g_xhat])  # (2C,): one collective for both sums
            dist.all_reduce(both, group=ctx.group)
            g_sum, g_xhat_sum = both.chunk(2)
            m = count.to(ct).clamp_min(1)
            scale = invstd if weight is None else invstd * weight.to(ct)
            dx = g - F.channel_view(g_sum / m, x) - x_hat * F.channel_view(g_xhat_sum / m, x)
            dx = (dx * F.channel_view(scale, x)).to(x.dtype)
        # γ and β get this rank's share; DDP's gradient all-reduce sums the shares.
        dw = sum_g_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] \
            else None
        db = sum_g.to(ctx.bias_dtype or ct) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None, None


def sync_batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                          group: Any = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, μ, σ², m): the training transform of BN over the batch of all ranks of ``group``."""
    mean, var, count = sync_batch_stats(x, group)
    return _SyncBatchNormFn.apply(x, weight, bias, mean, var, count, eps, group), mean, var, count


class SyncBatchNorm(BatchNorm):
    """BN whose training statistics are those of the batch across all ranks (any (N, C, *)).

    Same arguments, buffers and state_dict keys as `bnlab.BatchNorm`, plus ``process_group``
    (default: the world). The running statistics get the global μ and the unbiased
    m/(m−1)·σ² with m the global count, so they are identical on every rank. See the module
    docstring for eval mode, the single-process fallback and empty shards.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, bias: bool = True, process_group: Any = None,
                 **kwargs: Any) -> None:
        # kwargs: the keywords of the layer a subclass synchronizes (NoisyBatchNorm's noise),
        # which may not take ``bias`` (so it is passed only when it says something)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **({} if bias else {"bias": False}), **kwargs)
        self.process_group = process_group

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """`bnlab.convert_sync_batchnorm` under torch's spelling,
        ``nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)``, so code that calls
        it keeps working with ``bnlab.SyncBatchNorm`` in its place."""
        return convert_sync_batchnorm(module, process_group)

    def _syncing(self, batch_stats: bool) -> bool:
        # Training with batch statistics and someone to sync with; eval (which uses the batch's
        # statistics only without running ones), frozen layers and one process are local BN.
        return batch_stats and self.training and _sync_active(self.process_group)

    def _normalize(self, input: Tensor, running_mean: Tensor | None,
                   running_var: Tensor | None, training: bool,
                   momentum: float | Tensor) -> tuple[Tensor, Tensor | None]:
        # `BatchNorm.forward`'s transform step: the global batch's statistics where syncing,
        # so subclasses of other BN layers (BatchNormReLU, NoisyBatchNorm) keep their own
        # forward around it.
        if not self._syncing(training):
            return super()._normalize(input, running_mean, running_var, training, momentum)
        # One process checks these in batch_norm; the shard's size is checked globally (every
        # rank is configured alike, so all raise together and none waits in the collective)
        check_args(input, running_mean, running_var, self.weight, self.bias, True, momentum,
                   self.eps, self._who(), local_size=False)
        y, mean, var, count = sync_batch_norm_train(input, self.weight, self.bias, self.eps,
                                                    self.process_group)
        if running_mean is None and input.numel() == 0:
            # the layer's forward counts a batch by this shard: an empty one by the global
            # batch here, so every rank's num_batches_tracked moves alike
            count_untracked(self, input, nonempty=count > 0)
        if not _has_stats(count, self._who()) or running_mean is None or running_var is None:
            return y, None
        return y, store_running_stats(running_mean, running_var, mean, unbiased(var, count),
                                      momentum)


class SyncBatchNormReLU(SyncBatchNorm, BatchNormReLU):
    """`bnlab.BatchNormReLU` with `SyncBatchNorm`'s statistics: relu(SyncBatchNorm(x)) (the
    fused kernel where nothing is synchronized)."""

    def _normalize(self, input: Tensor, running_mean: Tensor | None,
                   running_var: Tensor | None, training: bool,
                   momentum: float | Tensor) -> tuple[Tensor, Tensor | None]:
        y, finite = super()._normalize(input, running_mean, running_var, training, momentum)
        return (torch.relu(y) if self._syncing(training) else y), finite


class SyncNoisyBatchNorm(SyncBatchNorm, NoisyBatchNorm):
    """`bnlab.variants.NoisyBatchNorm` with `SyncBatchNorm`'s statistics and the global batch's
    noise: built alike on every rank (one seed), each rank draws the noise of the whole global
    batch (D_j^t and every per-element draw, Alg. 1) and adds its shard's rows of it. With the
    shards in rank order (`bnlab.ddp.shard_batch`) that is one process's output exactly; in any
    order the draws stay independent across samples and the generators equal (uneven and empty
    shards too). Costs one all_gather of the shards' sizes (none inside
    `bnlab.variants.noise_rows`, which gives them) and world × one shard's draws."""

    def forward(self, input: Tensor) -> Tensor:
        y = BatchNorm.forward(self, input)  # (SyncBatchNorm's statistics through _normalize)
        group = self.process_group
        if not self.noise.training or input.device.type == "meta" or \
                not _sync_active(group) or _ROWS.get() is not None:
            return self.noise(y)
        sizes = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=input.device)
        _all_gather(sizes, torch.full_like(sizes[:1], input.shape[0]), group)
        counts = sizes.tolist()  # (offset, total) of this rank's rows in the global batch:
        return self.noise(y, rows=(sum(counts[:dist.get_rank(group)]), sum(counts)))


class SyncBatchRenorm(BatchRenorm):
    """Batch Renormalization with statistics of the batch across all ranks (see `BatchRenorm`).

    r and d come from the global μ_B, σ_B; everything else is as `SyncBatchNorm`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, process_group: Any = None, **renorm: Any) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         **renorm)
        self.process_group = process_group

    def _renorm_train(self, input: Tensor, r_max: Tensor, d_max: Tensor,
                      update: bool) -> tuple[Tensor, Tensor | None]:
        if not _sync_active(self.process_group):
            return super()._renorm_train(input, r_max, d_max, update)
        running_mean, running_var = self.running_stats()
        momentum = self._momentum()
        check_args(input, running_mean, running_var, self.weight, self.bias, True, momentum,
                   self.eps, self._who(), local_size=False)  # (as above)
        mean, var, count = sync_batch_stats(input, self.process_group)
        if not _has_stats(count, self._who()):  # every shard empty: no r, d, no update
            return F.empty_batch(input, self.weight, self.bias), None
        r, d = renorm_factors(mean, var, running_mean, running_var, self.eps, r_max, d_max)
        w, b = renorm_affine(self.weight, self.bias, r, d)
        y = _SyncBatchNormFn.apply(input, w, b, mean, var, count, self.eps, self.process_group)
        if not update:
            return y, None
        return y, store_running_stats(running_mean, running_var, mean, unbiased(var, count),
                                      momentum)


# Class → its synchronized class, or None: kept as is on purpose (statistics local by design).
_SYNC: dict[type, type | None] = {
    **{c: SyncBatchNorm for c in (BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                                  nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                  nn.SyncBatchNorm, SyncBatchNorm)},
    **{c: SyncBatchRenorm for c in (BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
                                    SyncBatchRenorm)},
    **{c: SyncBatchNormReLU for c in (BatchNormReLU, BatchNormReLU1d, BatchNormReLU2d,
                                      BatchNormReLU3d, SyncBatchNormReLU)},
    NoisyBatchNorm: SyncNoisyBatchNorm,
    SyncNoisyBatchNorm: SyncNoisyBatchNorm,
    GhostBatchNorm: None,
    FrozenBatchNorm: None,
}


def register_sync_conversion(cls: type, sync_cls: type | None) -> None:
    """Tell `convert_sync_batchnorm` what ``cls`` becomes: a class built like `SyncBatchNorm`
    (``sync_cls(num_features, eps, momentum, affine, track_running_stats, process_group=...)``;
    ``device=`` and ``bias=`` too where its constructor takes them) or None to keep it
    unchanged. Exact classes only: subclasses need their own entry."""
    _SYNC[cls] = sync_cls


def _target(m: nn.Module) -> tuple[bool, type | None]:
    """(known, sync class or None to keep) for a module."""
    for cls in type(m).__mro__:
        if cls in _SYNC and (cls is type(m) or _SYNC[cls] is None):
            return True, _SYNC[cls]  # exact match, or a subclass of a kept-as-is class
    return False, None


@torch.no_grad()
def _to_sync(m: nn.Module, sync_cls: type, group: Any) -> nn.Module:
    kwargs: dict[str, Any] = {}
    if isinstance(m, BatchRenorm):
        kwargs = {k: getattr(m, k) for k in ("r_max", "d_max", "warmup_steps", "r_max_steps",
                                             "d_max_steps")}
    elif isinstance(m, NoisyBatchNorm):  # its seed: no draw from the global generator
        kwargs = {k: getattr(m.noise, k) for k in ("n_mu", "n_sigma", "r_mu", "r_sigma", "seed")}
    else:  # BN's bias=False (affine γ only), as torch 2.13
        kwargs = {"bias": not m.affine or m.bias is not None}
    ref = next(iter([*m.parameters(), *m.buffers()]), None)
    kwargs["device"] = None if ref is None else ref.device
    try:  # a registered class may take only the documented arguments
        params = inspect.signature(sync_cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    new = sync_cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                   process_group=group, **kwargs)
    # The same Parameter and buffer objects (as torch does): optimizers keep working. None
    # stays None (no bias, running buffers deleted to use batch statistics in eval).
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(m, name, None))
    if getattr(m, "num_nonfinite_batches", None) is not None:
        new.num_nonfinite_batches = m.num_nonfinite_batches
    for name, child in m.named_children():  # NoisyBatchNorm's noise (its generator)
        setattr(new, name, child)
    new.training = m.training  # not train(): the children keep their own modes (noise.eval())
    carry_hooks(m, new)
    new.frozen = is_frozen(m)
    new._stats_update_blocked = getattr(m, "_stats_update_blocked", 0)
    if hasattr(m, "qconfig"):
        new.qconfig = m.qconfig
    return new


def convert_sync_batchnorm(module: nn.Module, process_group: Any = None, *,
                           keep_synced: bool = False) -> nn.Module:
    """Replace BN layers by their synchronized form, keeping each variant's behaviour.

    bnlab and torch ``BatchNorm{,1d,2d,3d}``/``nn.SyncBatchNorm`` → `SyncBatchNorm`; Batch
    Renorm → `SyncBatchRenorm`; `BatchNormReLU` → `SyncBatchNormReLU`; `NoisyBatchNorm` →
    `SyncNoisyBatchNorm`; Ghost and Frozen BN are kept (local by definition); classes added
    with `register_sync_conversion` as registered. Parameters, buffers (None included) and
    child modules are shared with the originals, the train/eval mode and frozen flags are
    kept. Any other BN subclass is left unchanged and named in a warning: converting it to a
    bare SyncBN would silently drop its extra behaviour. A subclass of bnlab's synchronized
    layers is kept as it is, as is, with ``keep_synced``, any of them whatever its process
    group (otherwise one of another group is rebuilt with ``process_group``).

    Returns:
        ``module`` converted in place, or its replacement if ``module`` itself is a BN.
    """
    check_materialized(module, "convert_sync_batchnorm")
    skipped: list[str] = []
    out = _convert(module, process_group, "", skipped, keep_synced)
    if skipped:
        warnings.warn("convert_sync_batchnorm: left unsynchronized (unknown BN subclasses; "
                      "register them with bnlab.distributed.register_sync_conversion): "
                      + ", ".join(skipped), UserWarning, stacklevel=2)
    return out


def _convert(m: nn.Module, group: Any, name: str, skipped: list[str],
             keep_synced: bool) -> nn.Module:
    if isinstance(m, (BatchNorm, nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)):
        known, sync_cls = _target(m)
        synced = isinstance(m, (SyncBatchNorm, SyncBatchRenorm))
        if synced and (keep_synced or not known):
            return m  # a user's subclass of a synchronized layer, or asked to keep them
        if not known:
            skipped.append(f"{name or '<root>'} ({type(m).__name__})")
            return m
        if isinstance(m, nn.SyncBatchNorm) and (group is None or keep_synced):
            group = m.process_group  # torch's SyncBN keeps its (sub)group
        if sync_cls is None or (type(m) is sync_cls and m.process_group is group):
            return m  # kept, or already what it would become: the same module, hooks and all
        return _to_sync(m, sync_cls, group)
    for child_name, child in m.named_children():
        new = _convert(child, group, f"{name}.{child_name}" if name else child_name, skipped,
                       keep_synced)
        if new is not child:
            setattr(m, child_name, new)
    return m
