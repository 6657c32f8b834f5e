"""The backward on a gradient that is a channel slice of a bigger NCHW tensor (what torch.cat's
backward hands a BN whose output was concatenated): read in place on the fused planar path,
copied on the split path, and in both cases equal to the results from a contiguous gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bnlab import kernels
from test_kernels import RTOL, SETTINGS, dx_scale, reference_train, rel_err

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="bnlab CPU kernels could not be built here")


@SETTINGS
@given(st.integers(2, 5), st.sampled_from([1, 3, 8, 17]), st.lists(st.integers(1, 9), max_size=3),
       st.integers(0, 3), st.integers(0, 3), st.booleans(),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_gradient_as_channel_slice_equals_contiguous_gradient(  # type: ignore[no-untyped-def]
        n, c, spatial, before, after, relu, dtype) -> None:
    """The gradient torch.cat's backward hands a BN whose output was concatenated is a channel
    slice of a bigger NCHW tensor. The backward reads it in place where it can; the results
    are bit-identical to those from a contiguous copy of it, with and without the ReLU mask."""
    gen = torch.Generator().manual_seed(n * 1000 + c * 10 + len(spatial))
    x = (torch.randn((n, c, *spatial), generator=gen) * 2 + 1).to(dtype)
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    big = torch.randn((n, before + c + after, *spatial), generator=gen).to(dtype)
    g = big[:, before:before + c]
    op = torch.ops.bnlab
    _, mean, var, mask = op.bn_train_fwd(x, w, b, 1e-5, None, relu, relu)
    m = mask if relu else None
    got = op.bn_bwd(g, x, mean, var, w, 1e-5, m, True, True, False)
    want = op.bn_bwd(g.contiguous(), x, mean, var, w, 1e-5, m, True, True, False)
    for a, e in zip(got[:3], want[:3], strict=True):
        assert torch.equal(a, e)


def test_gradient_channel_slice_on_the_split_path_is_copied_and_equal() -> None:
    """With 3 channels over 2 threads each channel is split over threads; that path reads a
    contiguous gradient, so a sliced one is copied first: same results either way."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        x = torch.randn(4, 3, 100, 100) * 2 + 1
        w, b = torch.rand(3) + 0.5, torch.randn(3)
        g = torch.randn(4, 7, 100, 100)[:, 2:5]
        op = torch.ops.bnlab
        _, mean, var, _ = op.bn_train_fwd(x, w, b, 1e-5, None, False, False)
        got = op.bn_bwd(g, x, mean, var, w, 1e-5, None, True, True, False)
        want = op.bn_bwd(g.contiguous(), x, mean, var, w, 1e-5, None, True, True, False)
    finally:
        torch.set_num_threads(before)
    for a, e in zip(got[:3], want[:3], strict=True):
        assert torch.equal(a, e)


def test_gradient_channel_slice_is_read_in_place_and_matches_reference() -> None:
    """Through autograd: cat([BN(x), other]) backward gives the reference path's gradients, and
    the kernel reads the sliced gradient without copying it."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 16, 7, 7, generator=gen) * 3 + 1
    w = (torch.rand(16, generator=gen) + 0.5).requires_grad_(True)
    b = torch.randn(16, generator=gen).requires_grad_(True)
    other = torch.randn(4, 5, 7, 7, generator=gen)
    g = torch.randn(4, 21, 7, 7, generator=gen)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y = kernels.batch_norm_train(xs[0], w, b, 1e-5)[0]
    y_ref = reference_train(xs[1], w, b, 1e-5)[0]
    got = torch.autograd.grad(torch.cat([other, y], 1), [xs[0], w, b], g)
    want = torch.autograd.grad(torch.cat([other, y_ref], 1), [xs[1], w, b], g)
    var = x.var((0, 2, 3), unbiased=False)
    scales = [dx_scale(g[:, 5:], w, var, 1e-5)] + [float(g.abs().sum((0, 2, 3)).max())] * 2
    for a, e, scale in zip(got, want, scales, strict=True):
        assert rel_err(a, e, scale) <= RTOL
    _, mean, var_b, _ = torch.ops.bnlab.bn_train_fwd(x, w.detach(), b.detach(), 1e-5, None,
                                                     False, False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ops.bnlab.bn_bwd(g[:, 5:], x, mean, var_b, w.detach(), 1e-5, None, True, True,
                               False)
    assert "aten::copy_" not in {e.key for e in prof.key_averages()}
