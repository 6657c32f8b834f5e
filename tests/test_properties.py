"""The papers' mathematical properties of BN (Ioffe & Szegedy 2015, Sec. 3 and 3.3)."""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import functional as F


@pytest.mark.parametrize("shape", [(64, 5), (16, 3, 9), (8, 4, 6, 6), (4, 2, 3, 4, 5)])
def test_training_output_has_zero_mean_unit_variance(shape):
    x = torch.randn(shape, dtype=torch.float64) * 7 - 3
    y = F.batch_norm(x, None, None, training=True, eps=1e-5)
    dims = F.reduce_dims(x)
    torch.testing.assert_close(y.mean(dims), torch.zeros(shape[1], dtype=torch.float64),
                               atol=1e-12, rtol=0)
    var = y.var(dims, unbiased=False)
    # (1/m) Σ x̂² = σ²/(σ² + ε): 1 up to the ε term
    expected = x.var(dims, unbiased=False) / (x.var(dims, unbiased=False) + 1e-5)
    torch.testing.assert_close(var, expected, atol=1e-12, rtol=1e-10)


def test_identity_recovered_with_gamma_sqrt_var_beta_mean():
    """γ = √(Var + ε), β = E[x] makes BN the identity (Sec. 3)."""
    x = torch.randn(32, 4, 5, dtype=torch.float64) * 3 + 2
    var, mean = torch.var_mean(x, dim=(0, 2), correction=0)
    y = F.batch_norm(x, None, None, torch.sqrt(var + 1e-5), mean, training=True, eps=1e-5)
    torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("a", [0.01, 3.0, 250.0])
def test_scale_invariance_and_jacobian_scaling(a):
    """BN((aW)u) = BN(Wu) and ∂BN((aW)u)/∂(aW) = (1/a)·∂BN(Wu)/∂W (Sec. 3.3)."""
    u = torch.randn(20, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    g = torch.randn(20, 4, dtype=torch.float64)

    def out_and_grad(weight):
        weight = weight.clone().requires_grad_()
        y = F.batch_norm(u @ weight.T, None, None, training=True, eps=1e-12)
        (gw,) = torch.autograd.grad(y, weight, g)
        return y, gw

    y1, g1 = out_and_grad(w)
    y2, g2 = out_and_grad(a * w)
    torch.testing.assert_close(y2, y1, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(g2, g1 / a, rtol=1e-6, atol=1e-10)
    # and the layer Jacobian w.r.t. u is unchanged
    u1 = u.clone().requires_grad_()
    u2 = u.clone().requires_grad_()
    (gu1,) = torch.autograd.grad(F.batch_norm(u1 @ w.T, None, None, training=True, eps=1e-12),
                                 u1, g)
    (gu2,) = torch.autograd.grad(F.batch_norm(u2 @ (a * w).T, None, None, training=True,
                                              eps=1e-12), u2, g)
    torch.testing.assert_close(gu2, gu1, rtol=1e-6, atol=1e-10)


def test_bias_before_bn_has_no_effect_and_no_gradient():
    """Sec. 3.2: the bias b of Wu + b is cancelled by the mean subtraction."""
    x = torch.randn(10, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = F.batch_norm(x + b, None, None, training=True)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True))
    (gb,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), b)
    torch.testing.assert_close(gb, torch.zeros_like(gb), atol=1e-12, rtol=0)


def test_eval_output_depends_only_on_buffers():
    bn = bnlab.BatchNorm2d(3)
    for _ in range(3):
        bn(torch.randn(8, 3, 4, 4) * 2 + 1)
    bn.eval()
    x = torch.randn(8, 3, 4, 4)
    y = bn(x)
    # per example: the same output whatever the rest of the batch is
    torch.testing.assert_close(bn(x[:1]), y[:1])
    perm = torch.randperm(8)
    torch.testing.assert_close(bn(x[perm]), y[perm])
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    ref = (x - bn.running_mean.view(1, -1, 1, 1)) * s.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, ref)


def test_running_average_closed_form_after_two_steps():
    bn = bnlab.BatchNorm1d(2, momentum=0.25).double()
    x1, x2 = torch.randn(5, 2, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    bn(x1)
    bn(x2)
    m = 0.25
    mean = (1 - m) * ((1 - m) * 0 + m * x1.mean(0)) + m * x2.mean(0)
    var = (1 - m) * ((1 - m) * 1 + m * x1.var(0)) + m * x2.var(0)  # unbiased stored
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)


def test_momentum_none_is_cumulative_average():
    bn = bnlab.BatchNorm1d(2, momentum=None).double()
    xs = [torch.randn(6, 2, dtype=torch.float64) for _ in range(5)]
    for x in xs:
        bn(x)
    torch.testing.assert_close(bn.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([x.var(0) for x in xs]).mean(0))
