"""`torch.func.vmap` through bnlab's training-mode BN (model ensembles, per-sample gradients,
jacfwd/jacrev): each mapped slice is normalized with its own batch statistics, exactly as a loop
over the slices, and as torch's BN under the same transforms."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, stack_module_state, vmap

import bnlab
import bnlab.variants
from bnlab import functional as F

torch_bn = torch.nn.functional.batch_norm


def _params(c: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.rand(c, generator=gen, dtype=dtype) + 0.5, torch.randn(c, generator=gen,
                                                                        dtype=dtype)


@pytest.mark.parametrize("shape", [(4, 6, 3), (3, 5, 2, 4, 4), (2, 4, 3, 2, 3, 2)])
def test_vmap_normalizes_each_slice_with_its_own_statistics(shape):
    x = torch.randn(shape) * 2 + 5  # (B, N, C, *): B independent batches
    w, b = _params(shape[2])
    out = vmap(lambda xi: F.batch_norm(xi, None, None, w, b, True))(x)
    loop = torch.stack([F.batch_norm(xi, None, None, w, b, True) for xi in x])
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, vmap(lambda xi: torch_bn(xi, None, None, w, b, True))(x),
                               rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_match_a_loop():
    """DP-SGD style: the gradient of each sample's loss alone (its own batch of one image, whose
    spatial positions give BN several values per channel)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4,
                                track_running_stats=False), torch.nn.ReLU())
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 3, 6, 6)

    def loss(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).square().mean()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i]).backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad, rtol=1e-5, atol=1e-6)


def test_a_vmapped_ensemble_equals_its_members():
    members = [bnlab.BatchNorm2d(3, track_running_stats=False) for _ in range(3)]
    for i, m in enumerate(members):
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.fill_(i)
    params, buffers = stack_module_state(members)
    x = torch.randn(8, 3, 4, 4)

    def run(p, bufs, x):
        return functional_call(members[0], (p, bufs), (x,))

    out = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(members):
        torch.testing.assert_close(out[i], m(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 4)])
def test_jacfwd_equals_jacrev_equals_torch(shape):
    """jacfwd maps jvp over the basis, jacrev maps the backward: both through vmap."""
    x = torch.randn(shape, dtype=torch.float64)
    w, b = _params(shape[1], torch.float64)

    def ours(x):
        return F.batch_norm(x, None, None, w, b, True, eps=1e-3)

    def ref(x):
        return torch_bn(x, None, None, w, b, True, eps=1e-3)

    j_fwd, j_rev, j_ref = jacfwd(ours)(x), jacrev(ours)(x), jacrev(ref)(x)
    torch.testing.assert_close(j_fwd, j_ref)
    torch.testing.assert_close(j_rev, j_ref)


@pytest.mark.parametrize(("make", "buffer"), [
    (lambda: bnlab.BatchNorm2d(4), "running_mean"),
    (lambda: bnlab.variants.LpNorm(4, p=1), "running_mean"),
    (lambda: bnlab.variants.GhostBatchNorm(4, virtual_batch_size=3), "running_mean"),
])
def test_vmap_over_unbatched_running_statistics_says_what_to_do(make, buffer):
    """functorch's own error blames "inplace arithmetic" and asks for a bug report."""
    with pytest.raises(RuntimeError, match=f"buffer {buffer} is not batched.*"
                                           "track_running_stats=False"):
        vmap(make())(torch.randn(3, 6, 4, 5, 5))


def test_a_vmapped_ensemble_with_batched_running_statistics_updates_each_member():
    members = [bnlab.BatchNorm2d(3) for _ in range(3)]
    params, buffers = stack_module_state(members)
    xs = torch.randn(3, 8, 3, 4, 4) + torch.arange(3.0).view(3, 1, 1, 1, 1)

    def run(p, bufs, x):
        return functional_call(members[0], (p, bufs), (x,))

    out = vmap(run)(params, buffers, xs)
    for i, m in enumerate(members):
        torch.testing.assert_close(out[i], m(xs[i]), rtol=1e-5, atol=1e-6)
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(buffers[k][i], getattr(m, k))


def test_autograd_functional_vectorized_jacobian_and_hessian_match_torch():
    """torch.autograd.functional's vectorize=True vmaps autograd.grad over the graph built
    outside the transform: here the kernels' C++ node (float32), batched by torch's fallback."""
    from torch.autograd.functional import hessian, jacobian

    x = torch.randn(5, 3, 2, 2)
    w, b = _params(3)

    def loss_of(impl):
        return lambda x: (impl(x, None, None, w, b, True) ** 3).sum()

    torch.testing.assert_close(
        jacobian(lambda x: F.batch_norm(x, None, None, w, b, True), x, vectorize=True),
        jacobian(lambda x: torch_bn(x, None, None, w, b, True), x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hessian(loss_of(F.batch_norm), x, vectorize=True),
                               hessian(loss_of(torch_bn), x), rtol=1e-4, atol=1e-4)
