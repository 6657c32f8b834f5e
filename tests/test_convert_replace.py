"""replace_norm: torch's BN to bnlab's drop-ins and back, and any BN to a variant."""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab.convert import is_frozen
from bnlab.variants import BatchRenorm2d, FrozenBatchNorm2d, GhostBatchNorm

_CONFIG = ("eps", "momentum", "affine", "track_running_stats")


class _Mixed(nn.Module):
    """Every rank and configuration torch's BN has, beside a conv (eval and train differ)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(3, momentum=None)  # cumulative average
        self.bn2_nobias = nn.BatchNorm2d(3, momentum=0.01, bias=False)
        self.bn1 = nn.BatchNorm1d(4, affine=False, eps=1e-3)
        self.bn1_batch = nn.BatchNorm1d(4, track_running_stats=False)  # batch stats in eval
        self.bn3 = nn.BatchNorm3d(2, momentum=0.3)

    def forward(self, x: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = self.bn2_nobias(self.bn2(self.conv(x)))
        return (y.mean((1, 2, 3)).sum() + self.bn1_batch(self.bn1(v)).pow(2).sum()
                + self.bn3(w).pow(3).sum())


def _inputs() -> tuple[torch.Tensor, ...]:
    return torch.randn(6, 2, 5, 5) * 2 + 1, torch.randn(5, 4, 3) - 3, torch.randn(3, 2, 2, 3, 2)


def _step(model: nn.Module, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    xs = tuple(x.clone().requires_grad_() for x in xs)
    out = model(*xs)
    out.backward()
    return (out.detach(), *(x.grad for x in xs))


def test_bnlab_target_keeps_every_layers_configuration_and_function() -> None:
    theirs = _Mixed()
    for _ in range(2):  # running statistics away from their initial values
        theirs(*_inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only torch's exact classes here: nothing to warn about
        ours = bnlab.replace_norm(theirs)
    kinds = {"bn2": bnlab.BatchNorm2d, "bn2_nobias": bnlab.BatchNorm2d, "bn1": bnlab.BatchNorm1d,
             "bn1_batch": bnlab.BatchNorm1d, "bn3": bnlab.BatchNorm3d}
    for name, cls in kinds.items():
        new, old = getattr(ours, name), getattr(theirs, name)
        assert type(new) is cls
        assert all(getattr(new, k) == getattr(old, k) for k in _CONFIG)
        assert (new.bias is None) == (old.bias is None)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    # Training steps (momentum=None's average, momentum 0.01 and 0.3, no running stats) and then
    # eval give the same outputs, input gradients and running statistics.
    for _ in range(3):
        xs = _inputs()
        for a, b in zip(_step(ours, xs), _step(theirs, xs), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    xs = _inputs()
    torch.testing.assert_close(ours(*xs), theirs(*xs), rtol=1e-5, atol=1e-5)


def test_torch_target_is_the_way_back() -> None:
    theirs = _Mixed()
    theirs(*_inputs())
    back = bnlab.replace_norm(bnlab.replace_norm(theirs), "torch")
    assert [type(m) for m in back.modules()] == [type(m) for m in theirs.modules()]
    for name in ("bn2", "bn2_nobias", "bn1", "bn1_batch", "bn3"):
        assert all(getattr(getattr(back, name), k) == getattr(getattr(theirs, name), k)
                   for k in _CONFIG)
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # SyncBN keeps its process group both ways; a frozen layer stays frozen both ways.
    group = object()
    sync = bnlab.replace_norm(nn.SyncBatchNorm(3, process_group=group))
    assert type(sync) is bnlab.SyncBatchNorm and sync.process_group is group
    torch_sync = bnlab.replace_norm(sync, "torch")
    assert type(torch_sync) is nn.SyncBatchNorm and torch_sync.process_group is group
    no_beta = bnlab.replace_norm(nn.SyncBatchNorm(3, bias=False))  # γ only, both ways
    assert no_beta.bias is None and bnlab.replace_norm(no_beta, "torch").bias is None
    frozen = bnlab.freeze(nn.BatchNorm2d(3), affine=True)
    ours = bnlab.replace_norm(frozen)
    assert ours.frozen and not ours.weight.requires_grad and not ours.bias.requires_grad
    again = bnlab.replace_norm(ours.train(), "torch")
    assert is_frozen(again) and not again.weight.requires_grad
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(again(x), frozen.eval()(x))  # running statistics, in train()


class _MyBN(nn.BatchNorm2d):
    """A subclass with behaviour of its own, which no conversion may drop silently."""


def test_layers_without_a_counterpart_are_left_and_named() -> None:
    model = nn.Sequential(_MyBN(3), nn.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"no bnlab counterpart.*0 \(_MyBN\)"):
        out = bnlab.replace_norm(model)
    assert type(out[0]) is _MyBN and type(out[1]) is bnlab.BatchNorm2d
    ours = nn.Sequential(bnlab.BatchNormReLU2d(3), GhostBatchNorm(3, virtual_batch_size=2),
                         bnlab.BatchNorm(3), bnlab.BatchNorm2d(3))
    with pytest.warns(UserWarning, match=r"no torch counterpart.*0 \(BatchNormReLU2d\), "
                      r"1 \(GhostBatchNorm\), 2 \(BatchNorm\)$"):
        out = bnlab.replace_norm(ours, "torch")
    assert [type(m) for m in out] == [bnlab.BatchNormReLU2d, GhostBatchNorm, bnlab.BatchNorm,
                                      nn.BatchNorm2d]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already bnlab's: nothing to do, nothing to say
        assert [type(m) for m in bnlab.replace_norm(ours)] == [type(m) for m in ours]


def test_a_factory_gets_the_layers_structure_when_it_takes_it() -> None:
    old = nn.BatchNorm2d(3, momentum=0.5, affine=False, track_running_stats=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = bnlab.replace_norm(old, bnlab.BatchNorm2d)
    assert not new.affine and new.running_mean is None and new.momentum == 0.1  # its own
    x = torch.randn(4, 3, 2, 2) * 3 + 5
    torch.testing.assert_close(new.eval()(x), old(x))  # both normalize with batch statistics
    # A partial's explicit choice wins: γ = 1, β = 0 compute the same, so no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        affine = bnlab.replace_norm(old, functools.partial(bnlab.BatchNorm2d, affine=True))
    assert affine.affine and affine.running_mean is None
    torch.testing.assert_close(affine.eval()(x), old(x))


def test_a_factory_that_cannot_compute_the_old_function_is_named() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match=r"do not compute.*: 1 \(BatchNorm2d\) -> "
                      r"FrozenBatchNorm2d$"):
        bnlab.replace_norm(model, FrozenBatchNorm2d)
    with pytest.warns(UserWarning, match=r"0 \(BatchNorm2d\) -> BatchNorm2d"):
        bnlab.replace_norm(model[:1], functools.partial(bnlab.BatchNorm2d, affine=False))
    with warnings.catch_warnings():  # not a BN: the user asked for another function
        warnings.simplefilter("error")
        out = bnlab.replace_norm(model, lambda c: nn.GroupNorm(1, c))
    assert all(isinstance(m, nn.GroupNorm) for m in out)


@pytest.mark.parametrize(("factory", "error"), [("jax", ValueError), (3, TypeError)])
def test_a_bad_factory_is_named(factory, error) -> None:
    with pytest.raises(error, match=r"replace_norm: factory must be 'bnlab', 'torch' or a "
                       r"callable \(num_features\) -> nn.Module, got (.jax.|int)"):
        bnlab.replace_norm(nn.BatchNorm2d(2), factory)


def test_inplace_converts_the_model_itself() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2))
    kept = copy.deepcopy(model)
    assert bnlab.replace_norm(model) is not model and type(model[0]) is nn.BatchNorm1d
    assert bnlab.replace_norm(model, inplace=True) is model
    assert type(model[0]) is bnlab.BatchNorm1d and type(kept[0]) is nn.BatchNorm1d


@pytest.mark.parametrize("factory", [
    bnlab.BatchNorm2d, nn.BatchNorm2d, FrozenBatchNorm2d, bnlab.SyncBatchNorm,
    functools.partial(BatchRenorm2d, r_max=2.0),
    functools.partial(GhostBatchNorm, virtual_batch_size=4, stats_update="per_batch"),
])
def test_replace_norm_preserves_eval_outputs(factory) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, eps=1e-3), nn.ReLU(),
                          nn.Conv2d(3, 3, 3), bnlab.BatchNorm2d(3), nn.ReLU())
    model.train()(torch.randn(8, 2, 7, 7) * 2 + 1)
    model.eval()
    x = torch.randn(2, 2, 7, 7)
    out = bnlab.replace_norm(model, factory)
    assert out is not model and all(type(out[i]) is not nn.BatchNorm2d or factory is
                                    nn.BatchNorm2d for i in (1, 4))
    assert out[1].eps == 1e-3 and not out[1].training
    torch.testing.assert_close(out(x), model(x))


def test_replace_norm_match_root_and_frozen_flag() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    out = bnlab.replace_norm(model, bnlab.BatchNorm1d, match=lambda name, _: name == "1")
    assert type(out[0]) is nn.BatchNorm1d and type(out[1]) is bnlab.BatchNorm1d
    frozen = bnlab.freeze(bnlab.BatchNorm1d(2))
    new = bnlab.replace_norm(frozen, bnlab.BatchNorm1d)
    assert new is not frozen and new.frozen
    # A variant's own hyper-parameters come from the factory: eps only is copied.
    renorm = bnlab.replace_norm(nn.BatchNorm2d(2, momentum=0.3), BatchRenorm2d)
    assert renorm.momentum == 0.01


@pytest.mark.parametrize("handle_first", [True, False])
def test_a_bn_kept_under_two_names_is_replaced_under_both(handle_first: bool) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            bn = nn.BatchNorm2d(4)
            if handle_first:
                self.last_bn = bn
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
            self.last_bn = bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    new = bnlab.replace_norm(Net(), "bnlab")
    assert isinstance(new.body[1], bnlab.BatchNorm2d) and new.last_bn is new.body[1]


@pytest.mark.parametrize("target", ["bnlab", "torch"])
def test_mixed_precision_bn_keeps_each_tensors_dtype(target: str) -> None:
    # bfloat16 γ, β beside float32 running statistics (the statistics were rounded to bfloat16)
    old = (nn.BatchNorm2d(4) if target == "bnlab" else bnlab.BatchNorm2d(4)).to(torch.bfloat16)
    old.running_mean = old.running_mean.float().add_(1 / 3)
    old.running_var = old.running_var.float()
    new = bnlab.replace_norm(old, target)
    assert new.weight.dtype == torch.bfloat16 and new.running_mean.dtype == torch.float32
    assert torch.equal(new.running_mean, old.running_mean)


@pytest.mark.parametrize("factory", [BatchRenorm2d, functools.partial(GhostBatchNorm,
                                                                       virtual_batch_size=2),
                                     bnlab.variants.NoisyBatchNorm])
def test_a_bn_without_beta_becomes_a_variant_without_beta(factory) -> None:
    # The variants take torch 2.13's bias=False as the core layers do (they refused it, and
    # replace_norm gave the new layer a β to learn that the old one did not have).
    new = bnlab.replace_norm(nn.Sequential(nn.BatchNorm2d(3, bias=False)), factory)
    assert new[0].bias is None and new[0].weight is not None
    assert new[0](torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)


def _trained_flag_off() -> nn.BatchNorm2d:
    """A BN with statistics whose track_running_stats was then turned off: they stop moving and
    eval keeps normalizing with them (torch's semantics)."""
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.normal_(2.0, 1.0)
        bn.running_var.uniform_(0.5, 3.0)
        bn.weight.normal_()
    bn.track_running_stats = False
    return bn


@pytest.mark.parametrize("factory", ["bnlab", BatchRenorm2d,
                                     functools.partial(GhostBatchNorm, virtual_batch_size=2)])
def test_a_layer_with_its_statistics_flag_off_keeps_them(factory) -> None:
    # The new layer was built from the flag alone: no buffers, so eval normalized with the
    # batch's statistics (max difference 2.1) and no warning said so.
    old = _trained_flag_off()
    x = torch.randn(4, 3, 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it computes the same: nothing to warn about
        new = bnlab.replace_norm(old, factory)
    assert torch.equal(new.running_mean, old.running_mean) and not new.track_running_stats
    torch.testing.assert_close(new.eval()(x), old.eval()(x))
    before = new.running_mean.clone()
    new.train()(x)
    assert torch.equal(new.running_mean, before)  # still not updated in training
    if factory == "bnlab":  # and back
        back = bnlab.replace_norm(new, "torch")
        assert not back.track_running_stats
        torch.testing.assert_close(back.eval()(x), old.eval()(x))


def test_a_fused_layers_hooks_stay_after_its_relu() -> None:
    # Wrapped as Sequential(new, ReLU), the hooks had moved onto the inner layer, before the
    # ReLU: a hook that edits the output changed the model's output.
    model = nn.Sequential(bnlab.BatchNormReLU2d(3), nn.Flatten())
    seen: list[float] = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(out.min().item()) or out - 1)
    x = torch.randn(4, 3, 2, 2)
    want = model(x)
    new = bnlab.replace_norm(model, BatchRenorm2d)
    assert isinstance(new[0], nn.Sequential)
    torch.testing.assert_close(new(x), want)
    assert seen[0] >= 0 and seen[1] >= 0


@pytest.mark.parametrize("kind", ["torch", "bnlab"])
def test_hook_handles_still_remove_the_hooks_after_inplace_replacement(kind: str) -> None:
    model = nn.Sequential(nn.BatchNorm2d(3) if kind == "torch" else bnlab.BatchNorm2d(3))
    calls: list[int] = []
    pre = model[0].register_forward_pre_hook(lambda m, a: calls.append(0))
    post = model[0].register_forward_hook(lambda m, a, out: calls.append(1), always_call=True)
    bnlab.replace_norm(model, "bnlab" if kind == "torch" else "torch", inplace=True)
    x = torch.randn(2, 3, 2, 2)
    model(x)
    assert calls == [0, 1]
    pre.remove()
    post.remove()
    model(x)
    assert calls == [0, 1]


def test_a_frozen_layer_made_a_torch_bn_copies_and_unfreezes() -> None:
    # freeze's handles on the new torch BN pointed at hook dicts that carrying the old layer's
    # hooks replaced: deepcopy (so fold, replace_norm) failed and unfreeze removed nothing
    model = bnlab.freeze(nn.Sequential(nn.Linear(4, 3), bnlab.BatchNorm1d(3)))
    calls: list[int] = []
    model[1].register_forward_hook(lambda m, a, out: calls.append(1))
    back = bnlab.replace_norm(model, "torch")
    assert is_frozen(back[1])
    x = torch.randn(6, 4)
    torch.testing.assert_close(back.train()(x), copy.deepcopy(back).eval()(x))
    assert len(calls) == 2
    bnlab.fold(back)
    bnlab.unfreeze(back)
    before = back[1].running_mean.clone()
    back.train()(x)
    assert not is_frozen(back[1]) and not torch.equal(back[1].running_mean, before)
    assert len(calls) == 3  # the user's hook stays
