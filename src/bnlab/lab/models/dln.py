"""The 25-layer deep linear network (DLN) of Santurkar et al. (2018, App. A.1) and its data.

The task: minimize ‖W_25 ⋯ W_1 x − A x‖² over 1000 Gaussian samples, A a 10×10 Gaussian
matrix, every W_i 10×10, with full-batch gradient descent. The paper does not say where BN sits
in the DLN; here ``norm_layer`` follows each linear layer (the usual "after the linear map"
placement), except the last one unless ``norm_last=True``: the prediction itself is not
normalized. Holds no training code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DLNData", "DeepLinearNetwork", "dln_loss", "make_dln_data"]

NormFactory = Callable[[int], nn.Module]


class DeepLinearNetwork(nn.Module):
    """W_depth ⋯ W_1 x, square bias-free linear layers, optionally normalized after each.

    Args:
        depth: number of linear layers k (25 in the paper).
        width: their size (10 in the paper).
        norm_layer: ``(num_features) -> nn.Module`` after each linear layer (None: none); it
            receives (N, width) input.
        norm_last: also normalize the output of the last layer (default False).

    ``layers()[k − 1]`` is the paper's "layer #k" (Fig. 3 plots #9 and #17).
    """

    def __init__(self, depth: int = 25, width: int = 10, *, norm_layer: NormFactory | None = None,
                 norm_last: bool = False) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"DeepLinearNetwork: depth must be an int >= 1, got {depth!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"DeepLinearNetwork: width must be an int >= 1, got {width!r}")
        blocks = []
        for i in range(depth):
            use_norm = norm_layer is not None and (norm_last or i < depth - 1)
            norm = norm_layer(width) if use_norm else nn.Identity()  # type: ignore[misc]
            blocks.append(nn.Sequential(OrderedDict(
                layer=nn.Linear(width, width, bias=False), norm=norm)))
        self.blocks = nn.Sequential(*blocks)
        self.depth, self.width = depth, width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot (Xavier) uniform weights: Var = 2/(10 + 10), so ‖W_i x‖ ≈ ‖x‖ at init."""
        for m in self.layers():
            nn.init.xavier_uniform_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)

    def layers(self) -> list[nn.Linear]:
        """The linear layers W_1 … W_depth in forward order."""
        return [b.layer for b in self.blocks]  # type: ignore[misc]

    def norms(self) -> list[nn.Module]:
        """The module after each linear layer (Identity where none)."""
        return [b.norm for b in self.blocks]  # type: ignore[misc]


@dataclass
class DLNData:
    """The synthetic regression task: targets y = A x (row-wise: y = x Aᵀ)."""

    x: Tensor  # (n, dim), i.i.d. N(0, 1)
    y: Tensor  # (n, dim)
    A: Tensor  # (dim, dim), i.i.d. N(0, 1)


def make_dln_data(n: int = 1000, dim: int = 10, *, seed: int = 0, device: Any = None,
                  dtype: torch.dtype = torch.float32) -> DLNData:
    """Draw A (dim×dim) and n samples x from standard Gaussians with a private generator.

    The same ``seed`` gives the same data on every device (drawn on the CPU, then moved).
    """
    if n < 1 or dim < 1:
        raise ValueError(f"make_dln_data: n and dim must be >= 1, got n={n!r}, dim={dim!r}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = x @ a.T  # (n, dim): row i is A x_i
    return DLNData(*(t.to(device=device, dtype=dtype) for t in (x, y, a)))


def dln_loss(pred: Tensor, target: Tensor) -> Tensor:
    """‖W x − A x‖² summed over the samples and coordinates (not averaged).

    The paper does not state the reduction; its plotted training losses (about 10²–10⁴ with
    initial values near n·dim·(dim + 1) ≈ 1.1·10⁵ for n = 1000, dim = 10) fit a sum, and its
    tiny learning rate (10⁻⁶) is consistent with the 1000× larger gradients of a sum.
    """
    return (pred - target).square().sum()
