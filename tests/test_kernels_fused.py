"""Fused BN+ReLU and BN+add+ReLU (`bnlab.kernels.bn_relu`, `bn_add_relu`) against the
composition of the reference ops: outputs, gradients (via the saved ReLU mask) and running
statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnlab import functional as F
from bnlab import kernels

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="bnlab CPU kernels could not be built here")


def rel_err(a: torch.Tensor, ref: torch.Tensor, scale: float = 0.0) -> float:
    a, ref = a.double(), ref.double()
    return (a - ref).abs().max().item() / max(ref.abs().max().item(), scale, 1e-30)


def make(shape, fmt, seed=0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2 + 0.5
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


SHAPES = [(4, 6, 5, 7), (32, 3, 4, 4), (16, 33), (2, 20, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_matches_composition(shape, fmt, training, residual, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    if fmt == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs rank 4")
    check_fused(shape, fmt, training, residual, monkeypatch)


# Over the LLC (32 MiB) together with their outputs: the training forward normalizes each block
# of channels right after its statistics, the backward writes each block's dx right after its
# sums (small tensors: one sweep after all channels' sums). Whole vectors per plane (streaming
# stores) and not.
@pytest.mark.parametrize("shape", [(2, 16, 512, 300), (2, 16, 499, 301)])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_matches_composition_on_large_tensors(shape, residual, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    check_fused(shape, "contiguous", True, residual, monkeypatch)


def check_fused(shape, fmt, training, residual, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    c = shape[1]
    x = make(shape, fmt)
    z = make(shape, fmt, seed=1) if residual else None
    w = (torch.rand(c) + 0.5).requires_grad_(True)
    b = torch.randn(c).requires_grad_(True)
    g = torch.randn(shape)
    results = []
    for force in ("0", "1"):  # kernels, then the reference composition
        monkeypatch.setenv("BNLAB_FORCE_REFERENCE", force)
        rm, rv = torch.zeros(c), torch.ones(c)
        xi = x.clone().requires_grad_(True)
        zi = z.clone().requires_grad_(True) if z is not None else None
        if z is None:
            y = kernels.bn_relu(xi, rm, rv, w, b, training, 0.1, 1e-5)
        else:
            y = kernels.bn_add_relu(xi, zi, rm, rv, w, b, training, 0.1, 1e-5)
        leaves = [xi, w, b] + ([zi] if zi is not None else [])
        results.append((y, rm, rv, torch.autograd.grad(y, leaves, g)))
    (y, rm, rv, grads), (y_ref, rm_ref, rv_ref, grads_ref) = results
    assert (y >= 0).all()
    assert rel_err(y, y_ref) <= 1e-5
    torch.testing.assert_close(rm, rm_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-6, atol=1e-7)
    scale = float(g.abs().max() * 3)  # |γ·invstd·g| bound: γ < 1.5, σ ≈ 2
    for got, want in zip(grads, grads_ref, strict=True):
        assert rel_err(got, want, scale) <= 1e-5


def test_fused_without_grad_saves_no_mask_and_refuses_backward() -> None:
    x = torch.randn(4, 3, 5, 5)
    y, _, _, mask = torch.ops.bnlab.bn_train_fwd(x, None, None, 1e-5, None, True, False)
    assert mask.numel() == 0 and (y >= 0).all()
    xr = x.clone().requires_grad_(True)
    y, _, _, mask = torch.ops.bnlab.bn_train_fwd(xr, None, None, 1e-5, None, True, False)
    with pytest.raises(RuntimeError, match="save_mask"):
        y.sum().backward()


def test_relu_mask_marks_positive_outputs() -> None:
    x = torch.randn(8, 4, 6, 6)
    y, _, _, mask = torch.ops.bnlab.bn_train_fwd(x, None, None, 1e-5, None, True, True)
    assert mask.dtype == torch.uint8
    assert torch.equal(mask.bool(), y > 0)
    ref = torch.relu(F.batch_norm(x, None, None, training=True))
    assert rel_err(y, ref) <= 1e-5


def test_bad_residual_shape_names_argument() -> None:
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(ValueError, match="residual"):
        kernels.bn_add_relu(x, torch.randn(4, 3, 5, 4), None, None, training=True)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("force", ["0", "1"])
def test_batchnormrelu_layer_equals_torch_bn_then_relu(momentum, force, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`bnlab.BatchNormReLU2d` = torch BatchNorm2d + ReLU: outputs, gradients, running statistics
    and num_batches_tracked over training steps (fused kernel, and the reference fallback), then
    eval; a torch state_dict loads into it."""
    import bnlab

    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", force)
    torch.manual_seed(0)
    ours = bnlab.BatchNormReLU2d(5, momentum=momentum)
    ref = torch.nn.BatchNorm2d(5, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    for step in range(3):
        x = make((8, 5, 4, 3), "contiguous", seed=step)
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y, y_ref = ours(xa), torch.relu(ref(xb))
        g = torch.randn_like(y)
        ga = torch.autograd.grad(y, (xa, ours.weight, ours.bias), g)
        gb = torch.autograd.grad(y_ref, (xb, ref.weight, ref.bias), g)
        assert rel_err(y, y_ref) <= 1e-5
        for a, b in zip(ga, gb):
            assert rel_err(a, b) <= 1e-4
    assert rel_err(ours.running_mean, ref.running_mean) <= 1e-5
    assert rel_err(ours.running_var, ref.running_var) <= 1e-5
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ours.eval()
    ref.eval()
    x = make((2, 5, 4, 3), "contiguous", seed=9)
    assert rel_err(ours(x), torch.relu(ref(x))) <= 1e-5


def test_fold_keeps_the_relu_of_batchnormrelu() -> None:
    import bnlab

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnlab.BatchNormReLU2d(4),
                                torch.nn.Flatten(), bnlab.BatchNormReLU1d(4 * 4 * 4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6))
    model.eval()
    folded = bnlab.fold(model)
    x = torch.randn(5, 3, 6, 6)
    assert not any(isinstance(m, bnlab.BatchNorm) for m in folded.modules())
    assert isinstance(folded[1], torch.nn.ReLU)
    assert (folded(x) >= 0).all()
    assert rel_err(folded(x), model(x)) <= 1e-5


def test_sync_conversion_keeps_the_relu_and_the_fused_kernel_on_one_process() -> None:
    import bnlab
    from bnlab.distributed import SyncBatchNormReLU

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnlab.BatchNormReLU2d(4))
    ref = copy.deepcopy(model)
    out = bnlab.convert_sync_batchnorm(model)
    assert type(out[1]) is SyncBatchNormReLU
    x = torch.randn(6, 3, 7, 7)
    ops, ys = [], []
    for net in (ref, out):
        with torch.profiler.profile() as prof:
            ys.append(net(x))
        ops.append([e.name for e in prof.events() if e.name.startswith("bnlab::")])
    assert ops[0] == ops[1] and ops[0], ops  # not synchronizing: BatchNormReLU's own kernels
    assert rel_err(ys[1], ys[0]) <= 1e-6 and bool((ys[1] >= 0).all())
    assert rel_err(out[1].running_mean, ref[1].running_mean) <= 1e-6


def test_e2e_nets_with_fused_layer_equal_bn_then_relu() -> None:
    """The e2e benchmark's fused variant computes the same net: BatchNormReLU2d in place of
    BatchNorm2d + ReLU, same weights, same outputs."""
    import bnlab
    from bnlab.kernels import e2e

    torch.manual_seed(0)
    plain = e2e.InceptionNet(bnlab.BatchNorm2d)
    torch.manual_seed(0)
    fused = e2e.InceptionNet(bnlab.BatchNormReLU2d)
    assert sum(isinstance(m, torch.nn.ReLU) for m in fused.modules()) == 0
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert rel_err(fused(x), plain(x)) <= 1e-4


def test_e2e_bn_op_time_counts_batch_norm_ops_only() -> None:
    """`bnlab bench --e2e` splits BN's own profiled time out of the step: zero for the net
    without BN, positive with torch's BN and with ours."""
    from bnlab.kernels import e2e

    def tiny(norm: e2e.NormLayer) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3), norm(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 10))

    norms = e2e._norms()
    steppers = {k: e2e._train_step(*e2e._build(lambda k=k: tiny(norms[k]), 4, (1, 12, 12)))
                for k in ("none", "torch_bn", "bnlab_bn")}
    ms = {k: e2e.bn_op_ms(e2e.profile_steps(s, steps=1)) for k, s in steppers.items()}
    assert ms["none"] == 0.0
    assert ms["torch_bn"] > 0.0 and ms["bnlab_bn"] > 0.0
