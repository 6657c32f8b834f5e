"""VGG-style network of Santurkar et al. (2018, App. A.1), sized for 32×32 (or 28×28) images.

The paper gives no layer configuration; its figures refer to layers #2 … #13, so bnlab uses
VGG-13's (Simonyan & Zisserman 2015, config B): 10 conv layers and 3 linear layers = 13 layers,
numbered in forward order ("layer #k" = ``model.layers()[k - 1]``). The normalization is an
argument (``norm_layer``), applied after every conv/linear layer but the last, "before the
non-linearity". Glorot-uniform initialization, as the paper states. Holds no training code.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnlab._checks import check_sizes, check_width

__all__ = ["VGG", "VGG_CONFIGS", "vgg"]

NormFactory = Callable[[int], nn.Module]

# Output channels per conv layer, "M" = 2×2 max-pool (Simonyan & Zisserman 2015, Table 1).
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
}


def _block(layer: nn.Module, width: int, norm_layer: NormFactory | None,
           activation: Callable[[], nn.Module]) -> nn.Sequential:
    """layer -> norm -> activation, with stable child names (``layer``, ``norm``, ``act``)."""
    norm = norm_layer(width) if norm_layer is not None else nn.Identity()
    return nn.Sequential(OrderedDict(layer=layer, norm=norm, act=activation()))


class VGG(nn.Module):
    """VGG-style classifier: conv blocks with max-pooling, then a 3-layer linear classifier.

    Args:
        num_classes: outputs of the last linear layer.
        in_channels: 1 for (Fashion-)MNIST, 3 for CIFAR-like input.
        image_size: input side (32 for padded Fashion-MNIST / CIFAR, or 28), or (height,
            width) for non-square images. Pools use ``ceil_mode`` so 28 → 14 → 7 → 4 → 2 → 1
            works as well as 32 → … → 1.
        config: a key of `VGG_CONFIGS` or a custom tuple of channels and "M".
        width: multiplier of every conv width and of the hidden width (rounded, at least 1).
        hidden: hidden width of the classifier (default 512·width).
        norm_layer: ``(num_features) -> nn.Module`` applied after each conv/linear layer but
            the last (None: no normalization). It receives (N, C, H, W) after convs and (N, C)
            in the classifier: bnlab's `BatchNorm`, `NoisyBatchNorm`, `LpNorm` and
            `ActivationNoise` accept both.
        classifier_norm: also normalize the two hidden linear layers.
        activation: a factory of the nonlinearity (default ``nn.ReLU``).
        bias: give conv/linear layers a bias (kept by default, as torchvision's ``vgg*_bn``, so
            that networks with and without a norm differ only by the norm).
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        in_channels: int = 1,
        image_size: int | tuple[int, int] = 32,
        config: str | Sequence[int | str] = "vgg13",
        width: float = 1.0,
        hidden: int | None = None,
        norm_layer: NormFactory | None = None,
        classifier_norm: bool = True,
        activation: Callable[[], nn.Module] = nn.ReLU,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(config, str) and config not in VGG_CONFIGS:
            raise ValueError(f"VGG: config must be one of {', '.join(VGG_CONFIGS)} or a sequence "
                             f"of channel counts and 'M', got {config!r}")
        cfg = VGG_CONFIGS[config] if isinstance(config, str) else tuple(config)
        check_width("VGG", width)
        height, width_px = (image_size if isinstance(image_size, tuple)
                            else (image_size, image_size))
        check_sizes("VGG", num_classes=num_classes, in_channels=in_channels,
                    image_height=height, image_width=width_px,
                    **({} if hidden is None else {"hidden": hidden}))
        features: list[nn.Module] = []
        c, size = in_channels, (height, width_px)
        for v in cfg:
            if v == "M":
                features.append(nn.MaxPool2d(2, ceil_mode=True))
                size = (math.ceil(size[0] / 2), math.ceil(size[1] / 2))
                continue
            out = max(1, round(int(v) * width))
            conv = nn.Conv2d(c, out, 3, padding=1, bias=bias)
            features.append(_block(conv, out, norm_layer, activation))
            c = out
        self.features = nn.Sequential(*features)
        h = hidden if hidden is not None else max(1, round(512 * width))
        cls_norm = norm_layer if classifier_norm else None
        self.classifier = nn.Sequential(
            _block(nn.Linear(c * size[0] * size[1], h, bias=bias), h, cls_norm, activation),
            _block(nn.Linear(h, h, bias=bias), h, cls_norm, activation),
            nn.Linear(h, num_classes),
        )
        self.image_size, self.in_channels = image_size, in_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot (Xavier) uniform weights and zero biases (Santurkar et al., App. A.1)."""
        for m in self.layers():
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))  # (N, C, s, s) -> (N, C·s·s)

    def layers(self) -> list[nn.Conv2d | nn.Linear]:
        """Conv/linear layers in forward order: the paper's "layer #k" is ``layers()[k − 1]``."""
        return [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def norms(self) -> list[nn.Module]:
        """The normalization module after each layer but the last (Identity where none)."""
        return [b.get_submodule("norm") for b in self._blocks()]

    def activations(self) -> list[nn.Module]:
        """The nonlinearity after each layer but the last; its input is the layer's
        pre-activation (the distributions of Santurkar et al. Figs. 1c, 2)."""
        return [b.get_submodule("act") for b in self._blocks()]

    def _blocks(self) -> list[nn.Sequential]:
        return [m for m in self.modules() if isinstance(m, nn.Sequential) and hasattr(m, "act")]


def vgg(num_classes: int = 10, *, norm_layer: NormFactory | None = None,
        width: float = 0.125, **kwargs: object) -> VGG:
    """The lab's VGG-13-style network at the Santurkar experiments' width (0.125: channels
    8 … 64, about 0.16M parameters, the CPU budget of this project; see the README)."""
    return VGG(num_classes, norm_layer=norm_layer, width=width, **kwargs)  # type: ignore[arg-type]
