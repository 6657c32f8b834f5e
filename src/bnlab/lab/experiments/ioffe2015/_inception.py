"""The BN-Inception model recipes of Ioffe & Szegedy 2015, Sec. 4.2.2, shared by fig2, alg2 and
the ensemble: each named model is the base Inception plus a set of changes (Sec. 4.2.1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bnlab.lab.config import DataConfig, OptimConfig
from bnlab.lab.models import Inception, activation, norm_factory


@dataclass(frozen=True)
class Recipe:
    """How one model of Sec. 4.2.2 differs from the base Inception."""

    norm: str = "none"  # "bn": BN before every nonlinearity, "in a convolutional way"
    act: str = "relu"
    lr_mult: float = 1.0  # × the base (Inception) learning rate
    modified: bool = False  # the Sec. 4.2.1 changes: no dropout, L2 ÷ 5, decay 6× faster,
    #                         no LRN, thorough shuffling


RECIPES = {
    "inception": Recipe(),
    "bn_baseline": Recipe(norm="bn"),
    "bn_x5": Recipe(norm="bn", lr_mult=5, modified=True),
    "bn_x30": Recipe(norm="bn", lr_mult=30, modified=True),
    "bn_x5_sigmoid": Recipe(norm="bn", act="sigmoid", lr_mult=5, modified=True),
    "inception_x5": Recipe(lr_mult=5),  # control: "reach[es] machine infinity"
    "inception_sigmoid": Recipe(act="sigmoid"),  # control: "accuracy equivalent to chance"
}


def settings(recipe: Recipe, optim: OptimConfig, data: DataConfig, *, dropout: float,
             lr: float | None = None) -> tuple[OptimConfig, DataConfig, float, bool]:
    """(optim, data, dropout, lrn) of a recipe applied to the base Inception's settings."""
    optim = dataclasses.replace(optim, lr=(lr or optim.lr) * recipe.lr_mult)
    if not recipe.modified:
        return optim, dataclasses.replace(data, shuffle="shards"), dropout, True
    optim = dataclasses.replace(optim, weight_decay=optim.weight_decay / 5,
                                decay_steps=max(1, round(optim.decay_steps / 6)))
    return optim, dataclasses.replace(data, shuffle="thorough"), 0.0, False


def build(recipe: Recipe, *, num_classes: int, in_channels: int, width: float, dropout: float,
          lrn: bool) -> Inception:
    return Inception(in_channels, num_classes, norm_layer=norm_factory(recipe.norm, conv=True),
                     activation=activation(recipe.act), width=width, dropout=dropout, lrn=lrn)
