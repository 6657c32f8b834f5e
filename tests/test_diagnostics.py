"""bnlab.diagnostics on closed forms: ICS (Santurkar Def. 2.1), landscape probes on a quadratic,
activation statistics (layer Jacobians: test_diagnostics_jacobian.py); and the promise of no
side effects."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnlab.diagnostics import (
    ActivationTracker,
    default_layers,
    distribution_shift,
    gradient_ics,
    landscape_probe,
    saturation_fraction,
)
from bnlab.layers import BatchNorm
from bnlab.variants import NoisyBatchNorm

D = torch.float64


def mse_sum(out, y):
    return 0.5 * (out - y).square().sum()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, \
        [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def assert_untouched(model, before, rng_before):
    state, grads = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng_before)


def mlp_bn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), NoisyBatchNorm(6, seed=1), nn.Tanh(), nn.Linear(6, 5),
                         BatchNorm(5), nn.Dropout(0.3), nn.Tanh(), nn.Linear(5, 2)).to(D)


def batch(n=16, d_in=4, d_out=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=D), torch.randn(n, d_out, generator=g, dtype=D)


# ----------------------------------------------------------------------------- ICS


def test_ics_single_layer_is_zero_even_with_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), NoisyBatchNorm(3, seed=2)).to(D)
    res = gradient_ics(model, mse_sum, batch(d_out=3), lr=0.5)
    assert res.layers == [1] and res.names == ["0+1"]  # the layer with its BN's γ, β
    assert res.l2.item() == 0.0
    assert math.isclose(res.cosine.item(), 1.0, rel_tol=1e-12)
    assert res.grad_norm.item() > 0


def test_ics_first_layer_zero_later_layers_not():
    model = mlp_bn()
    res = gradient_ics(model, mse_sum, batch(), lr=0.1)
    assert res.names == ["0+1", "3+4", "7"]
    assert res.l2[0] == 0 and (res.l2[1:] > 0).all()
    assert (res.cosine[1:] < 1).all() and (res.cosine[1:] > -1).all()


def test_ics_closed_form_two_linear_layers():
    # L = ½‖W2 W1 X − Y‖²: G1 = W2ᵀ R Xᵀ, G2 = R (W1 X)ᵀ; G′2 uses W1⁺ = W1 − lr·G1.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).to(D)
    x, y = batch(n=7, d_in=3, d_out=2)
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    X, Y = x.T, y.T  # (features, N)
    R = w2 @ w1 @ X - Y
    g1, g2 = w2.T @ R @ X.T, R @ (w1 @ X).T
    lr = 0.05
    w1p = w1 - lr * g1
    g2p = (w2 @ w1p @ X - Y) @ (w1p @ X).T
    res = gradient_ics(model, mse_sum, (x, y), lr=lr)
    torch.testing.assert_close(res.l2[1], torch.linalg.norm(g2 - g2p))
    cos = (g2 * g2p).sum() / (g2.norm() * g2p.norm())
    torch.testing.assert_close(res.cosine[1], cos)
    torch.testing.assert_close(res.grad_norm, torch.stack([g1.norm(), g2.norm()]))
    # A custom update: moving nothing gives no shift anywhere.
    still = gradient_ics(model, mse_sum, (x, y), update=lambda p, g: dict(p))
    assert (still.l2 == 0).all()


def test_ics_changes_nothing():
    model = mlp_bn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    mse_sum(model(x), y).backward()
    opt.step()
    opt_state = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    before, rng = snapshot(model), torch.get_rng_state()
    gradient_ics(model, mse_sum, (x, y), lr=0.1)
    assert_untouched(model, before, rng)
    for k, v in opt.state.items():
        assert torch.equal(v["momentum_buffer"], opt_state[k])
    assert model.training


def test_ics_measure_subset_and_groups():
    model = mlp_bn()
    full = gradient_ics(model, mse_sum, batch(), lr=0.1)
    part = gradient_ics(model, mse_sum, batch(), lr=0.1, measure=[3])
    torch.testing.assert_close(part.l2, full.l2[2:])
    # By default BN's γ, β belong to the layer before them (Def. 2.1's "previous layers" move
    # as in a training step); layers given without them leave γ, β where they are.
    grouped = gradient_ics(model, mse_sum, batch(), lr=0.1,
                           layers=[[model[0], model[1]], [model[3], model[4]], model[7]])
    torch.testing.assert_close(grouped.l2, full.l2)
    bare = gradient_ics(model, mse_sum, batch(), lr=0.1, layers=[model[0], model[3], model[7]])
    assert bare.names == ["0", "3", "7"] and not torch.allclose(bare.l2[2], full.l2[2])


def test_default_layers_follow_forward_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(3, 2)  # registered first, called last
            self.early = nn.Linear(4, 3)

        def forward(self, x):
            return self.late(torch.tanh(self.early(x)))

    assert default_layers(Net(), (torch.randn(2, 4),)) == ["early", "late"]
    model = mlp_bn()
    assert default_layers(model, (batch()[0],), with_norms=True) == [["0", "1"], ["3", "4"],
                                                                     ["7"]]


def test_ics_bad_arguments():
    model = mlp_bn()
    with pytest.raises(ValueError, match="lr"):
        gradient_ics(model, mse_sum, batch())
    with pytest.raises(ValueError, match="measure"):
        gradient_ics(model, mse_sum, batch(), lr=0.1, measure=[4])
    with pytest.raises(ValueError, match="pair"):
        gradient_ics(model, mse_sum, batch()[0], lr=0.1)
    with pytest.raises(ValueError, match="measure: expected at least one layer number"):
        gradient_ics(model, mse_sum, batch(), lr=0.1, measure=[])
    with pytest.raises(ValueError, match=r"params: expected names .*got \['nosuch.weight'\]"):
        landscape_probe(model, mse_sum, batch(), [0.1], params=["nosuch.weight"])


def test_ics_default_layers_skip_frozen_ones():
    """Fine-tuning: a frozen first layer is no W_i (nothing moves it), not an error."""
    model = mlp_bn()
    model[0].requires_grad_(False)
    res = gradient_ics(model, mse_sum, batch(), lr=0.1)
    assert res.names == ["0+1", "3+4", "7"] and res.l2[0] == 0.0  # BN 1 still trains: a W_1
    model[1].requires_grad_(False)
    res = gradient_ics(model, mse_sum, batch(), lr=0.1)
    assert res.names == ["3+4", "7"] and res.l2[0] == 0.0  # the first trainable layer: no ICS


# ----------------------------------------------------------------------------- landscape


class Quadratic(nn.Module):
    """L(w) = ½ wᵀ A w with A passed as the "target"; the input is ignored."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, _x):
        return self.w


def quad_loss(w, a):
    return 0.5 * w @ a @ w


def spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))[0]
    lam = torch.linspace(0.5, 4.0, n, dtype=D)
    return q @ torch.diag(lam) @ q.T, lam, q


def test_landscape_quadratic_closed_form():
    a, lam, _ = spd(6)
    w = torch.randn(6, dtype=D, generator=torch.Generator().manual_seed(3))
    etas = torch.tensor([0.01, 0.05, 0.1, 0.4], dtype=D)
    res = landscape_probe(Quadratic(w), quad_loss, (None, a), etas)
    g = a @ w
    torch.testing.assert_close(res.grad_change, etas * torch.linalg.norm(a @ g))
    torch.testing.assert_close(res.beta, torch.full((4,), float(torch.linalg.norm(a @ g)
                                                                 / torch.linalg.norm(g)), dtype=D))
    assert res.beta_max <= lam.max() + 1e-12
    want = torch.stack([quad_loss(w - e * g, a) for e in etas])
    torch.testing.assert_close(res.loss, want)
    # the range is the probe's own losses' (exactly) and the closed form's (to rounding: the
    # two compute w − ηg in another order, and a loaded machine's BLAS may split work otherwise)
    assert res.loss_range == (float(res.loss.min()), float(res.loss.max()))
    assert res.loss_range == pytest.approx((float(want.min()), float(want.max())), rel=1e-12)
    assert math.isclose(res.loss0, float(quad_loss(w, a)))
    d = res.to_dict()
    assert d["beta_max"] == res.beta_max and len(d["loss"]) == 4


def test_landscape_beta_equals_top_eigenvalue_along_top_eigenvector():
    a, lam, q = spd(5, seed=1)
    res = landscape_probe(Quadratic(q[:, -1] * 2), quad_loss, (None, a), [0.1, 0.2])
    torch.testing.assert_close(torch.tensor(res.beta_max, dtype=D), lam.max())
    # Another direction d: the gradient changes by η‖A d‖.
    rnd = torch.randn(5, dtype=D)
    res = landscape_probe(Quadratic(q[:, 0]), quad_loss, (None, a), [0.3],
                          direction={"w": rnd})
    torch.testing.assert_close(res.grad_change[0], 0.3 * torch.linalg.norm(a @ rnd))


def test_landscape_bn_uses_batch_stats_and_changes_nothing():
    model = mlp_bn()
    x, y = batch()
    mse_sum(model(x), y).backward()  # existing .grad must survive
    before, rng = snapshot(model), torch.get_rng_state()
    res = landscape_probe(model, mse_sum, (x, y), [0.01, 0.1])
    assert_untouched(model, before, rng)
    # Brute force on a copy: move the weights, same batch, same randomness, train mode.
    gen_state = model[1].noise.generator.get_state()
    copy = mlp_bn()
    copy.load_state_dict(model.state_dict())
    gen = copy[1].noise._generator_for(x.device)

    def loss_copy():
        gen.set_state(gen_state)  # the noisy-BN draw at the probed step
        torch.set_rng_state(rng)  # the dropout mask at the probed step
        return mse_sum(copy(x), y)

    g = torch.autograd.grad(loss_copy(), list(copy.parameters()))
    with torch.no_grad():
        for p, gi in zip(copy.parameters(), g, strict=True):
            p -= 0.1 * gi
    torch.testing.assert_close(res.loss[1], loss_copy().detach())


def test_landscape_bad_step_sizes():
    with pytest.raises(ValueError, match="step_sizes"):
        landscape_probe(mlp_bn(), mse_sum, batch(), [0.1, -0.1])


def test_landscape_zero_direction_is_an_error_not_nan():
    """At a stationary point (w = 0 of a quadratic) no step moves w: beta would be 0 / 0."""
    a, _, _ = spd(4)
    with pytest.raises(ValueError, match=r"the gradient at w is zero"):
        landscape_probe(Quadratic(torch.zeros(4, dtype=D)), quad_loss, (None, a), [0.1])
    with pytest.raises(ValueError, match=r"direction is zero"):
        landscape_probe(Quadratic(torch.ones(4, dtype=D)), quad_loss, (None, a), [0.1],
                        direction={"w": torch.zeros(4, dtype=D)})
    # Along a direction, a stationary point is fine: the gradient changes by η‖A d‖.
    d = torch.ones(4, dtype=D)
    res = landscape_probe(Quadratic(torch.zeros(4, dtype=D)), quad_loss, (None, a), [0.5],
                          direction={"w": d})
    torch.testing.assert_close(res.beta[0], torch.linalg.norm(a @ d) / torch.linalg.norm(d))


# ----------------------------------------------------------------------------- activations


def test_tracker_quantiles_histograms_and_moments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2), nn.ReLU())
    x = torch.randn(50, 3)
    tr = ActivationTracker(model, bins=8, hist_range=(-2.0, 2.0), saturation_threshold=0.5)
    tr.record(x, step=10)
    tr.record(x * 2, step=20)
    h = tr.history()
    assert list(h) == ["1", "3"]
    z = model[0](x).detach()
    hs = h["1"]
    torch.testing.assert_close(hs["steps"], torch.tensor([10, 20]))
    torch.testing.assert_close(hs["quantiles"][0, 0],
                               torch.quantile(z.flatten(), torch.tensor([0.15, 0.5, 0.85])))
    torch.testing.assert_close(hs["hist"][0, 0], torch.histc(z, 8, -2, 2) / z.numel())
    torch.testing.assert_close(hs["outside"][0, 0], (z.abs() > 2).float().mean())
    torch.testing.assert_close(hs["channel_mean"][0], z.mean(0).double())
    torch.testing.assert_close(hs["channel_var"][0], z.var(0, correction=0).double())
    torch.testing.assert_close(saturation_fraction(h)["1"][0], (z.abs() > 0.5).float().mean())
    assert len(tr.to_dict()["layers"]["3"]["quantiles"]) == 2


def test_tracker_units_conv_and_no_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), BatchNorm(3), nn.ReLU())
    x = torch.randn(4, 1, 6, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tr = ActivationTracker(model, [model[1]], where="output", units=[0, 2])
    tr.record(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])  # BN running statistics untouched
    y = model(x).detach()  # ReLU output; take the BN output again for reference
    bn_out = BatchNorm(3)(model[0](x)).detach()
    unit2 = bn_out[:, 2].flatten()
    q = tr.history()["1"]["quantiles"][0]  # (U=2, Q=3)
    assert q.shape == (2, 3)
    torch.testing.assert_close(q[1], torch.quantile(unit2, torch.tensor([0.15, 0.5, 0.85])))
    assert y.shape == bn_out.shape


def test_tracker_capture_own_forward_and_errors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    tr = ActivationTracker(model)
    with tr.capture(step=5):
        model(torch.randn(8, 3)).sum().backward()  # a training forward
    assert tr.history()["1"]["steps"].tolist() == [5]
    with pytest.raises(ValueError, match="nonlinearity"):
        ActivationTracker(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="quantiles"):
        ActivationTracker(model, quantiles=(0.5, 1.5))
    with pytest.raises(ValueError, match="saturation_threshold"):
        saturation_fraction(tr.history())
    with pytest.raises(ValueError, match="'nope' is not the name of a submodule"):
        ActivationTracker(model, ["nope"])
    with pytest.raises(ValueError, match=r"units: expected channel indices below 4"):
        ActivationTracker(model, units=[7]).record(torch.randn(2, 3))
    # A step where a watched module is not called stores nothing for any module.
    two = ActivationTracker(model, [model[0], model[1]])
    with pytest.raises(RuntimeError, match=r"'1'.* not called"), two.capture():
        model[0](torch.randn(2, 3))
    two.record(torch.randn(2, 3))
    assert [len(h["steps"]) for h in two.history().values()] == [1, 1]
    assert all(h["quantiles"].shape[0] == 1 for h in two.history().values())


def test_tracker_records_are_taken_before_in_place_ops():
    """A ReLU(inplace=True) overwrote a watched sigmoid-free layer's input before a forward hook
    read it, and the record of an output was a view that the next in-place op changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Hardtanh(inplace=True))
    x = torch.randn(40, 3)
    z = model[0](x).detach()  # the pre-activation, negatives included
    inputs = ActivationTracker(model, [model[1]], where="input", units=[0])
    outputs = ActivationTracker(model, [model[0]], where="output", units=[0])
    inputs.record(x)
    outputs.record(x)
    want = torch.quantile(z[:, 0], torch.tensor([0.15, 0.5, 0.85]))
    for tr in (inputs, outputs):
        (h,) = tr.history().values()
        torch.testing.assert_close(h["quantiles"][0, 0], want)
        torch.testing.assert_close(h["channel_mean"][0], z.mean(0).double())


def test_tracker_keeps_float64_and_names_a_module_shared_by_widths():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    x = torch.randn(30, 3, dtype=D) * 1e-4
    tr = ActivationTracker(model)
    tr.record(x)
    z = model[0](x).detach()
    torch.testing.assert_close(tr.history()["1"]["channel_var"][0], z.var(0, correction=0),
                               rtol=1e-12, atol=0)  # not through float32

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 6), nn.Linear(6, 5), nn.Tanh()

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.act(self.b(self.act(self.a(t))))

    shared = Shared()
    tr = ActivationTracker(shared)
    with pytest.raises(RuntimeError, match=r"'act' was called with \[5, 6\] channels"):
        tr.record(torch.randn(8, 3))
    assert tr.steps == []


def test_distribution_shift_closed_form():
    mu = torch.tensor([[0.0, 1.0], [1.0, 1.0], [3.0, 0.0]], dtype=D)  # (T=3, C=2)
    var = torch.tensor([[1.0, 1.0], [2.0, 1.0], [2.0, 5.0]], dtype=D)
    s = distribution_shift({"channel_mean": mu, "channel_var": var})
    torch.testing.assert_close(s["mean_step"], torch.tensor([0.5, 1.5], dtype=D))
    torch.testing.assert_close(s["var_step"], torch.tensor([0.5, 2.0], dtype=D))
    torch.testing.assert_close(s["mean_drift"], torch.tensor([0.0, 0.5, 1.0], dtype=D))
    torch.testing.assert_close(s["var_drift"], torch.tensor([0.0, 0.5, 2.5], dtype=D))
    assert distribution_shift({"channel_mean": mu, "channel_var": var},
                              reduce="none")["mean_step"].shape == (2, 2)


class _Counting(nn.Module):
    """Buffers that the forward replaces instead of updating in place (a call counter, an EMA)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2).to(D)
        self.register_buffer("calls", torch.zeros((), dtype=D))
        self.register_buffer("ema", torch.zeros(2, dtype=D))

    def forward(self, x):
        y = self.lin(x)
        self.calls = self.calls + 1
        self.ema = 0.9 * self.ema + 0.1 * y.detach().mean(0)
        return y


def test_probes_restore_buffers_that_the_forward_replaces():
    model = _Counting()
    xb, yb = batch()
    before, rng = snapshot(model), torch.get_rng_state()
    gradient_ics(model, mse_sum, (xb, yb), lr=0.1, layers=["lin"])
    landscape_probe(model, mse_sum, (xb, yb), [0.1, 0.2])
    assert_untouched(model, before, rng)
    assert "calls" in model.state_dict() and model.calls.item() == 0.0
