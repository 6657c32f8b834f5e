"""NoisyBatchNorm / ActivationNoise (Santurkar et al. 2018, Alg. 1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.convert import fold
from bnlab.layers import BatchNorm
from bnlab.variants import (
    ActivationNoise,
    FrozenBatchNorm,
    NoisyBatchNorm,
    activation_noise,
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


def test_activation_noise_checks_its_input():
    with pytest.raises(TypeError, match=r"floating point, got dtype torch\.int64"):
        activation_noise(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"a must be a torch\.Tensor, got list"):
        activation_noise([[1.0, 2.0]])  # type: ignore[arg-type]
