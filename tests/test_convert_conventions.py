"""Keras / Flax conventions ↔ ours: eval outputs, round trips, and the running average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.convert import (
    decay_to_momentum,
    flax_variables,
    keras_weights,
    load_flax_variables,
    load_keras_weights,
    momentum_to_decay,
)

F64 = torch.float64
C = 4


def _keras_arrays(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(C, generator=g, dtype=F64) + 0.5, torch.randn(C, generator=g, dtype=F64),
            torch.randn(C, generator=g, dtype=F64), torch.rand(C, generator=g, dtype=F64) + 0.1]


def _keras_inference(x, gamma, beta, mean, var, epsilon):
    """keras.layers.BatchNormalization(training=False), axis=-1 on (N, C) input."""
    return gamma * (x - mean) / torch.sqrt(var + epsilon) + beta


def _keras_train_step(moving, x, decay):
    """One training step of Keras' moving statistics: decay form, biased variance."""
    mean, var = moving
    return (decay * mean + (1 - decay) * x.mean(0),
            decay * var + (1 - decay) * x.var(0, unbiased=False))


@pytest.mark.parametrize("make", [lambda: bnlab.BatchNorm1d(C, dtype=F64),
                                  lambda: nn.BatchNorm1d(C, dtype=F64)])
def test_keras_load_gives_the_keras_inference_output(make) -> None:
    arrays = _keras_arrays()
    bn = load_keras_weights(make(), [a.numpy() for a in arrays], momentum=0.9, epsilon=1e-3)
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.1)
    x = torch.randn(6, C, dtype=F64)
    torch.testing.assert_close(bn.eval()(x), _keras_inference(x, *arrays, 1e-3))


@pytest.mark.parametrize("batch_values", [None, 10])
def test_keras_round_trip(batch_values: int | None) -> None:
    arrays = _keras_arrays(1)
    bn = load_keras_weights(bnlab.BatchNorm1d(C, dtype=F64), arrays, momentum=0.99,
                            epsilon=1e-3, batch_values=batch_values)
    out = keras_weights(bn, batch_values=batch_values)
    for a, b in zip(out.weights, arrays, strict=True):
        torch.testing.assert_close(a, b)
    assert out.config == {"momentum": pytest.approx(0.99), "epsilon": 1e-3, "center": True,
                          "scale": True}


def test_keras_training_continues_the_same_moving_average() -> None:
    """With batch_values = m, one step of ours after the conversion is one step of Keras."""
    torch.manual_seed(0)
    arrays, decay, n = _keras_arrays(2), 0.9, 10
    bn = load_keras_weights(bnlab.BatchNorm1d(C, dtype=F64), arrays, momentum=decay,
                            batch_values=n)
    x = torch.randn(n, C, dtype=F64) * 2 + 1
    bn.train()(x)
    mean, var = _keras_train_step((arrays[2], arrays[3]), x, decay)
    exported = keras_weights(bn, batch_values=n).weights
    torch.testing.assert_close(exported[2], mean)
    torch.testing.assert_close(exported[3], var)


def test_keras_mapping_names_and_missing_affine() -> None:
    gamma, beta, mean, var = _keras_arrays(3)
    named = {"bn/gamma:0": gamma, "bn/beta:0": beta, "bn/moving_mean:0": mean,
             "bn/moving_variance:0": var}
    bn = load_keras_weights(bnlab.BatchNorm1d(C, dtype=F64), named)
    torch.testing.assert_close(bn.weight.detach(), gamma)
    no_scale = load_keras_weights(bnlab.BatchNorm1d(C, dtype=F64), [beta, mean, var],
                                  scale=False)
    torch.testing.assert_close(no_scale.weight.detach(), torch.ones(C, dtype=F64))
    with pytest.raises(ValueError, match="expected 4 arrays"):
        load_keras_weights(bnlab.BatchNorm1d(C), [mean, var])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        load_keras_weights(bnlab.BatchNorm1d(C), [gamma, beta, mean, var[:2]])
    with pytest.raises(ValueError, match="affine=False"):
        load_keras_weights(bnlab.BatchNorm1d(C, affine=False), [gamma, beta, mean, var])
    with pytest.raises(ValueError, match="has bias=False but the source has a non-trivial beta"):
        load_keras_weights(bnlab.BatchNorm1d(C, bias=False), [gamma, beta, mean, var])


def test_flax_round_trip_and_inference() -> None:
    gamma, beta, mean, var = _keras_arrays(4)
    variables = {"params": {"scale": gamma, "bias": beta},
                 "batch_stats": {"mean": mean, "var": var}}
    bn = load_flax_variables(nn.BatchNorm1d(C, dtype=F64), variables, momentum=0.95)
    assert bn.eps == 1e-5 and bn.momentum == pytest.approx(0.05)
    x = torch.randn(5, C, dtype=F64)
    torch.testing.assert_close(bn.eval()(x), _keras_inference(x, gamma, beta, mean, var, 1e-5))
    out = flax_variables(bn)
    for key in ("scale", "bias"):
        torch.testing.assert_close(out.variables["params"][key], variables["params"][key])
    for key in ("mean", "var"):
        torch.testing.assert_close(out.variables["batch_stats"][key],
                                   variables["batch_stats"][key])
    assert out.config["momentum"] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="batch_stats"):
        load_flax_variables(bn, {"params": variables["params"]})


def test_momentum_decay_conversions() -> None:
    assert decay_to_momentum(0.99) == pytest.approx(0.01)
    assert momentum_to_decay(0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="momentum=None"):
        momentum_to_decay(None)
    with pytest.raises(ValueError, match="decay"):
        decay_to_momentum(1.5)


def test_a_failed_load_leaves_the_layer_as_it_was() -> None:
    gamma, beta, mean, var = _keras_arrays(5)
    bn = bnlab.BatchNorm1d(C, dtype=F64)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=r"beta must have shape \(4,\)"):
        load_keras_weights(bn, [gamma, beta[:3], mean, var], momentum=0.9, epsilon=0.1)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert bn.eps == 1e-5 and bn.momentum == 0.1


def test_a_module_that_is_not_batch_norm_is_refused_before_anything_is_loaded() -> None:
    """LpNorm has a running_mean but no running_var: it used to get its running_mean loaded
    and then fail on the missing buffer, half loaded."""
    norm = bnlab.variants.LpNorm(C, dtype=F64)
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    variables = {"params": {"scale": torch.ones(C), "bias": torch.zeros(C)},
                 "batch_stats": {"mean": torch.full((C,), 5.0), "var": torch.ones(C)}}
    for call in (lambda: load_keras_weights(norm, _keras_arrays(5)),
                 lambda: load_flax_variables(norm, variables), lambda: keras_weights(norm),
                 lambda: flax_variables(norm)):
        with pytest.raises(TypeError, match=r"must be a batch-norm layer .* got LpNorm, which "
                                            r"has no running_var"):
            call()
    for k, v in norm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mapping_loaders_reject_unknown_and_missing_keys() -> None:
    """A typo ('gama') silently loaded γ = 1; Flax's nesting gave a bare KeyError."""
    gamma, beta, mean, var = _keras_arrays(6)
    bn = bnlab.BatchNorm1d(C, dtype=F64)
    with pytest.raises(ValueError, match=r"weights .* must have keys .* got \['beta', 'gama'"):
        load_keras_weights(bn, {"gama": gamma, "beta": beta, "moving_mean": mean,
                                "moving_variance": var})
    with pytest.raises(ValueError, match=r"must have keys \['beta', 'moving_mean'"):
        load_keras_weights(bn, {"gamma": gamma, "beta": beta, "moving_mean": mean,
                                "moving_variance": var}, scale=False)  # scale=False: no gamma
    with pytest.raises(ValueError, match=r"variables\['params'\] must have keys"):
        load_flax_variables(bn, {"params": {"weight": gamma},
                                 "batch_stats": {"mean": mean, "var": var}})
    with pytest.raises(ValueError, match=r"variables\['batch_stats'\] must have keys .*got \[\]"):
        load_flax_variables(bn, {"batch_stats": {}})
    with pytest.raises(ValueError, match=r"variables \(one layer's\) must have keys"):
        load_flax_variables(bn, {"params": {"BatchNorm_0": {}}, "batch_stats": {},
                                 "extra": {}})


def test_numpy_scalars_are_numbers_as_in_torch() -> None:
    """np.float32 eps/momentum/decay and an np.int64 batch size (np.prod's) are accepted, as
    torch accepts them, and stored as Python numbers."""
    np = pytest.importorskip("numpy")
    bn = bnlab.BatchNorm1d(C, eps=np.float32(1e-3), momentum=np.float64(0.2))
    assert type(bn.eps) is float and type(bn.momentum) is float and bn.momentum == 0.2
    gamma, beta, mean, var = _keras_arrays(7)
    load_keras_weights(bn, [gamma, beta, mean, var], momentum=np.float32(0.5),
                       epsilon=np.float64(1e-3), batch_values=np.int64(4))
    assert bn.momentum == pytest.approx(0.5)
    torch.testing.assert_close(bn.running_var, (var * 4 / 3).float())
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got np.float32"):
        bnlab.BatchNorm1d(C, eps=np.float32(-1))
    with pytest.raises(ValueError, match="batch_values must be an integer"):
        load_keras_weights(bn, [gamma, beta, mean, var], batch_values=np.float64(4))


def test_loading_into_an_unmaterialized_lazy_layer_is_named() -> None:
    gamma, beta, mean, var = _keras_arrays(8)
    with pytest.raises(ValueError, match="LazyBatchNorm1d"):
        load_keras_weights(bnlab.LazyBatchNorm1d(), [gamma, beta, mean, var])


def test_non_finite_or_negative_statistics_are_refused_and_bf16_exports_as_float32() -> None:
    gamma, beta, mean, var = _keras_arrays(9)
    bad = var.clone()
    bad[1] = -0.5
    with pytest.raises(ValueError, match=r"variance must be finite and >= 0, got \[.*-0.5"):
        load_keras_weights(bnlab.BatchNorm1d(C, dtype=F64), [gamma, beta, mean, bad])
    nan_mean = mean.clone()
    nan_mean[0] = float("nan")
    with pytest.raises(ValueError, match="mean must be finite"):
        load_flax_variables(bnlab.BatchNorm1d(C, dtype=F64),
                            {"batch_stats": {"mean": nan_mean, "var": var}})
    bn = bnlab.BatchNorm1d(C, dtype=torch.bfloat16)
    out = keras_weights(bn)
    assert all(w.dtype == torch.float32 for w in out.weights)
    assert flax_variables(bn).variables["params"]["scale"].dtype == torch.float32
    assert keras_weights(bnlab.BatchNorm1d(C, dtype=F64)).weights[0].dtype == F64


def test_a_noisy_bn_takes_and_gives_the_sources_function() -> None:
    # Its eval output is E[s]·BN(x): loaded as a plain BN it was 1.125x Keras's output, and
    # its export described another function than its own (fold and FrozenBatchNorm take E[s]).
    arrays = _keras_arrays(10)
    noisy = bnlab.variants.NoisyBatchNorm(C, dtype=F64, seed=0)
    load_keras_weights(noisy, arrays, epsilon=1e-3)
    x = torch.randn(6, C, dtype=F64)
    torch.testing.assert_close(noisy.eval()(x), _keras_inference(x, *arrays, 1e-3))
    out = keras_weights(noisy)
    torch.testing.assert_close(_keras_inference(x, *out.weights, out.config["epsilon"]),
                               noisy(x))
    torch.testing.assert_close(out.weights[0], arrays[0])  # a round trip
    with pytest.raises(ValueError, match=r"affine=False evaluates to E\[s\] = 1\.125 times"):
        load_keras_weights(bnlab.variants.NoisyBatchNorm(C, affine=False), arrays[2:],
                           center=False, scale=False)


def test_python_lists_load_at_the_layers_precision() -> None:
    # lists went through float32 on their way to a float64 layer (0.3 -> 0.30000001192...)
    bn = load_flax_variables(bnlab.BatchNorm1d(2, dtype=F64),
                             {"batch_stats": {"mean": [0.3, 0.7], "var": [0.1, 2.0]}})
    assert bn.running_mean.tolist() == [0.3, 0.7] and bn.running_var.tolist() == [0.1, 2.0]
    with pytest.raises(ValueError, match=r"moving_variance is not representable in the "
                       r"layer's torch.float16"):
        load_keras_weights(bnlab.BatchNorm1d(2, dtype=torch.float16),
                           [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1e5, 1.0]])


def test_source_arguments_are_named_as_the_source_names_them() -> None:
    arrays = _keras_arrays(11)
    with pytest.raises(ValueError, match=r"load_keras_weights: momentum \(the source's decay "
                       r"of the old value\) must be a number in \[0, 1\], got 1.5"):
        load_keras_weights(bnlab.BatchNorm1d(C), arrays, momentum=1.5)
    with pytest.raises(ValueError, match=r"load_flax_variables: epsilon must be a finite number "
                       r">= 0, got -1"):
        load_flax_variables(bnlab.BatchNorm1d(C), {"batch_stats": {"mean": arrays[2],
                                                                  "var": arrays[3]}}, epsilon=-1)
    frozen = load_keras_weights(bnlab.variants.FrozenBatchNorm1d(C, eps=0.0), arrays, epsilon=0)
    assert frozen.eps == 0.0  # ε = 0 evaluates, as the layers take it


def test_shapes_are_checked_where_the_layer_has_nowhere_to_put_them_and_state_is_whole() -> None:
    arrays = _keras_arrays(12)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4,\), got \(3,\)"):
        load_keras_weights(bnlab.BatchNorm1d(C, affine=False),
                           [torch.ones(3), torch.zeros(5), *arrays[2:]])
    half = bnlab.BatchNorm1d(C)
    half.running_var = None
    with pytest.raises(ValueError, match="running_mean and running_var must both be None"):
        load_keras_weights(half, arrays)
    assert torch.equal(half.running_mean, torch.zeros(C))  # nothing copied
    with pytest.raises(ValueError, match="running_mean and running_var must both be None"):
        keras_weights(half)
    with pytest.raises(ValueError, match="LazyBatchNorm1d"):
        flax_variables(bnlab.LazyBatchNorm1d())


def test_flax_config_loads_back_as_keyword_arguments() -> None:
    # the Keras pair took its config back; flax_variables' use_scale/use_bias were refused
    bn = load_keras_weights(bnlab.BatchNorm1d(C, dtype=F64), _keras_arrays(13), epsilon=1e-4)
    f = flax_variables(bn)
    back = load_flax_variables(bnlab.BatchNorm1d(C, dtype=F64), f.variables, **f.config)
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    assert back.eps == bn.eps
    with pytest.raises(ValueError, match=r"variables\['params'\] must have keys \['bias'\]"):
        load_flax_variables(bnlab.BatchNorm1d(C), f.variables, use_scale=False)
