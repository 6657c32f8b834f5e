"""Numerics: no catastrophic cancellation, half-precision statistics, non-finite batches."""

from __future__ import annotations

import warnings

import pytest
import torch

import bnlab
from bnlab import functional as F


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_mean_variance_is_accurate_in_float32(offset):
    """1e4 + N(0, 1) in float32: E[x²] − E[x]² loses most digits; the variance keeps 1e-3."""
    x = (torch.randn(4096, 3, dtype=torch.float64) + offset).float()
    _, var = F.batch_stats(x)
    exact = x.double().var(0, unbiased=False)  # exact variance of the float32 values
    rel = ((var.double() - exact).abs() / exact).max().item()
    assert rel < 1e-3
    naive = (x * x).mean(0) - x.mean(0) ** 2  # the one-pass formula the library never uses
    assert ((naive.double() - exact).abs() / exact).max().item() > 100 * rel
    # Normalized output: unit variance. Its mean is zero up to the float32 rounding of μ_B
    # itself (half a ULP of the offset: 5e-4 at 1e4, 3e-2 at 1e6).
    y = F.batch_norm(x, None, None, training=True).double()
    assert y.var(0, unbiased=False).sub(1).abs().max() < 1e-3
    assert y.mean(0).abs().max() < torch.finfo(torch.float32).eps * offset


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_gives_half_output_and_float32_statistics(dtype):
    bn = bnlab.BatchNorm2d(3)  # float32 parameters and buffers, as under autocast
    x = (torch.randn(8, 3, 4, 4) * 50 + 300).to(dtype)
    y = bn(x)
    assert y.dtype == dtype
    assert bn.running_mean.dtype == torch.float32
    xf = x.float()
    torch.testing.assert_close(bn.running_mean, 0.9 * 0 + 0.1 * xf.mean((0, 2, 3)))
    assert torch.isfinite(y).all()


def test_nonfinite_batch_leaves_running_stats_untouched_and_warns_once():
    bn = bnlab.BatchNorm1d(2)
    bn(torch.randn(8, 2))
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    bad = torch.randn(8, 2)
    bad[3, 1] = float("inf")
    F._warned_nonfinite = False
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        bn(bad)
        bad[0, 0] = float("nan")
        bn(bad)
    assert sum("non-finite batch statistics" in str(x.message) for x in w) == 1
    torch.testing.assert_close(bn.running_mean, before[0])
    torch.testing.assert_close(bn.running_var, before[1])
    assert bn.num_batches_tracked.item() == before[2].item()
    assert bn.num_nonfinite_batches.item() == 2
    bn(torch.randn(8, 2))  # a good batch updates again
    assert bn.num_batches_tracked.item() == 2
    assert not torch.equal(bn.running_mean, before[0])
    assert "num_nonfinite_batches" not in bn.state_dict()


def test_constant_channel_is_finite():
    x = torch.full((16, 2, 3, 3), 1e7)
    y = F.batch_norm(x, None, None, training=True)
    assert torch.isfinite(y).all() and y.abs().max() == 0


def _bad_batch() -> torch.Tensor:
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = float("nan")
    return x


_NONFINITE_CALLS = {
    "layer": lambda x: bnlab.BatchNorm2d(3)(x),
    "functional": lambda x: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True),
    "fused": lambda x: bnlab.kernels.bn_relu(x, torch.zeros(3), torch.ones(3), training=True),
    "fused layer": lambda x: bnlab.BatchNormReLU2d(3)(x),
    "renorm": lambda x: bnlab.BatchRenorm2d(3)(x),
    "ghost": lambda x: bnlab.GhostBatchNorm(3, virtual_batch_size=2)(x),
}


@pytest.mark.parametrize("reference", [False, True], ids=["kernels", "reference"])
@pytest.mark.parametrize("call", list(_NONFINITE_CALLS))
def test_nonfinite_warning_points_at_the_users_line(call, reference, monkeypatch):
    """The warning names the line that called bnlab (here, the lambda in this file), not
    bnlab's or torch's internals, whatever the depth of the path that raised it."""
    if reference:
        monkeypatch.setenv("BNLAB_FORCE_REFERENCE", "1")
    monkeypatch.setattr(F, "_warned_nonfinite", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _NONFINITE_CALLS[call](_bad_batch())
    (w,) = [w for w in seen if "non-finite batch statistics" in str(w.message)]
    assert w.filename == __file__, (w.filename, w.lineno)
