"""Figures drawn from saved metrics only (never from a live model): curves with a ±std band
over seeds, percentile bands, PNG encoding. Figures are made without pyplot, so they need no
display, and importing the lab leaves the user's matplotlib backend alone (a notebook's too)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["Curve", "figure", "plot_curves", "plot_percentiles", "to_png"]

Curve = tuple[Sequence[float], Sequence[float], Sequence[float]]  # steps, mean, std over seeds


def figure(ncols: int = 1, *, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Axes]]:
    """A figure with ``ncols`` side-by-side axes."""
    fig = Figure(figsize=(width * ncols, height))
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, list(axes[0])


def plot_curves(ax: Axes, curves: Mapping[str, Curve], *, xlabel: str = "steps",
                ylabel: str = "held-out accuracy", title: str = "",
                ylim: tuple[float, float] | None = None, hline: float | None = None) -> None:
    """One line per label (mean over seeds) with a shaded ±std band."""
    for label, (x, mean, std) in curves.items():
        (line,) = ax.plot(x, mean, label=label, lw=1.4)
        lo = [m - s for m, s in zip(mean, std, strict=True)]
        hi = [m + s for m, s in zip(mean, std, strict=True)]
        if any(s > 0 for s in std):
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if hline is not None:
        ax.axhline(hline, color="grey", ls=":", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_percentiles(ax: Axes, steps: Sequence[float], bands: Sequence[Sequence[float]], *,
                     title: str = "", labels: Sequence[str] = ("15th", "50th", "85th"),
                     ylim: tuple[float, float] | None = (-2.5, 2.5)) -> None:
    """Percentile curves over training (Ioffe Fig. 1b, c)."""
    for band, label in zip(bands, labels, strict=True):
        ax.plot(steps, band, label=label, lw=1.2)
    ax.set_xlabel("steps")
    ax.set_ylabel("sigmoid input")
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def to_png(fig: Figure, *, dpi: int = 110) -> bytes:
    """Encode ``fig`` (a pyplot-free Figure: nothing to close)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
