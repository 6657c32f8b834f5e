"""FrozenBatchNorm: BN's inference transform in every mode, with BN's state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.variants import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, LpNorm

F64 = torch.float64


def _trained_bn(c: int = 3) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c, eps=1e-3, dtype=F64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    bn.train()(torch.randn(8, c, 4, 4, dtype=F64) * 3 + 2)
    return bn.eval()


def test_equals_bn_eval_in_train_mode_and_passes_input_gradients() -> None:
    bn = _trained_bn()
    frozen = FrozenBatchNorm2d.from_batchnorm(bn).train()
    assert frozen.eps == 1e-3
    x = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = frozen(x)
    torch.testing.assert_close(y, bn(x2))
    y.sum().backward()
    bn(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert list(frozen.parameters()) == []
    before = frozen.running_mean.clone()
    frozen(torch.randn(4, 3, 4, 4, dtype=F64))
    assert torch.equal(frozen.running_mean, before)


def test_state_dict_round_trips_with_bn() -> None:
    bn = _trained_bn()
    frozen = FrozenBatchNorm2d(3, eps=1e-3, dtype=F64)
    frozen.load_state_dict(bn.state_dict())
    assert set(frozen.state_dict()) == set(bn.state_dict())
    back = nn.BatchNorm2d(3, eps=1e-3, dtype=F64).eval()
    back.load_state_dict(frozen.state_dict())
    x = torch.randn(2, 3, 2, 2, dtype=F64)
    torch.testing.assert_close(back(x), bn(x))
    # torchvision's FrozenBatchNorm2d checkpoints have no num_batches_tracked.
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm2d(3, eps=1e-3, dtype=F64).load_state_dict(sd)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_statistics_in_float32(dtype: torch.dtype) -> None:
    """Half-precision input is normalized in float32 and rounded once: with ε = 0 and a
    running variance of 1e-8, 1/√v = 1e4 and (x − 300)·1e4 = 2e4; float16 arithmetic gave inf
    (1e-8 underflows there), bfloat16 a mean of 300 rounded to 300 from 300.5."""
    frozen = FrozenBatchNorm1d(2, eps=0.0)
    frozen.running_var.fill_(1e-8)
    frozen.running_mean.fill_(300.5 if dtype == torch.bfloat16 else 300.0)
    x = torch.full((4, 2), 302.0)  # exact in both half types
    y = frozen(x.to(dtype))
    assert y.dtype == dtype
    assert torch.equal(y, frozen(x).to(dtype))  # the float32 result, rounded once


def test_bad_input_and_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1.0"):
        FrozenBatchNorm(3, eps=-1.0)
    assert FrozenBatchNorm(3, eps=0.0).eps == 0.0  # eval only: as torch's BN, ε = 0 evaluates
    with pytest.raises(ValueError, match="4D"):
        FrozenBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        FrozenBatchNorm(3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="track_running_stats"):
        FrozenBatchNorm.from_batchnorm(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"expected a BatchNorm layer .* got LpNorm"):
        FrozenBatchNorm.from_batchnorm(LpNorm(3))


def test_replace_norm_to_frozen_and_back_preserves_eval_outputs() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bnlab.BatchNorm2d(3, eps=1e-4), nn.ReLU())
    model.train()(torch.randn(8, 2, 5, 5))
    model.eval()
    x = torch.randn(2, 2, 5, 5)
    frozen = bnlab.replace_norm(model, FrozenBatchNorm2d)
    assert isinstance(frozen[1], FrozenBatchNorm2d) and frozen[1].eps == 1e-4
    torch.testing.assert_close(frozen.train()(x), model(x))
    back = bnlab.replace_norm(frozen, bnlab.BatchNorm2d).eval()
    torch.testing.assert_close(back(x), model(x))
