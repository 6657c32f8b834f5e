"""Fold BN into the preceding conv/linear layer for inference (Ioffe & Szegedy 2015, Alg. 2, l. 11).

In eval mode BN is the per-channel affine map
    y = γ/√(Var[x]+ε) · x + (β − γ·E[x]/√(Var[x]+ε)),
so after z = Wu + b it merges into the layer: W' = s·W, b' = s·b + t (s, t per output channel).
Pairs are found with torch.fx where the model traces, else inside `nn.Sequential` containers.
The result keeps the model's own classes: folded BNs become `nn.Identity`, the others a
`ChannelAffine` (a fused `BatchNormReLU` keeps its ReLU: `nn.ReLU`, or affine + ReLU).
Arithmetic is in float64, then cast to the layer's dtype.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from bnlab._checks import FxLeaf, check_materialized
from bnlab.convert import _pairs
from bnlab.layers import BatchNormReLU
from bnlab.stats import is_batchnorm
from bnlab.variants.frozen import FrozenBatchNorm

__all__ = ["ChannelAffine", "fold", "fold_pairs"]


def _is_norm(m: nn.Module) -> bool:
    """A module whose eval transform is BN's: bnlab/torch BN (and subclasses) or FrozenBatchNorm."""
    return is_batchnorm(m) or isinstance(m, FrozenBatchNorm)


class ChannelAffine(FxLeaf, nn.Module):
    """y = scale·x + shift per channel (dimension 1): an eval-mode BN with nothing to fold into."""

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        # A list, not a starred tuple, so that TorchScript compiles it (a folded model is the
        # scriptable form of a bnlab model: `bnlab._checks.no_torchscript`).
        shape = [1] * x.dim()
        shape[1] = -1  # (C,) -> (1, C, 1, ...)
        return x * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


def _affine_of(bn: nn.Module, name: str) -> tuple[Tensor, Tensor]:
    """(s, t) in float64 with BN_eval(x) = s·x + t."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"fold: layer {name!r} has no running statistics "
                         "(track_running_stats=False), so it has no inference transform; "
                         "recalibrate it (bnlab.stats.recalibrate) with running stats enabled")
    var = bn.running_var.detach().to(torch.float64)
    s = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().to(torch.float64)
    t = -bn.running_mean.detach().to(torch.float64) * s
    if bn.bias is not None:
        t = t + bn.bias.detach().to(torch.float64)
    return s, t


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph, modules, calls = _pairs.trace(model, _is_norm)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(modules[node.target]):
            continue
        prev = node.args[0] if node.args else None
        if (isinstance(prev, fx.Node) and prev.op == "call_module"
                and _pairs.is_layer(modules[prev.target])
                and len(prev.users) == 1 and calls[prev.target] == 1 and calls[node.target] == 1):
            pairs.append((prev.target, node.target))
    return pairs


def fold_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) names such that bn's only input is layer's output and layer feeds only bn."""
    try:
        return _pairs_fx(model)
    except Exception:  # not traceable (data-dependent control flow, ...): Sequential only
        return _pairs.sequential_pairs(model, _pairs.is_layer, _is_norm)


@torch.no_grad()
def _fold_into(layer: nn.Module, s: Tensor, t: Tensor) -> None:
    w = layer.weight.detach().to(torch.float64)
    transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
    # Output channels: dim 0 of a Linear/Conv weight (out, in/g, k...), dim 1 of a transposed
    # conv's (in, out/g, k...); with groups > 1 the latter repeats per group.
    if transposed:
        g = layer.groups
        w = w.view(g, w.shape[0] // g, *w.shape[1:])  # (in, out/g, k...) -> (g, in/g, out/g, k...)
        s_g = s.view(g, 1, -1, *([1] * (w.dim() - 3)))  # (out,) -> (g, 1, out/g, 1...)
        w = (w * s_g).view(layer.weight.shape)
    else:
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(s)
    layer.weight.copy_(w.to(layer.weight.dtype))
    new_bias = (s * b + t).to(layer.weight.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return an inference copy of ``model`` with no BN module left (Alg. 2, step 11).

    Each BN that directly follows a Linear/Conv{1,2,3}d/ConvTranspose{1,2,3}d (whose output feeds
    nothing else) is folded into that layer's weight and bias; any other BN becomes a
    `ChannelAffine`. The returned model is in eval mode and matches ``model.eval()``'s outputs
    (to float32 rounding: the fold is computed in float64).

    ``model`` may be a BN itself; then the `ChannelAffine` (followed by a ReLU for a
    `BatchNormReLU`) is returned.

    Raises:
        ValueError: a BN without running statistics (nothing defines its inference transform).
    """
    check_materialized(model, "fold")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    bns = {name: m for name, m in model.named_modules() if _is_norm(m)}
    affines = {name: _affine_of(bn, name) for name, bn in bns.items()}
    folded = set()
    for layer_name, bn_name in fold_pairs(model):
        _fold_into(model.get_submodule(layer_name), *affines[bn_name])
        # A fused BN+ReLU leaves its ReLU behind.
        _pairs.set_module(model, bn_name,
                          nn.ReLU() if isinstance(bns[bn_name], BatchNormReLU) else nn.Identity())
        folded.add(bn_name)
    for name, bn in bns.items():
        if name not in folded:
            s, t = affines[name]
            dtype = bn.running_mean.dtype
            affine = ChannelAffine(s.to(dtype), t.to(dtype))
            new = nn.Sequential(affine, nn.ReLU()) if isinstance(bn, BatchNormReLU) else affine
            if not name:  # ``model`` is itself a BN: its replacement is the whole answer
                return new.eval()
            _pairs.set_module(model, name, new)
    return model
