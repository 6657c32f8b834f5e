"""bnlab.diagnostics pointed at users' models and settings the lab never uses: custom updates
that write in place, other layer kinds, tied and frozen parts, generators kept in containers,
probes beside hooks that count training batches, and bad arguments refused up front."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bnlab.diagnostics import (
    ActivationTracker,
    default_layers,
    distribution_shift,
    gradient_ics,
    landscape_probe,
    layer_jacobians,
)
from bnlab.diagnostics._common import SideEffectGuard
from bnlab.diagnostics.activations import _quantiles
from bnlab.lab.experiments.santurkar2018._probes import ICSProbe, LandscapeProbe
from bnlab.lab.probes import CumulativeBatchStats, InputPercentiles
from bnlab.lab.train import ProbeContext

D = torch.float64


def mse(out, y):
    return 0.5 * (out - y).square().sum()


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)


def batch(n: int = 8, d_in: int = 4, d_out: int = 3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, d_in, generator=g, dtype=D), torch.randn(n, d_out, generator=g, dtype=D)


def test_an_in_place_update_neither_moves_the_weights_nor_changes_the_result():
    model, b = mlp(), batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def sgd_in_place(params, grads):  # what an optimizer-style update does
        with torch.no_grad():
            for n, t in params.items():
                t.sub_(0.5 * grads[n])
                grads[n].zero_()
        return params

    res = gradient_ics(model, mse, b, update=sgd_in_place)
    ref = gradient_ics(model, mse, b, lr=0.5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.allclose(res.l2, ref.l2) and float(res.l2[1]) > 0
    assert torch.allclose(res.grad_norm, ref.grad_norm)


def test_update_and_lr_arguments_are_checked():
    model, b = mlp(), batch()
    with pytest.raises(ValueError, match=r"update: expected a tensor of shape \(5, 4\) for "
                       r"parameter '0.weight', got shape \(4,\)"):
        gradient_ics(model, mse, b, update=lambda p, g: {**p, "0.weight": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"got nothing"):
        gradient_ics(model, mse, b, update=lambda p, g: {})
    with pytest.raises(TypeError, match=r"update: expected it to return a dict"):
        gradient_ics(model, mse, b, update=lambda p, g: list(p.values()))
    with pytest.raises(ValueError, match="not both"):
        gradient_ics(model, mse, b, lr=0.1, update=lambda p, g: p)
    for lr in (0, -0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match=r"lr: expected a finite number > 0, got"):
            gradient_ics(model, mse, b, lr=lr)


def test_default_layers_cover_other_layer_kinds_and_group_their_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    res = gradient_ics(model, mse, batch(), lr=0.3)
    assert res.names == ["0+1", "3"]  # LayerNorm's γ, β move with the layer before it
    explicit = gradient_ics(model, mse, batch(), lr=0.3, layers=[[model[0], model[1]], model[3]])
    assert torch.equal(res.l2, explicit.l2)
    bare = gradient_ics(model, mse, batch(), lr=0.3, layers=[model[0], model[3]])
    assert not torch.allclose(res.l2[1], bare.l2[1])  # leaving γ, β still changes layer 2's ICS

    torch.manual_seed(0)
    up = nn.Sequential(nn.ConvTranspose1d(2, 3, 3), nn.BatchNorm1d(3), nn.ReLU(),
                       nn.ConvTranspose1d(3, 1, 3)).to(D)
    x, y = torch.randn(4, 2, 5, dtype=D), torch.randn(4, 1, 9, dtype=D)
    assert gradient_ics(up, mse, (x, y), lr=0.1).names == ["0+1", "3"]


def test_parameters_no_default_layer_holds_are_named_in_a_warning():
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 5, batch_first=True)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    model = Recurrent().to(D)
    x, y = torch.randn(6, 3, 4, dtype=D), torch.randn(6, 3, dtype=D)
    with pytest.warns(UserWarning, match=r"never move: rnn.weight_ih_l0, .*pass layers="):
        res = gradient_ics(model, mse, (x, y), lr=0.1)
    assert res.names == ["head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # named layers: the user chose, nothing to warn about
        gradient_ics(model, mse, (x, y), lr=0.1, layers=[model.rnn, model.head])


class Noisy(nn.Module):
    """Noise from a generator kept in a dict, as a per-device table would keep it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.gens = {"cpu": torch.Generator().manual_seed(3)}

    def forward(self, x):
        h = self.lin1(x)
        noise = torch.randn(h.shape, generator=self.gens["cpu"], dtype=h.dtype)
        return self.lin2(torch.tanh(h + noise))


def test_generators_in_containers_are_reset_between_evaluations():
    torch.manual_seed(0)
    model = Noisy().to(D)
    state = model.gens["cpu"].get_state()
    res = gradient_ics(model, mse, batch(), lr=0.1)
    assert float(res.l2[0]) == 0  # nothing moves before layer 1: the same noise both times
    assert torch.equal(model.gens["cpu"].get_state(), state)  # the training stream untouched


def test_probes_are_not_counted_as_training_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    stats = CumulativeBatchStats(model)
    x, y = batch()
    mse(model(x), y).backward()  # one training forward
    mean = stats.sums["1"][0].clone()
    landscape_probe(model, mse, (x, y), [0.1, 0.2, 0.4])
    gradient_ics(model, mse, (x, y), lr=0.1)
    assert stats.count["1"] == 1 and torch.equal(stats.sums["1"][0], mean)
    with SideEffectGuard(model):
        pass
    mse(model(x), y).backward()  # counting resumes after the guard
    assert stats.count["1"] == 2


def test_landscape_direction_must_match_the_parameters():
    model, b = mlp(), batch()
    with pytest.raises(ValueError, match=r"direction\['0.weight'\]: expected a tensor of the "
                       r"parameter's shape \(5, 4\), got shape \(\)"):
        landscape_probe(model, mse, b, [0.1], params=["0.weight"],
                        direction={"0.weight": torch.tensor(1.0)})
    nan = torch.full((5, 4), float("nan"))
    with pytest.raises(ValueError, match=r"direction\['0.weight'\]: expected finite values"):
        landscape_probe(model, mse, b, [0.1], params=["0.weight"], direction={"0.weight": nan})
    with pytest.raises(TypeError, match=r"params: expected a list of parameter names, got the "
                       r"str '0.weight'"):
        landscape_probe(model, mse, b, [0.1], params="0.weight")
    ones = {"0.weight": torch.ones(5, 4)}  # float32 direction for a float64 model: fine
    res = landscape_probe(model, mse, b, [0.1], params=["0.weight"], direction=ones)
    assert res.beta.dtype == D and torch.isfinite(res.beta).all()


def test_wrappers_and_inference_mode_are_refused_with_the_fix():
    model, b = mlp(), batch()
    with pytest.raises(TypeError, match=r"model is a DataParallel; probe the wrapped module"):
        gradient_ics(nn.DataParallel(model), mse, b, lr=0.1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode"):
        landscape_probe(model, mse, b, [0.1])


def test_a_compiled_model_is_refused_with_the_fix():
    """Dynamo traces the probes' hooks and swapped-in parameters and failed inside its tracer
    (or, for landscape_probe, ran): the compiled module's _orig_mod is the one to probe."""
    model, b = mlp(), batch()
    compiled = torch.compile(model, backend="eager")
    probes = [lambda m: gradient_ics(m, mse, b, lr=0.1),
              lambda m: landscape_probe(m, mse, b, [0.1]),
              lambda m: layer_jacobians(m, b[0]),
              lambda m: default_layers(m, b[0])]
    for probe in probes:
        with pytest.raises(TypeError, match=r"model is a torch.compile'd OptimizedModule; probe "
                           r"the module it compiles \(model._orig_mod\)"):
            probe(compiled)
        probe(compiled._orig_mod)


def test_a_single_name_as_a_str_is_refused_not_read_letter_by_letter():
    layers = [nn.Linear(4, 4)] + [m for _ in range(6) for m in (nn.Linear(4, 4), nn.Tanh())]
    model = nn.Sequential(*layers).to(D)  # children '0'..'12': '1' and '2' exist too
    x, y = batch(d_out=4)
    with pytest.raises(TypeError, match=r"modules: expected a list of modules or module names, "
                       r"got the str '12' \(write \['12'\]\)"):
        ActivationTracker(model, "12")
    with pytest.raises(TypeError, match=r"layers: expected a list of modules, module names or "
                       r"groups of them, got the str '11'"):
        gradient_ics(model, mse, (x, y), lr=0.1, layers="11")
    with pytest.raises(TypeError, match=r"modules: expected a list .*got the str '12'"):
        layer_jacobians(model, x, modules="12")
    with pytest.raises(TypeError, match=r"measure: expected a list of layer numbers in 1..7, "
                       r"got the str '12'$"):
        gradient_ics(model, mse, (x, y), lr=0.1, measure="12")
    assert list(ActivationTracker(model, ["12"]).modules) == ["12"]


def test_errors_name_the_argument_and_numpy_integers_are_integers():
    model, b = mlp(), batch()
    with pytest.raises(TypeError, match=r"measure: expected a list of layer numbers in 1..2, "
                       r"got the int 1 \(write \[1\]\)"):
        gradient_ics(model, mse, b, lr=0.1, measure=1)
    with pytest.raises(ValueError, match=r"modules: 'nope' is not the name of a submodule of "
                       r"the model"):
        layer_jacobians(model, b[0], modules=["0", "nope"])
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match=r"landscape_probe: the model has no parameter that "
                       r"requires grad, so no step moves it; pass params="):
        landscape_probe(frozen, mse, b, [0.1])
    res = landscape_probe(frozen, mse, b, [0.1], params=["0.weight"])  # as the message says
    assert torch.isfinite(res.beta).all()
    # A bare tensor is one input, as for the other probes (it was spread over its rows).
    assert default_layers(model, b[0]) == default_layers(model, (b[0],)) == ["0", "2"]
    tracker = ActivationTracker(model, bins=np.int64(10), saturation_threshold=np.float32(2))
    tracker.record(b[0])
    assert tracker.history()["1"]["hist"].shape == (1, 1, 10)
    _, jacs = layer_jacobians(model, b[0], [model[0], model[2]], max_examples=np.int64(2))
    assert jacs[0].shape == (2, 3, 5)


def test_quantiles_past_float32_positions():
    n = 2**24 + 4  # float32 cannot hold every position of this many values
    v = torch.arange(n, dtype=torch.float32).flip(0).reshape(1, -1)
    q = torch.tensor([0.0, 0.99999, 1.0], dtype=D)
    got = _quantiles(v, q)[0]
    want = np.quantile(np.arange(n, dtype=np.float64), q.numpy())
    assert got[0] == 0 and got[2] == n - 1
    assert abs(float(got[1]) - want[1]) <= 2.0  # float32 values: spacing 2 above 2**24


def test_activation_tracker_refuses_bad_settings():
    model = mlp()
    bad = [({"units": []}, "units: expected a non-empty list"),
           ({"units": [0.5]}, "units: expected a non-empty list"),
           ({"quantiles": [float("nan")]}, "quantiles must be"),
           ({"hist_range": (0, float("inf"))}, "hist_range must be finite"),
           ({"hist_range": ("a", 1)}, "hist_range must be finite"),
           ({"saturation_threshold": -1}, "saturation_threshold: expected a finite number"),
           ({"bins": True}, "bins must be an int")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            ActivationTracker(model, **kwargs)
    tracker = ActivationTracker(model, units=[np.int64(1)])
    assert tracker.units == [1]
    with pytest.raises(ValueError, match=r"has shape \(0, 4\); expected \(N, C, \*\), not empty"):
        ActivationTracker(model, [model[0]]).record(torch.zeros(0, 4, dtype=D))


def test_distribution_shift_reads_whole_number_histories():
    h = {"channel_mean": [[0, 1], [2, 3]], "channel_var": [[1, 1], [1, 4]]}
    out = distribution_shift(h)  # e.g. read back from JSON
    assert out["mean_step"].tolist() == [2.0] and out["var_step"].tolist() == [1.5]


def test_layer_jacobian_arguments():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    x = torch.randn(5, 3, dtype=D)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"max_examples: expected an int >= 1"):
            layer_jacobians(model, x, [model[0], model[2]], max_examples=bad)

    class Pair(nn.Module):
        def forward(self, h):
            return h, h

    tupled = nn.Sequential(nn.Linear(3, 4), Pair())
    with pytest.raises(ValueError, match=r"modules: 1 \(Pair\) returns tuple, expected one"):
        layer_jacobians(tupled, x.float(), [tupled[0], tupled[1]])


def _ctx(model, lr=0.1, step=0):
    x, y = batch()
    return ProbeContext(model, step, (x, y), torch.optim.SGD(model.parameters(), lr=0.1), lr,
                        None)


def test_lab_probes_check_their_settings():
    model = mlp()
    for every in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"every: expected an int >= 1"):
            LandscapeProbe([1, 2], mse, every=every)
        with pytest.raises(ValueError, match=r"every: expected an int >= 1"):
            ICSProbe([model[0], model[2]], [2], mse, every=every)
    probe = LandscapeProbe([0.5, 1], mse)
    with pytest.raises(ValueError, match=r"LandscapeProbe: the learning rate at step 0 is 0.0"):
        probe(_ctx(model, lr=0.0))
    assert probe(_ctx(model))["landscape"]["beta_max"] > 0


def test_input_percentiles_keep_frozen_modes_and_see_the_input_before_in_place_ops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(inplace=True),
                          nn.Linear(6, 2))
    model[1].eval()  # frozen BN inside a training model
    x = torch.randn(64, 4)
    probe = InputPercentiles(model[2], x, qs=(15, 50))
    got = probe(_ctx(model))["pct"]
    assert model.training and not model[1].training
    model.eval()
    with torch.no_grad():
        z = model[1](model[0](x))
    want = torch.quantile(z, torch.tensor([0.15, 0.5]), dim=0)
    assert np.allclose(got, want.numpy(), atol=1e-4) and min(got[0]) < 0  # not ReLU'd
    for qs, message in [((), "non-empty"), ((150,), r"in \[0, 100\]"),
                        ((0.15, 0.5), "fractions of a percent")]:
        with pytest.raises(ValueError, match=r"qs: expected .*" + message):
            InputPercentiles(model[2], x, qs=qs)
