"""bnlab.kernels' public entry points called directly: their arguments checked as
bnlab.functional's, gradients of running statistics honoured, version counters moved by every
running update, residual dtypes, and BNLAB_FORCE_REFERENCE's spellings."""

from __future__ import annotations

import warnings

import pytest
import torch

import bnlab
import bnlab._checks
from bnlab import functional as F
from bnlab import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the kernels did not build")


@pytest.mark.parametrize("call, kind, message", [
    (lambda x: kernels.batch_norm_train(x, torch.ones(3, device="meta"), None, 1e-5),
     ValueError, r"batch_norm_train: weight must be on the input's device \(cpu\), got meta"),
    (lambda x: kernels.batch_norm_train(x, torch.ones(1, 3), None, 1e-5),
     ValueError, r"weight must have shape \(3,\)"),
    (lambda x: kernels.batch_norm_train(x, None, None, -1.0),
     ValueError, r"eps must be a finite number > 0 when training"),
    (lambda x: kernels.batch_norm_train(x[:1, :, :1, :1], None, None, 1e-5),
     ValueError, r"more than 1 value per channel"),
    (lambda x: kernels.batch_norm_train(x, torch.ones(3, dtype=torch.long), None, 1e-5),
     TypeError, r"weight must be floating point"),
    (lambda x: kernels.batch_norm_eval(x, torch.zeros(4), torch.ones(3), None, None, 1e-5),
     ValueError, r"batch_norm_eval: running_mean must have shape \(3,\)"),
    (lambda x: kernels.batch_norm_train_update(x, None, None, 1e-5, torch.zeros(3),
                                               torch.ones(3), float("nan")),
     ValueError, r"momentum must be in \[0, 1\]"),
    (lambda x: kernels.batch_norm_train_update(x, None, None, 1e-5, torch.zeros(3),
                                               torch.ones(3), 5.0),
     ValueError, r"momentum must be in \[0, 1\]"),
    (lambda x: F.batch_norm(x, torch.zeros(3), torch.ones(3), training=True,
                            momentum=torch.tensor(0.1, device="meta")),
     ValueError, r"momentum must be on the input's device \(cpu\) or a CPU scalar, got a "
                 r"tensor on meta"),
    (lambda x: kernels.update_running_stats(torch.zeros(3), torch.ones(3), torch.zeros(3),
                                            torch.ones(3), 0, 0.1),
     ValueError, r"count must be an integer >= 1"),
    (lambda x: kernels.update_running_stats(torch.zeros(3), torch.ones(3), torch.zeros(3),
                                            torch.ones(4), 8, 0.1),
     ValueError, r"var must have mean's shape"),
])
def test_public_entry_points_check_their_arguments(call, kind, message):
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(kind, match=message):
        call(x)


@pytest.mark.parametrize("momentum", [float("nan"), torch.tensor(float("nan")),
                                      torch.tensor(1.5), torch.full((3,), 0.1)])
def test_nan_momentum_cannot_poison_the_buffers(momentum):
    # update_running_stats checked a number but took any tensor: a NaN one wrote NaN into both
    # buffers, and a (3,) one failed in C++ without naming momentum
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="momentum must be"):
        kernels.batch_norm_train_update(torch.randn(4, 3), None, None, 1e-5, rm, rv, momentum)
    with pytest.raises(ValueError, match="update_running_stats: momentum must be"):
        kernels.update_running_stats(rm, rv, torch.ones(3), torch.ones(3), 4, momentum)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_direct_training_calls_take_an_empty_batch_as_functional_does():
    # The C++ op refused it ("at least one value per channel"): an empty output, no update.
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    w = torch.rand(3, requires_grad=True)
    y, mean, var = kernels.batch_norm_train(x, w, None, 1e-5)
    assert y.shape == x.shape and mean.isnan().all() and var.isnan().all()
    rm, rv = torch.zeros(3), torch.ones(3)
    y2, finite = kernels.batch_norm_train_update(x, w, None, 1e-5, rm, rv, 0.1)
    assert finite is None and torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    torch.testing.assert_close(y2, F.batch_norm(x, None, None, w, None, True))
    (y.sum() + y2.sum()).backward()
    assert torch.equal(w.grad, torch.zeros(3))


def test_batch_norm_eval_differentiates_running_statistics_that_require_grad():
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    rm = torch.randn(3, requires_grad=True)
    rv = (torch.rand(3) + 0.5).requires_grad_(True)
    y = kernels.batch_norm_eval(x, rm, rv, None, None, 1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, rm, rv), g)
    # The closed forms of y = (x − μ)/√(v + ε): ∂/∂x = 1/√(v + ε), ∂/∂μ = −Σg/√(v + ε),
    # ∂/∂v = −½·Σg·(x − μ)·(v + ε)^(−3/2), sums over all but the channel.
    inv = (rv.detach() + 1e-5).rsqrt().view(1, 3, 1, 1)
    centred = x.detach() - rm.detach().view(1, 3, 1, 1)
    want = (g * inv, -(g * inv).sum((0, 2, 3)), (-0.5 * g * centred * inv**3).sum((0, 2, 3)))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", [bnlab.BatchNorm2d, bnlab.BatchNormReLU2d])
def test_every_running_update_moves_the_version_counters(make):
    """A graph that saved running_var refuses to backward once a training forward changed it
    (the fused layer's update used the new values silently)."""
    layer = make(3)
    v = torch.ones(3, requires_grad=True)
    y = (v * layer.running_var).sum()
    before = layer.running_var._version
    layer(torch.randn(4, 3, 5, 5))
    assert layer.running_var._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_update_running_stats_works_before_anything_loaded_the_kernels():
    import subprocess
    import sys

    code = ("import torch; from bnlab import kernels; rm, rv = torch.zeros(3), torch.ones(3); "
            "f = kernels.update_running_stats(rm, rv, torch.ones(3), torch.full((3,), 2.0), 5, "
            "0.5); print(bool(f), rm.tolist(), rv.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)  # (an AttributeError: the op was not registered yet)
    assert out.stdout.split() == ["True", "[0.5,", "0.5,", "0.5]", "[1.75,", "1.75,", "1.75]"]


def test_bn_add_relu_refuses_a_residual_of_another_dtype():
    x = torch.randn(4, 3, 5, 5)
    bn = bnlab.BatchNorm2d(3)
    with pytest.raises(TypeError, match=r"residual must have the input's dtype torch.float32, "
                       r"got torch.float64"):
        kernels.bn_add_relu(x, x.double(), bn.running_mean, bn.running_var, training=True)


@pytest.mark.parametrize("value, forced, warns", [
    ("1", True, False), ("TRUE", True, False), ("on", True, False), ("0", False, False),
    ("false", False, False), ("No", False, False), (" off ", False, False), ("", False, False),
    ("maybe", True, True),
])
def test_force_reference_spellings(value, forced, warns, monkeypatch):
    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", value)
    monkeypatch.setattr(bnlab._checks, "_FLAGS", {})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert F._force_reference() is forced
    assert any("BNLAB_FORCE_REFERENCE='maybe' is neither" in str(w.message)
               for w in seen) is warns
    assert kernels.supports(torch.randn(4, 3)) is not forced
