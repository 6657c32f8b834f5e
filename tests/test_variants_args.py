"""The variants' functional forms and constructors on arguments the layers never pass: unbounded
Batch Renorm limits, unchecked functional calls, NumPy scalars, bad seeds and inputs of the
noise, and the memory format the noise returns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bnlab.variants import (
    ActivationNoise,
    BatchRenorm1d,
    BatchRenorm2d,
    GhostBatchNorm,
    NoisyBatchNorm,
    batch_renorm,
    ghost_batch_norm,
    renorm_limits,
)


def test_unbounded_renorm_limits_are_plain_bn_during_warm_up():
    r, d = renorm_limits(0, math.inf, math.inf, warmup_steps=5, r_max_steps=10, d_max_steps=10)
    assert (float(r), float(d)) == (1.0, 0.0)  # (nan, 0) before: inf * 0
    r, d = renorm_limits(7, math.inf, 5.0, warmup_steps=5, r_max_steps=10, d_max_steps=10)
    assert math.isinf(float(r)) and float(d) == pytest.approx(2.0)
    torch.manual_seed(0)
    x = torch.randn(16, 3) * 3 + 1
    layer = BatchRenorm1d(3, r_max=math.inf, d_max=math.inf, warmup_steps=5)
    ref = torch.nn.BatchNorm1d(3, momentum=0.01)
    assert torch.allclose(layer(x), ref(x), atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"r_max": float("nan")}, r"r_max must be a number >= 1, got nan"),
    ({"r_max": 0.5}, r"r_max must be a number >= 1"),
    ({"d_max": -1.0}, r"d_max must be a number >= 0"),
    ({"r_max": True}, r"r_max must be a number >= 1, got True"),
    ({"warmup_steps": 2.5}, r"warmup_steps must be an integer >= 0"),
])
def test_renorm_bounds_are_checked_everywhere(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchRenorm2d(3, **kwargs)
    with pytest.raises(ValueError, match=message.replace("BatchRenorm2d", "")):
        renorm_limits(0, **{"r_max": 3.0, "d_max": 5.0, **kwargs})
    layer = BatchRenorm2d(3, r_max=np.float32(2.0), warmup_steps=np.int64(0))  # NumPy scalars
    assert layer.r_max == 2.0 and layer.warmup_steps == 0


def test_the_functional_batch_renorm_checks_its_training_arguments():
    x, rm, rv = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    cases = [((None, None, True, 0.1, -1.0), ValueError, r"eps must be a finite number > 0"),
             ((None, None, True, 5.0), ValueError, r"momentum must be in \[0, 1\]"),
             ((None, None, "no"), TypeError, r"training must be a bool, got str 'no'"),
             ((None, None, True, 0.1, 1e-5, 3.0, -1.0), ValueError, r"d_max must be a number"),
             ((None, None, True, 0.1, 1e-5, 0.5), ValueError, r"r_max must be a number >= 1"),
             ((torch.ones(4), None, True), ValueError, r"weight")]
    for args, kind, message in cases:
        before = rm.clone()
        with pytest.raises(kind, match=message):
            batch_renorm(x, rm, rv, *args)
        assert torch.equal(rm, before)  # nothing moved
    with pytest.raises(ValueError, match=r"running_mean and running_var are required"):
        batch_renorm(x, None, None, training=True)


@pytest.mark.parametrize("v, eps, message", [
    (0, 1e-5, r"virtual_batch_size must be an integer >= 1, got 0"),
    (-2, 1e-5, r"virtual_batch_size must be an integer >= 1, got -2"),
    (2.5, 1e-5, r"virtual_batch_size must be an integer >= 1, got 2.5"),
    (4, -1.0, r"eps must be a finite number > 0"),
])
def test_the_functional_ghost_batch_norm_checks_its_arguments(v, eps, message):
    with pytest.raises(ValueError, match=message):
        ghost_batch_norm(torch.randn(8, 3), None, None, eps, v)


def test_ghost_batch_norm_names_a_mis_sized_weight_and_takes_numpy_sizes():
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ghost_batch_norm: .*weight"):
        ghost_batch_norm(x, torch.ones(5, dtype=torch.float64), None, 1e-5, 4)
    layer = GhostBatchNorm(3, virtual_batch_size=np.int64(4))
    assert layer.virtual_batch_size == 4 and type(layer.virtual_batch_size) is int


def test_noise_arguments_and_inputs_are_checked_in_the_layer_s_own_name():
    with pytest.raises(ValueError, match=r"^NoisyBatchNorm: n_sigma must be a finite number"):
        NoisyBatchNorm(3, n_sigma=0.5)
    layer = NoisyBatchNorm(3, n_sigma=np.float32(1.5), seed=np.int64(3))
    assert layer.noise.n_sigma == 1.5 and layer.noise.seed == 3
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=r"num_features"):
            ActivationNoise(bad)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\) or None"):
        ActivationNoise(4, seed=2**64)
    with pytest.raises(ValueError, match=r"n_mu must be a finite number >= 0.0, got True"):
        ActivationNoise(4, n_mu=True)
    noise = ActivationNoise(4, seed=0)
    for mode in (True, False):
        with pytest.raises(TypeError, match=r"input must be floating point, got dtype "
                           r"torch.int64"):
            noise.train(mode)(torch.ones(3, 4, dtype=torch.long))
    out = noise.train()(torch.empty(2, 4, 3, device="meta"))  # shape propagation only
    assert out.shape == (2, 4, 3) and out.device.type == "meta"


def test_the_noise_keeps_the_memory_format_and_draws_as_before_on_contiguous_input():
    """The draws are torch.rand/randn's, in NCHW order whatever the layout: channels_last
    input gets the same noise as contiguous input, and keeps its layout."""
    x = torch.randn(2, 3, 4, 5)
    a = NoisyBatchNorm(3, seed=1)(x.contiguous(memory_format=torch.channels_last))
    assert a.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a, NoisyBatchNorm(3, seed=1)(x))  # (BN's sums: other order)
    cl = ActivationNoise(3, seed=3)(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl, ActivationNoise(3, seed=3)(x))
    noise = ActivationNoise(3, seed=2)
    y = noise(x)
    g = torch.Generator().manual_seed(2)  # the draws torch.rand/randn make, in their order
    mu = (torch.rand(3, generator=g) * 2 - 1) * 0.5
    sigma = 1 + torch.rand(3, generator=g) * 0.25
    m = torch.rand(x.shape, generator=g) * 0.2 + (mu - 0.1).view(1, 3, 1, 1)
    s = torch.randn(x.shape, generator=g) * 0.1 + sigma.view(1, 3, 1, 1)
    assert torch.equal(y, x * s + m)


def test_lp_norm_takes_a_numpy_p():
    from bnlab.variants import LpNorm

    assert LpNorm(3, p=np.int64(2)).p == 2.0
    with pytest.raises(ValueError, match=r"p must be 1, 2 or math.inf"):
        LpNorm(3, p=np.float64(3.0))
