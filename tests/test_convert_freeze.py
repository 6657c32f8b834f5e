"""freeze / unfreeze / no_stats_update on bnlab's layers, its variants, LpNorm and torch's BN."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnlab
from bnlab.convert import is_frozen
from bnlab.variants import BatchRenorm2d, GhostBatchNorm, LpNorm

NORMS = {
    "bnlab": lambda c: bnlab.BatchNorm2d(c),
    "torch": lambda c: nn.BatchNorm2d(c),
    "renorm": lambda c: BatchRenorm2d(c),
    "ghost": lambda c: GhostBatchNorm(c, virtual_batch_size=2),
    "sync": lambda c: bnlab.SyncBatchNorm(c),
    "lp": lambda c: LpNorm(c, p=1),  # not a BN, but running statistics to freeze all the same
}


def _model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), NORMS[kind](3), nn.ReLU())
    model.train()(torch.randn(8, 2, 5, 5) * 2 + 1)  # non-trivial running statistics
    return model


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("kind", NORMS)
def test_freeze_survives_train_and_matches_eval(kind: str) -> None:
    model = _model(kind)
    x = torch.randn(4, 2, 5, 5)
    expected = model.eval()(x)
    bnlab.freeze(model)
    model.train()
    assert model[1].training  # the mode flag still reports the model's mode
    before = _stats(model)
    torch.testing.assert_close(model(x), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True))
    assert is_frozen(model[1]) and not model[1].weight.requires_grad
    bnlab.unfreeze(model)
    assert not is_frozen(model[1]) and model[1].weight.requires_grad
    model.train()(x)
    assert not torch.equal(model[1].running_mean, before[0])


def test_freeze_stats_only_keeps_affine_trainable_and_pickles() -> None:
    model = _model("torch")
    bnlab.freeze(model, affine=False)
    assert model[1].weight.requires_grad
    model.train()
    loss = model(torch.randn(2, 2, 5, 5)).square().sum()
    loss.backward()
    assert model[1].weight.grad is not None
    clone = pickle.loads(pickle.dumps(model))  # hooks are module-level functions: picklable
    assert is_frozen(clone[1])
    for m in (model, clone):  # the statistics stay put in training mode, after pickling too
        before = (m[1].running_mean.clone(), m[1].running_var.clone())
        m.train()(torch.randn(4, 2, 5, 5) * 3 + 1)
        assert torch.equal(m[1].running_mean, before[0])
        assert torch.equal(m[1].running_var, before[1])


def test_freeze_affine_only_keeps_statistics_learning() -> None:
    model = _model("bnlab")
    bnlab.freeze(model, stats=False)
    before = model[1].running_mean.clone()
    model.train()(torch.randn(4, 2, 5, 5))
    assert not torch.equal(model[1].running_mean, before)
    assert not model[1].bias.requires_grad


def test_freeze_without_running_stats_raises_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match=r"'1'.*track_running_stats"):
        bnlab.freeze(model)


@pytest.mark.parametrize("kind", NORMS)
def test_no_stats_update_keeps_statistics_and_batch_normalization(kind: str) -> None:
    model = _model(kind)
    x = torch.randn(4, 2, 5, 5)
    before = _stats(model)
    with bnlab.no_stats_update(model):
        y = model(x)
        with bnlab.no_stats_update(model):  # nests
            model(x)
        model(x)
    assert all(torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True))
    torch.testing.assert_close(y, model(x))  # a normal training forward gives the same output
    assert not torch.equal(model[1].running_mean, before[0])  # and it does update again


def test_no_stats_update_restores_after_exception_and_keeps_eval() -> None:
    model = _model("torch")
    x = torch.randn(2, 2, 5, 5)
    expected = model.eval()(x)
    with pytest.raises(RuntimeError, match="boom"), bnlab.no_stats_update(model):
        torch.testing.assert_close(model(x), expected)
        raise RuntimeError("boom")
    assert model[1].track_running_stats


@pytest.mark.parametrize("kind", ["bnlab", "torch"])
def test_checkpoint_recomputation_updates_statistics_once(kind: str) -> None:
    """pytorch#96136: activation checkpointing re-runs the forward in backward."""
    plain, ckpt = _model(kind), _model(kind)
    x = torch.randn(4, 2, 5, 5, requires_grad=True)
    plain(x).sum().backward()
    loss = checkpoint(ckpt, x, use_reentrant=False).sum()
    with bnlab.no_stats_update(ckpt):
        loss.backward()
    for a, b in zip(_stats(plain), _stats(ckpt), strict=True):
        torch.testing.assert_close(a, b)


def test_a_frozen_torch_bn_whose_forward_raises_keeps_the_models_mode() -> None:
    # freeze runs torch's BN in eval mode for the call; a forward that raised (a bad shape, an
    # OOM the caller retries) used to leave it in eval mode for good.
    model = bnlab.freeze(nn.Sequential(nn.BatchNorm2d(4))).train()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 3, 3))
    assert model[0].training
    bnlab.unfreeze(model)
    model(torch.randn(2, 4, 3, 3))
    assert model[0].num_batches_tracked == 1  # trains again


@pytest.mark.parametrize("lazy", [nn.LazyBatchNorm2d, bnlab.LazyBatchNorm2d])
def test_no_stats_update_on_a_lazy_bn_not_yet_run(lazy: type) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), lazy()).train()
    with bnlab.no_stats_update(model):  # (torch's failed to clone its uninitialized buffers)
        model(torch.randn(4, 3, 6, 6))
    bn = model[1]
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()
    assert bn.num_batches_tracked == 0


def test_a_freeze_that_raises_changes_nothing() -> None:
    # The layers were frozen one by one: those before the one without statistics stayed frozen.
    model = nn.Sequential(bnlab.BatchNorm2d(3), nn.BatchNorm2d(3),
                          bnlab.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="layer '2' has no running statistics"):
        bnlab.freeze(model)
    assert not any(is_frozen(m) for m in model) and all(p.requires_grad
                                                         for p in model.parameters())


@pytest.mark.parametrize(("reentrant", "after", "updates"), [
    (False, False, 1), (False, True, 2), (True, False, 2), (True, True, 2)])
def test_checkpointing_without_no_stats_update(reentrant: bool, after: bool,
                                               updates: int) -> None:
    # As README says: twice, as torch's BN, but where non-reentrant recomputation stops early
    # at a BN that ends the region (its tensors are saved before its running update).
    torch.manual_seed(0)
    bn = bnlab.BatchNorm2d(3)
    model = nn.Sequential(bn, nn.ReLU()) if after else bn
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    checkpoint(model, x, use_reentrant=reentrant).square().sum().backward()
    assert bn.num_batches_tracked.item() == updates
