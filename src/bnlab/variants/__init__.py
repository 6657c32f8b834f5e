"""BN variants with the core's drop-in conventions (PyTorch arguments, buffers, state_dict keys).

* `renorm`: Batch Renormalization (Ioffe 2017) with the paper's warm-up of r_max/d_max.
* `ghost`: Ghost BN, statistics per virtual batch, both running-statistics conventions.
* `frozen`: `FrozenBatchNorm`, BN's inference transform with no trainable state.

Every variant computes its statistics and normalizes with `bnlab.functional`'s helpers and
dispatch, so a faster kernel speeds it up too. (More variants join this package: noisy BN and
ℓp normalizations of Santurkar et al. 2018.)
"""

from bnlab.variants.frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
from bnlab.variants.ghost import GhostBatchNorm, ghost_batch_norm, ghost_splits
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
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm",
    "batch_renorm",
    "ghost_batch_norm",
    "ghost_splits",
    "renorm_factors",
    "renorm_limits",
]
