"""What `fold`, `batchnormify` and `replace_norm` share: finding a Linear/Conv layer and the
module after it, what counts as a norm, a layer's output size, replacing a module by name.

`fold` and `batchnormify` look for pairs with torch.fx where the model traces (stopping at the
given leaf modules, e.g. BN, whose input checks are Python control flow) and fall back to
adjacent children of `nn.Sequential` containers; all three replace modules by dotted name.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Callable
from typing import TypeGuard

from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from bnlab.layers import BatchNorm
from bnlab.stats import is_batchnorm
from bnlab.variants.frozen import FrozenBatchNorm

# The layers whose output BN may follow (Sec. 3.2) and into which it folds (Alg. 2, l. 11).
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# For type checkers: the classes `is_layer` and `is_norm` accept, which declare the attributes
# read of them (nn.Module types any other attribute Tensor | Module).
Layer = nn.Linear | _ConvNd
Norm = BatchNorm | _BatchNorm | FrozenBatchNorm

ModulePredicate = Callable[[nn.Module], bool]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares its process groups (a SyncBatchNorm's), which are
    handles to the processes' communicator, not state (and cannot be deep-copied)."""
    groups = [getattr(m, "process_group", None) for m in model.modules()]
    return copy.deepcopy(model, {id(g): g for g in groups if g is not None})


def is_layer(m: nn.Module) -> TypeGuard[Layer]:
    return isinstance(m, LAYERS)


def layer_at(model: nn.Module, name: str) -> Layer:
    """The `LAYERS` layer at dotted ``name``, a name that a pair search returned."""
    layer = model.get_submodule(name)
    assert is_layer(layer)  # the searches return the names of such layers only
    return layer


def out_features(layer: Layer) -> int:
    """The output size of a `LAYERS` layer (features, or channels of a convolution)."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def is_norm(m: nn.Module) -> TypeGuard[Norm]:
    """A module whose eval transform is BN's: bnlab/torch BN (and subclasses) or FrozenBatchNorm."""
    return is_batchnorm(m) or isinstance(m, FrozenBatchNorm)


def custom_forward(m: nn.Module) -> bool:
    """Whether a norm's class runs a ``forward`` of its own, neither bnlab's nor torch's (e.g.
    timm's BatchNormAct2d: BN, then an activation): its eval transform is then not BN's, so
    it is not folded, and not replaced unless asked for by name."""
    where = getattr(getattr(type(m), "forward", None), "__module__", None) or ""
    return not where.startswith(("torch.", "bnlab."))


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf: ModulePredicate) -> None:
        super().__init__()
        self._leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._leaf(m) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module,
          leaf: ModulePredicate) -> tuple[fx.Graph, dict[str, nn.Module], Counter[str]]:
    """(graph, modules by name, calls per module name) of ``model`` traced with torch.fx, with
    the modules ``leaf`` accepts (and torch.nn's own) kept as single calls. A module called more
    than once (shared weights) is no pair's member. Raises whatever tracing raises."""
    graph = _LeafTracer(leaf).trace(model)
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    return graph, dict(model.named_modules()), calls


def own_forward(m: nn.Module) -> bool:
    """Whether ``m``'s class computes something else than the `LAYERS` class it derives from
    (its own ``forward`` or ``_conv_forward``, as a weight-standardized conv): torch.fx traces
    through such a module, so only the `nn.Sequential` fallback must be told."""
    base = next(cls for cls in LAYERS if isinstance(m, cls))
    return any(getattr(type(m), f, None) is not getattr(base, f, None)
               for f in ("forward", "_conv_forward"))


def sequential_pairs(model: nn.Module, first: ModulePredicate,
                     second: ModulePredicate) -> list[tuple[str, str]]:
    """Dotted names (a, b) of adjacent children of an `nn.Sequential` anywhere in ``model`` with
    ``first(a)`` and ``second(b)``: the fallback for models torch.fx cannot trace. A module
    registered more than once (in two containers, or under an alias) may run more than once,
    so it is no pair's member (as a module called twice in the traced graph)."""
    names = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for prefix, seq in model.named_modules():
        # A subclass with a forward of its own (parallel branches, a skip) is no chain.
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        for (a, ma), (b, mb) in itertools.pairwise(seq._modules.items()):
            if first(ma) and second(mb) and names[id(ma)] == names[id(mb)] == 1:
                pairs.append((f"{prefix}.{a}" if prefix else a, f"{prefix}.{b}" if prefix else b))
    return pairs


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``, under every name it is registered
    (a module kept under two names, e.g. a handle on a BN next to the container that runs
    it, would otherwise go on running under the other)."""
    old = model.get_submodule(name)
    places = [(parent, leaf) for parent in model.modules()
              for leaf, child in parent._modules.items() if child is old]
    for parent, leaf in places:
        setattr(parent, leaf, new)
