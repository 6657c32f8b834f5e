"""bnlab: batch normalization done right, and a lab that reproduces the papers.

Core (imports torch only): `functional` (Alg. 1 and its hand-written backward), the drop-in
layers, `stats` (Alg. 2 population statistics) and `convert` (folding for inference).

References:
    S. Ioffe, C. Szegedy. Batch Normalization: Accelerating Deep Network Training by Reducing
    Internal Covariate Shift. ICML 2015, arXiv:1502.03167v3.
    S. Santurkar, D. Tsipras, A. Ilyas, A. Madry. How Does Batch Normalization Help
    Optimization? NeurIPS 2018, arXiv:1805.11604v3.
"""

from bnlab import functional
from bnlab.convert import ChannelAffine, fold
from bnlab.layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.stats import population_statistics, recalibrate

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "ChannelAffine",
    "fold",
    "functional",
    "population_statistics",
    "recalibrate",
]
