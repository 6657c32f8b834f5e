"""BN variants with the core's drop-in conventions (PyTorch arguments, buffers, state_dict keys).

* `renorm`: Batch Renormalization (Ioffe 2017) with the paper's warm-up of r_max/d_max.
* `ghost`: Ghost BN, statistics per virtual batch, both running-statistics conventions.
* `frozen`: `FrozenBatchNorm`, BN's inference transform with no trainable state.
* `noisy`: Santurkar et al. (2018) `NoisyBatchNorm` and `ActivationNoise` (Sec. 2.1,
  App. A.2.1, Algorithm 1).
* `lp`: Santurkar et al. (2018) `LpNorm` (Sec. 3.3, p = 1, 2, ∞).

Every BN variant computes its statistics and normalizes with `bnlab.functional`'s helpers and
dispatch, so a faster kernel speeds it up too.
"""

from bnlab.variants.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from bnlab.variants.ghost import GhostBatchNorm, ghost_batch_norm, ghost_splits
from bnlab.variants.lp import LpNorm, lp_norm, lp_stats
from bnlab.variants.noisy import ActivationNoise, NoisyBatchNorm, activation_noise, noise_rows
from bnlab.variants.renorm import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    batch_renorm,
    renorm_factors,
    renorm_limits,
)

__all__ = [
    "ActivationNoise",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm",
    "LpNorm",
    "NoisyBatchNorm",
    "activation_noise",
    "batch_renorm",
    "ghost_batch_norm",
    "ghost_splits",
    "lp_norm",
    "lp_stats",
    "noise_rows",
    "renorm_factors",
    "renorm_limits",
]
