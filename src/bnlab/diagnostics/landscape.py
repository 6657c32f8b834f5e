"""Loss-landscape probes along the gradient (Santurkar et al. 2018, Sec. 3.2, Fig. 4, App. A.2.2).

At weights w with gradient g = ∇L(w) on a batch, for each step size η in a sweep::

    loss(η)             = L(w − η·d)                        (d = g unless another direction)
    grad_change(η)      = ‖∇L(w − η·d) − ∇L(w)‖₂            "gradient predictiveness"
    beta(η)             = grad_change(η) / ‖w(η) − w‖₂      "effective β-smoothness"

where w(η) is w − η·d as the weights' dtype holds it: the distance moved, η‖d‖₂ up to
rounding, which in bfloat16 or float16 can be far from it for small steps (a weight's change
below half its spacing rounds away).

and the summaries the paper plots: the range [min, max] of loss(η), the range of
grad_change(η), and max_η beta(η). "This is not a training procedure, but an evaluation of the
local loss landscape": weights, ``.grad``, optimizer state, buffers and RNG states are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnlab.diagnostics._common import (
    LossFn,
    SideEffectGuard,
    check_probe_model,
    current_params,
    flat,
    loss_and_grad,
)

__all__ = ["LandscapeResult", "landscape_probe"]


@dataclass
class LandscapeResult:
    """One probe: per-step-size values (aligned with ``step_sizes``) and the paper's summaries."""

    step_sizes: Tensor  # (S,) η
    loss0: float  # L(w)
    grad_norm: float  # ‖∇L(w)‖₂
    loss: Tensor  # (S,) L(w − η·d)
    grad_change: Tensor  # (S,) ‖∇L(w − η·d) − ∇L(w)‖₂
    beta: Tensor  # (S,) grad_change / ‖w(η) − w‖₂, the distance moved (≈ ‖η·d‖₂)

    @property
    def loss_range(self) -> tuple[float, float]:
        """(min, max) of the loss over the sweep: the band of Fig. 4a."""
        return float(self.loss.min()), float(self.loss.max())

    @property
    def grad_change_range(self) -> tuple[float, float]:
        """(min, max) gradient change over the sweep: the band of Fig. 4b."""
        return float(self.grad_change.min()), float(self.grad_change.max())

    @property
    def beta_max(self) -> float:
        """Effective β-smoothness: the largest gradient change per distance moved (Fig. 4c)."""
        return float(self.beta.max())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        return {
            "step_sizes": self.step_sizes.tolist(), "loss0": self.loss0,
            "grad_norm": self.grad_norm, "loss": self.loss.tolist(),
            "grad_change": self.grad_change.tolist(), "beta": self.beta.tolist(),
            "loss_min": self.loss_range[0], "loss_max": self.loss_range[1],
            "grad_change_min": self.grad_change_range[0],
            "grad_change_max": self.grad_change_range[1], "beta_max": self.beta_max,
        }


def _direction_part(direction: Mapping[str, Tensor], name: str, w: Tensor) -> Tensor:
    """``direction[name]`` as ``w``'s dtype and device: a tensor of w's shape, all finite (a
    smaller one would broadcast in w − η·d while ‖d‖ counted only its own values)."""
    d = direction[name]
    if not isinstance(d, Tensor) or d.shape != w.shape:
        got = f"shape {tuple(d.shape)}" if isinstance(d, Tensor) else type(d).__name__
        raise ValueError(f"direction[{name!r}]: expected a tensor of the parameter's shape "
                         f"{tuple(w.shape)}, got {got}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"direction[{name!r}]: expected finite values, got nan or inf")
    return d.detach().to(w)


def landscape_probe(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    step_sizes: Sequence[float] | Tensor,
    *,
    direction: Mapping[str, Tensor] | None = None,
    params: Sequence[str] | None = None,
) -> LandscapeResult:
    """Probe L and ∇L along −g (or along −``direction``) at the given step sizes.

    The model keeps its mode: in training mode every BN normalizes each probed point with the
    batch statistics of the same batch, as the training step would; its running statistics are
    restored afterwards. All evaluations see the same randomness (dropout, noisy-BN draws).

    Args:
        model: any module; ``model(*inputs)`` must work.
        loss_fn: ``loss_fn(model(*inputs), target) -> scalar``.
        batch: ``(inputs, target)``; the same batch for every point (the paper does not say;
            a fixed batch isolates the landscape from sampling noise).
        step_sizes: η values, e.g. ``lr * torch.tensor([0.5, 1, 2, 4])`` for the paper's VGG
            sweep [1/2, 4]×lr, or ``lr * torch.logspace(-2, log10(30), 8)`` for its DLN sweep.
            Each must be > 0.
        direction: a dict name -> tensor to move along instead of g (e.g. a random direction);
            the gradient change is still measured against ∇L(w).
        params: names of the parameters that move (default: all that require grad); the
            gradient and all norms are over these.

    Returns:
        A `LandscapeResult`. Cost: one gradient per step size, plus one.

    Raises:
        ValueError: no parameter moves (the model is frozen and ``params`` not given, g or
            ``direction`` is zero, or a step size changes no weight in the weights' dtype).
    """
    check_probe_model(model, "landscape_probe")
    etas = torch.as_tensor(step_sizes, dtype=torch.float64).reshape(-1).cpu()
    if etas.numel() == 0 or not bool((etas > 0).all()) or not bool(torch.isfinite(etas).all()):
        raise ValueError(f"step_sizes must be a non-empty sequence of finite numbers > 0, "
                         f"got {etas.tolist()}")
    with SideEffectGuard(model) as guard:
        w = current_params(model, params)
        if not w:  # (current_params refuses an empty params=)
            raise ValueError("landscape_probe: the model has no parameter that requires grad, so "
                             "no step moves it; pass params=[names] to probe frozen ones")
        guard.reset()
        loss0, g = loss_and_grad(model, w, loss_fn, batch, w.keys())
        if direction is None:
            d = g
        else:
            missing = set(w) - set(direction)
            if missing:
                raise ValueError(f"direction lacks parameters {sorted(missing)}")
            d = {n: _direction_part(direction, n, w[n]) for n in w}
        w_flat, g_flat, d_norm = flat(w), flat(g), torch.linalg.vector_norm(flat(d))
        if float(d_norm) == 0:  # no step leaves w, and beta would be 0 / 0 (nan stays nan)
            what = "the gradient at w" if direction is None else "direction"
            raise ValueError(f"landscape_probe: {what} is zero, so no step size moves the "
                             f"weights and beta is undefined; pass another direction=")
        losses, changes, dists = [], [], []
        for eta in etas.tolist():
            moved = {n: w[n] - eta * d[n] for n in w}
            # β per distance actually moved: w − η·d is rounded to the weights' dtype
            dists.append(torch.linalg.vector_norm(flat(moved) - w_flat).cpu())
            if float(dists[-1]) == 0:
                dtypes = ", ".join(sorted({str(t.dtype) for t in w.values()}))
                raise ValueError(f"step_sizes: η = {eta:g} moves no weight (w − η·d rounds to "
                                 f"w in {dtypes}), so beta is undefined; use larger step sizes")
            guard.reset()
            loss, g_eta = loss_and_grad(model, moved, loss_fn, batch, w.keys())
            losses.append(loss.to(torch.float64).cpu())
            changes.append(torch.linalg.vector_norm(flat(g_eta) - g_flat).cpu())
    change = torch.stack(changes)
    return LandscapeResult(
        step_sizes=etas, loss0=float(loss0), grad_norm=float(torch.linalg.vector_norm(g_flat)),
        loss=torch.stack(losses), grad_change=change, beta=change / torch.stack(dists),
    )
