"""The accelerator path (PyTorch's native op, cuDNN on GPU) checked on CPU tensors.

CI has no GPU, so the dispatch is forced onto CPU here: outputs, gradients and running
statistics must equal the reference path's (the paper's equations).
"""

from __future__ import annotations

import pytest
import torch

import bnlab
from bnlab import _autograd
from bnlab import functional as F


@pytest.fixture
def native_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "_use_native", lambda x: True)
    monkeypatch.setattr(F, "_use_kernels", lambda x: False)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5), (4, 3, 5, 6), (2, 3, 2, 3, 4)])
def test_native_train_matches_reference(shape):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 2).requires_grad_()
    w = (torch.rand(shape[1], dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(shape[1], dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape, dtype=torch.float64)
    y, mean, var = F.native_train(x, w, b, 1e-5)
    y_ref, mean_ref, var_ref = _autograd.BatchNormTrain.apply(x, w, b, 1e-5)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(mean, mean_ref)
    torch.testing.assert_close(var, var_ref, rtol=1e-9, atol=1e-12)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(y_ref, (x, w, b), g)):
        torch.testing.assert_close(a, r)


def test_layers_through_native_dispatch_match_torch(native_everywhere):
    ours, ref = bnlab.BatchNorm2d(4).double(), torch.nn.BatchNorm2d(4).double()
    for _ in range(3):
        x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_native_dispatch_keeps_the_nonfinite_guard(native_everywhere):
    bn = bnlab.BatchNorm1d(2)
    bn(torch.randn(8, 2))
    before = bn.running_mean.clone()
    bad = torch.randn(8, 2)
    bad[0, 0] = float("nan")
    F._warned_nonfinite = False
    with pytest.warns(RuntimeWarning, match="non-finite batch statistics"):
        bn(bad)
    torch.testing.assert_close(bn.running_mean, before)
    assert bn.num_nonfinite_batches.item() == 1


def test_native_is_not_used_on_cpu_by_default():
    assert not F._use_native(torch.randn(2, 3))


@pytest.mark.parametrize(("x_dtype", "p_dtype"), [
    (torch.float32, torch.float64), (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float64), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32)])
def test_mixed_dtypes_take_a_path_that_computes_them(native_everywhere, monkeypatch, x_dtype,
                                                     p_dtype):
    # torch's op takes only parameters in x's dtype, or float32 ones for half x: the other
    # combinations, which bnlab's layers take, reached it and failed ("mixed dtype").
    monkeypatch.setattr(F, "_fast", None)
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5).to(x_dtype)
    w, b = torch.rand(3).to(p_dtype) + 0.5, torch.randn(3).to(p_dtype)
    rm, rv = torch.randn(3).to(p_dtype), torch.rand(3).to(p_dtype) + 0.5
    for training in (True, False):
        y = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
        monkeypatch.setattr(F, "_use_native", lambda x: False)
        want = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
        monkeypatch.setattr(F, "_use_native", lambda x: True)
        assert y.dtype == x_dtype
        torch.testing.assert_close(y.float(), want.float(), rtol=1e-2, atol=1e-2)
