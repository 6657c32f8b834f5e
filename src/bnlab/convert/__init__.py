"""Model surgery around BN: folding for inference (more in later modules of this package)."""

from bnlab.convert.fold import ChannelAffine, fold, fold_pairs

__all__ = ["ChannelAffine", "fold", "fold_pairs"]
