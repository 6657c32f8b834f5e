"""Algorithm 2 population statistics against closed forms; splits; weights and modes untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.stats import population_statistics, recalibrate


def _net(norm=bnlab.BatchNorm2d):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), norm(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 5 * 5, 4, bias=False),
                         bnlab.BatchNorm1d(4)).double()


def _inputs_of_first_bn(net, batches):
    with torch.no_grad():
        return [net[0](b) for b in batches]


@pytest.mark.parametrize("norm", [bnlab.BatchNorm2d, nn.BatchNorm2d])
def test_alg2_equal_batches_closed_form(norm):
    net = _net(norm)
    batches = [torch.randn(6, 2, 5, 5, dtype=torch.float64) + i for i in range(4)]
    stats = population_statistics(net, batches)
    acts = _inputs_of_first_bn(net, batches)
    mus = torch.stack([a.mean((0, 2, 3)) for a in acts])
    vars_ = torch.stack([a.var((0, 2, 3), unbiased=False) for a in acts])
    m = 6 * 5 * 5  # m' = N·H·W for a conv layer
    torch.testing.assert_close(stats["1"].mean, mus.mean(0))
    torch.testing.assert_close(stats["1"].var, m / (m - 1) * vars_.mean(0))
    assert stats["1"].count == 4 * m and stats["1"].batches == 4
    assert set(stats) == {"1", "5"}


def test_population_estimator_equals_concatenated_data_and_is_split_invariant():
    net = _net()
    data = torch.randn(20, 2, 5, 5, dtype=torch.float64) * 2 + 1
    full = torch.cat(_inputs_of_first_bn(net, [data]))
    want_mean, want_var = full.mean((0, 2, 3)), full.var((0, 2, 3), unbiased=True)
    for sizes in ([20], [10, 10], [3, 9, 8], [2, 2, 16]):
        batches = list(data.split(sizes))
        s = population_statistics(net, batches, estimator="population")["1"]
        torch.testing.assert_close(s.mean, want_mean)
        torch.testing.assert_close(s.var, want_var)


def test_alg2_uneven_batches_weighted_by_size():
    net = _net()
    batches = [torch.randn(n, 2, 5, 5, dtype=torch.float64) * (1 + n) for n in (2, 7, 3)]
    acts = _inputs_of_first_bn(net, batches)
    s = population_statistics(net, batches)["1"]
    ms = [a.shape[0] * 25 for a in acts]
    mean = sum(m * a.mean((0, 2, 3)) for m, a in zip(ms, acts)) / sum(ms)
    var = sum(m * a.var((0, 2, 3), unbiased=False) for m, a in zip(ms, acts)) / \
        sum(m - 1 for m in ms)
    torch.testing.assert_close(s.mean, mean)
    torch.testing.assert_close(s.var, var)
    # the batch means are identical however the same per-batch data is ordered
    s2 = population_statistics(net, batches[::-1])["1"]
    torch.testing.assert_close(s2.mean, s.mean)
    torch.testing.assert_close(s2.var, s.var)


def test_recalibrate_sets_buffers_restores_mode_and_never_changes_weights():
    net = _net()
    net.eval()
    net[2].train()  # a mixed-mode model
    params = {k: v.clone() for k, v in net.named_parameters()}
    batches = [torch.randn(6, 2, 5, 5, dtype=torch.float64) for _ in range(3)]
    stats = recalibrate(net, batches, num_batches=2)
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k])
    assert not net.training and not net[1].training and net[2].training
    torch.testing.assert_close(net[1].running_mean, stats["1"].mean)
    torch.testing.assert_close(net[5].running_var, stats["5"].var)
    assert stats["1"].batches == 2
    assert net[1].num_batches_tracked.item() == 2  # as torch's update_bn leaves it


def test_num_batches_fetches_no_more_batches_than_it_uses():
    """A one-shot iterator (a stream, a generator over files) loses no batch to the count."""
    stream = iter([torch.randn(4, 2, 5, 5, dtype=torch.float64) for _ in range(3)])
    population_statistics(_net(), stream, num_batches=2)
    assert len(list(stream)) == 1


def test_population_statistics_leaves_buffers_alone():
    net = _net()
    before = [b.clone() for b in net.buffers()]
    population_statistics(net, [torch.randn(4, 2, 5, 5, dtype=torch.float64)])
    for a, b in zip(net.buffers(), before):
        assert torch.equal(a, b)


def test_errors():
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        population_statistics(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(ValueError, match="estimator must be"):
        population_statistics(_net(), [], estimator="ema")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="saw 0 value"):
        population_statistics(_net(), [])


def test_alg2_inference_beats_short_moving_average_on_shifted_stream():
    """Alg. 2 uses the whole training set; an EMA with momentum 0.5 remembers the last batches."""
    bn = nn.Sequential(bnlab.BatchNorm1d(1, momentum=0.5)).double()
    batches = [torch.randn(50, 1, dtype=torch.float64) + (5.0 if i == 9 else 0.0)
               for i in range(10)]
    for b in batches:
        bn(b)
    ema_mean = bn[0].running_mean.item()
    recalibrate(bn, batches)
    assert abs(bn[0].running_mean.item() - 0.5) < abs(ema_mean - 0.5)


def test_recalibrate_equals_torchs_swa_update_bn():
    """`torch.optim.swa_utils.update_bn` (momentum=None: the cumulative average of μ_B and the
    unbiased σ²_B) leaves bnlab's layers alone; `recalibrate` gives what it gives torch's."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    ours = _net()
    theirs = bnlab.replace_norm(_net(), "torch")
    theirs.load_state_dict(ours.state_dict())
    assert type(theirs[1]) is nn.BatchNorm2d and type(theirs[5]) is nn.BatchNorm1d
    batches = [torch.randn(8, 2, 5, 5, dtype=torch.float64) * 3 + 1 for _ in range(4)]
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    update_bn(batches, ours)  # finds no torch BN: nothing changes
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k])
    update_bn(batches, theirs)
    recalibrate(ours, batches)
    for i in (1, 5):
        torch.testing.assert_close(ours[i].running_mean, theirs[i].running_mean)
        torch.testing.assert_close(ours[i].running_var, theirs[i].running_var)
        assert ours[i].num_batches_tracked == theirs[i].num_batches_tracked == len(batches)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, bnlab.BatchNorm1d])
def test_recalibrate_leaves_frozen_layers_and_is_idempotent(norm) -> None:
    # A frozen layer normalizes with its running statistics in training too; its input
    # statistics were written over them, which made the layers after it stale (a second
    # recalibrate then gave other statistics).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), norm(3), nn.Tanh(), nn.Linear(3, 2), norm(2))
    bnlab.freeze(model[1])
    batches = [torch.randn(8, 3) * 2 + 1 for _ in range(3)]
    stats = bnlab.recalibrate(model, batches)
    assert list(stats) == ["4"]
    assert model[1].running_mean.eq(0).all() and model[1].running_var.eq(1).all()
    first = model[4].running_mean.clone()
    bnlab.recalibrate(model, batches)
    torch.testing.assert_close(model[4].running_mean, first, rtol=0, atol=0)
    bnlab.freeze(model)
    with pytest.raises(ValueError, match="every BatchNorm layer of Sequential is frozen"):
        bnlab.recalibrate(model, batches)


def test_population_statistics_reads_an_input_passed_by_keyword() -> None:
    class KwargBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = bnlab.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(input=x)  # (an IndexError in the hook)

    x = torch.randn(8, 3, dtype=torch.float64)
    got = bnlab.population_statistics(KwargBN().double(), [x])["bn"]
    torch.testing.assert_close(got.mean, x.mean(0))


class _WithHead(nn.Module):
    """A net with an auxiliary head its forward does not call (as torch's update_bn allows)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _net()
        self.aux_bn = bnlab.BatchNorm1d(4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_layer_the_forward_never_calls_is_left_out_with_a_warning() -> None:
    # It raised "saw 0 value(s)" for the whole model, recalibrating nothing.
    net = _WithHead()
    batches = [torch.randn(4, 2, 5, 5, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        net.aux_bn.running_mean.fill_(7.0)
    with pytest.warns(RuntimeWarning, match="never called aux_bn"):
        stats = recalibrate(net, batches)
    assert "aux_bn" not in stats and set(stats) == {"body.1", "body.5"}
    assert net.aux_bn.running_mean.eq(7.0).all()
    want = population_statistics(net.body, batches)
    torch.testing.assert_close(stats["body.1"].var, want["1"].var)
    with pytest.raises(ValueError, match="called none of the BatchNorm layers"):
        population_statistics(nn.Sequential(net.aux_bn, nn.Linear(4, 4)),
                              batches, forward=lambda m, b: None)
