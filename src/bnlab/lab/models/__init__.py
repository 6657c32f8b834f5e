"""Models of the lab; each takes ``norm_layer`` and ``activation`` and never hard-codes a norm.

`norm_factory` turns a name ("bn", "none", or a callable) into the ``norm_layer`` argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from bnlab.lab.models.dln import DeepLinearNetwork
from bnlab.lab.models.inception import Inception
from bnlab.lab.models.mlp import MLP
from bnlab.lab.models.vgg import VGG, vgg
from bnlab.layers import BatchNorm1d, BatchNorm2d

if TYPE_CHECKING:
    from bnlab.kernels.e2e import Net

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "VGG",
    "DeepLinearNetwork",
    "Inception",
    "NormFactory",
    "activation",
    "e2e_nets",
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


def e2e_nets() -> dict[str, Net]:
    """The lab's VGG (santurkar2018: width 0.125, batch 128, 1x32x32) and Inception (ioffe2015
    fig2: width 1, batch 32, 1x28x28) for `bnlab.kernels.e2e.run_e2e`: name -> (build(norm kind),
    batch, image). Norms after the VGG's linear layers too, as in its experiments; the fused
    kind ("bnlab_bn_relu") replaces the ReLU after each norm."""
    from bnlab.kernels.e2e import any_rank_norms  # only `bnlab bench --e2e` needs it

    def act(kind: str, relu: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        return nn.Identity if kind == "bnlab_bn_relu" else relu

    def norm(kind: str) -> NormFactory | None:
        return None if kind == "none" else any_rank_norms()[kind]

    return {
        # each with its experiments' ReLU: the VGG's nn.ReLU, the Inception's in-place one
        "lab_vgg_b128_32x32": (lambda kind: vgg(norm_layer=norm(kind),
                                                activation=act(kind, nn.ReLU)), 128, (1, 32, 32)),
        "lab_inception_b32_28x28": (lambda kind: Inception(
            norm_layer=norm(kind), activation=act(kind, ACTIVATIONS["relu"])), 32, (1, 28, 28)),
    }
