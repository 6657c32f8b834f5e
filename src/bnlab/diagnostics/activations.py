"""Activation distributions over training: the "ridge" plots of Santurkar et al. (2018, Fig. 1c,
Fig. 2), the input-percentile curves of Ioffe & Szegedy (2015, Fig. 1b/c), the distribution
stability of Santurkar et al. (Fig. 8), and the fraction of saturated units.

`ActivationTracker` hooks chosen modules only while it records, so training forwards run at
full speed between records. It stores plain tensors (easy to save as JSON); plotting lives in
the lab.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bnlab._checks import call_input, is_integer, is_real
from bnlab.diagnostics._common import SideEffectGuard, check_not_str, fresh, submodule

__all__ = ["NONLINEARITIES", "ActivationTracker", "distribution_shift", "saturation_fraction"]

NONLINEARITIES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
)


def _quantiles(v: Tensor, q: Tensor) -> Tensor:
    """Quantiles of each row of v (U, n) by linear interpolation (torch.quantile's default),
    via a sort: torch.quantile refuses more than 2**24 values."""
    s = v.sort(dim=1).values
    # Positions in float64: float32 cannot index past 2**24 values, the case this path is for.
    pos = q.to(torch.float64) * (s.shape[1] - 1)  # (Q,)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=s.shape[1] - 1)
    frac = (pos - lo.to(torch.float64)).to(s)
    return s[:, lo] + (s[:, hi] - s[:, lo]) * frac  # (U, Q)


class ActivationTracker:
    """Record per-layer activation statistics on demand, over the course of training.

    Args:
        model: any module.
        modules: what to watch: a dict name -> module, a list of modules or names. Default: every
            nonlinearity module (`NONLINEARITIES`), i.e. the pre-activations.
        where: ``"input"`` (default; what enters the module, e.g. a sigmoid's input) or
            ``"output"`` (e.g. every BN output: pass ``modules=[bn layers], where="output"``).
        quantiles: levels recorded at each step (default 15/50/85 %, Ioffe Fig. 1b/c).
        bins, hist_range: a fixed histogram grid, the same at every step (ridge plots); values
            outside the range are not binned but counted in ``outside``.
        units: channel indices (dimension 1) to describe one by one; None pools every value of
            the layer (over batch, channels and positions) into one distribution. (Ioffe's
            Fig. 1b/c shows one typical unit of the last hidden layer: ``units=[k]``.)
        saturation_threshold: if given, also record the fraction of values with |x| > threshold
            (e.g. 4 for a sigmoid: σ′(4) < 0.018), over all units.

    Use `record` on a fixed batch (no gradients, buffers and RNG untouched), or `capture` around
    one of your own forward passes. Every call of a watched module inside a step is pooled into
    that step's record (several batches; a module that serves several layers of one width too,
    while widths that differ are an error). Records are copies, taken before an in-place op
    can change them (a ``ReLU(inplace=True)`` after or, for ``where="input"``, at the module).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module] | Sequence[nn.Module | str] | None = None,
        *,
        where: Literal["input", "output"] = "input",
        quantiles: Sequence[float] = (0.15, 0.5, 0.85),
        bins: int = 60,
        hist_range: tuple[float, float] = (-6.0, 6.0),
        units: Sequence[int] | None = None,
        saturation_threshold: float | None = None,
    ) -> None:
        if where not in ("input", "output"):
            raise ValueError(f"where must be 'input' or 'output', got {where!r}")
        q = torch.as_tensor(quantiles, dtype=torch.float64)
        if q.dim() != 1 or q.numel() == 0 or not bool(((q >= 0) & (q <= 1)).all()):
            raise ValueError(f"quantiles must be a non-empty list of levels in [0, 1], "
                             f"got {quantiles!r}")
        if not is_integer(bins) or bins < 1:
            raise ValueError(f"bins must be an int >= 1, got {bins!r}")
        try:
            lo_hi = [float(v) for v in hist_range]
        except (TypeError, ValueError):
            lo_hi = []
        if len(lo_hi) != 2 or not all(map(math.isfinite, lo_hi)) or not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"hist_range must be finite (low, high) with low < high, "
                             f"got {hist_range!r}")
        if units is not None and (isinstance(units, (str, int)) or len(units) == 0 or not all(
                isinstance(u, numbers.Integral) and not isinstance(u, bool) for u in units)):
            raise ValueError(f"units: expected a non-empty list of channel indices (or None "
                             f"to pool all values), got {units!r}")
        if saturation_threshold is not None and not (
                is_real(saturation_threshold) and not isinstance(saturation_threshold, bool)
                and saturation_threshold >= 0 and math.isfinite(saturation_threshold)):
            raise ValueError(f"saturation_threshold: expected a finite number >= 0 (or None), "
                             f"got {saturation_threshold!r}")
        self.model, self.where, self.q, self.bins = model, where, q, int(bins)
        self.hist_range = (float(hist_range[0]), float(hist_range[1]))
        self.bin_edges = torch.linspace(*self.hist_range, bins + 1, dtype=torch.float64)
        self.units = None if units is None else [int(u) for u in units]
        self.saturation_threshold = (None if saturation_threshold is None
                                     else float(saturation_threshold))
        self.modules = self._resolve(modules)
        self._records: dict[str, list[dict[str, Tensor]]] = {n: [] for n in self.modules}
        self.steps: list[int] = []

    def _resolve(self, modules: Any) -> dict[str, nn.Module]:
        by_name = dict(self.model.named_modules())
        names = {m: n for n, m in by_name.items()}
        if modules is None:
            found = {n: m for n, m in by_name.items() if isinstance(m, NONLINEARITIES)}
            if not found:
                raise ValueError(f"ActivationTracker: {type(self.model).__name__} has no "
                                 "nonlinearity module; pass modules=... (e.g. its BN layers "
                                 "with where='output')")
            return found
        if isinstance(modules, Mapping):
            return dict(modules)
        check_not_str(modules, "modules", "modules or module names")
        out = {}
        for m in modules:
            if isinstance(m, str):
                mod = submodule(self.model, m)
                if mod is None:
                    raise ValueError(f"modules: {m!r} is not the name of a submodule of the "
                                     f"model (names: {', '.join(list(by_name)[1:6])}, ...)")
                out[m] = mod
            elif m in names:
                out[names[m]] = m
            else:
                raise ValueError(f"modules: {type(m).__name__} is not a submodule of the model")
        return out

    @contextmanager
    def capture(self, step: int | None = None) -> Iterator[None]:
        """Record the statistics of the forward pass(es) run inside the block as one step."""
        seen: dict[str, list[Tensor]] = {n: [] for n in self.modules}

        def hook(name: str) -> Callable[..., None]:
            # The input is read before the module runs (a pre-hook), and every record is a copy:
            # an in-place op (ReLU(inplace=True) here or after) would otherwise change it.
            def fn(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   out: Any = None) -> None:
                x = call_input(args, kwargs) if self.where == "input" else out
                if not isinstance(x, Tensor):
                    raise ValueError(f"ActivationTracker: the {self.where} of {name!r} is "
                                     f"{type(x).__name__}, expected one tensor (N, C, *) "
                                     "(a module returning a tuple, as an RNN, cannot be "
                                     "watched at its output)")
                if x.dim() < 2 or x.numel() == 0:
                    raise ValueError(f"ActivationTracker: the {self.where} of {name!r} has "
                                     f"shape {tuple(x.shape)}; expected (N, C, *), not empty")
                if self.units is not None and not all(-x.shape[1] <= u < x.shape[1]
                                                      for u in self.units):
                    raise ValueError(f"units: expected channel indices below {x.shape[1]} "
                                     f"(the {self.where} of {name!r}), got {self.units}")
                dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                # (N, C, *) -> (C, N·positions): a unit is a channel, as in conv BN.
                v = x.detach().transpose(0, 1).reshape(x.shape[1], -1)
                seen[name].append(v.to(dtype, copy=True))
            return fn

        handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True)
                   if self.where == "input"
                   else m.register_forward_hook(hook(n), with_kwargs=True)
                   for n, m in self.modules.items()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        missed = [name for name, chunks in seen.items() if not chunks]
        if missed:  # checked before anything is stored: a failed step leaves no half record
            raise RuntimeError(f"ActivationTracker: module(s) {', '.join(map(repr, missed))} "
                               "were not called")
        for name, chunks in seen.items():
            widths = sorted({c.shape[0] for c in chunks})
            if len(widths) > 1:
                raise RuntimeError(f"ActivationTracker: module {name!r} was called with "
                                   f"{widths} channels in one step (one module shared by "
                                   "layers of different widths?); watch modules that each "
                                   "serve one layer")
            # A layer's records stack into its history: one width at every step.
            earlier = self._records[name][0]["channel_mean"].shape[0] \
                if self._records[name] else widths[0]
            if widths[0] != earlier:
                raise RuntimeError(f"ActivationTracker: the {self.where} of {name!r} has "
                                   f"{widths[0]} channels (dimension 1) at this step, {earlier} "
                                   "at earlier ones; a layer's records must have one width (a "
                                   "(N, T, D) sequence has T in dimension 1: record batches "
                                   "of one length)")
        described = {name: self._describe(torch.cat(chunks, dim=1))
                     for name, chunks in seen.items()}
        self.steps.append(len(self.steps) if step is None else int(step))
        for name, rec in described.items():
            self._records[name].append(rec)

    @torch.no_grad()
    def record(self, *inputs: Any, step: int | None = None) -> None:
        """Run ``model(*inputs)`` without gradients and record one step; the model keeps its
        mode, and its buffers and RNG states are restored (no running-statistics update), and
        ``inputs`` are untouched (the model gets copies)."""
        with SideEffectGuard(self.model), self.capture(step):
            self.model(*fresh(inputs))  # copies: a forward editing its input leaves it be

    def _describe(self, v: Tensor) -> dict[str, Tensor]:
        """Statistics of one layer at one step from its values v (C, n)."""
        var, mean = torch.var_mean(v.double(), dim=1, correction=0)
        sel = v.reshape(1, -1) if self.units is None else v[self.units]  # (U, n)
        edges = self.bin_edges.to(v.device)
        hist = torch.stack([torch.histc(r, self.bins, *self.hist_range) for r in sel])
        inside = (sel >= edges[0]) & (sel <= edges[-1])
        out = {
            "quantiles": _quantiles(sel, self.q.to(v.device)).cpu(),  # (U, Q)
            "hist": (hist / sel.shape[1]).cpu(),  # (U, B): fraction of values per bin
            "outside": (1 - inside.float().mean(1)).cpu(),  # (U,)
            "channel_mean": mean.cpu(),  # (C,)
            "channel_var": var.cpu(),  # (C,) biased
        }
        if self.saturation_threshold is not None:
            out["saturated"] = (v.abs() > self.saturation_threshold).float().mean().cpu()
        return out

    def history(self) -> dict[str, dict[str, Tensor]]:
        """Layer name -> {"steps": (T,), "quantiles": (T, U, Q), "hist": (T, U, B),
        "outside": (T, U), "channel_mean"/"channel_var": (T, C)[, "saturated": (T,)]}."""
        out = {}
        for name, recs in self._records.items():
            h = {k: torch.stack([r[k] for r in recs]) for k in (recs[0] if recs else {})}
            h["steps"] = torch.tensor(self.steps, dtype=torch.long)
            out[name] = h
        return out

    def to_dict(self) -> dict[str, Any]:
        """`history` as nested lists, with the quantile levels and bin edges (JSON-ready)."""
        return {
            "quantile_levels": self.q.tolist(), "bin_edges": self.bin_edges.tolist(),
            "units": self.units, "where": self.where,
            "layers": {n: {k: t.tolist() for k, t in h.items()}
                       for n, h in self.history().items()},
        }


def distribution_shift(layer_history: Mapping[str, Tensor], *,
                       reduce: Literal["mean", "none"] = "mean") -> dict[str, Tensor]:
    """Distribution stability of one layer over recorded steps (Santurkar et al. 2018, Fig. 8).

    From the per-channel mean μ_t and (biased) variance σ²_t at the recorded steps::

        mean_step = |μ_{t+1} − μ_t|     var_step = |σ²_{t+1} − σ²_t|      (T − 1 values)
        mean_drift = μ_t − μ_0          var_drift = σ²_t − σ²_0            (T values)

    Args:
        layer_history: one entry of `ActivationTracker.history()`.
        reduce: ``"mean"`` averages over channels (shape (T−1,) / (T,)); ``"none"`` keeps them
            (shape (T−1, C) / (T, C)).
    """
    if reduce not in ("mean", "none"):
        raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")
    # (T, C); as float64, so a history read back from JSON with whole numbers works too
    mu, var = (torch.as_tensor(layer_history[k], dtype=torch.float64)
               for k in ("channel_mean", "channel_var"))
    out = {"mean_step": (mu[1:] - mu[:-1]).abs(), "var_step": (var[1:] - var[:-1]).abs(),
           "mean_drift": mu - mu[:1], "var_drift": var - var[:1]}
    return {k: v.mean(1) for k, v in out.items()} if reduce == "mean" else out


def saturation_fraction(history: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Layer name -> (T,) fraction of saturated values (|x| > the tracker's threshold) per step.

    For sigmoid inputs this is the share of units stuck where σ′ is tiny, the regime BN keeps
    networks out of (Ioffe & Szegedy 2015, Sec. 3.3; the BN-x5-Sigmoid model, Sec. 4.2.1).
    """
    out = {}
    for name, h in history.items():
        if "saturated" not in h:
            raise ValueError(f"saturation_fraction: layer {name!r} has no saturation record; "
                             "create the ActivationTracker with saturation_threshold=...")
        out[name] = h["saturated"]
    return out
