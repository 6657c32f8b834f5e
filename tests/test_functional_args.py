"""The functional entry points' arguments off the common path: gradients through the running
statistics in evaluation, ``training`` that is not a bool, arguments that are not tensors,
buffers made under ``torch.inference_mode``, and views of channels_last tensors. Each once
behaved differently on the kernels' path and the reference path, or differed from torch, or
raised an unnamed error from inside torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import bnlab
from bnlab import functional as F
from bnlab.kernels import bn_add_relu, bn_relu

FNS = {"batch_norm": F.batch_norm, "bn_relu": bn_relu,
       "bn_add_relu": lambda x, *a, **k: bn_add_relu(x, torch.zeros_like(x), *a, **k)}


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("dtype, force", [(torch.float32, False), (torch.float32, True),
                                          (torch.float64, False)])
def test_eval_differentiates_through_the_running_statistics_on_every_path(
        name, dtype, force, monkeypatch) -> None:
    """Test-time adaptation of E[x], Var[x]: with y = γ(x − μ)/√(v + ε) + β (Alg. 2) and
    upstream g (masked by the ReLU where fused), ∂L/∂μ = −γ/√(v + ε)·Σg and
    ∂L/∂v = −½γ(v + ε)^(−3/2)·Σ g(x − μ), per channel. The kernels have no such gradient, so
    the call takes the reference path (it returned no gradient at all, silently)."""
    if force:
        monkeypatch.setenv("BNLAB_FORCE_REFERENCE", "1")
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5, dtype=dtype)
    rm = torch.randn(3, dtype=dtype).requires_grad_()
    rv = (torch.rand(3, dtype=dtype) + 0.5).requires_grad_()
    w, b, eps = torch.rand(3, dtype=dtype) + 0.5, torch.randn(3, dtype=dtype), 1e-5
    g = torch.randn_like(x)
    y = FNS[name](x, rm, rv, w, b, False, 0.1, eps)
    (y * g).sum().backward()
    if name != "batch_norm":
        g = g * (y > 0)
    view = (1, 3, 1, 1)
    s = (rv.detach() + eps).view(view)
    dm = (-w.view(view) / s.sqrt() * g).sum((0, 2, 3))
    dv = (-0.5 * w.view(view) * s ** -1.5 * g * (x - rm.detach().view(view))).sum((0, 2, 3))
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    torch.testing.assert_close(rm.grad, dm, **tol)
    torch.testing.assert_close(rv.grad, dv, **tol)


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("training", [0.1, "eval", None, 1, np.True_, torch.tensor(False)])
def test_training_must_be_a_bool(name, training) -> None:
    """Momentum one slot early (``batch_norm(x, rm, rv, w, b, 0.1)``) ran a training step on
    the evaluation's buffers; torch refuses anything but a bool."""
    x, rm, rv = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match=f"{name}: training must be a bool, got "
                                        f"{type(training).__name__}"):
        FNS[name](x, rm, rv, None, None, training)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("training", [True, False])
def test_arguments_that_are_not_tensors_are_named(training) -> None:
    x, rm, rv = torch.randn(8, 3), torch.zeros(3), torch.ones(3)
    cases = [
        ((x, np.zeros(3), rv), "running_mean must be a torch.Tensor or None, got ndarray"),
        ((x, rm, rv, [1.0, 1.0, 1.0]), "weight must be a torch.Tensor or None, got list"),
        ((x.numpy(), rm, rv), "input must be a torch.Tensor, got ndarray"),
    ]
    for args, msg in cases:
        with pytest.raises(TypeError, match=msg):
            F.batch_norm(*args, training=training)
    for residual in (None, 1.0, np.ones((8, 3))):
        with pytest.raises(TypeError, match=r"bn_add_relu: residual must be a torch\.Tensor"):
            bn_add_relu(x, residual, rm, rv, training=training)  # type: ignore[arg-type]


def test_functional_momentum_message_does_not_offer_none() -> None:
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        F.batch_norm(torch.randn(8, 3), torch.zeros(3), torch.ones(3), training=True,
                     momentum=1.5)


@pytest.mark.parametrize("name", FNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_buffers_made_under_inference_mode_train_as_torchs(name, dtype) -> None:
    """A model built under ``torch.inference_mode`` and then trained: torch's update writes its
    inference-tensor buffers; the reference path raised torch's "Inplace update to inference
    tensor outside InferenceMode"."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, dtype=dtype) * 2 + 1
    with torch.inference_mode():
        ours = (torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype))
        ref = (torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype))
    y = FNS[name](x, *ours, None, None, True, 0.1)
    want = TF.batch_norm(x, *ref, None, None, True, 0.1)
    torch.testing.assert_close(y, want if name == "batch_norm" else want.relu())
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(ours[0], torch.zeros(3, dtype=dtype))  # it moved


VIEWS = {
    "crop": lambda x: x[:, :, 1:-1, 2:],
    "subsample": lambda x: x[..., ::2, ::2],
    "channel slice": lambda x: x[:, 1:4],
    "3-D crop": lambda x: x[:, :, 1:, :-1, 1:],
}


@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("name", ["batch_norm", "bn_relu"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_views_of_channels_last_tensors_keep_torchs_layout(view, name, training, dtype) -> None:
    """torch's BN gives a crop or strided view of a channels_last tensor a channels_last output
    (its suggest_memory_format follows stride order); bnlab gave a contiguous one, on the
    kernels' path and the reference path, which the next channels_last conv converts back."""
    torch.manual_seed(0)
    five = view == "3-D crop"
    shape, fmt = ((3, 5, 4, 5, 6), torch.channels_last_3d) if five else \
        ((3, 5, 8, 8), torch.channels_last)
    base = (torch.randn(shape, dtype=dtype) * 2 + 1).contiguous(memory_format=fmt)
    base.requires_grad_()
    base_ref = base.detach().clone().requires_grad_()  # (clone keeps the layout)
    c = VIEWS[view](base).shape[1]
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    w = (torch.rand(c, dtype=dtype) + 0.5).requires_grad_()
    w_ref = w.detach().clone().requires_grad_()
    y = FNS[name](VIEWS[view](base), rm.clone(), rv.clone(), w, None, training)
    want = TF.batch_norm(VIEWS[view](base_ref), rm.clone(), rv.clone(), w_ref, None, training)
    want = want if name == "batch_norm" else want.relu()
    assert y.stride() == want.stride() and y.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), (base, w))
    ref = torch.autograd.grad((want * g).sum(), (base_ref, w_ref))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_inside_inference_mode_updates_its_inference_buffers() -> None:
    with torch.inference_mode():
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        x = torch.randn(8, 3, dtype=torch.float64) + 2
        F.batch_norm(x, rm, rv, None, None, True, 0.5)
    torch.testing.assert_close(rm, 0.5 * x.mean(0))


def test_a_tensor_eps_is_taken_as_torchs() -> None:
    # torch's layer and F.batch_norm take a 0-d tensor ε; bnlab refused it as "not a number".
    x = torch.randn(4, 3, 2, 2)
    eps = torch.tensor(1e-3)
    ours = bnlab.BatchNorm2d(3, eps=eps)
    assert isinstance(ours.eps, float)
    torch.testing.assert_close(ours(x), torch.nn.BatchNorm2d(3, eps=eps)(x))
    torch.testing.assert_close(F.batch_norm(x, None, None, training=True, eps=eps),
                               TF.batch_norm(x, None, None, training=True, eps=1e-3))
    converted = bnlab.replace_norm(torch.nn.BatchNorm2d(3, eps=eps))
    assert isinstance(converted.eps, float)
