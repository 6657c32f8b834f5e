"""bnlab.diagnostics' layer Jacobians (Ioffe & Szegedy 2015, Sec. 3.3) on closed forms: a linear
layer, BN in eval and train mode, a sigmoid MLP, an in-place ReLU; spectrum summaries."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.diagnostics import (
    JacobianResult,
    layer_jacobian_singular_values,
    layer_jacobians,
    spectrum_summary,
)
from bnlab.distributed import SyncBatchNormReLU
from bnlab.layers import BatchNorm, BatchNormReLU1d

D = torch.float64

def test_jacobian_of_linear_layer_is_its_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(5, 4)).to(D)
    x = torch.randn(3, 5, dtype=D)
    pairs, jacs = layer_jacobians(model, x, [model[0], model[1]])
    assert pairs == [("0", "1")]
    torch.testing.assert_close(jacs[0], model[1].weight.detach().expand(3, 4, 5))
    res = layer_jacobian_singular_values(model, x, ["0", "1"])
    torch.testing.assert_close(res.singular_values[0][0], torch.linalg.svdvals(model[1].weight))


def test_jacobian_of_bn_in_eval_mode_is_a_known_diagonal():
    torch.manual_seed(0)
    std = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=D)
    bn = BatchNorm(4, momentum=None).to(D)
    model = nn.Sequential(nn.Identity(), bn)
    for _ in range(20):  # Gaussian input with per-channel std `std`
        bn(torch.randn(256, 4, dtype=D) * std + 3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 1.0, 0.5], dtype=D))
    model.train()  # the probe's eval mode must not depend on the model's mode
    x = torch.randn(6, 4, dtype=D)
    _, jacs = layer_jacobians(model, x, [model[0], bn], normalized=False)
    diag = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(jacs[0], torch.diag(diag).expand(6, 4, 4))
    _, jacs = layer_jacobians(model, x, [model[0], bn])  # to x̂ = (y − β)/γ: no γ
    torch.testing.assert_close(jacs[0], torch.diag(diag / bn.weight.detach()).expand(6, 4, 4))
    torch.testing.assert_close(diag.abs() * std / bn.weight.detach().abs(),
                               torch.ones(4, dtype=D), rtol=0.05, atol=0)
    assert model.training


def test_jacobian_between_normalized_values_closed_form():
    """Sec. 3.3's ẑ = F(x̂) between normalized vectors: for BN_a -> Linear W -> BN_b in eval,
    J_x̂ = diag(1/σ_b) W diag(γ_a), whatever γ_b; between outputs diag(γ_b/σ_b) W."""
    torch.manual_seed(0)
    model = nn.Sequential(BatchNorm(3), nn.Linear(3, 4, bias=False), BatchNorm(4)).to(D)
    model.train()(torch.randn(64, 3, dtype=D) * 2 + 1)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.5, -2.0, 3.0]))
        model[2].weight.copy_(torch.tensor([4.0, 1.0, -0.5, 2.0]))
    x = torch.randn(5, 3, dtype=D)
    w = model[1].weight.detach()
    inv_sigma = torch.rsqrt(model[2].running_var + model[2].eps)
    _, (jac,) = layer_jacobians(model, x, [model[0], model[2]])
    torch.testing.assert_close(jac, (inv_sigma[:, None] * w * model[0].weight.detach())
                               .expand(5, 4, 3))
    _, (jac,) = layer_jacobians(model, x, [model[0], model[2]], normalized=False)
    torch.testing.assert_close(jac, ((model[2].weight.detach() * inv_sigma)[:, None] * w)
                               .expand(5, 4, 3))
    with torch.no_grad():
        model[2].weight[1] = 0.0
    with pytest.raises(ValueError, match=r"'2' has γ = 0 .*normalized=False"):
        layer_jacobians(model, x, [model[0], model[2]])


def test_jacobian_between_normalized_conv_maps_equals_autograd():
    """γ is per channel and repeated over the positions of each map (channel-major order)."""
    torch.manual_seed(0)
    bn_a, conv, bn_b = BatchNorm(2), nn.Conv2d(2, 3, 2, bias=False), BatchNorm(3)
    model = nn.Sequential(bn_a, conv, bn_b).to(D)
    model.train()(torch.randn(16, 2, 3, 3, dtype=D))
    with torch.no_grad():
        bn_a.weight.copy_(torch.tensor([0.5, -2.0]))
        bn_b.weight.copy_(torch.tensor([3.0, 1.0, -0.25]))
    model.eval()
    x = torch.randn(2, 2, 3, 3, dtype=D)
    _, (jac,) = layer_jacobians(model, x, [bn_a, bn_b])

    def f(xhat_a):  # (2, 3, 3) -> (3, 2, 2): one example, between normalized values
        y_a = bn_a.weight.view(-1, 1, 1) * xhat_a + bn_a.bias.view(-1, 1, 1)
        y_b = bn_b(conv(y_a[None]))[0]
        return (y_b - bn_b.bias.view(-1, 1, 1)) / bn_b.weight.view(-1, 1, 1)

    xhat0 = ((x[0] - bn_a.running_mean.view(-1, 1, 1))
             / torch.sqrt(bn_a.running_var.view(-1, 1, 1) + bn_a.eps))
    want = torch.autograd.functional.jacobian(f, xhat0).reshape(12, 18)
    torch.testing.assert_close(jac[0], want)


def test_jacobian_of_bn_in_train_mode_is_the_diagonal_block():
    # ∂y_n/∂x_n = γ/√(σ²+ε)·(1 − 1/m − x̂_n²/m) per channel: the batch couples the examples.
    torch.manual_seed(0)
    bn = BatchNorm(3).to(D)
    model = nn.Sequential(nn.Identity(), bn)
    x = torch.randn(5, 3, dtype=D) * 2 + 1
    _, jacs = layer_jacobians(model, x, [model[0], bn], train=True, max_examples=4)
    var, mean = torch.var_mean(x, 0, correction=0)
    xhat = (x - mean) / torch.sqrt(var + bn.eps)
    d = (1 - 1 / 5 - xhat.square() / 5) / torch.sqrt(var + bn.eps)  # (N, C)
    torch.testing.assert_close(jacs[0], torch.diag_embed(d[:4]))
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=D))  # restored


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, BatchNorm])
def test_jacobian_in_train_mode_works_on_torchs_bn_too(norm):
    """torch's BN saves its running buffers for backward: the Jacobians are taken before the
    buffers are restored (restoring them first made autograd refuse)."""
    torch.manual_seed(0)
    bn = norm(3, momentum=None).to(D)
    model = nn.Sequential(nn.Identity(), bn)
    x = torch.randn(5, 3, dtype=D) * 2 + 1
    _, jacs = layer_jacobians(model, x, [model[0], bn], train=True)
    var, mean = torch.var_mean(x, 0, correction=0)
    xhat = (x - mean) / torch.sqrt(var + bn.eps)
    d = (1 - 1 / 5 - xhat.square() / 5) / torch.sqrt(var + bn.eps)
    torch.testing.assert_close(jacs[0], torch.diag_embed(d))
    assert torch.equal(bn.running_mean, torch.zeros(3, dtype=D))
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, BatchNorm])
def test_eval_jacobian_of_a_bn_without_running_statistics_is_coupled(norm):
    """Without running statistics eval mode normalizes by the batch: the per-example blocks of
    the batch Jacobian, as in train mode (a summed backward gave exactly 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).to(D), norm(3, track_running_stats=False).to(D))
    x = torch.randn(6, 4, dtype=D)
    _, jacs = layer_jacobians(model, x, [model[0], model[1]])
    h = model[0](x).detach()
    full = torch.autograd.functional.jacobian(lambda t: model[1](t), h)  # (N, 3, N, 3)
    torch.testing.assert_close(jacs[0], torch.stack([full[n, :, n] for n in range(6)]))
    assert jacs[0].abs().max() > 0.1


def test_jacobian_sigmoid_mlp_default_points():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), BatchNorm(5), nn.Sigmoid(), nn.Linear(5, 4),
                          BatchNorm(4), nn.Sigmoid()).to(D)
    x = torch.randn(7, 6, dtype=D)
    res = layer_jacobian_singular_values(model, x)
    assert [p for p in res.pairs] == [("1", "4")]
    # Closed form in eval mode: J = diag(γ₄/√(v₄+ε)) · W₃ · diag(σ′(bn₁ output)).
    with torch.no_grad():
        model.eval()
        s = torch.sigmoid(model[1](model[0](x)))
        model.train()
    scale = model[4].weight / torch.sqrt(model[4].running_var + 1e-5)
    j = scale[:, None] * model[3].weight.detach() * (s * (1 - s))[:, None, :]
    torch.testing.assert_close(res.singular_values[0], torch.linalg.svdvals(j).detach())
    assert res.singular_values[0].shape == (7, 4)
    plain = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4))
    assert layer_jacobian_singular_values(plain, x.float()).pairs == [("0", "2")]


def test_jacobian_through_inplace_relu_is_w_times_relu_mask():
    # J between Linear outputs z1 -> z2 = W2 relu(z1): W2 · diag(1[z1 > 0]), with ReLU in place.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4)).to(D)
    x = torch.randn(7, 6, dtype=D)
    _, jacs = layer_jacobians(model, x, [model[0], model[2]])
    mask = (model[0](x) > 0).to(D)  # (N, 5)
    expected = model[2].weight.detach()[None] * mask[:, None, :]
    torch.testing.assert_close(jacs[0], expected)


@pytest.mark.parametrize("fused_cls", [BatchNormReLU1d, SyncBatchNormReLU])
def test_a_fused_bn_relu_is_cut_before_its_relu_as_bn_then_relu(fused_cls):
    """relu(γx̂ + β) is 0 wherever γx̂ + β < 0, so x̂ = (y − β)/γ cannot be read from a fused
    layer's output: it is cut before its ReLU, as the BN of a BN + nn.ReLU pair. In eval mode,
    x̂₂ = (W₂ relu(γ₁x̂₁ + β₁) + b₂ − μ₂)/σ₂: J = diag(1/σ₂) W₂ diag(1[γ₁x̂₁ + β₁ > 0]·γ₁)."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(5, 6), nn.Linear(6, 6)
    sep = nn.Sequential(lin1, BatchNorm(6), nn.ReLU(), lin2, BatchNorm(6), nn.ReLU()).to(D)
    fused = nn.Sequential(lin1, fused_cls(6), lin2, fused_cls(6)).to(D)
    bn1, bn2 = sep[1], sep[4]
    with torch.no_grad():
        for bn in (bn1, bn2):
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
    fused[1].load_state_dict(bn1.state_dict())
    fused[3].load_state_dict(bn2.state_dict())
    x = torch.randn(8, 5, dtype=D)
    with torch.no_grad():
        z1 = bn1.weight * (lin1(x) - bn1.running_mean) / torch.sqrt(bn1.running_var + bn1.eps) \
            + bn1.bias
    mask = (z1 > 0).to(D)
    assert 0 < mask.mean() < 1  # both sides of the ReLU
    hand = (lin2.weight / torch.sqrt(bn2.running_var + bn2.eps)[:, None]).detach() \
        * (mask * bn1.weight.detach())[:, None, :]
    _, (jac,) = layer_jacobians(fused, x)
    torch.testing.assert_close(jac, hand)
    for train in (False, True):
        for normalized in (True, False):
            _, (want,) = layer_jacobians(sep, x, train=train, normalized=normalized)
            _, (got,) = layer_jacobians(fused, x, train=train, normalized=normalized)
            torch.testing.assert_close(got, want)
    assert "_normalize" not in vars(fused[1])  # fused again after the probe
    torch.testing.assert_close(fused.eval()(x), sep.eval()(x))


def test_spectrum_summary_closed_form():
    s = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=D)
    out = spectrum_summary(s)
    assert out["median"] == pytest.approx(1.0)
    assert out["within"] == pytest.approx(3 / 5)  # 0.5, 1 and 2 lie in [0.5, 2]
    assert out["abslog"] == pytest.approx(math.log10(2.0))  # |log10| = 1, .30, 0, .30, 1
    assert out["p10"] == pytest.approx(0.1 + 0.4 * 0.4)  # linear interpolation at 0.4
    assert out["zero"] == 0.0 and out["median_nz"] == pytest.approx(1.0)
    # A ReLU-like rank deficiency: zeros are counted apart and left out of the log statistics.
    z = spectrum_summary(torch.tensor([0.0, 1e-12, 1.0, 4.0], dtype=D))
    assert z["zero"] == 0.5 and z["median_nz"] == pytest.approx(2.5)
    assert z["abslog"] == pytest.approx(math.log10(4.0) / 2) and z["within"] == 0.25
    res = JacobianResult([("a", "b")], [torch.ones(3, 4, dtype=D)])
    assert res.summary()["a->b"]["within"] == 1.0 and res.summary()["a->b"]["abslog"] == 0.0
    with pytest.raises(ValueError, match="band"):
        spectrum_summary(s, band=(2.0, 3.0))
    with pytest.raises(ValueError, match="empty"):
        spectrum_summary(torch.empty(0))


class _CalledOutOfOrder(nn.Module):
    """bn2 is registered before bn1 but called after it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn2, self.bn1, self.bn3 = BatchNorm(3), BatchNorm(3), BatchNorm(3)
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.bn3(self.bn2(self.lin(self.bn1(x))))


def test_jacobian_pairs_follow_the_forward_not_the_registration():
    """Paired by registration order, (bn2, bn1) has no path between them: a zero Jacobian,
    reported as the network's. The forward's order gives the linear layer's weight."""
    torch.manual_seed(0)
    model = _CalledOutOfOrder().to(D).eval()
    x = torch.randn(4, 3, dtype=D)
    for modules in (None, [model.bn3, model.bn2, model.bn1]):
        pairs, jacs = layer_jacobians(model, x, modules)
        assert pairs == [("bn1", "bn2"), ("bn2", "bn3")]
        scale = model.bn2.weight / torch.sqrt(model.bn2.running_var + model.bn2.eps)
        torch.testing.assert_close(jacs[0], (scale[:, None] * model.lin.weight).detach()
                                   .expand(4, 3, 3))
    model.bn9 = BatchNorm(3).to(D)  # registered, never called
    with pytest.raises(ValueError, match="the forward did not call bn9"):
        layer_jacobians(model, x)
