"""Shared by the Santurkar et al. (2018) experiments: the norm names, the two models (the VGG of
App. A.1 on Fashion-MNIST and the 25-layer deep linear network), and one training entry per
model that goes through `bnlab.lab.train.fit` with the experiment's probes attached.

Variants are named ``"<model>-<norm>-lr<lr>"`` (e.g. ``"vgg-noisy_bn-lr0.1"``,
``"dln-bn-lr1e-06"``); `parse_variant` reads them back.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig, at_least, positive
from bnlab.lab.data import Dataset
from bnlab.lab.models import VGG, DeepLinearNetwork
from bnlab.lab.models.dln import dln_loss, make_dln_data
from bnlab.lab.registry import RunContext
from bnlab.lab.train import Probe, evaluate, fit, seed_all
from bnlab.layers import BatchNorm
from bnlab.stats import BufferSnapshot
from bnlab.variants import ActivationNoise, LpNorm, NoisyBatchNorm

__all__ = ["NORMS", "SUBSTITUTION_DLN", "SUBSTITUTION_VGG", "DLNSpec", "VGGSpec", "make_norm",
           "parse_variant", "run_dln", "run_vgg", "variant_name"]

SUBSTITUTION_VGG = (
    "Fashion-MNIST (60k/10k, 28×28 grey, 10 classes; Debian `dataset-fashion-mnist`) stands in "
    "for CIFAR-10 (50k/10k, 32×32 colour), at its native 28×28 size (the VGG pools in ceil mode: "
    "28→14→7→4→2→1). The VGG-13-style net is narrowed (width multiplier {width}: channels "
    "{c0}…{c1}, hidden {h}) and trained {steps} steps instead of 15,000 (SGD, batch {batch}, "
    "{optim}, no augmentation, Glorot init; the paper's \"standard stochastic gradient descent\" "
    "is read as plain SGD, its momentum and weight decay are not stated). Accuracies are not "
    "comparable in level with the paper's CIFAR-10 numbers; compare orderings and gaps.")
SUBSTITUTION_DLN = (
    "synthetic data, nothing to substitute: Gaussian regression as in the paper (A 10×10 "
    "Gaussian, "
    "x ~ N(0, I), {n} samples drawn from the run seed{fewer}), 25 square 10×10 bias-free layers, "
    "summed squared loss, full-batch gradient descent for {steps} steps. BN (or an ℓp norm) "
    "follows every linear layer but the last (the paper does not say where it sits).")

NORMS = ("none", "bn", "noisy_bn", "noise", "l1", "l2", "linf")
NormFactory = Callable[[int], nn.Module]


def make_norm(name: str, *, seed: int) -> NormFactory | None:
    """The ``norm_layer`` for ``name`` (one of `NORMS`); every layer takes any (N, C, *) input.

    "bn": bnlab's `BatchNorm`; "noisy_bn": `NoisyBatchNorm` (Alg. 1 after BN); "noise":
    `ActivationNoise` alone, the paper's control on the standard net; "l1"/"l2"/"linf":
    `LpNorm` with p = 1, 2, ∞ (Sec. 3.3). Noise modules get seeds ``seed·1000 + k`` (k = 0, 1, …
    in construction order), so the noise is a function of the run seed.
    """
    counter = itertools.count()

    def noise_seed() -> int:
        return seed * 1000 + next(counter)

    factories: dict[str, NormFactory | None] = {
        "none": None,
        "bn": BatchNorm,
        "noisy_bn": lambda c: NoisyBatchNorm(c, seed=noise_seed()),
        "noise": lambda c: ActivationNoise(c, seed=noise_seed()),
        "l1": lambda c: LpNorm(c, p=1),
        "l2": lambda c: LpNorm(c, p=2),
        "linf": lambda c: LpNorm(c, p=float("inf")),
    }
    if name not in factories:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {name!r}")
    return factories[name]


def variant_name(model: str, norm: str, lr: float) -> str:
    return f"{model}-{norm}-lr{lr:g}"


def parse_variant(variant: str) -> tuple[str, str, float]:
    """``"vgg-bn-lr0.1"`` → ("vgg", "bn", 0.1); the lr may contain "-" ("lr1e-06")."""
    model, norm, lr = variant.split("-", 2)
    if model not in ("vgg", "dln") or norm not in NORMS or not lr.startswith("lr"):
        raise ValueError(f"variant must look like 'vgg-bn-lr0.1', got {variant!r}")
    return model, norm, float(lr[2:])


# ------------------------------------------------------------------------------------- VGG


@dataclass(frozen=True)
class VGGSpec:
    """The VGG of App. A.1 scaled for this CPU (see `SUBSTITUTION_VGG`)."""

    width: float = 0.125  # channel multiplier of VGG-13 (64…512 → 8…64), hidden 512·width
    train_acc_examples: int = 2_000  # fixed training subset for the training-accuracy curve
    final_examples: int = 10_000  # examples of the final train/test accuracy in the summary

    def __post_init__(self) -> None:
        positive(self, "width")
        at_least(self, "train_acc_examples final_examples", 1)


# The smoke presets' sizes, shared by the experiments that train the VGG (and the DLN below).
SMOKE_DATA = DataConfig(eval_examples=120)
SMOKE_VGG = VGGSpec(train_acc_examples=100, final_examples=200)


def vgg_substitution(cfg: dict[str, Any]) -> str:
    """`SUBSTITUTION_VGG` filled in from a run's config (its ``vgg`` and ``train`` parts)."""
    w, train, optim = cfg["vgg"]["width"], cfg["train"], cfg.get("optim") or {}
    m, wd = optim.get("momentum", 0.0), optim.get("weight_decay", 0.0)
    return SUBSTITUTION_VGG.format(
        width=w, c0=max(1, round(64 * w)), c1=max(1, round(512 * w)), h=max(1, round(512 * w)),
        steps=train["steps"], batch=train["batch_size"],
        optim=f"{f'momentum {m:g}' if m else 'no momentum'}, "
              f"{f'weight decay {wd:g}' if wd else 'no weight decay'}")


class TrainAccuracy:
    """Accuracy on a fixed subset of the training set, in eval mode (the paper's "training
    accuracy" curves, Figs. 1, 2, 5)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __call__(self, ctx: Any) -> dict[str, Any]:
        return {"train_acc": evaluate(ctx.model, self.x, self.y)[0]}


ProbesFn = Callable[[nn.Module, Dataset], Sequence[Probe]]


def run_vgg(data_cfg: DataConfig, train: TrainConfig, optim: OptimConfig, spec: VGGSpec,
            variant: str, ctx: RunContext, probes: ProbesFn | None = None) -> dict[str, Any]:
    """Train the VGG of ``variant`` with plain SGD at its lr; add the final full train and test
    accuracy (``train_acc``, ``test_acc``) to `fit`'s summary."""
    _, norm, lr = parse_variant(variant)
    data = ctx.data(data_cfg)
    seed_all(ctx.seed)
    model = VGG(data.num_classes, in_channels=data.train_x.shape[1],
                image_size=(data.train_x.shape[-2], data.train_x.shape[-1]), width=spec.width,
                norm_layer=make_norm(norm, seed=ctx.seed))
    n = spec.train_acc_examples
    extra = list(probes(model, data)) if probes is not None else []
    summary = fit(model, data, ctx.run, train=train, optim=dataclasses.replace(optim, lr=lr),
                  data_cfg=data_cfg, seed=ctx.seed,
                  probes=[TrainAccuracy(data.train_x[:n], data.train_y[:n]), *extra],
                  progress=ctx.progress, desc=ctx.desc, resume=ctx.resume)
    m = spec.final_examples
    if not summary["diverged"]:
        summary["train_acc"] = evaluate(model, data.train_x[:m], data.train_y[:m])[0]
        summary["test_acc"] = evaluate(model, data.test_x[:m], data.test_y[:m])[0]
    else:
        summary["train_acc"] = summary["test_acc"] = None
    summary["norm"], summary["lr"] = norm, lr
    return summary


# ------------------------------------------------------------------------------------- DLN


@dataclass(frozen=True)
class DLNSpec:
    """The deep linear network of App. A.1: 25 layers of 10×10, 1000 samples, full-batch GD."""

    depth: int = 25
    width: int = 10
    samples: int = 1_000
    steps: int = 10_000
    eval_every: int = 50  # loss (and probes) every this many steps
    checkpoint_every: int = 2_000

    def __post_init__(self) -> None:
        at_least(self, "depth width samples steps eval_every checkpoint_every", 1)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.samples, eval_every=self.eval_every,
                           checkpoint_every=self.checkpoint_every)


SMOKE_DLN = DLNSpec(samples=100, steps=20, eval_every=10, checkpoint_every=10)
QUICK_DLN = DLNSpec(steps=600, eval_every=50, checkpoint_every=300)  # fig3-fig5's quick preset


def dln_substitution(spec: dict[str, Any]) -> str:
    fewer = "; the paper's 1,000" if spec["samples"] != 1_000 else ""
    return SUBSTITUTION_DLN.format(n=f"{spec['samples']:,}", steps=f"{spec['steps']:,}",
                                   fewer=fewer)


def _full_batch_loss(x: torch.Tensor, y: torch.Tensor) -> Callable[[nn.Module], dict[str, Any]]:
    """The training loss on the whole data set in the model's current (training) mode, i.e. the
    loss of the next full-batch step; normalization buffers are restored afterwards."""

    @torch.no_grad()
    def fn(model: nn.Module) -> dict[str, Any]:
        with BufferSnapshot(model):
            return {"loss": float(dln_loss(model(x), y))}

    return fn


def run_dln(spec: DLNSpec, variant: str, ctx: RunContext,
            probes: ProbesFn | None = None) -> dict[str, Any]:
    """Full-batch GD on the DLN of ``variant``; the summary adds the final and minimum loss."""
    _, norm, lr = parse_variant(variant)
    d = make_dln_data(spec.samples, spec.width, seed=ctx.seed)
    # The data set is its own "held-out" set: the paper plots the training loss only.
    data = Dataset(d.x, d.y, d.x, d.y, source="synthetic DLN data")
    seed_all(ctx.seed)
    model = DeepLinearNetwork(spec.depth, spec.width, norm_layer=make_norm(norm, seed=ctx.seed))
    extra = list(probes(model, data)) if probes is not None else []
    summary = fit(model, data, ctx.run, train=spec.train_config(),
                  optim=OptimConfig(lr=lr, momentum=0.0), data_cfg=DataConfig(), seed=ctx.seed,
                  probes=extra, loss_fn=dln_loss, loss_reduction="sum", progress=ctx.progress,
                  desc=ctx.desc, resume=ctx.resume, evaluate_fn=_full_batch_loss(d.x, d.y))
    losses = [m["loss"] for m in ctx.run.metrics() if isinstance(m.get("loss"), float)]
    summary["final_loss"] = losses[-1] if losses and not summary["diverged"] else None
    summary["min_loss"] = min(losses) if losses else None
    summary["norm"], summary["lr"] = norm, lr
    return summary
