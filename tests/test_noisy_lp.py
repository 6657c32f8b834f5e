"""NoisyBatchNorm / ActivationNoise (Santurkar et al. 2018, Alg. 1) and LpNorm (Sec. 3.3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bnlab.convert import fold
from bnlab.layers import BatchNorm
from bnlab.variants import (
    ActivationNoise,
    FrozenBatchNorm,
    LpNorm,
    NoisyBatchNorm,
    activation_noise,
    lp_norm,
    noise_rows,
)

# ----------------------------------------------------------------------------- noisy BN


def _draw_mu_sigma(steps: int, channels: int, n: int, **kw) -> tuple[torch.Tensor, ...]:
    """Per step and channel, estimate (μ_j, σ_j) from inputs 0 (-> m) and 1 (-> s + m)."""
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.zeros(n, channels), torch.ones(n, channels)]).double()
    mus, sigmas, resid0, resid1 = [], [], [], []
    for _ in range(steps):
        out = activation_noise(a, generator=g, **kw)
        m, sm = out[:n], out[n:]  # (n, C) each
        mus.append(m.mean(0))
        sigmas.append((sm - m).mean(0))
        resid0.append(m - m.mean(0))
        resid1.append(sm - sm.mean(0))
    return torch.stack(mus), torch.stack(sigmas), torch.cat(resid0), torch.cat(resid1)


def test_noise_moments_match_algorithm_1():
    n_mu, n_sigma, r_mu, r_sigma = 0.5, 1.25, 0.1, 0.1
    mu, sigma, res0, res1 = _draw_mu_sigma(200, 32, 200)
    # Per-channel draws: μ ~ U(−n_μ, n_μ), σ ~ U(1, n_σ). 6400 draws -> ~1% relative error.
    assert abs(mu.mean()) < 0.02
    assert math.isclose(mu.var().item(), n_mu**2 / 3, rel_tol=0.06)
    assert mu.abs().max() < n_mu + 0.03  # + the estimation error of each μ_j
    assert math.isclose(sigma.mean().item(), (1 + n_sigma) / 2, rel_tol=0.01)
    assert math.isclose(sigma.var().item(), (n_sigma - 1) ** 2 / 12, rel_tol=0.08)
    assert sigma.min() > 1 - 0.05 and sigma.max() < n_sigma + 0.05
    # Per-element draws: m ~ U(μ ± r_μ): var r_μ²/3 and support of width 2 r_μ;
    # s·1 + m has var r_σ² + r_μ²/3 (r_σ is a std).
    assert math.isclose(res0.var().item(), r_mu**2 / 3, rel_tol=0.01)
    assert res0.abs().max() <= 2 * r_mu
    assert math.isclose(res1.var().item(), r_sigma**2 + r_mu**2 / 3, rel_tol=0.01)


def test_noise_shared_per_channel_over_batch_and_space():
    # With r_μ = r_σ = 0 every element of a channel gets the same affine map σ_j·a + μ_j.
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    out = activation_noise(a, r_mu=0.0, r_sigma=0.0, generator=g)
    a2 = a.transpose(0, 1).reshape(5, -1)  # (N, C, H, W) -> (C, N·H·W)
    o2 = out.transpose(0, 1).reshape(5, -1)
    slope = (o2[:, 1:] - o2[:, :1]) / (a2[:, 1:] - a2[:, :1])
    torch.testing.assert_close(slope, slope[:, :1].expand_as(slope))
    assert slope[:, 0].unique().numel() == 5  # a different σ_j per channel
    assert ((slope >= 1) & (slope <= 1.25)).all()
    # With a = 0 each channel lies in one interval [μ_j − r_μ, μ_j + r_μ].
    zero = activation_noise(torch.zeros(8, 5, 3, 3), generator=g).transpose(0, 1).reshape(5, -1)
    assert (zero.amax(1) - zero.amin(1) <= 0.2 + 1e-6).all()


def test_gradient_is_the_multiplicative_noise():
    a = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = activation_noise(a, generator=torch.Generator().manual_seed(1))
    out2 = activation_noise(2 * a.detach(), generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out.sum(), a)
    torch.testing.assert_close(grad, (out2 - out.detach()) / a.detach())  # s = ∂a'/∂a


def test_noisy_bn_is_bn_plus_noise_and_its_expectation_in_eval():
    torch.manual_seed(0)
    noisy, bn = NoisyBatchNorm(4, seed=7), BatchNorm(4)
    x = torch.randn(16, 4, 5, 5) * 3 + 1
    y = noisy(x)
    ref = bn(x)
    assert not torch.allclose(y, ref, atol=1e-2)
    # Running statistics are those of the clean input.
    torch.testing.assert_close(noisy.running_mean, bn.running_mean)
    torch.testing.assert_close(noisy.running_var, bn.running_var)
    noisy.eval()
    bn.eval()
    # E[s·a + m] = a·(1 + n_σ)/2: the mean over many training-mode draws of the noise alone
    torch.testing.assert_close(noisy(x), bn(x) * 1.125)
    torch.testing.assert_close(noisy(x), noisy(x))  # deterministic
    a = bn(x)
    draws = torch.stack([noisy.noise.train()(a) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(draws, noisy.noise.eval()(a), rtol=0, atol=0.05)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), noisy).eval()
    torch.testing.assert_close(fold(model)(x), model(x))  # the fold keeps the factor E[s]
    frozen = FrozenBatchNorm.from_batchnorm(noisy)  # and so does a frozen copy
    torch.testing.assert_close(frozen(x), noisy(x))
    # Degenerate noise (μ = 0, σ = 1, r = 0) is exactly BN.
    ident = NoisyBatchNorm(4, n_mu=0.0, n_sigma=1.0, r_mu=0.0, r_sigma=0.0)
    torch.testing.assert_close(ident.train()(x), BatchNorm(4)(x))


def test_noise_seeded_and_fresh_each_step():
    x = torch.randn(8, 3)
    a, b, c = ActivationNoise(3, seed=5), ActivationNoise(3, seed=5), ActivationNoise(3, seed=6)
    ya, yb, yc = a(x), b(x), c(x)
    torch.testing.assert_close(ya, yb)
    assert not torch.allclose(ya, yc)
    assert not torch.allclose(a(x), ya)  # a new D_j^t at every step
    torch.manual_seed(1)
    d = ActivationNoise(3)
    torch.manual_seed(1)
    e = ActivationNoise(3)
    assert d.seed == e.seed  # seed=None is reproducible under torch.manual_seed
    assert torch.equal(ActivationNoise(3, seed=1).eval()(x), x * 1.125)  # E[s]·x


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("sizes", [(3, 4), (0, 7), (7, 0), (2, 2, 3)])
def test_shards_with_rows_get_one_calls_noise(sizes, fmt):
    """Shards drawing with equal generators and ``rows`` (a data-parallel batch) together get
    exactly the noise of one call on the whole batch, and their generators stay equal."""
    x = torch.randn(7, 3, 4, 5).contiguous(memory_format=fmt)
    whole = ActivationNoise(3, seed=9)
    shards = [ActivationNoise(3, seed=9) for _ in sizes]
    for _ in range(2):  # the second step: the generators moved on alike
        want = whole(x)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        got = torch.cat([m(x[a:a + n], rows=(a, 7)) for m, a, n in zip(shards, starts, sizes)])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(torch.equal(m.generator.get_state(), whole.generator.get_state()) for m in shards)


def test_noise_rows_context_gives_every_noise_module_its_rows():
    """`noise_rows` is `rows=` for every noise module called inside it (NoisyBatchNorm's too),
    and only inside it."""
    x = torch.randn(5, 3, 2)
    want = ActivationNoise(3, seed=4)(x)
    top, bottom = NoisyBatchNorm(3, seed=4), NoisyBatchNorm(3, seed=4)
    with noise_rows(0, 5):
        top(x[:2])
    with noise_rows(2, 5):
        bottom(x[2:])
    assert torch.equal(top.noise.generator.get_state(), bottom.noise.generator.get_state())
    parts = []
    for (offset, n), m in zip(((0, 2), (2, 3)), (ActivationNoise(3, seed=4),
                                                 ActivationNoise(3, seed=4))):
        with noise_rows(offset, 5):
            parts.append(m(x[offset:offset + n]))
    assert torch.equal(torch.cat(parts), want)
    first = ActivationNoise(3, seed=4)(x[:2])  # no rows left set: a batch of 2 rows
    assert torch.equal(first, ActivationNoise(3, seed=4)(x[:2]))
    assert not torch.equal(first, want[:2])
    with pytest.raises(ValueError, match="rows must be"), noise_rows(4, 5):
        ActivationNoise(3, seed=4)(x[:2])  # 2 rows from offset 4 overrun 5
    with pytest.raises(ValueError, match="rows must be"):
        noise_rows(6, 5).__enter__()
    with pytest.raises(ValueError, match="both offset and total or neither, got offset=3"):
        noise_rows(3).__enter__()
    with noise_rows(), noise_rows():  # every input a whole batch (nested: still)
        assert torch.equal(ActivationNoise(3, seed=4)(x), want)


@pytest.mark.parametrize("rows", [(1, 3), (-1, 5), (0, 2.5), [0, 5], (0,)])
def test_activation_noise_rows_must_hold_the_input(rows):
    with pytest.raises(ValueError, match=r"rows must be \(offset, total\).*N = 3"):
        activation_noise(torch.randn(3, 2), rows=rows)


def test_torch_state_dict_loads_into_noisy_bn():
    ref = nn.BatchNorm2d(3)
    ref(torch.randn(4, 3, 2, 2))
    noisy = NoisyBatchNorm(3, seed=0)
    noisy.load_state_dict(ref.state_dict())  # strict: same keys
    torch.testing.assert_close(noisy.running_var, ref.running_var)


@pytest.mark.parametrize(("arg", "value"), [("n_mu", -0.1), ("n_sigma", 0.5), ("r_mu", -1.0),
                                            ("r_sigma", float("nan")), ("seed", -3)])
def test_noise_bad_arguments(arg, value):
    with pytest.raises(ValueError, match=arg):
        NoisyBatchNorm(3, **{arg: value})


def test_activation_noise_checks_channels():
    with pytest.raises(ValueError, match=r"\(N, 3, \*\)"):
        ActivationNoise(3)(torch.randn(2, 4))


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


def test_activation_noise_checks_its_input():
    with pytest.raises(TypeError, match=r"floating point, got dtype torch\.int64"):
        activation_noise(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"a must be a torch\.Tensor, got list"):
        activation_noise([[1.0, 2.0]])  # type: ignore[arg-type]
