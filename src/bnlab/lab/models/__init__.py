"""Models of the lab; each takes ``norm_layer`` and ``activation`` and never hard-codes a norm.

`norm_factory` turns a name ("bn", "none", or a callable) into the ``norm_layer`` argument.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bnlab.lab.models.dln import DeepLinearNetwork
from bnlab.lab.models.inception import Inception
from bnlab.lab.models.mlp import MLP
from bnlab.lab.models.vgg import VGG
from bnlab.layers import BatchNorm1d, BatchNorm2d

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "VGG",
    "DeepLinearNetwork",
    "Inception",
    "NormFactory",
    "activation",
    "norm_factory",
]

NormFactory = Callable[[int], nn.Module]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": lambda: nn.ReLU(inplace=True),
    "tanh": nn.Tanh,
}


def activation(name: str) -> Callable[[], nn.Module]:
    """The activation factory called ``name``; unknown names list the valid ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def norm_factory(name: str, *, conv: bool) -> NormFactory | None:
    """``norm_layer`` for a norm name: "bn" gives bnlab's BatchNorm2d (conv) or 1d, "none" None.

    Later experiments (noisy BN, ℓp norms) add their names here rather than copying models.
    """
    if name == "bn":
        return BatchNorm2d if conv else BatchNorm1d
    if name == "none":
        return None
    raise ValueError(f"norm must be one of ['bn', 'none'], got {name!r}")
