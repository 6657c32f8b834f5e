"""Folding where modules, weights or hooks are shared with the rest of the model: aliases, the
`nn.Sequential` fallback's shared modules and layer subclasses, tied functional weights, BN
hooks, mixed precision. Each case once gave wrong outputs (or a KeyError); the check is always
`fold(model)(x) == model.eval()(x)`."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnlab
from bnlab.convert import ChannelAffine, fold, fold_pairs
from bnlab.stats import is_batchnorm


def _randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.2)
                m.weight.copy_(torch.rand(c, generator=g) * 2 + 0.3)
                m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def _check(model: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning: tested in test_fold.py
        folded = fold(model)
    assert not [m for m in folded.modules() if is_batchnorm(m)]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=atol, rtol=1e-5)
    return folded


def _untraceable(x: torch.Tensor) -> bool:
    return bool(x.sum() > -1e30)  # data-dependent control flow: torch.fx cannot trace it


@pytest.mark.parametrize("handle_first", [True, False])
def test_a_bn_kept_under_two_names_is_replaced_under_both(handle_first: bool) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            bn = bnlab.BatchNorm2d(4)
            if handle_first:  # a handle on the BN (for zero-init, hooks) before its container
                self.norm = bn
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
            self.norm = bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    folded = _check(_randomize(Net()), torch.randn(2, 3, 6, 6))
    assert folded.norm is folded.body[1]  # (it ran twice: once in the conv, once as a BN)


def test_the_fallback_leaves_modules_registered_twice_alone() -> None:
    conv, bn = nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4)

    class SharedConv(nn.Module):  # one conv, each use with its own BN
        def __init__(self) -> None:
            super().__init__()
            self.s1 = nn.Sequential(conv, bnlab.BatchNorm2d(4))
            self.s2 = nn.Sequential(conv, bnlab.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.s1(x) + self.s2(x) if _untraceable(x) else x

    class SharedBN(nn.Module):  # one BN after two convs (it was a KeyError)
        def __init__(self) -> None:
            super().__init__()
            self.s1 = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
            self.s2 = nn.Sequential(nn.Conv2d(3, 4, 3), bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.s1(x) + self.s2(x) if _untraceable(x) else x

    for model in (SharedConv(), SharedBN()):
        assert fold_pairs(model) == []
        _check(_randomize(model), torch.randn(2, 3, 6, 6))


def test_the_fallback_does_not_fold_into_a_layer_subclass_with_its_own_forward() -> None:
    class StdConv2d(nn.Conv2d):  # weight standardization (timm's StdConv2d): not linear in W
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
            return F.conv2d(x, w, self.bias)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = nn.Sequential(StdConv2d(3, 4, 3), bnlab.BatchNorm2d(4),
                                     nn.Conv2d(4, 4, 1), bnlab.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.seq(x) if _untraceable(x) else x

    assert fold_pairs(Net()) == [("seq.2", "seq.3")]  # the plain conv still folds
    folded = _check(_randomize(Net()), torch.randn(2, 3, 6, 6))
    assert isinstance(folded.seq[1], ChannelAffine)


def test_a_layer_whose_weight_the_model_also_reads_is_not_folded() -> None:
    class TiedAutoencoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.bn = nn.Linear(6, 4), bnlab.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(self.bn(self.enc(x)), self.enc.weight.t())  # the decoder: W^T

    model = _randomize(TiedAutoencoder())
    assert fold_pairs(model) == []
    _check(model, torch.randn(5, 6))


def test_a_bn_with_forward_hooks_keeps_them_as_a_channel_affine() -> None:
    calls = []
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    model[1].register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model[1].register_forward_hook(lambda m, args, out: out.clamp(min=0))  # not linear
    bnlab.freeze(model)  # freeze's own hooks on a torch BN are dropped; bnlab's has none
    folded = _check(_randomize(model), torch.randn(2, 3, 6, 6))
    assert isinstance(folded[1], ChannelAffine) and calls.count("pre") == 2
    torch_bn = bnlab.freeze(_randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))
    assert isinstance(_check(torch_bn, torch.randn(2, 3, 6, 6))[1], nn.Identity)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_a_float32_bn_in_a_bfloat16_model_folds_to_bfloat16_outputs(norm: type) -> None:
    # The mixed-precision recipe: layers in bfloat16, BN kept in float32. A BN after a pool
    # becomes a ChannelAffine, whose float32 output reached the next bfloat16 conv.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), norm(4), nn.Conv2d(4, 2, 1))
    model = _randomize(model).to(torch.bfloat16)
    model[2].float()
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    folded = _check(model, x, atol=5e-2)
    assert isinstance(folded[2], ChannelAffine) and folded(x).dtype == torch.bfloat16


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, bnlab.BatchNorm2d])
def test_a_linear_is_not_folded_into_a_batchnorm2d(norm: type) -> None:
    # A Linear on (N, C, H, W) maps W; BatchNorm2d normalizes C: with W = C the sizes match,
    # and the fold scaled the wrong dimension.
    model = _randomize(nn.Sequential(nn.Linear(4, 4), norm(4)))
    assert isinstance(_check(model, torch.randn(2, 4, 3, 4))[1], ChannelAffine)
