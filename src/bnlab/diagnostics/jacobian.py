"""Singular values of the Jacobian between consecutive normalized layers (Ioffe & Szegedy 2015,
Sec. 3.3): the paper conjectures that BN pushes them towards 1, which would preserve gradient
magnitudes during back-propagation ("remains an area of further study").

For watched modules M_1..M_K in forward order (default: the BN layers, or the Conv/Linear layers
of a network without any), with outputs ẑ_k, this computes per example n the singular values of
J_k[n] = ∂ẑ_{k+1}[n] / ∂ẑ_k[n]. A fused `BatchNormReLU` counts as its BN: ẑ is taken before
its ReLU, as for a BN followed by ``nn.ReLU``. No plotting; works on any module.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bnlab._checks import is_integer
from bnlab.diagnostics._common import (
    SideEffectGuard,
    check_not_str,
    check_probe_model,
    fresh,
    submodule,
)
from bnlab.distributed import SyncBatchNorm
from bnlab.layers import BatchNorm, BatchNormReLU
from bnlab.stats import is_batchnorm
from bnlab.variants import LpNorm

__all__ = ["JacobianResult", "layer_jacobian_singular_values", "layer_jacobians",
           "spectrum_summary"]


def spectrum_summary(s: Tensor, band: tuple[float, float] = (0.5, 2.0), *,
                     zero_tol: float = 1e-6) -> dict[str, float]:
    """How close singular values ``s`` (any shape, pooled) are to 1, the value Sec. 3.3
    conjectures.

    Returns their 10th/50th/90th percentiles (``p10``, ``median``, ``p90``), the fraction inside
    ``band`` (``within``), the fraction that is numerically zero, <= ``zero_tol`` · max(s)
    (``zero``: rank deficiency, e.g. the inactive units of a ReLU layer), and over the non-zero
    ones the median (``median_nz``) and the median of |log10 s| (``abslog``: 0 when all equal
    1, 1 when the typical value is off by a factor of 10).

    Raises:
        ValueError: ``s`` is empty or ``band`` is not (low, high) with 0 < low <= 1 <= high.
    """
    if s.numel() == 0:
        raise ValueError("spectrum_summary: s is empty")
    if not 0 < band[0] <= 1 <= band[1]:
        raise ValueError(f"band must be (low, high) with 0 < low <= 1 <= high, got {band!r}")
    v = s.detach().flatten().double().cpu()
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    q = torch.quantile(v, levels)
    nonzero = v[v > zero_tol * v.max()] if v.max() > 0 else v[:0]
    nz = torch.quantile(nonzero, 0.5) if nonzero.numel() else torch.tensor(float("nan"))
    abslog = (torch.quantile(torch.log10(nonzero).abs(), 0.5) if nonzero.numel()
              else torch.tensor(float("nan")))
    return {"p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]),
            "within": float(((v >= band[0]) & (v <= band[1])).double().mean()),
            "zero": 1.0 - nonzero.numel() / v.numel(), "median_nz": float(nz),
            "abslog": float(abslog)}


@dataclass
class JacobianResult:
    """Per consecutive pair (M_k, M_{k+1}): names and the (N, min(D_k, D_{k+1})) singular values,
    descending, where D is the number of values per example of a module's output."""

    pairs: list[tuple[str, str]]
    singular_values: list[Tensor]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per pair, the singular values and their mean/min/max over all examples."""
        return {f"{a}->{b}": {"singular_values": s.tolist(), "mean": float(s.mean()),
                              "min": float(s.min()), "max": float(s.max())}
                for (a, b), s in zip(self.pairs, self.singular_values, strict=True)}

    def summary(self, band: tuple[float, float] = (0.5, 2.0)) -> dict[str, dict[str, float]]:
        """Per pair "a->b", `spectrum_summary` of its singular values over all examples."""
        return {f"{a}->{b}": spectrum_summary(s, band)
                for (a, b), s in zip(self.pairs, self.singular_values, strict=True)}


def _default_points(model: nn.Module) -> list[nn.Module]:
    norms = [m for m in model.modules() if is_batchnorm(m) or isinstance(m, LpNorm)]
    if norms:
        return norms
    return [m for m in model.modules()
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def layer_jacobians(
    model: nn.Module,
    inputs: Tensor | Sequence[Any],
    modules: Sequence[nn.Module | str] | None = None,
    *,
    train: bool = False,
    max_examples: int | None = None,
    normalized: bool = True,
) -> tuple[list[tuple[str, str]], list[Tensor]]:
    """Per-example Jacobians J_k[n] = ∂ẑ_{k+1}[n]/∂ẑ_k[n] of consecutive watched modules.

    Where a watched module is a BN (or LpNorm) layer with γ, ẑ is its normalized value
    x̂ = (y − β)/γ, the vectors of Sec. 3.3's ẑ = F(x̂) (``normalized=False``: its output y):
    J_x̂ = diag(1/γ_{k+1}) J_y diag(γ_k), with γ repeated over each channel's positions.

    Every watched output is cut from the graph (replaced by a leaf), so J_k is the derivative of
    the stretch of network between M_k and M_{k+1} alone; this assumes they follow each other
    along one path (a sequential network, as Ioffe's MLP). A watched fused `BatchNormReLU` (or
    `SyncBatchNormReLU`) is cut between its BN and its ReLU, which then belongs to the next
    stretch: the result is that of the same weights as a BN followed by ``nn.ReLU``.

    Modes: ``train=False`` (default) runs the model in eval mode: BN uses its running statistics,
    examples are independent and J_k[n] is exact at one backward pass per output value (a BN
    or LpNorm without running statistics normalizes by the batch in eval mode too, which
    couples the examples: J_k[n] is then computed as for ``train=True``).
    ``train=True`` uses batch statistics, which couple the examples; J_k[n] is then the exact
    diagonal block ∂ẑ_{k+1}[n]/∂ẑ_k[n] of the batch Jacobian (including the 1/m terms through
    μ_B and σ²_B), at one backward pass per output value *and* example (use ``max_examples``).
    Modes, buffers and RNG states are restored afterwards.

    Args:
        model: any module; ``model(*inputs)`` must work.
        inputs: a held-out batch (a tensor or a tuple of positional arguments).
        modules: the watched modules (or names), paired in the order the forward calls them;
            default: every BN/LpNorm layer, or every Conv/Linear layer if there is none.
        train: the mode to run in (see above).
        max_examples: compute J for the first this-many examples only (all by default).
        normalized: between BN layers' normalized values x̂ (default) or their outputs.

    Returns:
        (pairs of module names, list of (N′, D_{k+1}, D_k) Jacobians, float64).

    Raises:
        ValueError: ``normalized`` and a γ of exactly 0 at M_{k+1} (x̂ is not determined there).
    """
    check_probe_model(model, "layer_jacobians")
    if max_examples is not None and (not is_integer(max_examples) or max_examples < 1):
        raise ValueError(f"max_examples: expected an int >= 1 (or None for all), "
                         f"got {max_examples!r}")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    names = {m: n for n, m in model.named_modules()}
    check_not_str(modules, "modules", "modules or module names")
    points = [_point(model, m) for m in (modules if modules is not None
                                         else _default_points(model))]
    if len(points) < 2:
        raise ValueError(f"layer_jacobians: need at least 2 watched modules, got {len(points)}")
    for p in points:
        if p not in names:
            raise ValueError(f"modules: {type(p).__name__} is not a submodule of the model")
    outs: dict[nn.Module, Tensor] = {}  # in the order the forward calls the modules
    leaves: dict[nn.Module, Tensor] = {}

    def cut(mod: nn.Module, _args: Any, out: Tensor) -> Tensor:
        if not isinstance(out, Tensor):
            raise ValueError(f"modules: {names[mod] or '<root>'} ({type(mod).__name__}) returns "
                             f"{type(out).__name__}, expected one tensor; watch modules that "
                             "return a tensor")
        if mod in outs:  # its stretches of network would be cut at its last call only
            raise ValueError(f"layer_jacobians: {names[mod] or '<root>'} "
                             f"({type(mod).__name__}) runs more than once in a forward (shared "
                             "weights); watch modules that run once (modules=...)")
        outs[mod] = out  # connected to the previous leaf
        leaves[mod] = out.detach().requires_grad_(True)
        if isinstance(mod, BatchNormReLU):  # out is its BN's (`_unfused`): the ReLU follows
            return torch.relu(leaves[mod])
        # The rest of the network sees a copy of a fresh leaf: a copy, so that an in-place op
        # that follows (ReLU(inplace=True)) is legal and leaves the leaf itself intact.
        return leaves[mod].clone()

    # A BN without running statistics uses the batch's in eval mode too: examples coupled.
    coupled = train or any((is_batchnorm(m) or isinstance(m, LpNorm))
                           and getattr(m, "running_mean", None) is None for m in model.modules())
    modes = {m: m.training for m in model.modules()}
    handles = [p.register_forward_hook(cut) for p in points]
    fused = [p for p in points if isinstance(p, BatchNormReLU)]
    try:
        with SideEffectGuard(model), torch.enable_grad():
            model.train(train)
            for p in fused:  # on the instance, for this forward only
                vars(p)["_normalize"] = _unfused(p)
            model(*fresh(inputs))
            missed = [names[p] or "<root>" for p in points if p not in outs]
            if missed:
                raise ValueError(f"layer_jacobians: the forward did not call {', '.join(missed)}")
            # Pairs follow the forward's order, not the modules' registration order (a model
            # may define bn2 before bn1 and call bn1 first): stretches of network between
            # modules that do not follow each other would have zero Jacobians. Computed before
            # the guard restores the running buffers, which torch's BN saved for its backward.
            pairs, jacs = [], []
            for a, b in itertools.pairwise(outs):
                pairs.append((names[a], names[b]))
                jac = _jacobian(outs[b], leaves[a], coupled, max_examples)
                if normalized:
                    jac = _between_normalized(jac, (a, outs[a]), (b, outs[b]), names[b])
                jacs.append(jac)
    finally:
        for h in handles:
            h.remove()
        for p in fused:
            vars(p).pop("_normalize", None)
        for m, mode in modes.items():
            m.training = mode  # (not train(mode): it would recurse, and a module under two
            # parents would take the second parent's mode)
    return pairs, jacs


def _point(model: nn.Module, m: Any) -> nn.Module:
    """A watched module given as itself or by name (checked against the model by the caller)."""
    if not isinstance(m, str):
        return m
    mod = submodule(model, m)
    if mod is None:
        raise ValueError(f"modules: {m!r} is not the name of a submodule of the model (e.g. "
                         f"{next((n for n, _ in model.named_modules() if n), 'none')!r})")
    return mod


def _unfused(m: BatchNormReLU) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """A fused layer's transform without its ReLU: BN's (y, finite flag), from the same
    statistics (the synchronized ones where a `SyncBatchNormReLU` syncs). Its output relu(y) is
    0 wherever y < 0, so x̂ = (y − β)/γ cannot be read back from it: the probe cuts at y."""
    def normalize(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                  training: bool, momentum: float | Tensor) -> tuple[Tensor, Tensor | None]:
        # SyncBatchNorm's transform applies no ReLU where it syncs; elsewhere it defers to the
        # next class in the MRO, the fused one, so BatchNorm's is called by name.
        sync = isinstance(m, SyncBatchNorm) and m._syncing(training)
        base = SyncBatchNorm if sync else BatchNorm
        return base._normalize(m, input, running_mean, running_var, training, momentum)
    return normalize


def _gamma(m: nn.Module, out: Tensor) -> Tensor | None:
    """γ of a BN/LpNorm module repeated over each channel's positions, (D,) in the order of
    ``out[n].reshape(-1)`` (channel-major); None for other modules or without γ."""
    w = getattr(m, "weight", None)
    if not (is_batchnorm(m) or isinstance(m, LpNorm)) or w is None:
        return None
    return w.detach().to(torch.float64).repeat_interleave(out[0].numel() // out.shape[1])


def _between_normalized(jac: Tensor, a: tuple[nn.Module, Tensor], b: tuple[nn.Module, Tensor],
                        name_b: str) -> Tensor:
    """J_y (N′, D_b, D_a) -> J_x̂ = diag(1/γ_b) J_y diag(γ_a) where a or b is a BN with γ."""
    ga, gb = _gamma(*a), _gamma(*b)
    if ga is not None:
        jac = jac * ga.to(jac.device)  # columns: ∂/∂x̂_a = ∂/∂y_a · γ_a
    if gb is not None:
        if bool((gb == 0).any()):
            raise ValueError(f"layer_jacobians: {name_b!r} has γ = 0 in some channel, where "
                             "its normalized value x̂ is not determined; pass normalized=False")
        jac = jac / gb.to(jac.device)[:, None]  # rows: x̂_b = (y_b − β_b)/γ_b
    return jac


def _jacobian(z: Tensor, x: Tensor, coupled: bool, max_examples: int | None) -> Tensor:
    """(N′, D_z, D_x) per-example blocks of ∂z/∂x, z: (N, *) and x: (N, *)."""
    n = z.shape[0] if max_examples is None else min(max_examples, z.shape[0])
    zf = z.reshape(z.shape[0], -1)  # (N, *) -> (N, D_z)
    dz, dx = zf.shape[1], x[0].numel()
    jac = torch.zeros(n, dz, dx, dtype=torch.float64, device=x.device)
    for j in range(dz):
        if not coupled:
            # Examples are independent: Σ_n ∂z[n, j]/∂x[n] in one pass gives every row n.
            (g,) = torch.autograd.grad(zf[:, j].sum(), x, retain_graph=True, allow_unused=True)
            if g is not None:
                jac[:, j] = g[:n].reshape(n, dx)
            continue
        for i in range(n):
            (g,) = torch.autograd.grad(zf[i, j], x, retain_graph=True, allow_unused=True)
            if g is not None:
                jac[i, j] = g[i].reshape(dx)
    return jac


def layer_jacobian_singular_values(
    model: nn.Module,
    inputs: Tensor | Sequence[Any],
    modules: Sequence[nn.Module | str] | None = None,
    *,
    train: bool = False,
    max_examples: int | None = None,
    normalized: bool = True,
) -> JacobianResult:
    """Singular values of J_k[n] for each consecutive pair and example (Ioffe & Szegedy 2015,
    Sec. 3.3: all equal to 1 if ẑ_k, ẑ_{k+1} were Gaussian, uncorrelated and F linear).

    Same arguments as `layer_jacobians`. Compare a BN network with the same network without
    BN (watching its Linear layers) on held-out batches.
    """
    pairs, jacs = layer_jacobians(model, inputs, modules, train=train, max_examples=max_examples,
                                  normalized=normalized)
    return JacobianResult(pairs=pairs,
                          singular_values=[torch.linalg.svdvals(j).cpu() for j in jacs])
