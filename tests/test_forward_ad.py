"""Forward-mode AD (`torch.autograd.forward_ad`, `torch.func.jvp`) through bnlab's BN: the
tangent of Alg. 1's transform against torch's and finite differences, forward over reverse
(Hessian-vector products), and, for every exported module, the adjoint identity
⟨J·t, u⟩ = ⟨t, Jᵀ·u⟩ between the forward-mode tangent and the backward's gradient."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.autograd import gradcheck
from torch.func import grad, jvp

from _modules import MODULES
from bnlab import functional as F
from bnlab import kernels

CASES = [((8, 5), False), ((4, 3, 5), False), ((4, 3, 5, 6), False), ((4, 3, 5, 6), True),
         ((2, 3, 3, 4, 5), False)]


def _inputs(shape, channels_last, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 3 + 100  # a large mean, as the kernels'
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    b = torch.randn(c, generator=gen, dtype=dtype)
    tangents = [torch.randn(t.shape, generator=gen, dtype=dtype) for t in (x, w, b)]
    return (x, w, b), tangents


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "channels_last"), CASES)
def test_tangent_and_running_stats_match_torch(shape, channels_last, dtype, training):
    (x, w, b), (tx, tw, tb) = _inputs(shape, channels_last, dtype)
    c = shape[1]
    rm, rv = torch.randn(c, dtype=dtype) + 100, torch.rand(c, dtype=dtype) + 5
    bufs = {k: (rm.clone(), rv.clone()) for k in ("ours", "torch")}
    out = {}
    with fwAD.dual_level():
        dual = [fwAD.make_dual(p, t) for p, t in ((x, tx), (w, tw), (b, tb))]
        for k, bn in (("ours", F.batch_norm), ("torch", torch.nn.functional.batch_norm)):
            out[k] = fwAD.unpack_dual(bn(dual[0], *bufs[k], *dual[1:], training, 0.1, 1e-5))
        for buf in bufs["ours"]:  # the running statistics never carry a tangent
            assert fwAD.unpack_dual(buf).tangent is None
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    torch.testing.assert_close(out["ours"].primal, out["torch"].primal, **tol)
    torch.testing.assert_close(out["ours"].tangent, out["torch"].tangent, **tol)
    for ours, ref in zip(bufs["ours"], bufs["torch"]):
        torch.testing.assert_close(ours, ref, **tol)


@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3), (2, 3, 2, 3)])
def test_forward_ad_against_finite_differences(shape):
    (x, w, b), _ = _inputs(shape, False, torch.float64)
    args = tuple(t.clone().requires_grad_() for t in (x, w, b))
    rm, rv = torch.randn(shape[1], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64)

    def train(x, w, b):
        return F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)

    def infer(x, w, b):
        return F.batch_norm(x, rm, rv + 0.1, w, b, training=False)

    for f in (train, infer):
        assert gradcheck(f, args, check_forward_ad=True, check_backward_ad=False)


def test_torch_func_jvp_and_forward_over_reverse_match_torch():
    (x, w, b), (tx, tw, tb) = _inputs((6, 4, 3), False, torch.float64)

    def bn_of(impl):
        return lambda x, w, b: impl(x, None, None, w, b, True, 0.1, 1e-5)

    ours = jvp(bn_of(F.batch_norm), (x, w, b), (tx, tw, tb))
    ref = jvp(bn_of(torch.nn.functional.batch_norm), (x, w, b), (tx, tw, tb))
    torch.testing.assert_close(ours, ref)

    # A Hessian-vector product, forward over reverse, of a loss through BN.
    def loss_of(impl):
        return lambda x: (bn_of(impl)(x, w, b) ** 3).sum()

    hvp = jvp(grad(loss_of(F.batch_norm)), (x,), (tx,))[1]
    hvp_ref = jvp(grad(loss_of(torch.nn.functional.batch_norm)), (x,), (tx,))[1]
    torch.testing.assert_close(hvp, hvp_ref)


@pytest.mark.skipif(not kernels.available(), reason="bnlab CPU kernels not built here")
def test_forward_ad_takes_the_reference_path():
    """The C++ autograd node has no jvp (torch's C++ custom-Function API offers none), so inside
    a dual level the kernels step aside; outside they are used again."""
    x = torch.randn(4, 3)
    assert kernels.supports(x)
    with fwAD.dual_level():
        assert not kernels.supports(x)
    assert kernels.supports(x)


def _shape(rank: int) -> tuple[int, ...]:
    return (6, 4, 3, 5, 2)[:rank]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_forward_tangent_is_adjoint_to_its_backward(name, training):
    """⟨J·t, u⟩ = ⟨t, Jᵀ·u⟩ for the module's Jacobian J in x: forward mode (reference path)
    against the backward (the kernels', on CPU float32). Renorm's r, d and the noise are
    constants in both modes, so this holds where a finite difference would not."""
    make, rank = MODULES[name]
    torch.manual_seed(0)
    module = make()
    x = torch.randn(_shape(rank)) * 2 + 1
    module(x)  # materialize lazy modules; non-trivial running statistics for eval
    module.train(training)
    t, u = torch.randn_like(x), torch.randn_like(x)
    fwd, bwd = copy.deepcopy(module), copy.deepcopy(module)
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(fwd(fwAD.make_dual(x, t)))
        for buf in fwd.buffers():
            assert fwAD.unpack_dual(buf).tangent is None
    xr = x.clone().requires_grad_()
    y = bwd(xr)
    (gx,) = torch.autograd.grad(y, xr, u)
    torch.testing.assert_close(primal, y.detach(), rtol=1e-5, atol=1e-5)
    lhs, rhs = (tangent.double() * u).sum(), (t.double() * gx).sum()
    assert torch.isclose(lhs, rhs, rtol=1e-4, atol=1e-4), (float(lhs), float(rhs))
    for a, b in zip(fwd.buffers(), bwd.buffers()):
        torch.testing.assert_close(a, b)
