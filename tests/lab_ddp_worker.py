"""One of the gloo processes started by tests/test_lab_ddp.py (not collected by pytest).

Trains a tiny net with dropout and per-rank activation noise through the lab's `fit` on uneven
shards (a global batch of 5: 3 + 2 rows), as `torchrun -m bnlab run` would. Phases: "whole"
(uninterrupted), "cut" (rank 1 alone is interrupted at step 4), "resume" (continues the cut
run), "cut_last" (rank 1 alone is interrupted at the last step's evaluation). Writes
OUT_DIR/PHASE-rank{r}.pt: the final state_dict, the step the run stopped after (interrupted),
the dropout mask of each step's first shard row and the noise's generator state. Usage:
lab_ddp_worker.py OUT_DIR PHASE.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from torch import nn

from bnlab import BatchNorm1d
from bnlab.lab import parallel, runs
from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig
from bnlab.lab.data import Dataset
from bnlab.lab.train import fit, seed_all
from bnlab.variants import ActivationNoise

TRAIN = TrainConfig(steps=10, batch_size=5, eval_every=2, checkpoint_every=4)


class InterruptOnRank1:
    """Ctrl-C in one process only, during an evaluation: every rank must still stop after the
    same step (the last one's too)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self, ctx):
        if ctx.step == self.step and parallel.current().rank == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return {}


def main(out: str, phase: str) -> None:
    par = parallel.init()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 3, 3, generator=g), torch.randint(0, 4, (48,), generator=g)
    data = Dataset(x[:40], y[:40], x[40:], y[40:], "synthetic")
    seed_all(0)
    drop = nn.Dropout(0.5)
    # Dropout before the ReLU: its input is non-zero, so its zeros are its mask alone.
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 16, bias=False), BatchNorm1d(16),
                          ActivationNoise(16, seed=3), drop, nn.ReLU(), nn.Linear(16, 4))
    masks: list[torch.Tensor] = []
    drop.register_forward_hook(
        lambda m, i, o: masks.append(o[0] == 0) if m.training and len(o) else None)
    path = Path(out) / {"resume": "cut"}.get(phase, phase)
    resume = phase == "resume"
    meta = {"experiment": "t", "preset": "t", "variant": "v", "seed": 0, "config": {}}
    run = (runs.prepare(path, meta, resume=resume)[0] if par.main
           else parallel.MemoryRun(path, resume=resume))
    stopped = None
    try:
        fit(model, data, run, train=TRAIN, optim=OptimConfig(lr=0.1, momentum=0.9),
            data_cfg=DataConfig(), seed=0, progress=False, resume=resume,
            probes=[InterruptOnRank1({"cut": 4, "cut_last": TRAIN.steps}.get(phase, -1))])
    except KeyboardInterrupt as e:
        stopped = int(str(e).split("after step ")[1].split(";")[0])
    torch.save({"state": model.state_dict(), "stopped": stopped, "masks": masks,
                "noise": model[3].generator.get_state()},
               Path(out) / f"{phase}-rank{par.rank}.pt")
    parallel.teardown(sync=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
