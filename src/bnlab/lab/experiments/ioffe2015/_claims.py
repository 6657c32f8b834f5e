"""Shared pieces of the experiments that test the abstract's remaining claims (lr_init, dropout,
saturation, jacobian): the fan-in initialization with a scale factor, the paper's MLP built for
a variant, and the probes they record (training-subset accuracy, saturated sigmoid units, layer
Jacobian spectra). Underscore module: skipped by experiment discovery.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.diagnostics import (
    ActivationTracker,
    layer_jacobian_singular_values,
    spectrum_summary,
)
from bnlab.lab.data import Dataset
from bnlab.lab.models import MLP, activation, norm_factory
from bnlab.lab.train import ProbeContext, evaluate
from bnlab.stats import is_batchnorm, recalibrate

# Gain of the "usual" fan-in initialization: LeCun (std = 1/√fan_in) for sigmoid and tanh,
# Kaiming/He (std = √2/√fan_in) for ReLU.
GAINS = {"sigmoid": 1.0, "tanh": 1.0, "relu": math.sqrt(2.0)}


def fan_in_init_(model: nn.Module, act: str, factor: float) -> nn.Module:
    """Re-draw every Linear/Conv weight from N(0, (factor · gain / √fan_in)²), biases 0.

    ``factor`` = 1 is the usual LeCun (sigmoid) or Kaiming (ReLU) scale; the lr_init grid
    multiplies it by 0.1 … 10 ("less careful initialization", Ioffe & Szegedy 2015, abstract).
    The output layer gets the same factor with gain 1 (it feeds a softmax, not ``act``).
    """
    if act not in GAINS:
        raise ValueError(f"act must be one of {sorted(GAINS)}, got {act!r}")
    if not factor > 0:
        raise ValueError(f"init factor must be > 0, got {factor}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for i, m in enumerate(layers):
            fan_in = m.weight[0].numel()  # in_features (Linear) or C_in·k·k (Conv)
            gain = 1.0 if i == len(layers) - 1 else GAINS[act]
            m.weight.normal_(0.0, factor * gain / math.sqrt(fan_in))
            if m.bias is not None:
                m.bias.zero_()
    return model


def build_mlp(data: Dataset, norm: str, act: str, *, init_std: float | None = None,
              init_factor: float | None = None) -> MLP:
    """The Sec. 4.1 network (784-100-100-100-10; BN before each nonlinearity, bias dropped)
    with weights N(0, init_std²) as in fig1, or fan-in scaled by ``init_factor``."""
    model = MLP(data.train_x[0].numel(), (100, 100, 100), data.num_classes,
                norm_layer=norm_factory(norm, conv=False), activation=activation(act),
                init_std=init_std if init_std is not None else 0.1)
    if init_factor is not None:
        fan_in_init_(model, act, init_factor)
    return model


def subset(data: Dataset, n: int | None) -> Dataset:
    """The first ``n`` training examples (all when None); held-out data unchanged."""
    if n is None or n >= len(data.train_x):
        return data
    if n < 1:
        raise ValueError(f"train_examples must be >= 1, got {n}")
    return Dataset(data.train_x[:n], data.train_y[:n], data.test_x, data.test_y, data.source)


class TrainAccuracy:
    """Accuracy and loss on a fixed subset of the training data, in eval mode (the training
    side of the train/held-out gap that a regularizer narrows, Sec. 3.4)."""

    def __init__(self, x: Tensor, y: Tensor, *, batch_size: int = 1000) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        acc, loss = evaluate(ctx.model, self.x, self.y, batch_size=self.batch_size)
        return {"train_acc": acc, "train_eval_loss": loss}


class Saturation:
    """Per hidden layer, the fraction of sigmoid inputs with |x| > ``threshold`` and their
    15/50/85th percentiles, on a fixed held-out batch in eval mode (`ActivationTracker` +
    `saturation_fraction`; Ioffe & Szegedy 2015, Sec. 3.3: σ′(4) < 0.018, so such units pass
    almost no gradient)."""

    def __init__(self, model: MLP, x: Tensor, *, threshold: float = 4.0) -> None:
        self.model, self.x, self.threshold = model, x, threshold
        self.layers = {f"layer{i + 1}": m for i, m in enumerate(model.nonlinearities())}

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        tracker = ActivationTracker(self.model, self.layers, where="input", units=None,
                                    saturation_threshold=self.threshold, bins=1)
        was = self.model.training
        self.model.eval()
        try:
            tracker.record(self.x, step=ctx.step)
        finally:
            self.model.train(was)
        hist = tracker.history()
        return {"sat": [round(float(h["saturated"][-1]), 6) for h in hist.values()],
                "sat_q": [[round(v, 4) for v in h["quantiles"][-1, 0].tolist()]
                          for h in hist.values()]}


def log10_edges(lo: float = -3.0, hi: float = 2.0, bins: int = 50) -> list[float]:
    """Histogram edges of log10(singular value), the same at every step and variant."""
    return torch.linspace(lo, hi, bins + 1).tolist()


class JacobianSpectrum:
    """Singular values of the Jacobian between consecutive watched layers (Ioffe & Szegedy 2015,
    Sec. 3.4) on a fixed held-out batch, via `bnlab.diagnostics.layer_jacobian_singular_values`.

    Watched: the BN layers of a BN network (their normalized x̂, the paper's vectors: the
    default of `layer_jacobian_singular_values`), the hidden Linear layers of one
    without. Measured in eval mode on a copy of the model whose BN statistics are first set to
    Alg. 2's population statistics over ``calib`` training batches, so every example's
    Jacobian is exact and independent of the batch, also at step 0 (where the running averages
    are still at their initial values). Records per pair the median, 10th/90th percentiles,
    fraction in [0.5, 2] and a histogram of log10 s over examples × singular values.
    """

    def __init__(self, model: MLP, x: Tensor, calib: Sequence[Tensor], *,
                 edges: Sequence[float] | None = None) -> None:
        self.x, self.calib = x, list(calib)
        names = [n for n, m in model.named_modules() if is_batchnorm(m)]
        if not names:
            names = [f"hidden.{i}" for i, m in enumerate(model.hidden) if isinstance(m, nn.Linear)]
        self.names = names
        self.edges = torch.tensor(list(edges) if edges is not None else log10_edges())

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]:
        twin = copy.deepcopy(ctx.model)
        if any(is_batchnorm(m) for m in twin.modules()):
            recalibrate(twin, self.calib, estimator="alg2")
        res = layer_jacobian_singular_values(twin, self.x, self.names, train=False)
        out: dict[str, Any] = {}
        for (a, b), s in zip(res.pairs, res.singular_values, strict=True):
            out[f"{a}->{b}"] = summarize_spectrum(s, self.edges)
        return {"jac": out}


def summarize_spectrum(s: Tensor, edges: Tensor) -> dict[str, Any]:
    """`spectrum_summary` of every singular value in ``s`` plus a histogram of log10 s
    (fractions per bin; values outside the edges go to the end bins)."""
    v = s.flatten().double()
    logv = torch.log10(v.clamp_min(1e-30)).clamp(float(edges[0]), float(edges[-1]))
    hist = torch.histc(logv, len(edges) - 1, float(edges[0]), float(edges[-1])) / v.numel()
    return {**spectrum_summary(v), "hist": [round(float(h), 5) for h in hist]}
