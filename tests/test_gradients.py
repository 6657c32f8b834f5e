"""Finite-difference checks (float64) of the hand-written backward, and agreement with autograd."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnlab
from bnlab import _autograd
from bnlab import functional as F
from conftest import SHAPES


def _autograd_reference(x, w, b, eps):
    """Alg. 1 written with plain differentiable torch ops: autograd's own backward."""
    dims = F.reduce_dims(x)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)
    x_hat = (x - mu) / torch.sqrt(var + eps)
    return x_hat * F.channel_view(w, x) + F.channel_view(b, x)


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3), (2, 3, 2, 3), (2, 2, 2, 1, 2)])
def test_gradcheck_and_gradgradcheck(shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_gradcheck_eval_and_no_affine():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    assert gradcheck(lambda x: F.batch_norm(x, rm, rv, training=False), (x,))
    assert gradcheck(lambda x: F.batch_norm(x, None, None, training=True), (x,))
    assert gradgradcheck(lambda x: F.batch_norm(x, None, None, training=True), (x,))


@pytest.mark.parametrize("shape", SHAPES)
def test_hand_written_backward_equals_autograd(shape):
    if torch.tensor(shape).prod() // shape[1] < 2:
        pytest.skip("one value per channel")
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    y, _, _ = _autograd.BatchNormTrain.apply(x, w, b, 1e-5)
    ours = torch.autograd.grad(y, (x, w, b), g)
    ref = torch.autograd.grad(_autograd_reference(x, w, b, 1e-5), (x, w, b), g)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def test_layer_backward_matches_torch_layer():
    ours, ref = bnlab.BatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    ours(x).backward(g)
    ref(x2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)


def test_double_backward_gradient_penalty_matches_torch():
    """∂/∂θ ‖∂L/∂x‖² (a gradient penalty) goes through the hand-written backward twice."""
    results = []
    for cls in (bnlab.BatchNorm1d, torch.nn.BatchNorm1d):
        torch.manual_seed(1)
        bn = cls(3).double()
        x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
        loss = (bn(x) ** 3).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        (gw,) = torch.autograd.grad((gx**2).sum(), bn.weight)
        results.append(gw)
    torch.testing.assert_close(*results)


def test_float32_gradients_close_to_torch():
    x = torch.randn(16, 8, 7, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn_like(x)
    F.batch_norm(x, None, None, training=True).backward(g)
    torch.nn.functional.batch_norm(x2, None, None, training=True).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_torch_func_grad_in_training_mode_matches_torch():
    """torch.func transforms need the forward/setup_context form of the autograd.Function.
    (With running statistics, training mode mutates buffers, which torch.func forbids for
    torch's own BN as well.)"""
    from torch.func import functional_call, grad

    x = torch.randn(8, 3, dtype=torch.float64)
    grads = []
    for cls in (bnlab.BatchNorm1d, torch.nn.BatchNorm1d):
        bn = cls(3, track_running_stats=False).double()
        params = dict(bn.named_parameters())
        grads.append(grad(lambda p, bn=bn: (functional_call(bn, p, (x,)) ** 3).sum())(params))
    torch.testing.assert_close(grads[0], grads[1])
