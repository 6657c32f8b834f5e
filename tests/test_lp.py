"""LpNorm (Santurkar et al. 2018, Sec. 3.3); shapes and dtypes of the noise layers too."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab.layers import BatchNorm
from bnlab.variants import (
    LpNorm,
    NoisyBatchNorm,
    lp_norm,
)

# ----------------------------------------------------------------------------- ℓp norms

X = torch.tensor([[1.0], [-2.0], [3.0], [0.0]], dtype=torch.float64)  # (N=4, C=1)
# μ = 0.5; s_1 = 6/4 = 1.5; s_2 = √(14/4) = √3.5; s_∞ = 3.
CENTRED = torch.tensor([[0.5], [-2.5], [2.5], [-0.5]], dtype=torch.float64)


@pytest.mark.parametrize(("p", "scale"), [(1, 1.5), (2, math.sqrt(3.5)), (math.inf, 3.0)])
def test_lp_norm_hand_computed(p, scale):
    layer = LpNorm(1, p=p, eps=1e-12, momentum=0.1).double()
    torch.testing.assert_close(layer(X), CENTRED / scale)
    torch.testing.assert_close(layer.running_mean, torch.tensor([0.05], dtype=torch.float64))
    torch.testing.assert_close(layer.running_scale,
                               torch.tensor([0.9 + 0.1 * scale], dtype=torch.float64))
    layer.eval()  # y = (x − running_mean)/(running_scale + ε)
    torch.testing.assert_close(layer(X), (X - 0.05) / (0.9 + 0.1 * scale))


def test_lp_norm_hand_computed_affine_and_conv_layout():
    # Two channels, spatial 1x2: the statistics run over N·H·W = 4 values per channel.
    x = torch.tensor([[[[1.0, -2.0]], [[2.0, 2.0]]], [[[3.0, 0.0]], [[-2.0, -2.0]]]])
    w, b = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0])
    y = lp_norm(x, None, None, w, b, training=True, eps=1e-12, p=1)
    # Channel 0: values 1, −2, 3, 0 -> (x − 0.5)/1.5·2. Channel 1: ±2, mean 0, s_1 = 2 -> ±1 + 1.
    want = torch.tensor([[[[1 / 1.5, -5 / 1.5]], [[2.0, 2.0]]],
                         [[[5 / 1.5, -1 / 1.5]], [[0.0, 0.0]]]])
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_norm_properties(p):
    torch.manual_seed(0)
    x = torch.randn(32, 5, 3, dtype=torch.float64) * 4 + 2
    y = lp_norm(x, None, None, training=True, eps=1e-12, p=p)
    torch.testing.assert_close(y.mean((0, 2)), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(lp_norm(3 * x, None, None, training=True, eps=1e-12, p=p), y)
    # Not shift-invariant (the scale is of the uncentred values), unlike BN.
    assert not torch.allclose(lp_norm(x + 5, None, None, training=True, p=p), y, atol=1e-3)


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_norm_gradcheck(p):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: lp_norm(x, None, None, w, b, True, p=p),
                                    (x, w, b))


def test_lp_norm_cumulative_momentum_and_eval_batch_independence():
    layer = LpNorm(3, p=2, momentum=None)
    batches = [torch.randn(10, 3) + i for i in range(3)]
    for xb in batches:
        layer(xb)
    scales = torch.stack([xb.square().mean(0).sqrt() for xb in batches])
    torch.testing.assert_close(layer.running_scale, scales.mean(0))
    torch.testing.assert_close(layer.running_mean, torch.stack(batches).mean((0, 1)))
    layer.eval()
    x = torch.randn(10, 3)
    perm = torch.randperm(10)
    torch.testing.assert_close(layer(x)[perm], layer(x[perm]))
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])  # one example works in eval


def test_lp_norm_counts_only_the_batches_its_average_used():
    """A rejected batch (one value per channel) and a non-finite one leave the cumulative
    average the exact mean of the batches used (the count was taken before both)."""
    layer = LpNorm(3, p=2, momentum=None)
    with pytest.raises(ValueError, match=r"LpNorm\(3\): expected more than 1 value"):
        layer(torch.randn(1, 3))
    layer(torch.full((4, 3), float("nan")))
    x = torch.randn(8, 3) + 5
    layer(x)
    assert layer.num_batches_tracked == 1
    torch.testing.assert_close(layer.running_mean, x.mean(0))
    # As BN: turning the flag off stops the updates and keeps eval on the running statistics.
    layer.track_running_stats = False
    layer(x * 3)
    assert layer.num_batches_tracked == 1
    layer.eval()
    torch.testing.assert_close(layer(x), lp_norm(x, layer.running_mean, layer.running_scale,
                                                 layer.weight, layer.bias, False))


def test_lp_norm_without_running_stats_uses_batch_in_eval():
    layer = LpNorm(2, p=1, track_running_stats=False).eval()
    x = torch.randn(7, 2)
    torch.testing.assert_close(layer(x), lp_norm(x, None, None, layer.weight, layer.bias, True,
                                                  p=1))


def test_lp_norm_buffers_set_to_none_by_hand_behave_as_bns():
    """As BN's layers: both running statistics None gives batch statistics in eval and still
    counts training batches; one of them None is refused (it used to train silently on batch
    statistics); reset_running_stats resets what exists (it used to fail an assert)."""
    x = torch.randn(6, 3, 4, 4)
    layer = LpNorm(3, p=1)
    layer.running_mean = layer.running_scale = None
    for _ in range(2):
        layer(x)
    assert layer.num_batches_tracked == 2
    torch.testing.assert_close(layer.eval()(x), lp_norm(x, None, None, layer.weight, layer.bias,
                                                        True, p=1))
    layer.reset_running_stats()
    assert layer.num_batches_tracked == 0
    for gone, left in (("running_mean", "running_scale"), ("running_scale", "running_mean")):
        layer = LpNorm(3)
        setattr(layer, gone, None)
        for mode in (True, False):
            with pytest.raises(ValueError, match=rf"LpNorm\(3\): running_mean and running_scale "
                               rf"must both be None or neither, got {gone} None only"):
                layer.train(mode)(x)
        layer.num_batches_tracked = None
        getattr(layer, left).fill_(7.0)
        layer.reset_running_stats()
        assert getattr(layer, left).eq(0.0 if left == "running_mean" else 1.0).all()


@pytest.mark.parametrize("p", [0, 3, "two", True])
def test_lp_norm_bad_p(p):
    with pytest.raises(ValueError, match="p must be"):
        LpNorm(3, p=p)


def test_lp_norm_bad_input():
    with pytest.raises(ValueError, match="expected 3 channels"):
        LpNorm(3)(torch.randn(4, 2))
    with pytest.raises(ValueError, match="more than 1 value"):
        LpNorm(3)(torch.randn(1, 3))


def test_lp_norm_errors_name_running_scale():
    """lp_norm shares batch_norm's argument checks; its errors name its own statistic."""
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"running_scale must have shape \(3,\)"):
        lp_norm(x, torch.zeros(3), torch.ones(2), p=2, training=True)
    with pytest.raises(ValueError, match="running_mean and running_scale are required"):
        lp_norm(x, None, None, p=2, training=False)


# ----------------------------------------------------------------------------- shapes, dtypes

SHAPES = st.tuples(st.integers(2, 5), st.integers(1, 4)).flatmap(
    lambda nc: st.lists(st.integers(1, 4), max_size=2).map(lambda sp: (*nc, *sp)))


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, p=st.sampled_from([1, 2, math.inf]))
def test_lp_norm_any_rank_equals_flattened_2d(shape, p):
    x = torch.randn(shape, dtype=torch.float64) + 0.5
    c = shape[1]
    flat2d = x.transpose(0, 1).reshape(c, -1).T  # (N, C, *) -> (N·positions, C)
    want = lp_norm(flat2d, None, None, training=True, p=p)
    got = lp_norm(x, None, None, training=True, p=p).transpose(0, 1).reshape(c, -1).T
    torch.testing.assert_close(got, want)


@settings(max_examples=15, deadline=None)
@given(shape=SHAPES, dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_noisy_layers_keep_shape_and_dtype(shape, dtype):
    x = torch.randn(shape).to(dtype)
    for layer in (NoisyBatchNorm(shape[1], seed=0, dtype=dtype), LpNorm(shape[1], dtype=dtype)):
        y = layer(x)
        assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_lp_norm_all_zero_channel_has_finite_closed_form_gradient(p):
    # A dead channel (all zeros over the batch): μ = s_p = 0, so y = γ·(x − μ)/ε there and
    # ∂ℓ/∂x = γ·(g − mean(g))/ε (the scale's gradient meets x − μ = 0). √(mean(x²))'s backward
    # at 0 is inf, and inf·0 made this NaN for p = 2.
    torch.manual_seed(0)
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    x[:, 1] = 0.0
    x.requires_grad_(True)
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    g = torch.randn(5, 3, 2, dtype=torch.float64)
    eps = 1e-3
    (lp_norm(x, None, None, w, None, True, eps=eps, p=p) * g).sum().backward()
    assert torch.isfinite(x.grad).all()
    g1 = g[:, 1]
    torch.testing.assert_close(x.grad[:, 1], 2.0 * (g1 - g1.mean()) / eps)


LAYOUTS = {  # inputs whose BN output torch makes contiguous (or channels_last for 4-D)
    "nlc_transposed": lambda: torch.randn(4, 7, 5).transpose(1, 2),
    "transposed_2d": lambda: torch.randn(5, 8).t(),
    "permuted": lambda: torch.randn(2, 6, 5, 7).permute(0, 2, 1, 3),
    "channels_last": lambda: torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lp_norm_output_strides_are_bns(layout, train):
    # Elementwise ops keep a permuted input's strides; BN returns torch's layout, which a
    # following .view() relies on.
    x = LAYOUTS[layout]()
    y_bn = BatchNorm(5).train(train)(x)
    y = LpNorm(5).train(train)(x)
    assert y.stride() == y_bn.stride()
    if y.is_contiguous():
        y.view(y.shape[0], -1)

