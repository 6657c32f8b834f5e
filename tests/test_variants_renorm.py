"""Batch Renormalization against its definition (Ioffe 2017, Alg. 1) and BN."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab.variants import BatchRenorm, BatchRenorm1d, BatchRenorm2d, renorm_limits

F64 = torch.float64
NO_WARMUP = {"warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0}


def _pair(cls: type, torch_cls: type, c: int, **kw) -> tuple[nn.Module, nn.Module]:
    ours = cls(c, dtype=F64, **kw)
    ref = torch_cls(c, momentum=ours.momentum, dtype=F64)
    with torch.no_grad():
        w, b = torch.rand(c, dtype=F64) + 0.5, torch.randn(c, dtype=F64)
        for m in (ours, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    return ours, ref


@pytest.mark.parametrize(("cls", "torch_cls", "shape"), [
    (BatchRenorm1d, nn.BatchNorm1d, (8, 3)), (BatchRenorm1d, nn.BatchNorm1d, (4, 3, 5)),
    (BatchRenorm2d, nn.BatchNorm2d, (4, 3, 5, 2)), (BatchRenorm, nn.BatchNorm3d, (2, 3, 2, 3, 2)),
])
@pytest.mark.parametrize("momentum", [0.01, 0.5, None])
def test_r_max_1_d_max_0_is_bn(cls, torch_cls, shape, momentum) -> None:
    torch.manual_seed(0)
    ours, ref = _pair(cls, torch_cls, shape[1], momentum=momentum, r_max=1.0, d_max=0.0,
                      **NO_WARMUP)
    for _ in range(3):
        x = torch.randn(shape, dtype=F64) * 2 + 3
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        gy = torch.randn(shape, dtype=F64)
        ya, yb = ours(xa), ref(xb)
        ya.backward(gy)
        yb.backward(gy)
        torch.testing.assert_close(ya, yb)
        torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == 3


def test_default_schedule_is_bn_during_warmup() -> None:
    torch.manual_seed(0)
    ours, ref = _pair(BatchRenorm2d, nn.BatchNorm2d, 3)
    with torch.no_grad():  # moving statistics far from the batch's: any correction would show
        ours.running_mean.fill_(5.0)
        ref.running_mean.fill_(5.0)
    x = torch.randn(4, 3, 3, 3, dtype=F64)
    torch.testing.assert_close(ours(x), ref(x))


def test_renorm_limits_follow_the_paper_schedule() -> None:
    def at(step: int) -> tuple[float, float]:
        r, d = renorm_limits(torch.tensor(step))
        return float(r), float(d)

    assert at(0) == (1.0, 0.0) and at(5000) == (1.0, 0.0)
    r, d = at(22500)  # halfway to 40k for r_max, 7/8 of the way to 25k for d_max
    assert r == pytest.approx(1 + 2 * 17500 / 35000) and d == pytest.approx(5 * 17500 / 20000)
    assert at(25000)[1] == pytest.approx(5.0) and at(40000) == pytest.approx((3.0, 5.0))
    assert at(10**6) == pytest.approx((3.0, 5.0))
    r, d = renorm_limits(0, 2.0, 0.5, **NO_WARMUP)
    assert (float(r), float(d)) == (2.0, 0.5)
    r, d = renorm_limits(0, 1.3, 0.4, **NO_WARMUP)  # not float32 values: exact in float64
    assert (float(r), float(d)) == (1.3, 0.4) and r.dtype == d.dtype == F64


def test_the_schedule_advances_with_the_layers_steps_and_survives_recalibrate() -> None:
    """The bounds follow the module's own training steps; `recalibrate` (which sets a BN's
    num_batches_tracked to its batch count) must not send them back to the warm-up."""
    kw = {"warmup_steps": 2, "r_max_steps": 6, "d_max_steps": 4}
    bn = BatchRenorm1d(3, **kw)
    seen = []
    for _ in range(7):
        seen.append(tuple(float(v) for v in bn.limits()))
        bn(torch.randn(8, 3))
    assert seen == [tuple(float(v) for v in renorm_limits(torch.tensor(k), **kw))
                    for k in range(7)]
    assert seen[0] == (1.0, 0.0) and seen[-1] == pytest.approx((3.0, 5.0))
    before = bn.limits()
    stats = bnlab.recalibrate(bn, [torch.randn(8, 3) for _ in range(2)])
    assert int(bn.num_batches_tracked) == 7 and bn.limits() == before
    torch.testing.assert_close(bn.running_var, stats[""].var.float())
    plain = bnlab.BatchNorm1d(3)  # a BN's counter is the number of batches averaged (torch's)
    bnlab.recalibrate(plain, [torch.randn(8, 3) for _ in range(2)])
    assert int(plain.num_batches_tracked) == 2


def _reference(x, w, b, rm, rv, eps, r_max, d_max):
    """Alg. 1 of Ioffe 2017 written out with autograd, r and d under stop_gradient."""
    dims = [0, *range(2, x.dim())]
    shape = (1, -1, *([1] * (x.dim() - 2)))
    mu = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(rv + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu - rm) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mu.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
    return w.view(shape) * x_hat + b.view(shape)


@pytest.mark.parametrize(("r_max", "d_max"), [(1.5, 0.3), (3.0, 5.0), (100.0, 100.0)])
def test_matches_definition_with_clipping(r_max: float, d_max: float) -> None:
    torch.manual_seed(1)
    bn = BatchRenorm2d(4, dtype=F64, r_max=r_max, d_max=d_max, momentum=0.3, **NO_WARMUP)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 2.0, -3.0, 10.0]))
        bn.running_var.copy_(torch.tensor([1.0, 0.1, 9.0, 4.0]))
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_()
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    x = (torch.randn(6, 4, 3, 3, dtype=F64) * 2 + 1).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w, b = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    gy = torch.randn(x.shape, dtype=F64)
    y = bn(x)
    y.backward(gy)
    y_ref = _reference(x2, w, b, rm, rv, bn.eps, r_max, d_max)
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bn.weight.grad, w.grad)
    torch.testing.assert_close(bn.bias.grad, b.grad)
    # The update used the batch statistics: r ← (1 − m)·r + m·s with the unbiased variance.
    torch.testing.assert_close(bn.running_mean, 0.7 * rm + 0.3 * x.detach().mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, 0.7 * rv + 0.3 * x.detach().var((0, 2, 3)))


def test_forward_matches_definition() -> None:
    torch.manual_seed(2)
    bn = BatchRenorm1d(3, dtype=F64, r_max=1.2, d_max=0.2, momentum=0.0, **NO_WARMUP)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([0.5, 4.0, 1.0]))
    x = torch.randn(16, 3, dtype=F64) * 1.5
    y_ref = _reference(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, 1.2, 0.2)
    torch.testing.assert_close(bn(x), y_ref)


def test_unclipped_training_output_equals_inference_output() -> None:
    """The point of the paper: with r, d unclipped, training computes the inference model."""
    torch.manual_seed(3)
    bn = BatchRenorm2d(3, dtype=F64, r_max=1e6, d_max=1e6, momentum=0.0, **NO_WARMUP)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 3)
    x = torch.randn(5, 3, 4, 4, dtype=F64) * 3 + 2
    torch.testing.assert_close(bn.train()(x), bn.eval()(x))


def test_gradcheck_where_r_and_d_are_clipped() -> None:
    """Clipped at their bounds, r and d are locally constant: finite differences then agree."""
    torch.manual_seed(4)
    bn = BatchRenorm1d(2, dtype=F64, r_max=1.5, d_max=0.5, momentum=0.0, **NO_WARMUP)
    with torch.no_grad():
        bn.running_mean.fill_(-50.0)  # d = +d_max
        bn.running_var.fill_(1e-4)  # r = r_max
    x = torch.randn(6, 2, dtype=F64, requires_grad=True)
    w = torch.rand(2, dtype=F64, requires_grad=True)
    b = torch.randn(2, dtype=F64, requires_grad=True)

    def f(x, w, b):
        return bnlab.variants.batch_renorm(x, bn.running_mean, bn.running_var, w, b, True, 0.0,
                                           1e-5, 1.5, 0.5, update=False)[0]

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_eval_is_bn_eval_and_state_dict_is_bns() -> None:
    torch.manual_seed(5)
    ref = nn.BatchNorm2d(3)
    ref.train()(torch.randn(8, 3, 4, 4) * 2 + 1)
    bn = BatchRenorm2d(3)
    bn.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(bn.eval()(x), ref.eval()(x))
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bn).eval()
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(bnlab.fold(model)(x), model(x), rtol=1e-5, atol=1e-5)


def test_non_finite_batch_leaves_statistics() -> None:
    bn = BatchRenorm1d(2, **NO_WARMUP)
    x = torch.randn(4, 2)
    x[0, 1] = float("nan")
    with warnings.catch_warnings():  # the core warns once per process
        warnings.simplefilter("ignore", RuntimeWarning)
        bn(x)
    assert torch.equal(bn.running_mean, torch.zeros(2))
    assert int(bn.num_batches_tracked) == 0 and int(bn.num_nonfinite_batches) == 1


@pytest.mark.parametrize(("kw", "match"), [
    ({"track_running_stats": False}, "track_running_stats"), ({"r_max": 0.5}, "r_max"),
    ({"d_max": -1.0}, "d_max"), ({"warmup_steps": -1}, "warmup_steps"),
])
def test_bad_arguments_raise(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchRenorm2d(3, **kw)


def test_single_value_per_channel_raises() -> None:
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchRenorm1d(3)(torch.randn(1, 3))


@pytest.mark.parametrize("unset", [("running_mean", "running_var"), ("num_batches_tracked",)])
def test_unset_buffers_that_renorm_needs_are_named(unset: tuple[str, ...]) -> None:
    """Batch Renorm computes r and d from the running statistics and its schedule from the step
    count, so it cannot fall back to batch statistics as BN does without them."""
    m = BatchRenorm2d(3)
    for name in unset:
        setattr(m, name, None)
    with pytest.raises(ValueError, match=rf"BatchRenorm2d\(3\): Batch Renorm needs {unset[0]}"):
        m(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_module_computes_r_and_d_products_in_float32(dtype: torch.dtype) -> None:
    # γ·r and γ·d + β in the module's dtype were rounded once more before the normalization:
    # a bfloat16 module's output then carried about twice the float32 module's error. Now a
    # half module equals a float32 module holding the same (half-representable) values.
    torch.manual_seed(3)
    half = BatchRenorm2d(8, r_max=3.0, d_max=5.0, momentum=0.0, **NO_WARMUP)
    with torch.no_grad():
        half.running_mean.uniform_(-2, 2)
        half.running_var.uniform_(0.5, 4)
        half.weight.uniform_(0.5, 2)
        half.bias.normal_()
    half = half.to(dtype)
    full = BatchRenorm2d(8, r_max=3.0, d_max=5.0, momentum=0.0, **NO_WARMUP)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = (torch.randn(16, 8, 4, 4) * 2 + 1).to(dtype)
    torch.testing.assert_close(half(x), full(x), rtol=0, atol=0)
