"""bnlab.diagnostics on models whose gradients or forward are out of the ordinary: sparse
embedding gradients, a forward that edits its input in place, bfloat16 weights, and a token
model recorded at several sequence lengths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.diagnostics import (
    ActivationTracker,
    default_layers,
    gradient_ics,
    landscape_probe,
    layer_jacobians,
)

D = torch.float64


def mse(out, y):
    return 0.5 * (out - y).square().sum()


class Bag(nn.Module):
    """A token classifier: the mean of tanh(embedding) over the sequence, then a linear head."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4, sparse=sparse)
        self.fc = nn.Linear(4, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(tokens)).mean(1))


def test_sparse_embedding_gradients_give_the_dense_results():
    """nn.Embedding(sparse=True) makes autograd return a sparse gradient for its weight; the
    probes measure what they measure with the dense one, and G is torch's gradient."""
    torch.manual_seed(0)
    dense = Bag(sparse=False).to(D)
    sparse = Bag(sparse=True).to(D)
    sparse.load_state_dict(dense.state_dict())
    tokens, target = torch.randint(0, 10, (5, 3)), torch.randint(0, 3, (5,))
    batch = (tokens, target)
    want, got = (gradient_ics(m, F.cross_entropy, batch, lr=0.5) for m in (dense, sparse))
    assert got.names == ["emb", "fc"] and float(got.l2[1]) > 0
    for field in ("l2", "cosine", "grad_norm"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field))
    F.cross_entropy(sparse(tokens), target).backward()
    assert sparse.emb.weight.grad.is_sparse
    torch.testing.assert_close(got.grad_norm[0], sparse.emb.weight.grad.to_dense().norm())
    want, got = (landscape_probe(m, F.cross_entropy, batch, [0.1, 0.5]) for m in (dense, sparse))
    for field in ("loss", "grad_change", "beta"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field))


class InPlace(nn.Module):
    """Preprocesses its inputs in place, as an ``x /= 255`` inside a forward would."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        x.div_(2.0)
        extra["shift"].add_(1.0)
        return self.fc2(torch.tanh(self.fc1(x) + extra["shift"]))


def test_a_forward_that_edits_its_input_sees_the_batch_as_given_every_time():
    """Def. 2.1 at layer 1 moves nothing, so G′ = G exactly, if every evaluation sees the same
    input; the user's tensors, nested in a tuple and a dict, stay as they were."""
    torch.manual_seed(0)
    model = InPlace().to(D)
    x, shift, y = torch.randn(6, 4, dtype=D), torch.randn(8, dtype=D), torch.randn(6, 3, dtype=D)
    inputs = (x, {"shift": shift})
    x0, shift0 = x.clone(), shift.clone()
    res = gradient_ics(model, mse, (inputs, y), lr=0.1)
    assert res.l2[0] == 0 and float(res.cosine[0]) == pytest.approx(1, abs=1e-12)
    land = landscape_probe(model, mse, (inputs, y), [0.1])
    with torch.no_grad():
        want = mse(model(x0.clone(), {"shift": shift0.clone()}), y)
    assert land.loss0 == pytest.approx(float(want), rel=1e-12)
    layer_jacobians(model, inputs, ["fc1", "fc2"])
    ActivationTracker(model, ["fc2"]).record(*inputs)
    assert default_layers(model, inputs) == ["fc1", "fc2"]
    assert torch.equal(x, x0) and torch.equal(shift, shift0)


class Point(nn.Module):
    """The weights themselves as the output: with `half_square`, L(w) = ½‖w‖²."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, _x: object) -> torch.Tensor:
        return self.w


def half_square(w, _target):
    return 0.5 * w.square().sum()


def test_beta_divides_by_the_distance_the_rounded_weights_moved():
    """L = ½‖w‖² has ∇L(w) = w (exactly, in any dtype), so the gradient changes by the distance
    moved and β = 1 for every step. bfloat16 rounds w − η·w to a point whose distance from w
    is not η‖w‖: dividing by η‖w‖ gave β far from 1."""
    w = torch.linspace(0.5, 2.0, 16, dtype=D)
    etas = [0.004, 0.01, 0.05]
    res = landscape_probe(Point(w), half_square, (None, None), etas)
    torch.testing.assert_close(res.beta, torch.ones(3, dtype=D), rtol=1e-12, atol=0)
    wb = w.to(torch.bfloat16)
    res = landscape_probe(Point(wb), half_square, (None, None), etas)
    assert res.beta.tolist() == [1.0, 1.0, 1.0]
    moved = (wb - etas[0] * wb).double() - wb.double()  # what bf16 holds after the step
    assert abs(float(moved.norm()) / (etas[0] * float(wb.double().norm())) - 1) > 0.05
    with pytest.raises(ValueError, match=r"step_sizes: η = 0.0001 moves no weight \(w − η·d "
                       r"rounds to w in torch.bfloat16\)"):
        landscape_probe(Point(wb), half_square, (None, None), [1e-4, 0.01])


def test_records_of_another_width_are_refused_and_that_step_is_not_kept():
    """A (N, T, D) token model has T in dimension 1: records at two lengths cannot stack into
    one history, so the second is refused (for every layer) and the tracker stays usable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.Tanh())
    tracker = ActivationTracker(model)
    tracker.record(torch.randn(4, 10, 8), step=0)
    with pytest.raises(RuntimeError, match=r"the input of '1' has 12 channels \(dimension 1\) "
                       r"at this step, 10 at earlier ones"):
        tracker.record(torch.randn(4, 12, 8), step=1)
    assert tracker.steps == [0]
    x = torch.randn(4, 10, 8)
    tracker.record(x, step=2)
    history = tracker.history()
    assert history["3"]["steps"].tolist() == [0, 2]
    with torch.no_grad():
        want = model[0](x).double().mean((0, 2))  # per position of dimension 1
    torch.testing.assert_close(history["1"]["channel_mean"][1], want)
    assert len(tracker.to_dict()["layers"]["3"]["quantiles"]) == 2
