"""bnlab.functional.batch_norm against torch.nn.functional.batch_norm over the edge-case table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import functional as F
from conftest import SHAPES


def _args(shape, dtype, affine):
    c = shape[1]
    rm, rv = torch.randn(c, dtype=torch.float32).to(dtype), torch.rand(c).to(dtype) + 0.5
    w = torch.rand(c, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(c, dtype=dtype) if affine else None
    return rm, rv, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0])
def test_matches_torch_float64(shape, training, affine, momentum):
    x = torch.randn(shape, dtype=torch.float64) * 3 + 2
    rm, rv, w, b = _args(shape, torch.float64, affine)
    rm2, rv2 = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)
    ref = TF.batch_norm(x, rm2, rv2, w, b, training, momentum, 1e-5)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rm, rm2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rv, rv2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(6, 4, 5, 7), (3, 5, 2, 4, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_matches_and_keeps_layout(shape, training):
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.randn(shape).contiguous(memory_format=fmt)
    rm, rv, w, b = _args(shape, torch.float32, True)
    y = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    ref = TF.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=fmt)


def test_no_buffers_in_training_uses_batch_stats():
    x = torch.randn(16, 3, 4, dtype=torch.float64)
    y = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y, TF.batch_norm(x, None, None, training=True))


def test_empty_batch_in_eval():
    x = torch.randn(0, 3, 4, 4)
    rm, rv, w, b = _args(x.shape, torch.float32, True)
    y = F.batch_norm(x, rm, rv, w, b, training=False)
    assert y.shape == x.shape


def test_bfloat16_matches_float32_statistics():
    x32 = torch.randn(32, 4, 8, 8) * 2 + 5
    x = x32.to(torch.bfloat16)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert y.dtype == torch.bfloat16
    # statistics are computed in float32 from the bf16 values, running buffers stay float32
    xf = x.float()
    torch.testing.assert_close(rm, xf.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, xf.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-5)
    ref = TF.batch_norm(xf, None, None, training=True)
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=2e-2)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6), c=st.integers(1, 5), spatial=st.lists(st.integers(1, 5), max_size=3),
    training=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
    offset=st.sampled_from([0.0, 100.0]),
)
def test_property_matches_torch(n, c, spatial, training, dtype, offset):
    shape = (n, c, *spatial)
    if training and n * int(torch.tensor(spatial).prod()) < 2:
        n = 2
        shape = (n, c, *spatial)
    x = torch.randn(shape, dtype=dtype) + offset
    rm, rv, w, b = _args(shape, dtype, True)
    rm2, rv2 = rm.clone(), rv.clone()
    y = F.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
    ref = TF.batch_norm(x, rm2, rv2, w, b, training, 0.3, 1e-3)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, rv2, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_a_tensor_momentum_is_checked_like_a_number(layout):
    """A 0-d tensor momentum (the layers' 1/n) in [0, 1] works on the kernels' path and the
    reference path alike; anything else is an error naming momentum (a tensor of 5.0 moved the
    running statistics outside the segment between them and the batch's)."""
    x = torch.randn(4, 3, 2, 2)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm, rv, training=True, momentum=torch.tensor(1.0))
    torch.testing.assert_close(rm, x.mean((0, 2, 3)))
    for bad, match in [(torch.tensor(5.0), r"in \[0, 1\], got 5.0"),
                       (torch.tensor(-0.5, dtype=torch.float64), r"in \[0, 1\], got -0.5"),
                       (torch.full((3,), 0.5), r"a number in \[0, 1\] or a 0-d floating-point "
                        r"tensor, got a tensor of shape \(3,\) and dtype torch.float32"),
                       (torch.tensor(1), r"a number .* dtype torch.int64")]:
        with pytest.raises(ValueError, match=f"batch_norm: momentum must be {match}"):
            F.batch_norm(x, rm, rv, training=True, momentum=bad)
    torch.testing.assert_close(rm, x.mean((0, 2, 3)))  # untouched by the rejected calls


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var", "weight", "bias"])
def test_integer_per_channel_tensors_are_refused_by_name(which: str, training: bool) -> None:
    # Training failed inside torch.lerp without naming the buffer; eval took them silently.
    args = {"running_mean": torch.zeros(3), "running_var": torch.ones(3),
            "weight": torch.ones(3), "bias": torch.zeros(3)}
    args[which] = args[which].long()
    with pytest.raises(TypeError, match=rf"{which} must be floating point, got dtype "
                       r"torch.int64"):
        F.batch_norm(torch.randn(4, 3), training=training, **args)
