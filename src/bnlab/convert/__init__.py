"""Model surgery around BN: folding for inference, freezing, inserting/replacing norms, and
converting weights between the Keras/Flax conventions and ours."""

from bnlab.convert.conventions import (
    decay_to_momentum,
    flax_variables,
    keras_weights,
    load_flax_variables,
    load_keras_weights,
    momentum_to_decay,
)
from bnlab.convert.fold import ChannelAffine, fold, fold_pairs
from bnlab.convert.freeze import freeze, is_frozen, no_stats_update, unfreeze
from bnlab.convert.replace import replace_norm
from bnlab.convert.surgery import batchnormify

__all__ = [
    "ChannelAffine",
    "batchnormify",
    "decay_to_momentum",
    "flax_variables",
    "fold",
    "fold_pairs",
    "freeze",
    "is_frozen",
    "keras_weights",
    "load_flax_variables",
    "load_keras_weights",
    "momentum_to_decay",
    "no_stats_update",
    "replace_norm",
    "unfreeze",
]
