"""Fused BN+ReLU and BN+add+ReLU (`bnlab.kernels.bn_relu`, `bn_add_relu`) against the
composition of the reference ops: outputs, gradients (via the saved ReLU mask) and running
statistics."""

from __future__ import annotations

import pytest
import torch

from bnlab import functional as F
from bnlab import kernels

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="bnlab CPU kernels could not be built here")


def rel_err(a: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    a, ref = a.double(), ref.double()
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), scale, 1e-30)


def make(shape, fmt, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


SHAPES = [(4, 6, 5, 7), (32, 3, 4, 4), (16, 33), (2, 20, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_matches_composition(shape, fmt, training, residual, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if fmt == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs rank 4")
    c = shape[1]
    x = make(shape, fmt)
    z = make(shape, fmt, seed=1) if residual else None
    w = (torch.rand(c) + 0.5).requires_grad_(True)
    b = torch.randn(c).requires_grad_(True)
    g = torch.randn(shape)
    results = []
    for force in ("0", "1"):  # kernels, then the reference composition
        monkeypatch.setenv("BNLAB_FORCE_REFERENCE", force)
        rm, rv = torch.zeros(c), torch.ones(c)
        xi = x.clone().requires_grad_(True)
        zi = z.clone().requires_grad_(True) if z is not None else None
        if z is None:
            y = kernels.bn_relu(xi, rm, rv, w, b, training, 0.1, 1e-5)
        else:
            y = kernels.bn_add_relu(xi, zi, rm, rv, w, b, training, 0.1, 1e-5)
        leaves = [xi, w, b] + ([zi] if zi is not None else [])
        results.append((y, rm, rv, torch.autograd.grad(y, leaves, g)))
    (y, rm, rv, grads), (y_ref, rm_ref, rv_ref, grads_ref) = results
    assert (y >= 0).all()
    assert rel_err(y, y_ref) <= 1e-5
    torch.testing.assert_close(rm, rm_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-6, atol=1e-7)
    scale = float(g.abs().max() * 3)  # |γ·invstd·g| bound: γ < 1.5, σ ≈ 2
    for got, want in zip(grads, grads_ref, strict=True):
        assert rel_err(got, want, scale) <= 1e-5


def test_fused_without_grad_saves_no_mask_and_refuses_backward() -> None:
    x = torch.randn(4, 3, 5, 5)
    y, _, _, mask = torch.ops.bnlab.bn_train_fwd(x, None, None, 1e-5, None, True, False)
    assert mask.numel() == 0 and (y >= 0).all()
    xr = x.clone().requires_grad_(True)
    y, _, _, mask = torch.ops.bnlab.bn_train_fwd(xr, None, None, 1e-5, None, True, False)
    with pytest.raises(RuntimeError, match="save_mask"):
        y.sum().backward()


def test_relu_mask_marks_positive_outputs() -> None:
    x = torch.randn(8, 4, 6, 6)
    y, _, _, mask = torch.ops.bnlab.bn_train_fwd(x, None, None, 1e-5, None, True, True)
    assert mask.dtype == torch.uint8
    assert torch.equal(mask.bool(), y > 0)
    ref = torch.relu(F.batch_norm(x, None, None, training=True))
    assert rel_err(y, ref) <= 1e-5


def test_bad_residual_shape_names_argument() -> None:
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match="residual"):
        kernels.bn_add_relu(x, torch.randn(4, 3, 5, 4), None, None, training=True)
