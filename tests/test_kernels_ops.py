"""How the CPU kernels plug into PyTorch: the ops' schemas, fake kernels and autograd
(`torch.library.opcheck`), double backward through the reference formula, torch.compile, the
dispatch from bnlab's layers (and `BNLAB_FORCE_REFERENCE`), and the no-grad speed path's
buffer versions."""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import kernels
from test_kernels import RTOL, reference_train, rel_err

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="bnlab CPU kernels could not be built here")


def test_double_backward_falls_back_to_reference_formula() -> None:
    x = torch.randn(6, 4, 3, 3, requires_grad=True)
    w = (torch.rand(4) + 0.5).requires_grad_(True)
    v, u = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)

    def hvp(fn):  # type: ignore[no-untyped-def]
        y = fn(x, w, None, 1e-5)[0]
        (gx,) = torch.autograd.grad((y * v).pow(2).sum(), x, create_graph=True)
        # (gx · u), not gx.sum(): Σ_i ∂ℓ/∂x_i ≡ 0 for BN (shift invariance), a vacuous check
        return torch.autograd.grad((gx * u).sum(), (x, w))

    for got, want in zip(hvp(kernels.batch_norm_train), hvp(reference_train), strict=True):
        assert rel_err(got, want) <= 1e-4


def test_layers_use_kernels_on_cpu_and_env_forces_reference(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    layer = bnlab.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    assert kernels.supports(x)
    assert "BatchNormTrain" not in type(layer(x).grad_fn).__name__
    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", "1")
    assert not kernels.supports(x)
    assert "BatchNormTrain" in type(layer(x).grad_fn).__name__


def test_no_grad_calls_skip_autograd_but_bump_buffer_versions() -> None:
    """Without anything to differentiate the ops bypass the autograd Function (a speed path);
    outputs then carry no graph, and the in-place running update still bumps the buffers'
    version counters. An eval graph saves copies of the running statistics, so its backward
    after a training forward uses what its forward saw, as the reference path does."""
    layer = bnlab.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    before = layer.running_mean._version
    y = layer(x)
    assert y.grad_fn is None and not y.requires_grad
    assert layer.running_mean._version > before
    layer.weight.requires_grad_(True)
    before = layer.running_mean._version
    assert layer(x).requires_grad and layer.running_mean._version > before  # grad path too
    layer.eval()
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    saved = layer(xg)  # eval forward saves copies of running_mean/var for its backward
    want = (g * layer.weight.detach().view(1, 3, 1, 1)
            / torch.sqrt(layer.running_var + layer.eps).view(1, 3, 1, 1))
    layer.train()
    with torch.no_grad():
        layer(x * 3 + 1)  # moves the running statistics in place
    saved.backward(g)
    torch.testing.assert_close(xg.grad, want)  # (it raised "modified by an inplace operation")


def test_supports_only_cpu_float32_bfloat16() -> None:
    assert not kernels.supports(torch.randn(4, 3, dtype=torch.float64))
    assert not kernels.supports(torch.randn(4, 3).half())
    assert not kernels.supports(torch.empty(4, 3, device="meta"))
    assert not kernels.supports(torch.randn(4))
    assert kernels.supports(torch.randn(4, 3).bfloat16())


# The layouts the kernels take as they are (contiguous, channels_last) or copy (others): the
# fake kernels' outputs must have the real ones' strides, or torch.compile's checks fail.
_LAYOUTS = {
    "nchw": lambda: torch.randn(4, 6, 3, 3),
    "channels_last": lambda: torch.randn(4, 6, 3, 3).to(memory_format=torch.channels_last),
    "cnhw": lambda: torch.randn(6, 4, 3, 3).transpose(0, 1),
    "hw_swapped": lambda: torch.randn(4, 6, 3, 3).transpose(2, 3),
    "nlc_sequence": lambda: torch.randn(4, 9, 6).transpose(1, 2),  # bn(x.transpose(1, 2))
    "channels_last_crop": lambda: torch.randn(4, 6, 5, 5).to(
        memory_format=torch.channels_last)[:, :, 1:-1, 1:-1],  # copied to channels_last
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_opcheck_schemas_fake_kernels_and_autograd(layout: str) -> None:
    x = _LAYOUTS[layout]().requires_grad_(True)
    w = torch.rand(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    z = torch.randn_like(x, requires_grad=True)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    ops = torch.ops.bnlab
    torch.library.opcheck(ops.bn_train_fwd, (x, w, b, 1e-5, None, False, False))
    torch.library.opcheck(ops.bn_train_fwd, (x, w, b, 1e-5, z, True, True))
    torch.library.opcheck(ops.bn_eval_fwd, (x, rm, rv, w, b, 1e-5, None, True, True))
    _y, mean, var, mask = ops.bn_train_fwd(x, w, b, 1e-5, None, True, True)
    torch.library.opcheck(ops.bn_bwd, (torch.randn_like(x), x.detach(), mean, var, w.detach(),
                                       1e-5, mask, True, True, True))
    torch.library.opcheck(ops.bn_train_fwd_update,
                          (x, w, b, 1e-5, rm.clone(), rv.clone(), x[:, 0].numel(), 0.1, None))
    torch.library.opcheck(ops.bn_update_running,
                          (rm.clone(), rv.clone(), mean, var, 36, 0.0, torch.tensor(0.5)))


def test_torch_compile_traces_the_ops() -> None:
    layer = bnlab.BatchNorm2d(5)
    x = torch.randn(4, 5, 6, 6, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    v = torch.randn(4, 5, 6, 6)
    y = compiled(x)
    (dx,) = torch.autograd.grad((y * v).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    y2, _, _ = reference_train(x2, layer.weight, layer.bias, layer.eps)
    (dx2,) = torch.autograd.grad((y2 * v).sum(), x2)
    assert rel_err(y, y2) <= RTOL and rel_err(dx, dx2) <= RTOL
    assert layer.num_batches_tracked.item() == 1
