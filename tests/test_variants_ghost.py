"""Ghost BN against its definition: BN per ghost batch; both running-statistics conventions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import bnlab
from bnlab.variants import GhostBatchNorm, ghost_splits

F64 = torch.float64


@given(n=st.integers(1, 500), v=st.integers(1, 64))
def test_ghost_splits_are_near_equal_and_bounded(n: int, v: int) -> None:
    sizes = ghost_splits(n, v)
    assert sum(sizes) == n and len(sizes) == math.ceil(n / v)
    assert max(sizes) <= v and max(sizes) - min(sizes) <= 1


@given(n=st.integers(2, 500), v=st.integers(1, 64))
def test_ghost_splits_with_a_least_size_keep_every_ghost_above_it(n: int, v: int) -> None:
    sizes = ghost_splits(n, v, min_size=2)
    assert sum(sizes) == n and min(sizes) >= 2 and max(sizes) - min(sizes) <= 1
    assert len(sizes) == math.ceil(n / v) or max(sizes) < 4  # fewer ghosts, of 2 or 3
    assert max(sizes) <= max(v, 3)


def test_an_odd_batch_of_vectors_is_cut_into_ghosts_of_two_or_more() -> None:
    """(5, C) with v = 2: ghosts of 3 and 2 samples (2, 2, 1 would leave one value per
    channel, an error in the middle of an epoch); v = 1 on (N, C) cannot work, and says so."""
    ghost = GhostBatchNorm(3, virtual_batch_size=2, dtype=F64)
    ref = nn.BatchNorm1d(3, dtype=F64)
    x = torch.randn(5, 3, dtype=F64)
    expected = torch.cat([ref(chunk) for chunk in torch.split(x, [3, 2])])
    torch.testing.assert_close(ghost(x), expected)
    torch.testing.assert_close(ghost.running_var, ref.running_var)
    with pytest.raises(ValueError, match=r"virtual_batch_size=1\): a ghost batch of one sample "
                       r"of input of shape \(5, 3\) has 1 value per channel.*at least 2"):
        GhostBatchNorm(3, virtual_batch_size=1)(x.float())
    GhostBatchNorm(3, virtual_batch_size=1)(torch.randn(5, 3, 2))  # 2 values per channel: fine


def _pair(v: int, c: int = 3, **kw) -> tuple[GhostBatchNorm, nn.BatchNorm2d]:
    ghost = GhostBatchNorm(c, virtual_batch_size=v, dtype=F64, **kw)
    ref = nn.BatchNorm2d(c, momentum=ghost.momentum, dtype=F64)
    with torch.no_grad():
        w, b = torch.rand(c, dtype=F64) + 0.5, torch.randn(c, dtype=F64)
        for m in (ghost, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return ghost, ref


@pytest.mark.parametrize("stats_update", ["per_ghost", "per_batch"])
def test_one_ghost_is_bn(stats_update: str) -> None:
    torch.manual_seed(0)
    ghost, ref = _pair(16, stats_update=stats_update)
    for _ in range(2):
        x = torch.randn(8, 3, 2, 2, dtype=F64) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ghost(xa), ref(xb)
        torch.testing.assert_close(ya, yb)
        gy = torch.randn_like(x)
        ya.backward(gy)
        yb.backward(gy)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ghost.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ghost.running_var, ref.running_var)
    torch.testing.assert_close(ghost.num_batches_tracked, ref.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_per_ghost_equals_bn_called_on_each_chunk(momentum: float | None) -> None:
    torch.manual_seed(1)
    ghost, ref = _pair(4, momentum=momentum)
    for n in (12, 10):  # 3 ghosts of 4; then 3 ghosts of 4, 3, 3
        x = torch.randn(n, 3, 2, 3, dtype=F64) * 3 - 2
        sizes = ghost_splits(n, 4)
        expected = torch.cat([ref(chunk) for chunk in torch.split(x, sizes)])
        torch.testing.assert_close(ghost(x), expected)
    torch.testing.assert_close(ghost.running_mean, ref.running_mean)
    torch.testing.assert_close(ghost.running_var, ref.running_var)
    assert int(ghost.num_batches_tracked) == 6


def test_per_batch_update_is_pooled_alg2_of_the_ghosts() -> None:
    torch.manual_seed(2)
    ghost, _ = _pair(3, momentum=0.25, stats_update="per_batch")
    x = torch.randn(8, 3, 2, 2, dtype=F64) * 2 + 5  # ghosts of 3, 3, 2 samples
    ghost(x)
    chunks = torch.split(x, ghost_splits(8, 3))
    m = torch.tensor([c.shape[0] * 4 for c in chunks], dtype=F64)  # values per channel
    var_b = torch.stack([c.var((0, 2, 3), unbiased=False) for c in chunks])  # (G, C)
    mean = x.mean((0, 2, 3))
    var = (m[:, None] * var_b).sum(0) / (m - 1).sum()
    torch.testing.assert_close(ghost.running_mean, 0.25 * mean)
    torch.testing.assert_close(ghost.running_var, 0.75 + 0.25 * var)
    assert int(ghost.num_batches_tracked) == 1


@pytest.mark.parametrize("estimator", ["alg2", "population"])
def test_population_statistics_average_over_the_ghosts(estimator: str) -> None:
    """Alg. 2 with B the ghost batch, the mini-batch a training forward normalizes by: one
    batch's alg2 statistics are the per_batch update's pooled ghost statistics (which ignore
    the spread of the ghosts' means), and equal training's output; "population" stays the
    variance of all values."""
    torch.manual_seed(3)
    ghost = GhostBatchNorm(3, momentum=None, stats_update="per_batch", virtual_batch_size=4,
                           dtype=F64)
    x = torch.randn(12, 3, dtype=F64) + torch.arange(12, dtype=F64)[:, None] // 4 * 3
    y_train = ghost(x)  # ghosts of 4 with means 0, 3, 6: pooled variance ~1, overall ~7
    stats = bnlab.population_statistics(ghost, [x], estimator=estimator)[""]
    if estimator == "alg2":
        torch.testing.assert_close(stats.mean, ghost.running_mean)
        torch.testing.assert_close(stats.var, ghost.running_var)
        assert stats.batches == 3 and stats.count == 12
        ghost.running_var.fill_(1.0)
        bnlab.recalibrate(ghost, [x])
        torch.testing.assert_close(ghost.running_var, stats.var)
    else:
        torch.testing.assert_close(stats.var, x.var(0))
    assert float(stats.var.max()) < 2 if estimator == "alg2" else float(stats.var.min()) > 5
    x_hat = (x - ghost.running_mean) / torch.sqrt(ghost.running_var + ghost.eps)
    assert (y_train - x_hat).abs().max() > 1  # per-ghost means: training is not eval here


def test_gradcheck_training_mode() -> None:
    torch.manual_seed(3)
    x = torch.randn(7, 2, 3, dtype=F64, requires_grad=True)
    w = torch.rand(2, dtype=F64, requires_grad=True)
    b = torch.randn(2, dtype=F64, requires_grad=True)

    def f(x, w, b):
        return bnlab.variants.ghost_batch_norm(x, w, b, 1e-5, 3)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_eval_is_bn_eval_and_folds() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), GhostBatchNorm(3, virtual_batch_size=2))
    model.train()(torch.randn(8, 2, 5, 5))
    model.eval()
    x = torch.randn(3, 2, 5, 5)
    ref = nn.BatchNorm2d(3).eval()
    ref.load_state_dict(model[1].state_dict())
    torch.testing.assert_close(model(x), ref(model[0](x)))
    torch.testing.assert_close(bnlab.fold(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_no_running_stats_uses_ghost_statistics_in_eval() -> None:
    torch.manual_seed(5)
    ghost = GhostBatchNorm(2, virtual_batch_size=2, track_running_stats=False).eval()
    x = torch.randn(4, 2)
    expected = torch.cat([nn.functional.batch_norm(c, None, None, training=True)
                          for c in x.split(2)])
    torch.testing.assert_close(ghost(x), expected)


def test_single_value_ghost_raises_with_the_argument() -> None:
    with pytest.raises(ValueError, match="virtual_batch_size=1"):
        GhostBatchNorm(3, virtual_batch_size=1)(torch.randn(4, 3))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            GhostBatchNorm(3, virtual_batch_size=bad)
    with pytest.raises(ValueError, match="stats_update"):
        GhostBatchNorm(3, stats_update="ema")
