"""bnlab: batch normalization done right, and a lab that reproduces the papers.

Core (imports torch only): `functional` (Alg. 1 and its hand-written backward), the drop-in
layers, `variants` (Batch Renorm, Ghost BN, Frozen BN), `distributed` (SyncBatchNorm over
torch.distributed), `stats` (Alg. 2 population statistics) and `convert` (folding, freezing,
BN insertion and replacement, Keras/Flax conventions). `bnlab.ddp` is the data-parallel
plumbing for the lab (imported on demand, not here).

References:
    S. Ioffe, C. Szegedy. Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift. ICML 2015, arXiv:1502.03167v3.
    S. Santurkar, D. Tsipras, A. Ilyas, A. Madry. How Does Batch Normalization Help
    Optimization? NeurIPS 2018, arXiv:1805.11604v3.
    S. Ioffe. Batch Renormalization: Towards Reducing Minibatch Dependence in Batch-Normalized
    Models. NIPS 2017, arXiv:1702.03275.
    E. Hoffer, I. Hubara, D. Soudry. Train longer, generalize better: closing the
    generalization gap in large batch training of neural networks. NIPS 2017, arXiv:1705.08741.
"""

from bnlab import functional
from bnlab.convert import (
    ChannelAffine,
    batchnormify,
    fold,
    freeze,
    no_stats_update,
    replace_norm,
    unfreeze,
)
from bnlab.distributed import SyncBatchNorm, SyncBatchRenorm, convert_sync_batchnorm
from bnlab.layers import (
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU,
    BatchNormReLU1d,
    BatchNormReLU2d,
    BatchNormReLU3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from bnlab.stats import population_statistics, recalibrate
from bnlab.variants import (
    BatchRenorm,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU",
    "BatchNormReLU1d",
    "BatchNormReLU2d",
    "BatchNormReLU3d",
    "BatchRenorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ChannelAffine",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "SyncBatchRenorm",
    "batchnormify",
    "convert_sync_batchnorm",
    "fold",
    "freeze",
    "functional",
    "no_stats_update",
    "population_statistics",
    "recalibrate",
    "replace_norm",
    "unfreeze",
]
