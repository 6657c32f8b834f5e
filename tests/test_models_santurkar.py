"""The Santurkar et al. (2018) models: the VGG-style network and the 25-layer deep linear net."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.diagnostics import default_layers
from bnlab.lab.experiments.santurkar2018._probes import layer_groups
from bnlab.lab.models.dln import DeepLinearNetwork, dln_loss, make_dln_data
from bnlab.lab.models.vgg import VGG, vgg
from bnlab.layers import BatchNorm
from bnlab.variants import ActivationNoise, LpNorm, NoisyBatchNorm

# ----------------------------------------------------------------------------- VGG


@pytest.mark.parametrize(("in_channels", "size"), [(1, 32), (1, 28), (3, 32)])
def test_vgg_shapes_and_paper_layer_numbering(in_channels, size):
    model = VGG(in_channels=in_channels, image_size=size, width=0.125, norm_layer=BatchNorm)
    x = torch.randn(4, in_channels, size, size)
    assert model(x).shape == (4, 10)
    layers = model.layers()
    assert len(layers) == 13  # the paper's figures name layers up to #13
    assert [type(m) for m in layers] == [nn.Conv2d] * 10 + [nn.Linear] * 3
    names = {m: n for n, m in model.named_modules()}
    assert default_layers(model, (x,)) == [names[m] for m in layers]  # = forward order
    # Def. 2.1's layers: each with its BN (γ, β move with "the previous layers"), the last alone.
    groups = layer_groups(model)
    assert [[names[m] for m in g] for g in groups] == default_layers(model, (x,),
                                                                      with_norms=True)
    assert [len(g) for g in groups] == [2] * 12 + [1]
    assert len(model.norms()) == 12 and len(model.activations()) == 12
    assert all(isinstance(n, BatchNorm) for n in model.norms())
    assert [n.num_features for n in model.norms()[:3]] == [8, 8, 16]  # 64·⅛, 64·⅛, 128·⅛


def test_vgg_norm_layer_is_an_argument():
    calls = []

    def factory(c):
        calls.append(c)
        return LpNorm(c, p=1)

    model = VGG(width=0.125, norm_layer=factory, classifier_norm=False, activation=nn.Tanh)
    assert len(calls) == 10 and all(isinstance(n, LpNorm) for n in model.norms()[:10])
    assert all(isinstance(n, nn.Identity) for n in model.norms()[10:])
    assert all(isinstance(a, nn.Tanh) for a in model.activations())
    plain = VGG(width=0.125)
    assert all(isinstance(n, nn.Identity) for n in plain.norms())
    assert sum(p.numel() for p in plain.parameters()) < sum(
        p.numel() for p in VGG(width=0.125, norm_layer=BatchNorm).parameters())


def test_vgg_glorot_init():
    model = VGG(width=0.25)
    conv = model.layers()[5]  # 3×3 conv, 64 -> 64 channels at width ¼
    fan_in, fan_out = conv.weight[0].numel(), conv.weight.shape[0] * 9
    bound = math.sqrt(6 / (fan_in + fan_out))  # Glorot-uniform U(−b, b), var b²/3
    assert conv.weight.abs().max() <= bound
    assert math.isclose(conv.weight.var().item(), bound**2 / 3, rel_tol=0.05)
    assert all((m.bias == 0).all() for m in model.layers())


@pytest.mark.parametrize("norm", [None, BatchNorm, NoisyBatchNorm, ActivationNoise,
                                  lambda c: LpNorm(c, p=math.inf)])
def test_vgg_trains_one_step_with_every_norm(norm):
    torch.manual_seed(0)
    model = vgg(norm_layer=norm, width=0.125)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    model.eval()
    out = model(x[:1])  # eval works on one example
    torch.testing.assert_close(out, model(x[:1]))


def test_vgg_bad_arguments():
    with pytest.raises(ValueError, match="width"):
        VGG(width=0)


# ----------------------------------------------------------------------------- DLN


def test_dln_structure_and_forward_is_the_product():
    torch.manual_seed(0)
    net = DeepLinearNetwork()
    assert len(net.layers()) == 25
    assert all(m.weight.shape == (10, 10) and m.bias is None for m in net.layers())
    prod = torch.eye(10)
    for m in net.layers():
        prod = m.weight.detach() @ prod  # W_25 ⋯ W_1
    x = torch.randn(5, 10)
    torch.testing.assert_close(net(x), x @ prod.T, rtol=1e-4, atol=1e-5)
    bound = math.sqrt(6 / 20)  # Glorot uniform for 10×10
    assert all(m.weight.abs().max() <= bound for m in net.layers())


def test_dln_norm_placement():
    bn = DeepLinearNetwork(norm_layer=BatchNorm)
    assert sum(isinstance(n, BatchNorm) for n in bn.norms()) == 24
    assert isinstance(bn.norms()[-1], nn.Identity)
    assert sum(isinstance(n, BatchNorm) for n in
               DeepLinearNetwork(norm_layer=BatchNorm, norm_last=True).norms()) == 25
    names = {m: n for n, m in bn.named_modules()}
    x = torch.randn(6, 10)
    assert default_layers(bn, (x,)) == [names[m] for m in bn.layers()]
    with pytest.raises(ValueError, match="depth"):
        DeepLinearNetwork(depth=0)


def test_dln_data_is_seeded_and_targets_are_ax():
    a, b, c = make_dln_data(seed=1), make_dln_data(seed=1), make_dln_data(seed=2)
    assert a.x.shape == (1000, 10) and a.A.shape == (10, 10)
    assert torch.equal(a.x, b.x) and torch.equal(a.A, b.A) and not torch.equal(a.A, c.A)
    torch.testing.assert_close(a.y, a.x @ a.A.T)
    assert abs(a.x.mean()) < 0.05 and abs(a.x.var() - 1) < 0.05
    d = make_dln_data(n=3, dim=4, dtype=torch.float64)
    assert d.x.dtype == torch.float64 and d.y.shape == (3, 4)


def test_dln_loss_is_a_sum_and_gradient_descent_lowers_it():
    torch.manual_seed(0)
    data = make_dln_data(seed=0)
    net = DeepLinearNetwork()
    loss0 = dln_loss(net(data.x), data.y)
    torch.testing.assert_close(loss0, ((net(data.x) - data.y) ** 2).sum())
    assert 3e4 < loss0.item() < 1e6  # ≈ n·dim·(dim + 1) = 1.1e5 at Glorot init
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)  # the paper's full-batch GD
    for _ in range(20):
        opt.zero_grad()
        loss = dln_loss(net(data.x), data.y)
        loss.backward()
        opt.step()
    assert dln_loss(net(data.x), data.y) < loss0
    bn = DeepLinearNetwork(norm_layer=BatchNorm)
    assert torch.isfinite(dln_loss(bn(data.x), data.y))
