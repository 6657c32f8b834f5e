"""An empty batch in training mode (N = 0, or an empty spatial size), as a detection head with
no proposals or a data-parallel rank with no samples sees it: torch's BN returns an empty output
and gives γ and β zero gradients. bnlab does the same, for every layer and functional entry
point, and moves no running statistic or counter: there are no batch statistics to move them
with. One value per channel stays an error."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

import bnlab
from _modules import MODULES
from bnlab import functional as F
from bnlab import kernels
from bnlab.variants import batch_renorm, lp_norm
from bnlab.variants._common import unbiased

# Per input rank, empty shapes with 4 channels: no samples, and samples with an empty plane.
EMPTY = {2: [(0, 4)], 3: [(0, 4, 3), (2, 4, 0)], 4: [(0, 4, 3, 2), (2, 4, 0, 3)],
         5: [(0, 4, 2, 3, 2), (2, 4, 2, 0, 2)]}
CASES = [(name, shape, layout) for name, (_, rank) in MODULES.items() for shape in EMPTY[rank]
         for layout in (("contiguous", "channels_last") if rank == 4 else ("contiguous",))]


@pytest.mark.parametrize(("name", "shape", "layout"), CASES)
def test_an_empty_training_batch_gives_an_empty_output_and_moves_no_state(
        name: str, shape: tuple[int, ...], layout: str) -> None:
    make, _ = MODULES[name]
    torch.manual_seed(0)
    m = make().train()
    if isinstance(m, LazyModuleMixin):  # an empty batch initializes it (C = 4) like any other
        before = type(m).cls_to_become(4).state_dict()
    else:
        before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-finite batch statistics" warning either
        y = m(x)
        y.sum().backward()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert x.grad is not None and x.grad.shape == x.shape
    for k, v in m.state_dict().items():  # buffers, num_batches_tracked and the other counters
        assert torch.equal(v, before[k]), k
    for p_name, p in m.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), p_name


def test_an_empty_batch_matches_torch_and_keeps_the_cumulative_average_exact() -> None:
    """Output, gradients and running statistics as torch's; the counter is where bnlab differs
    on purpose. torch counts the empty batch, so with momentum=None (the cumulative average of
    Alg. 2) the next batch is averaged in with 1/3 instead of 1/2; bnlab's running statistics
    stay the exact mean of the two batches' statistics."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64) - 3
    empty = torch.zeros(0, 4, 3, 3, dtype=torch.float64)
    ours = bnlab.BatchNorm2d(4, momentum=None, dtype=torch.float64)
    ref = nn.BatchNorm2d(4, momentum=None, dtype=torch.float64)
    xo, xr = empty.clone().requires_grad_(True), empty.clone().requires_grad_(True)
    yo, yr = ours(xo), ref(xr)
    assert yo.shape == yr.shape == empty.shape
    yo.sum().backward()
    yr.sum().backward()
    for po, pr in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
        torch.testing.assert_close(po.grad, pr.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 0 and int(ref.num_batches_tracked) == 1
    for x in (a, b):
        ours(x)
    dims = (0, 2, 3)
    torch.testing.assert_close(ours.running_mean, (a.mean(dims) + b.mean(dims)) / 2)
    torch.testing.assert_close(ours.running_var, (a.var(dims) + b.var(dims)) / 2)
    assert int(ours.num_batches_tracked) == 2


def _functional(fn: str, x: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    if fn == "batch_norm":
        return F.batch_norm(x, rm, rv, w, b, training=True)
    if fn == "bn_relu":
        return kernels.bn_relu(x, rm, rv, w, b, training=True)
    if fn == "bn_add_relu":
        return kernels.bn_add_relu(x, torch.zeros_like(x), rm, rv, w, b, training=True)
    if fn == "batch_renorm":
        return batch_renorm(x, rm, rv, w, b, training=True)[0]
    return lp_norm(x, rm, rv, w, b, training=True, p=math.inf)  # amax has no empty reduction


@pytest.mark.parametrize("fn", ["batch_norm", "bn_relu", "bn_add_relu", "batch_renorm",
                                "lp_norm_inf"])
@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_functional_entry_points_take_an_empty_batch_on_every_path(
        fn: str, path: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "reference":
        monkeypatch.setenv("BNLAB_FORCE_REFERENCE", "1")
    x = torch.randn(0, 4, 5, 5, dtype=dtype, requires_grad=True)
    rm, rv = torch.full((4,), 0.5), torch.full((4,), 2.0)
    w = torch.rand(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = _functional(fn, x, rm, rv, w, b)
        y.sum().backward()
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(rm, torch.full((4,), 0.5)) and torch.equal(rv, torch.full((4,), 2.0))
    assert torch.equal(w.grad, torch.zeros(4)) and torch.equal(b.grad, torch.zeros(4))


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1, 1), (1, 4, 1)])
def test_one_value_per_channel_is_still_an_error(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"more than 1 value per channel .* \(1 value per "):
        F.batch_norm(torch.randn(shape), None, None, training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnlab.BatchNorm2d(4)(torch.randn(1, 4, 1, 1))


def test_a_device_side_count_of_at_most_one_gives_an_undefined_unbiased_variance() -> None:
    """A synchronized batch's count stays on the device (no host sync): m <= 1 must make the
    running update skip the batch (NaN is non-finite), not store σ²_B = 0 as an estimate."""
    var = torch.tensor([0.0, 2.0])
    for m in (0, 1):
        assert torch.isnan(unbiased(var, torch.tensor(float(m)))).all()
    torch.testing.assert_close(unbiased(var, torch.tensor(4.0)), var * 4 / 3)
    torch.testing.assert_close(unbiased(var, 4), var * 4 / 3)
