"""Convert BN weights and buffers between the Keras / Flax conventions and ours (PyTorch's).

The three differences that keep breaking ports (peers.md, Sec. 3 and pain points 3–4):

=================  ==========================  =====================  ======================
                   ours (PyTorch)              Keras 3 / tf.keras     Flax linen / NNX
=================  ==========================  =====================  ======================
running average    r ← (1−m)·r + m·s, m=0.1    r ← d·r + (1−d)·s,     same as Keras, d=0.99
                                               d=0.99 ("momentum")
stored variance    unbiased m/(m−1)·σ²_B       biased σ²_B (fused     biased σ²_B
                                               tf.keras: unbiased)
ε default          1e-5                        1e-3                   1e-5
names              weight, bias,               gamma, beta,           params: scale, bias;
                   running_mean, running_var   moving_mean,           batch_stats: mean, var
                                               moving_variance
=================  ==========================  =====================  ======================

Loading keeps the source's ε and converts momentum (m = 1 − d), so eval outputs are identical.
A layer without a momentum (FrozenBatchNorm) loads and exports too; exporting one, or a layer
with ``momentum=None`` (the cumulative average, which Keras and Flax lack; a warning says so),
writes the frameworks' default decay 0.99 into ``config``.
The stored variance is copied as is by default, which is what makes eval outputs identical;
pass ``batch_values`` (the m values per channel of the training batches: N·H·W) to convert the
estimator as well (× m/(m−1) into ours, × (m−1)/m out), so that further training continues
each framework's running average exactly (this changes eval outputs by that factor).
Arrays may be numpy arrays, tensors or lists; results are CPU tensors (``.numpy()`` them).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from bnlab._checks import check_materialized, is_integer, is_real
from bnlab._layer_state import has_stats
from bnlab.variants.noisy import eval_factor

__all__ = [
    "FlaxBN",
    "KerasBN",
    "decay_to_momentum",
    "flax_variables",
    "keras_weights",
    "load_flax_variables",
    "load_keras_weights",
    "momentum_to_decay",
]


class _BNLike(Protocol):
    """What the conversions read and set of ``bn``. bnlab's and torch's BN layers and
    FrozenBatchNorm have these (the last no ``momentum``, which is optional), but the functions
    take any nn.Module with them, whose attributes nn.Module's __getattr__ types
    Tensor | Module."""

    num_features: int
    eps: float
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None


def _bn_like(bn: nn.Module, who: str) -> _BNLike:
    """``bn`` as the BN layer it must be: checked before anything is read or written, so a
    module without BN's attributes (e.g. `bnlab.LpNorm`, which has no running_var) is refused
    whole instead of left half loaded."""
    missing = [a for a in _BNLike.__annotations__ if not hasattr(bn, a)]
    if missing:
        raise TypeError(f"{who}: bn must be a batch-norm layer (bnlab's or torch's), got "
                        f"{type(bn).__name__}, which has no {', '.join(missing)}")
    return cast(_BNLike, bn)


def decay_to_momentum(decay: float) -> float:
    """Keras/Flax ``momentum`` (decay d of the old value) → PyTorch momentum m = 1 − d."""
    return _to_momentum(decay, "decay_to_momentum", "decay")


def _to_momentum(decay: Any, who: str, name: str) -> float:
    """`decay_to_momentum`, its errors naming ``who`` and the argument ``name``."""
    if isinstance(decay, bool) or not is_real(decay) or not 0.0 <= decay <= 1.0:
        raise ValueError(f"{who}: {name} must be a number in [0, 1], got {decay!r}")
    return 1.0 - float(decay)


def momentum_to_decay(momentum: float | None) -> float:
    """PyTorch momentum m → Keras/Flax decay d = 1 − m (``None``, the cumulative average, has
    no Keras/Flax equivalent)."""
    if (momentum is None or isinstance(momentum, bool) or not is_real(momentum)
            or not 0.0 <= momentum <= 1.0):
        raise ValueError("momentum_to_decay: momentum must be a number in [0, 1] (the "
                         "cumulative average momentum=None has no decay equivalent), got "
                         f"{momentum!r}")
    return 1.0 - float(momentum)


DEFAULT_DECAY = 0.99  # Keras's and Flax's default BatchNormalization momentum


def _export_decay(bn: nn.Module, who: str) -> float:
    """The decay to export: 1 − momentum, or the frameworks' default where ``bn`` has none
    (FrozenBatchNorm) or keeps the cumulative average (momentum=None, with a warning)."""
    if not hasattr(bn, "momentum"):
        return DEFAULT_DECAY
    momentum: Any = bn.momentum  # nn.Module types it Tensor | Module
    if momentum is None:
        warnings.warn(f"{who}: {type(bn).__name__} has momentum=None (the cumulative average), "
                      f"which Keras and Flax lack; config['momentum'] is their default "
                      f"{DEFAULT_DECAY}", UserWarning, stacklevel=3)
        return DEFAULT_DECAY
    return momentum_to_decay(momentum)


def _bessel(batch_values: int | None, who: str) -> float:
    if batch_values is None:
        return 1.0
    if not is_integer(batch_values) or batch_values < 2:
        raise ValueError(f"{who}: batch_values must be an integer >= 2 (values per channel "
                         f"of a training batch) or None, got {batch_values!r}")
    return int(batch_values) / (int(batch_values) - 1)


def _vector(value: Any, c: int, name: str, who: str, like: Tensor) -> Tensor:
    # Python lists in float64: torch.as_tensor made them float32, which rounded 0.3 for a
    # float64 layer (arrays and tensors keep their own dtype)
    t = torch.as_tensor(value, dtype=torch.float64 if isinstance(value, (list, tuple)) else None)
    t = t.detach()
    if tuple(t.shape) != (c,):
        raise ValueError(f"{who}: {name} must have shape ({c},), got {tuple(t.shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{who}: {name} must be finite, got {t.tolist()}")
    t = t.to(device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{who}: {name} is not representable in the layer's {like.dtype} "
                         f"(it becomes {t.tolist()})")
    return t


def _check_epsilon(eps: Any, who: str) -> None:
    """The source layer's ``epsilon``, named as the source names it. ε = 0 is taken: the
    layers evaluate with it (they refuse it only when training)."""
    if isinstance(eps, bool) or not is_real(eps) or not 0.0 <= eps < float("inf"):
        raise ValueError(f"{who}: epsilon must be a finite number >= 0, got {eps!r}")


@torch.no_grad()
def _load(bn: nn.Module, gamma: Any, beta: Any, mean: Any, var: Any, *, decay: float,
          eps: float, factor: float, who: str, names: tuple[str, str, str, str]) -> nn.Module:
    """Load (γ, β, mean, variance), named ``names`` in the source framework's terms."""
    check_materialized(bn, who)
    momentum = _to_momentum(decay, who, "momentum (the source's decay of the old value)")
    _check_epsilon(eps, who)
    layer = _bn_like(bn, who)
    if not has_stats(who, layer.running_mean, layer.running_var, "running_var"):
        raise ValueError(f"{who}: {type(bn).__name__} has no running statistics "
                         "(track_running_stats=False) to load into")
    assert layer.running_mean is not None  # (has_stats)
    # A NoisyBatchNorm's eval output is E[s]·BN(x) (its noise's expectation): γ and β are
    # loaded divided by it, so that the layer computes the source's function.
    k = eval_factor(bn)
    c = layer.num_features
    rm = layer.running_mean
    # Everything is converted and checked before anything is copied: a bad array leaves the
    # layer as it was, not half loaded.
    new = {"running_mean": _vector(mean, c, names[2], who, rm),
           "running_var": _vector(var, c, names[3], who, rm) * factor}
    v = new["running_var"]
    if not bool((torch.isfinite(v) & (v >= 0)).all()):
        raise ValueError(f"{who}: {names[3]} must be finite and >= 0, got {v.tolist()}")
    for name, shown, value, default in (("weight", names[0], gamma, 1.0),
                                        ("bias", names[1], beta, 0.0)):
        param = getattr(bn, name, None)
        if param is None:
            given = None if value is None else _vector(value, c, shown, who, rm)
            why = "affine=False" if not getattr(bn, "affine", True) else "bias=False"
            if given is not None and not torch.all(given == default):
                raise ValueError(f"{who}: {type(bn).__name__} has {why} but the source "
                                 f"has a non-trivial {shown}: {given.tolist()}")
            if k != 1.0 and (name == "weight" or default != 0.0):
                raise ValueError(f"{who}: a {type(bn).__name__} with {why} evaluates to "
                                 f"E[s] = {k} times the source's output; give it γ to load")
            continue
        new[name] = (_vector(value, c, shown, who, param) / k if value is not None
                     else torch.full_like(param, default / k))
    for name, t in new.items():
        getattr(bn, name).copy_(t)
    layer.eps = float(eps)
    if hasattr(bn, "momentum"):  # FrozenBatchNorm keeps no running average
        setattr(bn, "momentum", momentum)  # noqa: B010 (nn.Module types the attribute a Tensor)
    return bn


def _keys(given: Mapping[str, Any], allowed: Sequence[str], required: Sequence[str],
          what: str, who: str) -> None:
    """Unknown keys (a typo such as 'gama' would silently load γ = 1) and missing ones are
    errors naming both."""
    unknown = sorted(set(given) - set(allowed))
    missing = [k for k in required if k not in given]
    if unknown or missing:
        raise ValueError(f"{who}: {what} must have keys {list(allowed)} ({list(required)} "
                         f"required), got {sorted(given)}")


def _export(bn: nn.Module, batch_values: int | None, who: str) -> tuple[Tensor, ...]:
    check_materialized(bn, who)
    layer = _bn_like(bn, who)
    if not has_stats(who, layer.running_mean, layer.running_var, "running_var"):
        raise ValueError(f"{who}: {type(bn).__name__} has no running statistics to export")
    factor = _bessel(batch_values, who)
    assert layer.running_mean is not None and layer.running_var is not None  # (has_stats)
    c, like = layer.num_features, layer.running_mean
    w = layer.weight if layer.weight is not None else torch.ones(c, dtype=like.dtype)
    b = layer.bias if layer.bias is not None else torch.zeros(c, dtype=like.dtype)
    # A NoisyBatchNorm's eval transform ends with E[s] (as fold and FrozenBatchNorm take it)
    k = eval_factor(bn)
    if k != 1.0:
        w, b = w * k, b * k
    # bfloat16 has no NumPy dtype: such a layer's arrays come as float32 (exact), so that
    # `.numpy()` works as for the others.
    return tuple(t.detach().cpu().to(torch.float32 if t.dtype == torch.bfloat16 else t.dtype,
                                     copy=True)
                 for t in (w, b, layer.running_mean, layer.running_var / factor))


@dataclass
class KerasBN:
    """``weights`` in ``layer.get_weights()`` order: [gamma, beta, moving_mean, moving_variance];
    ``config`` the matching ``keras.layers.BatchNormalization`` arguments."""

    weights: list[Tensor]
    config: dict[str, Any]


@dataclass
class FlaxBN:
    """``variables`` as ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``;
    ``config`` the matching ``flax.linen.BatchNorm`` arguments."""

    variables: dict[str, dict[str, Tensor]]
    config: dict[str, Any]


def load_keras_weights(bn: nn.Module, weights: Sequence[Any] | Mapping[str, Any], *,
                       momentum: float = 0.99, epsilon: float = 1e-3, center: bool = True,
                       scale: bool = True, batch_values: int | None = None) -> nn.Module:
    """Load a Keras ``BatchNormalization`` layer into ``bn`` (bnlab or torch BN) in place.

    Args:
        bn: the destination; its ``eps`` and ``momentum`` are set to the converted values.
        weights: ``layer.get_weights()`` (gamma if ``scale``, beta if ``center``, moving_mean,
            moving_variance) or a mapping with those names.
        momentum, epsilon, center, scale: the Keras layer's arguments (Keras defaults).
        batch_values: see the module docstring (None: copy the variance, identical outputs).

    Returns:
        ``bn``, whose eval output equals the Keras layer's inference output.
    """
    who = "load_keras_weights"
    if isinstance(weights, Mapping):
        w: dict[str, Any] = {}
        for key, v in weights.items():  # "block/bn/gamma:0" -> "gamma"
            short = key.split("/")[-1].split(":")[0]
            if short in w:
                first = next(k for k in weights if k.split("/")[-1].split(":")[0] == short)
                raise ValueError(f"{who}: weights has two {short!r} arrays ({first!r} and "
                                 f"{key!r}); pass one layer's weights")
            w[short] = v
        needed = [*(["gamma"] if scale else []), *(["beta"] if center else []),
                  "moving_mean", "moving_variance"]
        _keys(w, needed, needed, "weights (scale and center as given)", who)
        gamma, beta = w.get("gamma"), w.get("beta")
        mean, var = w["moving_mean"], w["moving_variance"]
    else:
        expected = int(scale) + int(center) + 2
        if len(weights) != expected:
            raise ValueError(f"{who}: expected {expected} arrays (scale={scale}, "
                             f"center={center}), got {len(weights)}")
        items = list(weights)
        gamma = items.pop(0) if scale else None
        beta = items.pop(0) if center else None
        mean, var = items
    return _load(bn, gamma, beta, mean, var, decay=momentum, eps=epsilon,
                 factor=_bessel(batch_values, who), who=who,
                 names=("gamma", "beta", "moving_mean", "moving_variance"))


def keras_weights(bn: nn.Module, *, batch_values: int | None = None) -> KerasBN:
    """``bn`` (bnlab or torch BN) as Keras ``BatchNormalization`` weights and arguments."""
    gamma, beta, mean, var = _export(bn, batch_values, "keras_weights")
    layer = _bn_like(bn, "keras_weights")
    config = {"momentum": _export_decay(bn, "keras_weights"), "epsilon": float(layer.eps),
              "center": True, "scale": True}
    return KerasBN(weights=[gamma, beta, mean, var], config=config)


def load_flax_variables(bn: nn.Module, variables: Mapping[str, Mapping[str, Any]], *,
                        momentum: float = 0.99, epsilon: float = 1e-5,
                        use_scale: bool = True, use_bias: bool = True,
                        batch_values: int | None = None) -> nn.Module:
    """Load a Flax ``BatchNorm``'s variables (``{"params": ..., "batch_stats": ...}``) into
    ``bn`` in place; ``momentum``, ``epsilon``, ``use_scale`` and ``use_bias`` are the Flax
    layer's (Flax defaults), so ``load_flax_variables(bn, f.variables, **f.config)`` loads what
    `flax_variables` gave. A missing ``scale`` or ``bias`` loads as 1 or 0."""
    who = "load_flax_variables"
    _keys(variables, ("params", "batch_stats"), ("batch_stats",), "variables (one layer's)", who)
    params, stats = variables.get("params", {}), variables["batch_stats"]
    allowed = tuple(k for k, use in (("scale", use_scale), ("bias", use_bias)) if use)
    _keys(params, allowed, (), "variables['params']", who)  # (as use_scale, use_bias say)
    _keys(stats, ("mean", "var"), ("mean", "var"), "variables['batch_stats']", who)
    return _load(bn, params.get("scale"), params.get("bias"), stats["mean"], stats["var"],
                 decay=momentum, eps=epsilon, factor=_bessel(batch_values, who), who=who,
                 names=("scale", "bias", "mean", "var"))


def flax_variables(bn: nn.Module, *, batch_values: int | None = None) -> FlaxBN:
    """``bn`` (bnlab or torch BN) as Flax ``BatchNorm`` variables and arguments."""
    scale, bias, mean, var = _export(bn, batch_values, "flax_variables")
    layer = _bn_like(bn, "flax_variables")
    config = {"momentum": _export_decay(bn, "flax_variables"), "epsilon": float(layer.eps),
              "use_scale": True, "use_bias": True}
    return FlaxBN(variables={"params": {"scale": scale, "bias": bias},
                             "batch_stats": {"mean": mean, "var": var}}, config=config)
