"""A small Inception network for 28×28 input, in the spirit of BN-Inception (Ioffe & Szegedy 2015,
Sec. 4.2 and Appendix Fig. 5): 1×1, 3×3, double-3×3 and pool-projection branches, stride-2
modules that halve the grid, global average pooling, optional LRN and dropout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bnlab._checks import check_sizes, check_width

__all__ = ["Inception"]

Factory = Callable[[int], nn.Module] | None


class ConvUnit(nn.Sequential):
    """conv → norm → g; the conv has no bias when a norm follows (Sec. 3.2: β subsumes it)."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, norm_layer: Factory,
                 activation: Callable[[], nn.Module]) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2,
                                             bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(cout))
        layers.append(activation())
        super().__init__(*layers)


class Mixed(nn.Module):
    """An Inception module: concat of 1×1 | 1×1→3×3 | 1×1→3×3→3×3 | pool→1×1 branches.

    With ``stride=2`` (the paper's modules 3c and 4e) the 1×1 and pool-projection branches are
    dropped, the 3×3 branches stride by 2 and a stride-2 max pool passes the input through.
    """

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, cdr: int, cd: int, cp: int, *,
                 stride: int = 1, pool: str = "avg", **unit: Any) -> None:
        super().__init__()
        self.stride = stride
        self.b1 = ConvUnit(cin, c1, 1, **unit) if stride == 1 else None
        self.b3 = nn.Sequential(ConvUnit(cin, c3r, 1, **unit),
                                ConvUnit(c3r, c3, 3, stride=stride, **unit))
        self.bd = nn.Sequential(ConvUnit(cin, cdr, 1, **unit), ConvUnit(cdr, cd, 3, **unit),
                                ConvUnit(cd, cd, 3, stride=stride, **unit))
        pool_cls = nn.AvgPool2d if pool == "avg" else nn.MaxPool2d
        if stride == 1:
            self.bp = nn.Sequential(pool_cls(3, stride=1, padding=1), ConvUnit(cin, cp, 1, **unit))
        else:
            self.bp = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1))
        self.out_channels = (c1 if stride == 1 else 0) + c3 + cd + (cp if stride == 1 else cin)

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.b3(x), self.bd(x), self.bp(x)]
        if self.b1 is not None:
            branches.insert(0, self.b1(x))
        return torch.cat(branches, dim=1)  # (N, Σ c_branch, H', W')


class Inception(nn.Module):
    """BN-Inception in small: a stride-2 stem conv (28×28 → 14×14), a module at 14×14, a
    stride-2 module, one at 7×7, a stride-2 module, one at 4×4, global average pooling,
    dropout, linear classifier (no other fully connected layer, as in the paper).

    Channel widths are the paper's divided by about 8 times ``width`` (28×28 input instead of
    224×224); sized so a batch-32 training step takes tens of milliseconds on 2 CPU cores.

    Args:
        in_channels, num_classes: input channels and outputs.
        norm_layer: factory ``(C) -> module`` placed before every nonlinearity, or None.
        activation: factory of the nonlinearity (ReLU in the paper; sigmoid for BN-x5-Sigmoid).
        width: multiplier of every channel count.
        dropout: drop probability before the classifier (the paper's Inception: 0.4).
        lrn: local response normalization after the stem (removed in BN-x5, Sec. 4.2.1).

    Shape:
        x: (N, in_channels, 28, 28); returns (N, num_classes) logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, norm_layer: Factory = None,
                 activation: Callable[[], nn.Module] = lambda: nn.ReLU(inplace=True),
                 width: float = 1.0, dropout: float = 0.0, lrn: bool = False) -> None:
        super().__init__()
        check_width("Inception", width)
        check_sizes("Inception", in_channels=in_channels, num_classes=num_classes)

        def c(n: int) -> int:
            return max(1, round(n * width))

        unit: dict[str, Any] = {"norm_layer": norm_layer, "activation": activation}
        # 28×28 -> 14×14
        stem: list[nn.Module] = [ConvUnit(in_channels, c(32), 3, stride=2, **unit)]
        if lrn:
            stem.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
        self.stem = nn.Sequential(*stem)
        mods: list[Mixed] = []
        cin = c(32)
        # (c1, c3r, c3, cdr, cd, cp, stride, pool): modules in the places of the paper's 3a, 3c,
        # 4a, 4e and 5a (Fig. 5) with about 1/8 of their channels, not exactly: 3c and 4e are
        # 1/8 of the paper's; 3a's 3×3 (12, not 8) and pool projection (8, not 4), 4a's 3×3
        # (16, not 12) are wider, and the last module max-pools (5a avg-pools; 5b max-pools).
        # Every result the lab reports is this network's. (3b, 4b–4d are left out to keep a
        # step in tens of ms.)
        spec = [(8, 8, 12, 8, 12, 8, 1, "avg"), (0, 16, 20, 8, 12, 0, 2, "max"),
                (28, 8, 16, 12, 16, 16, 1, "avg"), (0, 16, 24, 24, 32, 0, 2, "max"),
                (44, 24, 40, 20, 28, 16, 1, "max")]
        for c1, c3r, c3, cdr, cd, cp, stride, pool in spec:
            m = Mixed(cin, c(c1), c(c3r), c(c3), c(cdr), c(cd), c(cp), stride=stride, pool=pool,
                      **unit)
            mods.append(m)
            cin = m.out_channels
        self.mixed = nn.Sequential(*mods)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.mixed(self.stem(x))
        x = torch.flatten(self.pool(x), 1)  # (N, C, 4, 4) -> (N, C)
        return self.fc(self.dropout(x))
