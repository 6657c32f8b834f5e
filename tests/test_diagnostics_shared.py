"""bnlab.diagnostics on models that share or tie modules and parameters, set buffers lazily or
call modules unusually: the probes measure what they say or refuse with a clear error, and leave
no trace (README: no probe changes weights, .grad, buffers or RNG state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.diagnostics import (
    ActivationTracker,
    gradient_ics,
    landscape_probe,
    layer_jacobians,
)
from bnlab.layers import BatchNorm

D = torch.float64


class LazyCentre(nn.Module):
    """Subtracts the mean of the first batch it sees, kept in a buffer registered as None (and
    counts its calls in a buffer its forward registers)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            self.mean = x.detach().mean(0)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        return x - self.mean


def test_probes_leave_buffers_set_or_registered_by_the_forward_as_they_were() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(LazyCentre(), nn.Linear(4, 3), BatchNorm(3), nn.Tanh(),
                          nn.Linear(3, 2)).to(D)
    x, y = torch.randn(8, 4, dtype=D), torch.randn(8, 2, dtype=D)
    probes = {
        "gradient_ics": lambda: gradient_ics(model, F.mse_loss, (x, y), lr=0.1),
        "landscape_probe": lambda: landscape_probe(model, F.mse_loss, (x, y),
                                                   torch.tensor([0.1])),
        "ActivationTracker": lambda: ActivationTracker(model).record(x),
        "layer_jacobians": lambda: layer_jacobians(model, x, modules=[model[1], model[4]]),
    }
    for name, probe in probes.items():
        probe()
        assert model[0].mean is None, name
        assert [n for n, _ in model.named_buffers()] == ["2.running_mean", "2.running_var",
                                                          "2.num_batches_tracked",
                                                          "2.num_nonfinite_batches"], name


def test_layer_jacobians_refuses_a_module_run_twice_and_restores_shared_modules_modes() -> None:
    hid = nn.Linear(3, 3)
    model = nn.Sequential(nn.Linear(3, 3), hid, nn.Tanh(), hid).to(D)
    # Differentiating the first stretch against the second call's leaf gave zeros.
    with pytest.raises(ValueError, match=r"layer_jacobians: 1 \(Linear\) runs more than once "
                       r"in a forward"):
        layer_jacobians(model, torch.randn(4, 3, dtype=D), modules=[model[0], hid])
    bn = BatchNorm(3)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), bn),
                          nn.Sequential(nn.Tanh(), bn)).to(D).train()
    bn.eval()  # under two parents, in eval mode while the rest trains
    layer_jacobians(model, torch.randn(4, 3, dtype=D), modules=["0.0", "1.0"])
    assert model.training and model[0].training and not bn.training


def test_gradient_ics_measures_a_tied_output_head() -> None:
    class TiedLM(nn.Module):  # GPT-2's tie: the head's weight is the embedding's
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.mlp = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 7, bias=False)
            self.lm_head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.lm_head(torch.tanh(self.mlp(self.embed(tokens))))

    torch.manual_seed(0)
    model = TiedLM().to(D)
    tokens, target = torch.randint(0, 7, (6,)), torch.randint(0, 7, (6,))
    res = gradient_ics(model, F.cross_entropy, (tokens, target), lr=0.1)
    assert res.names == ["embed", "mlp", "lm_head"]
    F.cross_entropy(model(tokens), target).backward()
    # G of the head is the gradient of its (shared) weight, as autograd sums it
    assert torch.allclose(res.grad_norm[2], model.embed.weight.grad.norm())
    # Def. 2.1 keeps W_i: measuring the head moves the mlp but not the embedding it is tied to
    explicit = gradient_ics(model, F.cross_entropy, (tokens, target), lr=0.1,
                            layers=["mlp", model.lm_head], measure=[np.int64(2)])
    assert explicit.layers == [2] and torch.allclose(explicit.l2, res.l2[2:])
    assert res.l2[0] == 0
    with pytest.raises(ValueError, match=r"measure: expected layer numbers, integers in 1..3, "
                       r"got True"):
        gradient_ics(model, F.cross_entropy, (tokens, target), lr=0.1, measure=[True])


def test_activation_tracker_reads_keyword_inputs_aliases_and_refuses_tuple_outputs() -> None:
    class KwargCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(3, 3), nn.Tanh()
            self.block = nn.Sequential(nn.Identity(), self.act)  # also under "block.1"

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(input=self.fc(x))

    model = KwargCall()
    x = torch.randn(5, 3)
    tracker = ActivationTracker(model, ["block.1"])  # (act(input=...) was an IndexError)
    tracker.record(x)
    h = model.fc(x).detach()
    torch.testing.assert_close(tracker.history()["block.1"]["channel_mean"][0], h.double().mean(0))
    rnn = nn.Sequential(nn.GRU(3, 4, batch_first=True))
    with pytest.raises(ValueError, match=r"the output of '0' is tuple, expected one tensor"):
        ActivationTracker(rnn, ["0"], where="output").record(torch.randn(2, 5, 3))
