"""Batch-norm variants (core: imports torch only).

Santurkar et al. (2018): `NoisyBatchNorm` and `ActivationNoise` (Sec. 2.1, App. A.2.1,
Algorithm 1) and `LpNorm` (Sec. 3.3, p = 1, 2, ∞).
"""

from bnlab.variants.lp import LpNorm, lp_norm, lp_stats
from bnlab.variants.noisy import ActivationNoise, NoisyBatchNorm, activation_noise

__all__ = [
    "ActivationNoise",
    "LpNorm",
    "NoisyBatchNorm",
    "activation_noise",
    "lp_norm",
    "lp_stats",
]
