"""batchnormify (Ioffe & Szegedy 2015, Sec. 3.2)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as TF

import bnlab
from bnlab.convert.surgery import nonlinearity_pairs
from bnlab.variants import GhostBatchNorm


def _mlp() -> nn.Sequential:  # the paper's MNIST net shape: Linear → sigmoid, three times
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 8),
                         nn.Sigmoid(), nn.Linear(8, 3))


class _Net(nn.Module):
    """Functional activations, a shared activation module and a layer already normalized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = TF.relu(self.conv1(x))
        x = self.relu(self.conv2(x)) + x
        x = self.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))  # no nonlinearity after the head


def test_batchnormify_mlp_inserts_bn_before_each_sigmoid_and_drops_bias() -> None:
    model = _mlp()
    out = bnlab.batchnormify(model)
    assert model[1].bias is not None  # a copy by default
    for i in (1, 3):
        layer, norm = out[i]
        assert isinstance(norm, bnlab.BatchNorm1d) and norm.num_features == 8
        assert layer.bias is None
    assert isinstance(out[5], nn.Linear) and out[5].bias is not None  # feeds no nonlinearity
    y = out.train()(torch.randn(5, 4, 4))
    assert y.shape == (5, 3)
    h = out[:2](torch.randn(64, 4, 4))  # BN output (before the sigmoid): zero mean, unit var
    torch.testing.assert_close(h.mean(0), torch.zeros(8), atol=1e-5, rtol=0)


def test_batchnormify_finds_functional_and_shared_activations_with_fx() -> None:
    assert sorted(nonlinearity_pairs(_Net())) == ["conv1", "conv2"]
    out = bnlab.batchnormify(_Net(), norm_layer=functools.partial(GhostBatchNorm,
                                                                  virtual_batch_size=2))
    assert isinstance(out.conv1[1], GhostBatchNorm) and isinstance(out.conv2[1], GhostBatchNorm)
    assert isinstance(out.conv3, nn.Conv2d) and out.conv3.bias is not None
    assert out(torch.randn(4, 2, 5, 5)).shape == (4, 2)


def test_batchnormify_keeps_dtype_mode_and_state_keys() -> None:
    model = _mlp().double().eval()
    out = bnlab.batchnormify(model, inplace=True)
    assert out is model and not out[1][1].training
    assert out[1][1].running_mean.dtype == torch.float64
    assert "1.0.weight" in out.state_dict() and "1.1.running_var" in out.state_dict()
    # The folded inference model is again a plain MLP with biases, and computes the same.
    out.train()(torch.randn(32, 4, 4, dtype=torch.float64))
    out.eval()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(bnlab.fold(out)(x), out(x))
