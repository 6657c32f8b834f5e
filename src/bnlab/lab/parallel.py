"""Data-parallel runs of the lab: ``torchrun --nproc-per-node K -m bnlab run NAME [--sync-bn]``.

Every rank draws the same *global* batch (same seed and batch order), keeps its shard
(`bnlab.ddp.shard_batch`) and scales its summed loss so that DDP's gradient average is the
gradient of the global mean loss (`bnlab.ddp.global_mean`). With ``--sync-bn`` every BN takes
its synchronized form (`bnlab.ddp.sync_in_place`), so the run equals one process on the same
global batch (noisy BN included: `SyncNoisyBatchNorm` draws the global batch's noise). Dropout
masks are each rank's own (`decorrelate`), and `bnlab.lab.train.fit` checkpoints every rank's
random state (`gather`). Evaluation
and probes run on every rank on identical parameters (no communication in eval mode); only
rank 0 writes the run directory, the other ranks keep their run in memory (`MemoryRun`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from bnlab import ddp
from bnlab.lab.runs import Run

__all__ = ["MemoryRun", "Parallel", "any_rank", "broadcast", "current", "decorrelate", "gather",
           "init", "prepare_model", "shard"]


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world: int = 1
    sync_bn: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


_STATE = Parallel()


def init(*, sync_bn: bool = False) -> Parallel:
    """Join the torchrun process group if there is one (a no-op in a single process). The lab
    trains on the CPU, so the group is gloo's. (An undocumented BNLAB_DEVICE=cuda chose NCCL
    while the model and data stayed on the CPU, which NCCL cannot reduce: removed.)"""
    global _STATE
    rank, world, _ = ddp.setup_from_env("cpu")
    _STATE = Parallel(rank, world, sync_bn)
    return _STATE


def current() -> Parallel:
    return _STATE


def teardown(*, sync: bool = False) -> None:
    """Leave the process group (`bnlab.ddp.teardown`; ``sync`` after a barrier)."""
    global _STATE
    ddp.teardown(sync=sync)
    _STATE = Parallel()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself in a single process)."""
    if _STATE.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective; ``flag`` in a single process)."""
    if _STATE.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=ddp.collective_device())
    return bool(ddp.all_reduce_sum(t).item() > 0)


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process). A
    collective: every rank calls it at the same point."""
    if _STATE.world == 1:
        return [obj]
    out: list[Any] = [None] * _STATE.world
    dist.all_gather_object(out, obj)
    return out


def _rank_seed(seed: int, *salt: int) -> int:
    """A 64-bit seed of its own for this rank, derived from ``seed`` (and ``salt``) by NumPy's
    `SeedSequence`, whose spawned streams are statistically independent."""
    seq = np.random.SeedSequence(seed, spawn_key=(_STATE.rank, *salt))
    return int(seq.generate_state(1, np.uint64)[0])


def decorrelate(seed: int, *salt: int) -> None:
    """Give this rank's global generator (dropout's masks) a stream of its own; rank 0 keeps
    the single process's. Every rank built the model from the same seed and draws the same
    global batch; without this, the ranks' shards got the same dropout masks row for row.
    Noise modules keep their shared generators: `bnlab.distributed.SyncNoisyBatchNorm` draws the
    global batch's noise from them and keeps its shard."""
    if _STATE.rank > 0:
        torch.manual_seed(_rank_seed(seed, *salt))


def prepare_model(model: nn.Module) -> nn.Module:
    """The module to train: ``model`` with SyncBN when asked (converted in place, parameters
    shared), wrapped in DDP when there is more than one process. ``model`` itself stays the
    unwrapped module used for evaluation, probes and checkpoints."""
    return ddp.wrap_ddp(model, sync_bn=_STATE.sync_bn)


def shard(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """This rank's shard of the global batch (x, y), and its (offset, total) rows in it."""
    start, stop = ddp.shard_range(len(x), _STATE.rank, _STATE.world)
    return x[start:stop], y[start:stop], (start, len(x))


class MemoryRun(Run):
    """A non-zero rank's view of a run: reads what rank 0 wrote before this process started
    (checkpoints to resume from), keeps everything it would write in memory."""

    def __init__(self, path: Path, *, resume: bool) -> None:
        super().__init__(Path(path))
        self._metrics = Run(self.path).metrics() if resume else []
        self._artifacts: dict[str, Any] = {}

    def metrics(self) -> list[dict[str, Any]]:
        return list(self._metrics)

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.append(record)

    def truncate_metrics(self, step: int) -> None:
        self._metrics = [r for r in self._metrics if r.get("step", 0) <= step]

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        pass

    def save_artifact(self, name: str, obj: Any) -> None:
        self._artifacts[name] = obj

    def load_artifact(self, name: str) -> Any:
        return self._artifacts[name] if name in self._artifacts else super().load_artifact(name)

    def finish(self, summary: dict[str, Any], *, keep_checkpoint: bool = False) -> None:
        pass
