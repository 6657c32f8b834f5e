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

import warnings
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from bnlab._checks import FxLeaf, check_materialized
from bnlab.convert import _pairs, freeze
from bnlab.layers import BatchNormReLU
from bnlab.variants.noisy import eval_factor

__all__ = ["ChannelAffine", "fold", "fold_pairs"]


class ChannelAffine(FxLeaf, nn.Module):
    """y = scale·x + shift per channel (dimension 1): an eval-mode BN with nothing to fold into."""

    if TYPE_CHECKING:
        # Buffers, declared for type checkers (nn.Module types them Tensor | Module); not at
        # run time, where TorchScript would read these (string) annotations and fail on them.
        scale: Tensor
        shift: Tensor

    def __init__(self, scale: Tensor, shift: Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.scale.numel():  # BN would refuse it too
            raise ValueError("ChannelAffine: expected input (N, " + str(self.scale.numel())
                             + ", *), got shape " + str(list(x.shape)))
        # A list, not a starred tuple, so that TorchScript compiles it (a folded model is the
        # scriptable form of a bnlab model: `bnlab._checks.no_torchscript`).
        shape = [1] * x.dim()
        shape[1] = -1  # (C,) -> (1, C, 1, ...)
        # Half and bfloat16 input in float32, as BN computes them: scale·x + shift cancels
        # where |E[x]| ≫ √Var[x], and in bfloat16 that cost 15x BN's output error (mean 20,
        # std 0.5). Returned in the input's dtype, as BN's output: a bfloat16 model's float32
        # BN (a common mixed-precision recipe) must not hand float32 to the next layer.
        xs = x
        if x.dtype == torch.float16 or x.dtype == torch.bfloat16:
            xs = x.float()
        return (xs * self.scale.view(shape) + self.shift.view(shape)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


def _affine_of(bn: _pairs.Norm, name: str) -> tuple[Tensor, Tensor]:
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
    k = eval_factor(bn)  # NoisyBatchNorm's eval mode scales by its noise's expectation E[s]
    return s * k, t * k


def _foldable(m: nn.Module) -> bool:
    """A norm whose eval transform is BN's affine map (not a class with a forward of its own)."""
    return _pairs.is_norm(m) and not _pairs.custom_forward(m)


def _pairs_fx(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs, the attributes the forward reads outside module calls)."""
    graph, modules, calls = _pairs.trace(model, _pairs.is_norm)
    # Parameters read outside their module's call (a tied decoder's F.linear(h, enc.weight.t()))
    # would read the folded weight: their layer is not folded.
    read = [str(node.target) for node in graph.nodes if node.op == "get_attr"]
    pairs: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module" or not _foldable(modules[node.target]):
            continue
        prev = node.args[0] if node.args else None
        # fx types a node's target str | callable; a call_module node's is the module's name.
        if (isinstance(prev, fx.Node) and prev.op == "call_module" and isinstance(prev.target, str)
                and _pairs.is_layer(modules[prev.target])
                and len(prev.users) == 1 and calls[prev.target] == 1 and calls[node.target] == 1
                and not any(t.startswith(prev.target + ".") for t in read)):
            pairs.append((prev.target, node.target))
    return pairs, read


def _find_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], list[str], Exception | None]:
    """fold_pairs, the attributes read outside module calls (none known without fx), and the
    error that made it fall back to `nn.Sequential` neighbours."""
    try:
        return (*_pairs_fx(model), None)
    except Exception as e:  # not traceable (data-dependent control flow, ...): Sequential only
        # (a subclass with a forward of its own, which fx would trace through, is not a layer
        # the BN can fold into)
        return _pairs.sequential_pairs(model, lambda m: _pairs.is_layer(m)
                                       and not _pairs.own_forward(m), _foldable), [], e


def fold_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) names such that bn's only input is layer's output and layer feeds only bn.

    Found with torch.fx where the model traces; else adjacent children of `nn.Sequential`
    containers, which assumes that each such layer's output feeds only the BN after it."""
    return _find_pairs(model)[0]


# Hooks that only recompute the weight, which the fold can bake in first (torch's deprecated
# weight_norm and spectral_norm; the parametrizations API is handled by `parametrize`).
_WEIGHT_HOOKS = {"WeightNorm": nn.utils.remove_weight_norm,
                 "SpectralNorm": nn.utils.remove_spectral_norm}


def _plain(layer: nn.Module) -> bool:
    """Make ``layer``'s weight and bias plain parameters holding the values its forward uses
    now (eval mode): parametrizations (weight_norm, spectral_norm, ...) and the deprecated
    weight hooks are removed, their current result left in place. False, with ``layer``
    unchanged, if another hook could change what the layer computes: then it is not folded."""
    hooks = [*layer._forward_pre_hooks.values(), *layer._forward_hooks.values()]
    if any(type(h).__name__ not in _WEIGHT_HOOKS for h in hooks):
        return False
    for h in list(layer._forward_pre_hooks.values()):
        # A WeightNorm / SpectralNorm (checked above), whose `name` is the weight it computes;
        # torch types the hooks as plain callables.
        _WEIGHT_HOOKS[type(h).__name__](layer, cast(Any, h).name)
    if parametrize.is_parametrized(layer):
        # The class torch made for the parametrized layer is shared with every deep copy of
        # it (the caller's model, for fold(inplace=False)), and removing a parametrization
        # deletes its property from that class: give this layer a class of its own first.
        cls = type(layer)
        layer.__class__ = type(cls.__name__, cls.__bases__, {
            k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
        parametrizations = layer.parametrizations
        assert isinstance(parametrizations, nn.ModuleDict)  # as is_parametrized found it
        for name in list(parametrizations.keys()):
            parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
    return True


def _channels_match(layer: _pairs.Layer, bn: _pairs.Norm) -> bool:
    """False where the BN's channels cannot be the layer's outputs: a Linear maps the last
    dimension, which is BN's channel dimension only for (N, F) input, and a BatchNorm2d/3d
    takes no such input."""
    if not isinstance(layer, nn.Linear):
        return True
    ranks = getattr(bn, "_ranks", None)  # bnlab's layers declare the input ranks they take
    if ranks is not None:
        return 2 in ranks
    return not isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d))


def _kept(bns: dict[str, _pairs.Norm], read: list[str]) -> dict[str, str]:
    """Norms the fold leaves in place (in eval mode), with why: a class with a forward of its
    own (BN + activation) computes more than BN's affine map, and a norm whose attributes the
    model reads outside its call (``self.bn.weight`` in a forward) must keep them."""
    kept = {}
    for name, m in bns.items():
        if _pairs.custom_forward(m):
            kept[name] = f"{type(m).__name__}.forward is its own"
        elif name and any(t.startswith(name + ".") for t in read):
            kept[name] = "the model reads its attributes"
    return kept


@torch.no_grad()
def _fold_into(layer: _pairs.Layer, s: Tensor, t: Tensor) -> None:
    """W' = s·W, b' = s·b + t, as new parameters: the old ones may be shared with other modules
    (tied weights), which must keep computing with them."""
    w = layer.weight.detach().to(torch.float64)
    # Output channels: dim 0 of a Linear/Conv weight (out, in/g, k...), dim 1 of a transposed
    # conv's (in, out/g, k...); with groups > 1 the latter repeats per group.
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        w = w.view(g, w.shape[0] // g, *w.shape[1:])  # (in, out/g, k...) -> (g, in/g, out/g, k...)
        s_g = s.view(g, 1, -1, *([1] * (w.dim() - 3)))  # (out,) -> (g, 1, out/g, 1...)
        w = (w * s_g).view(layer.weight.shape)
    else:
        w = w * s.view(-1, *([1] * (w.dim() - 1)))
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(s)
    dtype, grad = layer.weight.dtype, layer.weight.requires_grad
    layer.weight = nn.Parameter(w.to(dtype), requires_grad=grad)
    layer.bias = nn.Parameter((s * b + t).to(dtype), requires_grad=grad)


def fold(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return an inference copy of ``model`` with no BN module left (Alg. 2, step 11).

    Each BN that directly follows a Linear/Conv{1,2,3}d/ConvTranspose{1,2,3}d (whose output feeds
    nothing else) is folded into that layer's weight and bias; any other BN becomes a
    `ChannelAffine`. The returned model is in eval mode and matches ``model.eval()``'s outputs
    (to float32 rounding: the fold is computed in float64).

    ``model`` may be a BN itself; then the `ChannelAffine` (followed by a ReLU for a
    `BatchNormReLU`) is returned.

    A layer under a weight parametrization (``torch.nn.utils.parametrizations.weight_norm``,
    ``spectral_norm``, or their deprecated hook forms) is folded with the weight it computes
    now, the parametrization removed; a layer with any other forward hook is not folded (its
    BN becomes a `ChannelAffine`), nor is a layer whose output size is not the BN's C, nor a
    BN with forward hooks (its `ChannelAffine` runs them), nor a layer whose parameters the
    model also reads outside its call (a tied decoder). Two kinds of BN are left in place, in
    eval mode, and named in a warning: a subclass with a ``forward`` of its own (e.g. BN then
    an activation), and one whose attributes the model reads (``self.bn.weight`` in a forward,
    as channel-attention and pruning code do; seen where torch.fx traces the model). A
    Linear followed by a BN is folded on the assumption that it sees (N, F) input, as
    `batchnormify` builds it. Where torch.fx cannot trace the model, pairs are adjacent
    children of `nn.Sequential` containers, and a warning names the pairs folded on the
    assumption that each such layer's output feeds nothing else (a module registered twice,
    or a layer subclass with its own forward, is left out). A module registered under several
    names is replaced under all of them.

    Raises:
        ValueError: a BN without running statistics (nothing defines its inference transform).
    """
    check_materialized(model, "fold")
    if not inplace:
        try:
            model = _pairs.copy_model(model)
        except RuntimeError as e:  # a computed weight (deprecated weight hooks) after a forward
            raise RuntimeError(f"fold: the model cannot be deep-copied ({e}); fold it with "
                               "inplace=True, or use torch.nn.utils.parametrizations.weight_norm"
                               " / spectral_norm instead of the deprecated hook forms") from e
    model.eval()
    bns = {name: m for name, m in model.named_modules() if _pairs.is_norm(m)}
    pairs, read, untraced = _find_pairs(model)
    kept = _kept(bns, read)
    if kept:
        warnings.warn("fold: left in place (eval mode), not folded: " + ", ".join(
            f"{n or '<root>'} ({why})" for n, why in kept.items()), UserWarning, stacklevel=2)
    bns = {name: m for name, m in bns.items() if name not in kept}
    affines = {name: _affine_of(bn, name) for name, bn in bns.items()}
    folded = set()
    pairs = [(a, b) for a, b in pairs if b in bns
             and _pairs.out_features(_pairs.layer_at(model, a)) == bns[b].num_features
             and _channels_match(_pairs.layer_at(model, a), bns[b])
             and not freeze.user_hooks(bns[b]) and _plain(model.get_submodule(a))]
    if untraced is not None and pairs:
        warnings.warn(f"fold: torch.fx cannot trace the model ({type(untraced).__name__}: "
                      f"{str(untraced).splitlines()[0] if str(untraced) else ''}), so the "
                      "pairs folded are adjacent children of nn.Sequential containers, "
                      "assuming that each layer's output feeds only its BN: "
                      + ", ".join(f"{a} -> {b}" for a, b in pairs), UserWarning, stacklevel=2)
    for layer_name, bn_name in pairs:
        _fold_into(_pairs.layer_at(model, layer_name), *affines[bn_name])
        # A fused BN+ReLU leaves its ReLU behind.
        _pairs.set_module(model, bn_name,
                          nn.ReLU() if isinstance(bns[bn_name], BatchNormReLU) else nn.Identity())
        folded.add(bn_name)
    for name, bn in bns.items():
        if name not in folded:
            s, t = affines[name]
            assert bn.running_mean is not None  # _affine_of raised for a layer without
            # float32 at least: scale and shift rounded to half precision cancel (above)
            dtype = torch.promote_types(bn.running_mean.dtype, torch.float32)
            affine = ChannelAffine(s.to(dtype), t.to(dtype))
            new = nn.Sequential(affine, nn.ReLU()) if isinstance(bn, BatchNormReLU) else affine
            freeze.carry_hooks(bn, new)
            if not name:  # ``model`` is itself a BN: its replacement is the whole answer
                return new.eval()
            _pairs.set_module(model, name, new)
    return model
