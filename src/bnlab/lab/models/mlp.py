"""The MNIST network of Ioffe & Szegedy 2015, Sec. 4.1: 784-100-100-100-10, sigmoid, softmax."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnlab._checks import check_sizes

__all__ = ["MLP"]


class MLP(nn.Module):
    """Fully connected network y = W_out g(N(W_3 g(N(W_2 g(N(W_1 x)))))) (Sec. 4.1).

    With a ``norm_layer`` each hidden layer computes g(BN(Wu)) and drops its bias, which "will be
    canceled by the subsequent mean subtraction" (Sec. 3.2); without one it computes g(Wu + b).

    Args:
        in_features: input size (784 for flattened 28×28 images).
        hidden: widths of the hidden layers.
        num_classes: outputs of the last (linear, un-normalized) layer.
        norm_layer: factory ``(num_features) -> module`` placed before each nonlinearity, or None.
        activation: factory of the nonlinearity g (the paper: sigmoid).
        init_std: weights ~ N(0, init_std²), "small random Gaussian values"; biases 0.

    Shape:
        x: (N, *) with prod(*) = in_features; returns (N, num_classes) logits.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (100, 100, 100),
        num_classes: int = 10,
        *,
        norm_layer: Callable[[int], nn.Module] | None = None,
        activation: Callable[[], nn.Module] = nn.Sigmoid,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        check_sizes("MLP", in_features=in_features, num_classes=num_classes,
                    **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        layers: list[nn.Module] = []
        self._act_index: list[int] = []  # positions of the nonlinearities in `hidden`
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h, bias=norm_layer is None))
            if norm_layer is not None:
                layers.append(norm_layer(h))
            self._act_index.append(len(layers))
            layers.append(activation())
            width = h
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(torch.flatten(x, 1)))  # (N, 1, 28, 28) -> (N, 784)

    def nonlinearities(self) -> list[nn.Module]:
        """The hidden layers' nonlinearity modules, in order (a forward pre-hook sees g's input)."""
        return [self.hidden[i] for i in self._act_index]
