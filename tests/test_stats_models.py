"""Population statistics and SyncBN conversion on models as users write them: BN kept in eval
mode by a model's train() (detection code's norm_eval), ghost layers counting per batch,
noise switched off, hooks, registered sync classes with the documented constructor, torch's
SyncBN in a subgroup, and buffers of their own beside the BN layers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab.ddp import local_running_stats, rank_local_buffers
from bnlab.distributed import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    register_sync_conversion,
)
from bnlab.stats import population_statistics, recalibrate
from bnlab.variants import GhostBatchNorm, NoisyBatchNorm


class NormEval(nn.Module):
    """bn1 stays in eval mode whatever train() says (mmdet's norm_eval=True)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.lin, self.bn2 = nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3)
        with torch.no_grad():
            self.bn1.running_mean.fill_(5.0)
            self.bn1.running_var.fill_(4.0)

    def train(self, mode: bool = True) -> NormEval:
        super().train(mode)
        self.bn1.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.lin(self.bn1(x)))


def test_recalibrate_leaves_layers_the_model_keeps_in_eval_mode():
    torch.manual_seed(0)
    model = NormEval()
    data = [torch.randn(64, 3) for _ in range(8)]
    stats = recalibrate(model, data)
    assert set(stats) == {"bn2"}
    assert torch.equal(model.bn1.running_mean, torch.full((3,), 5.0))
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(x) for x in data])
    # bn2 was measured under bn1's running statistics, which eval mode uses: normalized output
    assert out.mean(0).abs().max() < 1e-5 and (out.var(0) - 1).abs().max() < 0.02

    class AllEval(NormEval):
        def train(self, mode: bool = True) -> AllEval:
            super().train(mode)
            self.bn2.eval()
            return self

    with pytest.raises(ValueError, match=r"every BatchNorm layer of AllEval ran in eval mode"):
        population_statistics(AllEval(), data)


def test_recalibrate_counts_per_batch_ghost_updates_as_training_does():
    torch.manual_seed(0)
    data = [torch.randn(8, 3) for _ in range(3)]
    trained = GhostBatchNorm(3, momentum=None, virtual_batch_size=2, stats_update="per_batch")
    for x in data:
        trained(x)
    recal = GhostBatchNorm(3, momentum=None, virtual_batch_size=2, stats_update="per_batch")
    recalibrate(recal, data)
    assert int(recal.num_batches_tracked) == int(trained.num_batches_tracked) == 3
    per_ghost = GhostBatchNorm(3, virtual_batch_size=2)
    recalibrate(per_ghost, data)
    assert int(per_ghost.num_batches_tracked) == 12  # one EMA step per ghost, as in training


def test_population_statistics_arguments_and_inputs():
    model = nn.Sequential(nn.BatchNorm1d(3))
    for bad in (2.5, True, "3"):
        with pytest.raises(ValueError, match=r"num_batches must be an integer >= 1 or None"):
            population_statistics(model, [torch.randn(4, 3)], num_batches=bad)
    with pytest.raises(ValueError, match=r"expected 2D or 3D input"):  # the layer's own message
        population_statistics(model, [torch.randn(3)])


def test_sync_conversion_keeps_modes_hooks_and_torch_s_groups():
    noisy = nn.Sequential(NoisyBatchNorm(3, seed=0))
    noisy[0].noise.eval()  # deterministic from here on
    converted = convert_sync_batchnorm(noisy)
    assert converted[0].training and not converted[0].noise.training

    torch_bn = nn.Sequential(nn.BatchNorm2d(3))
    calls = []
    torch_bn[0].register_forward_hook(lambda *_: calls.append("hook"))
    torch_bn[0].register_forward_pre_hook(lambda *_: calls.append("pre"))
    synced = convert_sync_batchnorm(torch_bn)
    assert isinstance(synced[0], SyncBatchNorm)
    synced.eval()(torch.randn(2, 3, 4, 4))
    assert calls == ["pre", "hook"]

    group = object()  # a subgroup's handle, never used in a single process
    kept = convert_sync_batchnorm(nn.Sequential(nn.SyncBatchNorm(3, process_group=group)),
                                  keep_synced=True)
    assert isinstance(kept[0], SyncBatchNorm) and kept[0].process_group is group


def test_registered_sync_classes_need_only_the_documented_constructor():
    class MyBN(bnlab.BatchNorm2d):
        pass

    class MySync(SyncBatchNorm):
        def __init__(self, num_features, eps, momentum, affine, track_running_stats,
                     process_group=None):
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             process_group=process_group)

    register_sync_conversion(MyBN, MySync)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = convert_sync_batchnorm(nn.Sequential(MyBN(3)))
    assert type(out[0]) is MySync


class WithEMA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = SyncBatchNorm(3)
        self.register_buffer("ema", torch.zeros(3))  # a user's data-dependent buffer


def test_buffers_that_may_differ_between_ranks_are_named():
    model = nn.Sequential(WithEMA(), nn.Linear(3, 3))
    assert local_running_stats(model) == []  # the SyncBN is the same on every rank
    assert rank_local_buffers(model) == ["0"]  # but the EMA is not: DDP must broadcast
    assert rank_local_buffers(nn.Sequential(SyncBatchNorm(3), nn.Linear(3, 3))) == []
