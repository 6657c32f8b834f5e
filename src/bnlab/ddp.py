"""Data-parallel plumbing for the lab: torchrun set-up, batch sharding, DDP wrapping.

Every function is a no-op (or the identity) in a single process, so one training loop serves
``python -m bnlab run ...`` and ``torchrun --nproc-per-node K -m bnlab run ... [--sync-bn]``.
The loop draws the *global* batch on every rank (same seed), keeps its shard with
`shard_batch`, and scales its summed loss with `global_mean`: then DDP's gradient average is
the gradient of the mean loss over the global batch, even for uneven shards, and with
``sync_bn`` the run matches one process on the same global batch. Imports torch only.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab.distributed import SyncBatchNorm, SyncBatchRenorm, convert_sync_batchnorm
from bnlab.distributed import _target as sync_target
from bnlab.layers import BatchNorm
from bnlab.variants import FrozenBatchNorm

__all__ = [
    "all_reduce_sum",
    "collective_device",
    "global_mean",
    "is_main",
    "local_running_stats",
    "rank_local_buffers",
    "setup_from_env",
    "shard_batch",
    "shard_range",
    "sync_in_place",
    "teardown",
    "unwrap",
    "world",
    "wrap_ddp",
]


def world() -> tuple[int, int]:
    """(rank, world_size) of the default group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_int(name: str, default: int, minimum: int) -> int:
    """An integer environment variable (``default`` where unset), named in the error."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"setup_from_env: environment variable {name} must be an integer >= "
                         f"{minimum}, got {raw!r}")
    return value


def setup_from_env(device: str | None = None, *,
                   timeout_s: float = 300.0) -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. With
    ``WORLD_SIZE`` unset or 1 nothing is initialized (a ``RANK`` or ``LOCAL_RANK`` other than
    0 then is an error: a launcher that forgot ``WORLD_SIZE`` would start several "rank 0"
    processes); with ``WORLD_SIZE`` > 1, ``RANK`` must be set, in [0, WORLD_SIZE) (a wrong one
    waited out the timeout, then failed with a network error). A process group the caller
    has already initialized is used as it is. Backend: NCCL when the device is CUDA, gloo
    otherwise. ``device`` (e.g. ``"cpu"``, ``"cuda"``) defaults to CUDA when available; on
    CUDA each process takes ``cuda:LOCAL_RANK``.

    Returns:
        (rank, world_size, device).
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(kind)
    if dist.is_available() and dist.is_initialized():  # the caller's group
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", _env_int("LOCAL_RANK", torch.cuda.current_device(), 0))
        return dist.get_rank(), dist.get_world_size(), dev
    world_size = _env_int("WORLD_SIZE", 1, 1)
    if world_size == 1:
        for name in ("RANK", "LOCAL_RANK"):
            if _env_int(name, 0, 0) != 0:
                raise ValueError(f"setup_from_env: {name}={os.environ[name]} but WORLD_SIZE is "
                                 f"{os.environ.get('WORLD_SIZE', 'unset')}: set WORLD_SIZE to "
                                 "the number of processes (torchrun sets both)")
        return 0, 1, (torch.device("cuda", 0) if dev.type == "cuda" and dev.index is None
                      else dev)
    if "RANK" not in os.environ:
        raise ValueError(f"setup_from_env: WORLD_SIZE={world_size} but RANK is unset: set "
                         "each process's RANK in [0, WORLD_SIZE) (torchrun sets it)")
    rank = _env_int("RANK", 0, 0)
    if rank >= world_size:
        raise ValueError(f"setup_from_env: RANK must be in [0, {world_size}) "
                         f"(WORLD_SIZE={world_size}), got {rank}")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", _env_int("LOCAL_RANK", 0, 0))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"setup_from_env: LOCAL_RANK {dev.index} names no CUDA device "
                             f"(this machine has {torch.cuda.device_count()})")
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), dev


def shard_batch(x: Tensor, y: Tensor | None, rank: int,
                world_size: int) -> tuple[Tensor, Tensor | None]:
    """Rank ``rank``'s contiguous shard of a global batch: near-equal sizes, the first
    ``N % world_size`` ranks one sample more; a rank may get an empty shard when N < world.
    ``x`` and ``y`` (if given) are tensors of the same length N in dimension 0."""
    for name, t in (("x", x), ("y", y)):
        if (t is not None or name == "x") and (not isinstance(t, Tensor) or t.dim() == 0):
            got = "a 0-d tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"shard_batch: {name} must be a tensor with a batch dimension, got "
                            f"{got}")
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"shard_batch: x and y must have the same length, got {x.shape[0]} "
                         f"and {y.shape[0]}")
    start, stop = shard_range(x.shape[0], rank, world_size)
    return x[start:stop], (None if y is None else y[start:stop])


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, stop): the rows of a batch of ``n`` that `shard_batch` gives rank ``rank``."""
    if world_size < 1 or n < 0:
        raise ValueError(f"shard_range: world_size must be >= 1 and n >= 0, got world_size="
                         f"{world_size}, n={n}")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_range: rank must be in [0, {world_size}), got {rank}")
    start = rank * (n // world_size) + min(rank, n % world_size)
    return start, start + n // world_size + (1 if rank < n % world_size else 0)


def global_mean(loss_sum: Tensor, global_batch_size: int) -> Tensor:
    """The loss to backpropagate on this rank, from the sum of its per-sample losses.

    DDP averages gradients over ranks, so each rank returns world·Σ_shard ℓ / N: the average
    is then ∇ (1/N) Σ_all ℓ, the single-process mean loss, even when shards are uneven.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_mean: global_batch_size must be >= 1, got {global_batch_size}")
    return loss_sum * (world()[1] / global_batch_size)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a small tensor for a collective of ``group`` must live: the current CUDA device
    under NCCL (which reduces CUDA tensors only), else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Σ over ranks of ``t`` (a copy; ``t`` itself when not distributed). For metric sums."""
    if world()[1] == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def sync_in_place(model: nn.Module) -> nn.Module:
    """``model`` with SyncBN, its bnlab BN layers converted by changing their class: the same
    module objects, so hooks and references that probes took before training stay valid (a
    new module, as `convert_sync_batchnorm` makes, left an activation probe waiting for a layer
    that was no longer called). A layer is converted so when its synchronized class (from
    `convert_sync_batchnorm`'s registry) derives from the layer's own class or one of its
    bases, as SyncBatchNorm from BatchNorm and SyncBatchNormReLU from BatchNormReLU: the same
    attributes, plus ``process_group``. The rest (torch's layers) go through
    `convert_sync_batchnorm`, with its warnings for layers it keeps local; layers that are
    already synchronized stay as they are, process group included."""
    for m in model.modules():
        known, sync_cls = sync_target(m)
        if (known and sync_cls is not None and type(m) is not sync_cls
                and isinstance(m, BatchNorm) and sync_cls.__bases__[-1] in type(m).__mro__):
            m.__class__ = sync_cls
            # torch types Module.__setattr__'s value Tensor | Module, but any value is accepted
            m.process_group = None  # type: ignore[assignment]
    return convert_sync_batchnorm(model, keep_synced=True)


def _world_synced(m: nn.Module) -> bool:
    """A layer whose buffers are the same on every rank by construction: synchronized over the
    whole world (not a subgroup), or frozen."""
    if isinstance(m, FrozenBatchNorm):
        return True
    if not isinstance(m, (SyncBatchNorm, SyncBatchRenorm)):
        return False
    group = m.process_group
    return not dist.is_initialized() or group is None or \
        dist.get_world_size(group) == dist.get_world_size()


def local_running_stats(model: nn.Module) -> list[str]:
    """Names of the layers that keep running statistics of their own rank's (or subgroup's)
    batches only (Ghost BN, LpNorm, BN subclasses `convert_sync_batchnorm` leaves alone, SyncBN
    in a subgroup): with them, the ranks' running buffers drift apart unless DDP broadcasts
    rank 0's."""
    return [name for name, m in model.named_modules()
            if getattr(m, "running_mean", None) is not None and not _world_synced(m)]


def rank_local_buffers(model: nn.Module) -> list[str]:
    """`local_running_stats`, and every other module with buffers of its own (a user's EMA, a
    counter): what may differ between ranks unless DDP broadcasts rank 0's."""
    return [name for name, m in model.named_modules()
            if next(m.buffers(recurse=False), None) is not None and not _world_synced(m)]


def wrap_ddp(model: nn.Module, sync_bn: bool = False, **ddp_kwargs: Any) -> nn.Module:
    """``model`` ready for data-parallel training (itself when single-process).

    ``sync_bn`` first converts its BN layers to SyncBN in place (`sync_in_place`; variants
    kept). Where every layer with running statistics is then synchronized, the buffers are
    identical on all ranks by construction, so DDP's per-forward buffer broadcast is switched
    off (it also breaks two forwards before one backward, pytorch#22095); otherwise
    (`rank_local_buffers`: layers with local running statistics, or any other module with
    buffers; or without ``sync_bn``) rank 0's buffers are broadcast at every forward, as in
    PyTorch, so that every rank evaluates the same model. ``ddp_kwargs`` go to
    `DistributedDataParallel` (e.g. ``find_unused_parameters=True``). A model with nothing to
    train (every parameter frozen, or none) is not wrapped, which DDP refuses: its buffers are
    broadcast from rank 0 once, as DDP does at construction.
    """
    if sync_bn:
        model = sync_in_place(model)
    if world()[1] == 1:
        return model
    if not any(p.requires_grad for p in model.parameters()):
        for b in model.buffers():
            dist.broadcast(b, 0)
        return model
    ref = next(iter(model.parameters()), None)
    device_ids = [ref.device] if ref is not None and ref.device.type == "cuda" else None
    # forward_sync_buffers is torch 2.13's name for broadcast_buffers (buffers still sync once
    # at construction, which is what we want: every rank starts from rank 0's state).
    broadcast = not sync_bn or bool(rank_local_buffers(model))
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               forward_sync_buffers=broadcast, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (for checkpoints without a ``module.`` prefix, and for
    rank-0-only evaluation, which must not go through DDP's forward and its buffer sync)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_main() -> bool:
    """True on rank 0, or when not distributed: the one process that writes the run directory."""
    return world()[0] == 0


def teardown(*, sync: bool = False) -> None:
    """Leave the process group (no-op when none is initialized). ``sync``: after a barrier, on
    a run that ended well: a rank that destroys its group while another still talks to it can
    abort the other at exit (gloo: "terminate called without an active exception", seen with
    two ranks on a loaded machine). Not on an error path, where a rank that died would leave
    the barrier waiting for gloo's timeout."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
