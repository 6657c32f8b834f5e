"""Every nn.Module that bnlab exports, for tests that go over all of them (test_toolchain.py
checks that the table covers the exported namespaces, so a new class cannot be left out)."""

from __future__ import annotations

import torch

import bnlab
import bnlab.convert
import bnlab.variants

# name -> (a factory building it for 4 channels, an input rank it accepts)
V = bnlab.variants
MODULES = {
    "BatchNorm": (lambda: bnlab.BatchNorm(4), 4),
    "BatchNorm1d": (lambda: bnlab.BatchNorm1d(4), 2),
    "BatchNorm2d": (lambda: bnlab.BatchNorm2d(4, momentum=None), 4),
    "BatchNorm3d": (lambda: bnlab.BatchNorm3d(4), 5),
    "BatchNormReLU": (lambda: bnlab.BatchNormReLU(4), 3),
    "BatchNormReLU1d": (lambda: bnlab.BatchNormReLU1d(4), 2),
    "BatchNormReLU2d": (lambda: bnlab.BatchNormReLU2d(4), 4),
    "BatchNormReLU3d": (lambda: bnlab.BatchNormReLU3d(4), 5),
    # Lazy: C = 4 from the first input (the factory returns it uninitialized).
    "LazyBatchNorm1d": (lambda: bnlab.LazyBatchNorm1d(), 2),
    "LazyBatchNorm2d": (lambda: bnlab.LazyBatchNorm2d(momentum=None), 4),
    "LazyBatchNorm3d": (lambda: bnlab.LazyBatchNorm3d(), 5),
    "BatchRenorm": (lambda: V.BatchRenorm(4, warmup_steps=0), 4),
    "BatchRenorm1d": (lambda: V.BatchRenorm1d(4), 2),
    "BatchRenorm2d": (lambda: V.BatchRenorm2d(4), 4),
    "BatchRenorm3d": (lambda: V.BatchRenorm3d(4), 5),
    "GhostBatchNorm": (lambda: V.GhostBatchNorm(4, virtual_batch_size=3), 4),
    "FrozenBatchNorm": (lambda: V.FrozenBatchNorm(4), 3),
    "FrozenBatchNorm1d": (lambda: V.FrozenBatchNorm1d(4), 2),
    "FrozenBatchNorm2d": (lambda: V.FrozenBatchNorm2d(4), 4),
    "FrozenBatchNorm3d": (lambda: V.FrozenBatchNorm3d(4), 5),
    "NoisyBatchNorm": (lambda: V.NoisyBatchNorm(4, seed=0), 4),
    "ActivationNoise": (lambda: V.ActivationNoise(4, seed=0), 4),
    "LpNorm": (lambda: V.LpNorm(4, p=1), 4),
    "SyncBatchNorm": (lambda: bnlab.SyncBatchNorm(4), 4),
    "SyncBatchRenorm": (lambda: bnlab.SyncBatchRenorm(4), 4),
    "ChannelAffine": (lambda: bnlab.convert.ChannelAffine(torch.rand(4) + 0.5, torch.randn(4)),
                      4),
}
