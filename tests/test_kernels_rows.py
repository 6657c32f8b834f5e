"""The rows layout's loops (channels_last and (N, C) inputs, `csrc/bn_rows.h`) against the
reference path. Statistics: register tiles (rows of up to 4 channel vectors, or inputs of at
most 256 KB), or four runs of whole rows a quarter of each thread's rows apart, then the last
rows one by one. Normalize (training forward, eval, the fused epilogues) and dx sweeps: one row
at a time, or four runs for inputs of at least 2 MB (dx: and C >= 2048). The shapes leave a
partial channel vector (C mod 16 != 0, and mod 8 and 4) and up to 3 rows after the runs in a
thread; a 1e4 offset checks the shifted sums there."""

from __future__ import annotations

import pytest
import torch

from bnlab import functional as F
from bnlab import kernels
from test_kernels import RTOL, dx_scale, reference_train, rel_err
from test_kernels_fused import check_fused

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="bnlab CPU kernels could not be built here")

# (shape, loop): channels_last for rank 4, else (N, C).
SHAPES = [
    ((5, 97, 13, 11), "runs"),   # 715 rows x 97 channels, 277 KB
    ((701, 200), "runs"),
    ((3, 300, 9, 11), "runs"),   # 297 rows x 300 channels, 356 KB
    ((333, 520), "runs"),
    ((2, 2053, 5, 5), "runs"),   # 50 rows x 2053 channels, 410 KB
    ((3, 100, 7, 7), "tiles"),   # 59 KB: fits in L2
    ((4, 97, 37, 41), "runs, normalize in runs"),  # 2.3 MB
    ((2, 2053, 11, 13), "runs, normalize and dx in runs"),
]


def make(shape: tuple[int, ...], dtype: torch.dtype, offset: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * 3 + offset
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


@pytest.mark.parametrize("shape, loop", SHAPES)
@pytest.mark.parametrize("offset", [0.5, 1e4])
def test_rows_loops_match_reference(shape, loop, offset) -> None:  # type: ignore[no-untyped-def]
    x = make(shape, torch.float32, offset)
    c = shape[1]
    gen = torch.Generator().manual_seed(1)
    w = (torch.rand(c, generator=gen) + 0.5).requires_grad_(True)
    b = torch.randn(c, generator=gen).requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    x64 = x.double().requires_grad_(True)
    y, mean, var = kernels.batch_norm_train(xs[0], w, b, 1e-5)
    y_ref, mean_ref, var_ref = reference_train(xs[1], w, b, 1e-5)
    y64 = reference_train(x64, w.double(), b.double(), 1e-5)[0]
    # (μ to 1e-5 of the values' size: with a 1e4 offset one float32 ulp of μ is 1e-3 of σ.)
    assert rel_err(mean, mean_ref, float(x.abs().max()) * 1e-2) <= RTOL
    assert rel_err(var, var_ref) <= RTOL
    got = torch.autograd.grad(y, [xs[0], w, b], g)
    want = torch.autograd.grad(y_ref, [xs[1], w, b], g)
    truth = torch.autograd.grad(y64, [x64, w, b], g.double())
    scales = [0.0, dx_scale(g, w, var_ref, 1e-5)] + [float(g.abs().sum(F.reduce_dims(x)).max())] * 2
    rm, rv = mean_ref.detach() + 0.1, var_ref.detach() + 0.5
    y_eval = kernels.batch_norm_eval(x, rm, rv, w.detach(), b.detach(), 1e-5)
    assert rel_err(y_eval, F.normalize(x, rm, rv, w.detach(), b.detach(), 1e-5)) <= RTOL
    for a, e, t, scale in zip((y, *got), (y_ref, *want), (y64, *truth), scales, strict=True):
        err = rel_err(a, e, scale)
        if err > RTOL and not torch.equal(mean, mean_ref):
            # With a 1e4 offset y, dx and dγ hang on μ's last bit (see test_kernels): then we
            # must be at least as close to the float64 result as the reference path is.
            assert rel_err(a, t, scale) <= rel_err(e, t, scale) + RTOL
        else:
            assert err <= RTOL


# bfloat16 reads half the bytes per value: shapes over the tiles' 256 KB at 2 bytes.
@pytest.mark.parametrize("shape, loop", [((10, 97, 13, 11), "runs"),
                                         ((6, 300, 9, 11), "runs"),
                                         ((3, 2053, 5, 5), "runs"),
                                         ((9, 97, 37, 41), "runs, normalize in runs")])
def test_rows_loops_bfloat16_match_reference(shape, loop) -> None:  # type: ignore[no-untyped-def]
    """Statistics in float32 as for float32 inputs; y and dx within bfloat16 roundings."""
    x = make(shape, torch.bfloat16, 0.5)
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    y, mean, var = kernels.batch_norm_train(xs[0], w, b, 1e-5)
    y_ref, mean_ref, var_ref = reference_train(xs[1], w, b, 1e-5)
    assert rel_err(mean, mean_ref, 1e-2) <= RTOL and rel_err(var, var_ref) <= RTOL
    assert rel_err(y, y_ref) <= 8e-3  # one bfloat16 rounding
    g = torch.randn(shape).to(torch.bfloat16)
    (dx,), (dx_ref,) = (torch.autograd.grad(t, [xi], g) for t, xi in ((y, xs[0]), (y_ref, xs[1])))
    assert rel_err(dx, dx_ref) <= 1.6e-2
    rm, rv = mean_ref.detach() + 0.1, var_ref.detach() + 0.5
    assert rel_err(kernels.batch_norm_eval(x, rm, rv, w, b, 1e-5),
                   F.normalize(x, rm, rv, w, b, 1e-5)) <= 8e-3


@pytest.mark.parametrize("shape", [(5, 97, 13, 11), (3, 300, 9, 11), (4, 97, 37, 41)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_rows_loops_with_relu_mask_match_composition(shape, training, residual,  # type: ignore[no-untyped-def]
                                                     monkeypatch) -> None:
    """The fused BN(+add)+ReLU: the epilogue in the normalize sweep, and the backward's sums of
    g masked by the saved mask, on the same loops."""
    check_fused(shape, "channels_last", training, residual, monkeypatch)


@pytest.mark.parametrize("shape, loop", [s for s in SHAPES if s[1] != "tiles"])
def test_rows_loops_deterministic(shape, loop) -> None:  # type: ignore[no-untyped-def]
    x = make(shape, torch.float32, 0.5)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last) if len(shape) == 4 \
        else torch.randn(shape)
    op = torch.ops.bnlab
    runs = []
    for _ in range(2):
        _, mean, var, _ = op.bn_train_fwd(x, None, None, 1e-5, None, False, False)
        runs.append((mean, var, *op.bn_bwd(g, x, mean, var, None, 1e-5, None, True, True,
                                           False)[:3]))
    for a, e in zip(*runs, strict=True):
        assert torch.equal(a, e)
