"""Model surgery: insert BN the paper's way (`batchnormify`; swapping norms is `replace.py`).

`batchnormify` applies Ioffe & Szegedy 2015, Sec. 3.2 to a model without BN: z = g(Wu + b)
becomes z = g(BN(Wu)), BN immediately before the nonlinearity and the bias b dropped ("its
effect will be canceled by the subsequent mean subtraction"). It keeps the model's own classes
(no fx.GraphModule comes back); torch.fx only finds the pairs.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as TF

from bnlab._checks import check_materialized
from bnlab.convert import _pairs
from bnlab.convert.replace import NormFactory
from bnlab.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnlab.stats import is_batchnorm

__all__ = ["batchnormify", "nonlinearity_pairs"]


_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
                nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink)
_ACT_FUNCTIONS = {torch.relu, torch.relu_, torch.sigmoid, torch.tanh, TF.relu, TF.relu_,
                  TF.relu6, TF.leaky_relu, TF.elu, TF.selu, TF.celu, TF.gelu, TF.silu, TF.mish,
                  TF.sigmoid, TF.tanh, TF.softplus, TF.softsign, TF.hardtanh, TF.hardswish,
                  TF.hardsigmoid, TF.logsigmoid}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}


def _is_activation(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        assert isinstance(node.target, str)  # the module's name (fx types it str | callable)
        return isinstance(modules[node.target], _ACT_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    return node.op == "call_method" and node.target in _ACT_METHODS


def _pairs_fx(model: nn.Module) -> list[str]:
    graph, modules, calls = _pairs.trace(model, is_batchnorm)
    return [node.target for node in graph.nodes
            if node.op == "call_module" and _pairs.is_layer(modules[node.target])
            and calls[node.target] == 1 and len(node.users) == 1
            and _is_activation(next(iter(node.users)), modules)]


def nonlinearity_pairs(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv layers whose only consumer is a nonlinearity (Sec. 3.2).

    Found with torch.fx where the model traces (module, ``F.*`` and ``Tensor.*`` activations),
    else as adjacent (layer, activation) modules inside ``nn.Sequential`` containers.
    """
    try:
        return _pairs_fx(model)
    except Exception:  # not traceable (data-dependent control flow, ...): Sequential only
        return [a for a, _ in _pairs.sequential_pairs(
            model, _pairs.is_layer, lambda m: isinstance(m, _ACT_MODULES))]


def _default_norm(layer: nn.Module) -> NormFactory:
    if isinstance(layer, (nn.Conv3d, nn.ConvTranspose3d)):
        return BatchNorm3d
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        return BatchNorm2d
    return BatchNorm1d  # Linear on (N, F), Conv1d on (N, C, L)


def batchnormify(model: nn.Module, norm_layer: NormFactory | None = None, *,
                 inplace: bool = False) -> nn.Module:
    """Insert BN right before every nonlinearity that follows a Linear/Conv layer (Sec. 3.2).

    Each such layer ``L`` becomes ``nn.Sequential(L, norm)`` with ``L``'s bias removed (β takes
    its role), so its state_dict keys move from ``name.*`` to ``name.0.*``. Layers already
    followed by a norm, used twice, or feeding anything else are left alone. Linear layers are
    assumed to see (N, F) input: a Linear on (N, L, F) would need BN over the last dimension,
    and the inserted BatchNorm1d says so with an error naming the shape, except where L = F:
    then it normalizes over L without a word (give such a model a ``norm_layer`` of its own).

    Args:
        model: a model without BN at those places.
        norm_layer: ``(num_features) -> nn.Module``; default bnlab's ``BatchNorm1d`` for Linear
            and 1-d convolutions, ``BatchNorm2d``/``BatchNorm3d`` for 2-d/3-d ones.
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The model with BN inserted, in ``model``'s train/eval mode.
    """
    check_materialized(model, "batchnormify")
    model = model if inplace else _pairs.copy_model(model)
    for name in nonlinearity_pairs(model):
        layer = _pairs.layer_at(model, name)
        norm = (norm_layer or _default_norm(layer))(_pairs.out_features(layer))
        norm.to(device=layer.weight.device, dtype=layer.weight.dtype).train(layer.training)
        layer.bias = None  # subsumed by the norm's β
        _pairs.set_module(model, name, nn.Sequential(layer, norm))
    return model
