"""Conversions on what users' models hold beside plain BN: BN subclasses with a forward of their
own (BN + activation), attributes read in a forward, fused BN+ReLU, hooks, parallel-branch
containers, frozen layers and momentum=None for Keras/Flax, and malformed weight dicts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bnlab
from bnlab.convert import (
    ChannelAffine,
    flax_variables,
    fold,
    fold_pairs,
    keras_weights,
    load_flax_variables,
    load_keras_weights,
    momentum_to_decay,
    replace_norm,
)
from bnlab.variants import FrozenBatchNorm2d


def _randomize(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their defaults."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, bnlab.BatchNorm)):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.randn(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g))
    return model


class BNAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d in miniature: BN, then an activation, in one module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class Attention(nn.Module):
    """Normalization-based attention (NAM): the forward reads the BN's γ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        w = self.bn.weight.abs() / self.bn.weight.abs().sum()
        return y * w.view(1, -1, 1, 1)


@pytest.mark.parametrize("make", [lambda: BNAct(4), lambda: None], ids=["subclass", "attrs"])
def test_fold_leaves_in_place_what_it_cannot_reproduce(make):
    torch.manual_seed(0)
    bn = make()
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), bn) if bn is not None else Attention())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model.eval()(x)
    with pytest.warns(UserWarning, match=r"fold: left in place \(eval mode\), not folded: "
                      r"(1 \(BNAct.forward is its own\)|bn \(the model reads its attributes\))"):
        folded = fold(model)
    with torch.no_grad():
        assert torch.allclose(folded(x), want, atol=1e-6)
    assert fold_pairs(model) == [] or bn is None


def test_replace_norm_keeps_a_fused_relu_and_the_hooks():
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNormReLU2d(4))).eval()
    calls = []
    model[1].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
        new = replace_norm(model, FrozenBatchNorm2d)
        got = new(x)
    assert isinstance(new[1], nn.Sequential) and isinstance(new[1][1], nn.ReLU)
    assert torch.allclose(got, want, atol=1e-6) and got.min() == 0
    assert len(calls) == 2  # the original's hook, then the copy the replacement carries

    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    seen = []
    plain[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    replace_norm(plain)(x)  # torch's BN -> bnlab's: the hook comes along
    assert seen == [torch.Size([2, 4, 4, 4])]


def test_replace_norm_leaves_subclasses_with_their_own_forward_unless_matched():
    model = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4))).eval()
    with pytest.warns(UserWarning, match=r"their classes' forward being their own.*1 \(BNAct\)"):
        kept = replace_norm(model, FrozenBatchNorm2d)
    assert isinstance(kept[1], BNAct)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chosen = replace_norm(model, FrozenBatchNorm2d, match=lambda n, m: n == "1")
    assert isinstance(chosen[1], FrozenBatchNorm2d)


class Branches(nn.Sequential):
    """Parallel branches over one input: no chain, though an nn.Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self], dim=1)


def test_fold_does_not_chain_the_children_of_a_sequential_with_its_own_forward():
    class Par(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = Branches(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace this
                return self.branches(x)
            return x

    model = _randomize(Par()).eval()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = model(x)
        got = fold(model)(x)
    assert fold_pairs(model) == []
    assert torch.allclose(got, want, atol=1e-6)


def test_channel_affine_refuses_another_channel_count():
    affine = ChannelAffine(torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match=r"expected input \(N, 1, \*\), got shape \[2, 3, 4\]"):
        affine(torch.randn(2, 3, 4))
    assert affine(torch.randn(2, 1, 4)).shape == (2, 1, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is, in torch 2.x
        scripted = torch.jit.script(affine)  # still scriptable, the check included
    with pytest.raises(torch.jit.Error, match=r"expected input \(N, 1, \*\)"):
        scripted(torch.randn(2, 3, 4))


def _keras(c: int = 3):
    g = np.random.default_rng(0)
    return [g.normal(size=c), g.normal(size=c), g.normal(size=c), g.uniform(0.5, 1, size=c)]


def test_frozen_layers_load_and_export_keras_and_flax():
    gamma, beta, mean, var = _keras()
    frozen = load_keras_weights(FrozenBatchNorm2d(3), [gamma, beta, mean, var])
    assert np.allclose(frozen.weight.numpy(), gamma) and frozen.eps == 1e-3
    out = keras_weights(frozen)
    assert out.config["momentum"] == 0.99 and np.allclose(out.weights[3].numpy(), var)
    flax = flax_variables(frozen)
    assert flax.config["momentum"] == 0.99
    again = load_flax_variables(FrozenBatchNorm2d(3), flax.variables)
    assert torch.equal(again.running_var, frozen.running_var)


def test_momentum_none_exports_with_the_default_decay_and_a_warning():
    bn = nn.BatchNorm2d(3, momentum=None)
    with pytest.warns(UserWarning, match=r"momentum=None \(the cumulative average\), which "
                      r"Keras and Flax lack; config\['momentum'\] is their default 0.99"):
        out = keras_weights(bn)
    assert out.config["momentum"] == 0.99 and len(out.weights) == 4


def test_malformed_keras_and_flax_weights_are_refused_in_their_own_terms():
    gamma, beta, mean, var = _keras()
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"weights has two 'gamma' arrays \('a/gamma' and "
                       r"'b/gamma'\); pass one layer's weights"):
        load_keras_weights(bn, {"a/gamma": gamma, "b/gamma": gamma, "bn/beta:0": beta,
                                "bn/moving_mean:0": mean, "bn/moving_variance:0": var})
    with pytest.raises(ValueError, match=r"load_keras_weights: gamma must be finite"):
        load_keras_weights(bn, [gamma * np.nan, beta, mean, var])
    with pytest.raises(ValueError, match=r"load_flax_variables: scale must have shape \(3,\)"):
        load_flax_variables(bn, {"params": {"scale": gamma[:2], "bias": beta},
                                 "batch_stats": {"mean": mean, "var": var}})
    with pytest.raises(ValueError, match=r"load_flax_variables: mean must be finite"):
        load_flax_variables(bn, {"batch_stats": {"mean": mean * np.inf, "var": var}})
    assert torch.equal(bn.weight, torch.ones(3))  # nothing loaded
    for bad in ("0.1", True, None, 1.5):
        with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
            momentum_to_decay(bad)
