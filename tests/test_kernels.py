"""The CPU kernels (`bnlab.kernels`) against the reference path (`bnlab._autograd`, the paper's
equations in PyTorch ops): outputs, gradients and running statistics agree to 1e-5 relative in
float32 over hypothesis-generated shapes and layouts; results are deterministic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bnlab
from bnlab import _autograd, kernels
from bnlab import functional as F

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="bnlab CPU kernels could not be built here")

RTOL = 1e-5
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def rel_err(a: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    """max |a − ref| / max |ref| (the max-norm relative error), in float64. ``scale`` is a floor
    for the denominator: the size of the terms that cancel into ref (dx of BN is a difference
    of O(γ·invstd·|g|) terms that is ~0 when N·H·W = 2)."""
    a, ref = a.double(), ref.double()
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), scale, 1e-30)


def dx_scale(g: torch.Tensor, w: torch.Tensor | None, var: torch.Tensor, eps: float) -> float:
    """max |γ·invstd·g|: the size of the terms of ∂ℓ/∂x before they cancel."""
    a = torch.rsqrt(var.double() + eps) * (1.0 if w is None else w.detach().double().abs())
    return float(a.max() * g.abs().max())


@st.composite
def inputs(draw: st.DrawFn) -> tuple[torch.Tensor, str]:
    """(x, layout): ranks 2–5, odd sizes, C = 1, N·spatial = 2, 1e4 offsets, and contiguous,
    channels_last or non-contiguous memory."""
    rank = draw(st.integers(2, 5))
    n = draw(st.integers(1, 6))
    c = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 33, 50, 100]))
    spatial = [draw(st.integers(1, 9)) for _ in range(rank - 2)]
    if n * int(torch.tensor(spatial).prod().item() if spatial else 1) < 2:
        n = 2
    # (offset, scale): 1e4 offsets at unit scale. (1e4 with σ = 1e-3 is ill-posed: σ is below
    # the float32 spacing at 1e4, so the mean's last bit decides y and ties are common.)
    offset, scale = draw(st.sampled_from([(0.0, 1.0), (0.0, 1e-3), (0.0, 50.0), (1e4, 1.0),
                                          (-1e4, 3.0), (-3.0, 1.0)]))
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "strided"]))
    gen = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    if layout == "strided":  # a slice of a bigger tensor, transposed back: no dense layout
        big = torch.randn((n, c, *[s * 2 for s in spatial]), generator=gen)
        x = big[(slice(None), slice(None), *[slice(None, None, 2)] * len(spatial))]
        if rank == 2:
            x = torch.randn((c, n), generator=gen).t()
    else:
        x = torch.randn(shape, generator=gen)
        if layout == "channels_last" and rank in (4, 5):
            fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
            x = x.contiguous(memory_format=fmt)
        elif layout == "channels_last" and rank == 3:  # (N, C, L) stored as (N, L, C)
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x * scale + offset, layout


def reference_train(x, w, b, eps):  # type: ignore[no-untyped-def]
    return _autograd.BatchNormTrain.apply(x, w, b, eps)


@SETTINGS
@given(inputs(), st.booleans())
def test_train_forward_backward_match_reference(data, affine) -> None:  # type: ignore[no-untyped-def]
    x, _ = data
    c = x.shape[1]
    gen = torch.Generator().manual_seed(1)
    w = (torch.rand(c, generator=gen) + 0.5).requires_grad_(affine) if affine else None
    b = torch.randn(c, generator=gen).requires_grad_(affine) if affine else None
    g = torch.randn(x.shape, generator=gen)
    eps = 1e-5
    xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
    x64 = x.double().requires_grad_(True)  # ground truth for the tie case below
    y, mean, var = kernels.batch_norm_train(xs[0], w, b, eps)
    y_ref, mean_ref, var_ref = reference_train(xs[1], w, b, eps)
    w64, b64 = (None if t is None else t.detach().double().requires_grad_(affine)
                for t in (w, b))
    y64, _, _ = reference_train(x64, w64, b64, eps)
    assert rel_err(mean, mean_ref, float(x.abs().max()) * 1e-2) <= RTOL
    assert rel_err(var, var_ref) <= RTOL
    params = [t for t in (w, b) if t is not None]
    grads = torch.autograd.grad(y, [xs[0], *params], g)
    grads_ref = torch.autograd.grad(y_ref, [xs[1], *params], g)
    truths = torch.autograd.grad(y64, [x64, *(t for t in (w64, b64) if t is not None)],
                                 g.double())
    scales = [dx_scale(g, w, var_ref, eps)] + [float(g.abs().sum(F.reduce_dims(x)).max())] * 2
    for got, want, truth, scale in zip((y, *grads), (y_ref, *grads_ref), (y64, *truths),
                                       [0.0, *scales], strict=False):
        # (∂ℓ/∂x and ∂ℓ/∂γ are differences of terms of size `scale`: compared against it.)
        err = rel_err(got, want, scale)
        if err > RTOL and truth is not None and not torch.equal(mean, mean_ref):
            # With a 1e4 offset the float32 spacing of μ is 1e-3·σ, so one ulp of μ_B moves
            # y by 1e-3 relative; and with few values per channel the exact mean is often a
            # rounding tie. The kernels round μ_B correctly (double sums); torch.var_mean's
            # Welford is off by one ulp in ~1% of such channels. Then we must be at least as
            # close to the float64 result as the reference is.
            assert rel_err(got, truth, scale) <= rel_err(want, truth, scale) + RTOL
        else:
            assert err <= RTOL


@SETTINGS
@given(inputs())
def test_eval_matches_reference(data) -> None:  # type: ignore[no-untyped-def]
    x, _ = data
    c = x.shape[1]
    gen = torch.Generator().manual_seed(2)
    rm = x.mean().expand(c).clone() + torch.randn(c, generator=gen)
    rv = torch.rand(c, generator=gen) * x.var() + 0.1
    w = (torch.rand(c, generator=gen) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=gen).requires_grad_(True)
    xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
    y = kernels.batch_norm_eval(xs[0], rm, rv, w, b, 1e-3)
    y_ref = F.normalize(xs[1], rm, rv, w, b, 1e-3)
    assert rel_err(y, y_ref) <= RTOL
    g = torch.randn(x.shape, generator=gen)
    # ∂ℓ/∂γ = Σ g·x̂ and ∂ℓ/∂β = Σ g are sums that may cancel: compared against the size of
    # their terms (as in the training test), dx (no sum) against itself.
    dims = F.reduce_dims(x)
    inv_std = (rv.double() + 1e-3).rsqrt()
    x_hat = (x.double() - F.channel_view(rm.double(), x)) * F.channel_view(inv_std, x)
    scales = [0.0, float((g.abs() * x_hat.abs()).sum(dims).max()), float(g.abs().sum(dims).max())]
    for got, want, scale in zip(torch.autograd.grad(y, (xs[0], w, b), g),
                                torch.autograd.grad(y_ref, (xs[1], w, b), g), scales,
                                strict=True):
        assert rel_err(got, want, scale) <= RTOL


@SETTINGS
@given(inputs(), st.sampled_from([0.1, 0.5, 1.0]), st.booleans())
def test_running_statistics_match_reference(data, momentum, tensor_momentum) -> None:  # type: ignore[no-untyped-def]
    x, _ = data
    c = x.shape[1]
    mom = torch.tensor(momentum) if tensor_momentum else momentum
    bufs = [(torch.full((c,), 0.3), torch.full((c,), 2.0)) for _ in range(2)]
    for _ in range(2):  # two updates, so the second mixes old and new values
        F.batch_norm_with_flag(x, *bufs[0], None, None, True, mom, 1e-5, "test")
        _y_ref, mean_ref, var_ref = reference_train(x, None, None, 1e-5)
        F.update_running_stats(*bufs[1], mean_ref, var_ref, x.numel() // c, mom)
    # The statistics agree to their last bits; a mean that nearly cancels (|μ| ≪ |x|) differs
    # by an ulp of the data, hence the absolute part of the tolerance.
    ulp_x = float(x.abs().max()) * 2e-7
    torch.testing.assert_close(bufs[0][0], bufs[1][0], rtol=1e-6, atol=ulp_x)
    torch.testing.assert_close(bufs[0][1], bufs[1][1], rtol=1e-6, atol=ulp_x**2)


@pytest.mark.parametrize(("c", "bad", "value"), [(3, 1, float("nan")), (40, 17, float("inf")),
                                                (40, 37, float("nan"))])
def test_nonfinite_batch_leaves_running_statistics(monkeypatch, c, bad, value) -> None:  # type: ignore[no-untyped-def]
    """A non-finite value in any channel, one the finite check reads in a whole vector (17 of
    40) or in its scalar tail (37 of 40, 1 of 3), leaves every running statistic alone."""
    monkeypatch.setattr(F, "_warned_nonfinite", False)  # the warning is once per process
    layer = bnlab.BatchNorm2d(c)
    x = torch.randn(4, c, 5, 5)
    x[0, bad, 0, 0] = value
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(c))
    assert torch.equal(layer.running_var, torch.ones(c))


@pytest.mark.parametrize("shape", [(32, 64, 9, 9), (3, 5, 7, 7), (64, 17), (2, 3, 1, 2)])
@pytest.mark.parametrize("fmt", ["nchw", "nhwc"])
def test_deterministic_for_fixed_threads(shape, fmt) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(shape) * 3 + 1
    if fmt == "nhwc" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(shape[1]) + 0.5, torch.randn(shape[1])
    g = torch.randn(shape)
    outs = []
    for _ in range(3):
        xr = x.clone().requires_grad_(True)
        y, mean, var = kernels.batch_norm_train(xr, w, b, 1e-5)
        (dx,) = torch.autograd.grad(y, xr, g)
        outs.append((y, mean, var, dx))
    for other in outs[1:]:
        for a, c in zip(outs[0], other, strict=True):
            assert torch.equal(a, c)


def test_threads_split_and_fused_paths_agree() -> None:
    """C = 3 with 2 threads splits each channel over threads; with 1 thread it does not."""
    x = torch.randn(64, 3, 40, 40) * 2 + 7  # planes over 1024 values: no samples split
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, m1, v1 = kernels.batch_norm_train(x, None, None, 1e-5)
        torch.set_num_threads(2)
        y2, m2, v2 = kernels.batch_norm_train(x, None, None, 1e-5)
    finally:
        torch.set_num_threads(before)
    assert rel_err(m1, m2) <= 1e-6 and rel_err(v1, v2) <= 1e-6 and rel_err(y1, y2) <= 1e-6


# The planar paths of the training forward and backward at 2 threads, each on a shape that
# takes it: cache-resident planes of at most 1024 values and C ≤ 256 are summed over all
# channels at once, each thread on its own samples; more channels, or fewer samples than
# threads, in blocks of channels per thread; few channels with larger planes split each
# channel over the threads; channel blocks of at least 8 MB prefetch ahead, (64, 300, 11, 11).
# The outlier sits where the shift K is sampled (the first 16 values of each channel's first
# plane), which sends every channel to the exact second pass.
@pytest.mark.parametrize("shape", [(8, 20, 7, 7), (3, 256, 2, 2), (4, 300, 5, 5), (1, 40, 6, 6),
                                   (16, 3, 40, 40), (64, 300, 11, 11)])
@pytest.mark.parametrize("outlier", [False, True])
def test_planar_paths_match_reference(shape, outlier) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2 + 1
    if outlier:
        x.view(shape[0], shape[1], -1)[0, :, :16] = 1e6
    c = shape[1]
    w = (torch.rand(c, generator=gen) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=gen).requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        y, mean, var = kernels.batch_norm_train(xs[0], w, b, 1e-5)
        grads = torch.autograd.grad(y, [xs[0], w, b], g)
    finally:
        torch.set_num_threads(before)
    y_ref, mean_ref, var_ref = reference_train(xs[1], w, b, 1e-5)
    grads_ref = torch.autograd.grad(y_ref, [xs[1], w, b], g)
    assert rel_err(mean, mean_ref) <= RTOL and rel_err(var, var_ref) <= RTOL
    assert rel_err(y, y_ref) <= RTOL
    scales = [dx_scale(g, w, var_ref, 1e-5)] + [float(g.abs().sum(F.reduce_dims(x)).max())] * 2
    for got, want, scale in zip(grads, grads_ref, scales, strict=True):
        assert rel_err(got, want, scale) <= RTOL


@pytest.mark.parametrize("shape, fmt", [
    ((8, 2, 40, 40), torch.contiguous_format),   # channel blocks, one per thread
    ((8, 3, 40, 40), torch.contiguous_format),   # few channels, each split over threads
    ((8, 20, 40, 40), torch.channels_last),      # rows, tiles
    ((8192, 100), torch.contiguous_format),      # rows, four runs
])
def test_outlier_first_value_takes_exact_pass(shape, fmt) -> None:  # type: ignore[no-untyped-def]
    """The shift K is a sample of the first values of each channel (the first 16 of its first
    plane, or of the first 16 rows); an outlier there must not cost accuracy, in every path."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if x.dim() == 4:
        x[0, :, 0, :16] = 1e6
    else:
        x[:16] = 1e6
    x = x.contiguous(memory_format=fmt)
    y, mean, var = kernels.batch_norm_train(x, None, None, 1e-5)
    y_ref, mean_ref, var_ref = reference_train(x, None, None, 1e-5)
    assert rel_err(mean, mean_ref) <= RTOL and rel_err(var, var_ref) <= RTOL
    assert rel_err(y, y_ref) <= RTOL


@pytest.mark.parametrize("shape, fmt", [((4, 3, 1024, 1024), torch.contiguous_format),
                                        ((4, 32, 320, 320), torch.channels_last),
                                        ((2, 5, 1001, 1001), torch.contiguous_format),
                                        ((2, 16, 512, 512), torch.contiguous_format)])
def test_large_tensors_streaming_stores_match_reference(shape, fmt) -> None:  # type: ignore[no-untyped-def]
    """Tensors over 16 MB take the streaming-store (non-temporal) output path when planes and
    rows are whole vectors, and store normally when they are not (odd H·W); with many channels
    the training forward normalizes each channel block right after its statistics (smaller
    tensors: one sweep after all statistics). Forward, eval and backward still equal the
    reference path."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt) * 3 + 1
    c = shape[1]
    w, b = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
    g = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y, mean, var = kernels.batch_norm_train(xs[0], w, b, 1e-5)
    y_ref, mean_ref, var_ref = reference_train(xs[1], w, b, 1e-5)
    assert rel_err(mean, mean_ref) <= RTOL and rel_err(var, var_ref) <= RTOL
    assert rel_err(y, y_ref) <= RTOL
    (dx,), (dx_ref,) = (torch.autograd.grad(t, [xi], g) for t, xi in ((y, xs[0]), (y_ref, xs[1])))
    assert rel_err(dx, dx_ref, dx_scale(g, w, var_ref, 1e-5)) <= RTOL
    rm, rv = mean_ref.detach(), var_ref.detach() + 0.5
    y_eval = kernels.batch_norm_eval(x, rm, rv, w, b, 1e-5)
    assert rel_err(y_eval, F.normalize(x, rm, rv, w, b, 1e-5)) <= RTOL


# NCHW planes longer than a vector that do not end on a vector boundary (7x7 and 14x14 with 16
# lanes, 5x7 with 8 or 4) are normalized on the tensor's vector grid: a vector that straddles
# two planes is blended from both planes' parameters, and when N·C is not a multiple of the
# group of planes that fills whole vectors the last planes take the plane walk. A bias of 100
# per channel index makes a lane normalized with its neighbour's parameters stand out.
@pytest.mark.parametrize("shape", [(3, 7, 7, 7), (2, 32, 14, 14), (5, 16, 7, 7), (1, 3, 5, 7),
                                   (4, 6, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planes_off_the_vector_grid_match_reference(shape, dtype) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype)
    w = torch.rand(c, generator=gen) + 0.5
    b = 100.0 * torch.arange(c, dtype=torch.float32)
    tol = RTOL if dtype == torch.float32 else 8e-3  # bfloat16: one rounding of the output
    y, mean, var = kernels.batch_norm_train(x, w, b, 1e-5)
    y_ref, _, _ = reference_train(x, w, b, 1e-5)
    assert rel_err(y, y_ref) <= tol
    rm, rv = mean + torch.randn(c, generator=gen), var + 0.5
    y_eval = kernels.batch_norm_eval(x, rm, rv, w, b, 1e-5)
    assert rel_err(y_eval, F.normalize(x, rm, rv, w, b, 1e-5)) <= tol


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_bfloat16_matches_reference(fmt) -> None:  # type: ignore[no-untyped-def]
    x = (torch.randn(8, 20, 6, 7) * 2 + 3).bfloat16().contiguous(memory_format=fmt)
    w, b = torch.rand(20) + 0.5, torch.randn(20)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y, mean, var = kernels.batch_norm_train(xs[0], w, b, 1e-5)
    y_ref, mean_ref, var_ref = reference_train(xs[1], w, b, 1e-5)
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32
    assert rel_err(mean, mean_ref) <= RTOL and rel_err(var, var_ref) <= RTOL
    assert rel_err(y, y_ref) <= 8e-3  # one bfloat16 rounding
    g = torch.randn(x.shape).bfloat16()
    (dx,) = torch.autograd.grad(y, xs[0], g)
    (dx_ref,) = torch.autograd.grad(y_ref, xs[1], g)
    assert dx.dtype == torch.bfloat16 and rel_err(dx, dx_ref) <= 1.6e-2


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape, layout", [((4, 3, 5, 5), "nchw"), ((4, 3, 5, 5), "cl"),
                                           ((16, 3), "rows"), ((2, 3, 40, 40), "nchw"),
                                           ((64, 3, 64, 64), "nchw")])
def test_eval_input_gradient_stays_finite_where_the_running_mean_is_not(shape, layout,
                                                                        fused) -> None:
    """Eval-mode dx = g·γ/√(var + ε) does not involve μ: torch's stays finite in a channel whose
    running mean is inf or nan; the kernel's sweep computed (x − μ)·0 there and gave nan. dγ
    involves μ and is nan in those channels in both."""
    torch.manual_seed(0)
    ours = (bnlab.BatchNormReLU if fused else bnlab.BatchNorm)(3).eval()
    ref = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(3).eval()
    for m in (ours, ref):
        m.running_mean.data[0], m.running_mean.data[1] = float("inf"), float("nan")
    x = torch.randn(shape)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    g = torch.randn(shape)
    ours(xs[0]).backward(g)
    y_ref = ref(xs[1])
    (torch.relu(y_ref) if fused else y_ref).backward(g)
    assert xs[0].grad.isfinite().all()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    # (dγ sums 262144 products on the largest shape: float32 summation order differs)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, equal_nan=True, rtol=1e-5,
                               atol=1e-4)
