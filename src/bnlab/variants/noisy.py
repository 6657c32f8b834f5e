"""Santurkar et al.'s "noisy" batch norm (2018, Sec. 2.1, App. A.2.1, their Algorithm 1).

Holds the noise transform (`activation_noise`), the `ActivationNoise` module (the noise alone,
for the paper's control "adding the same amount of noise to the activations of the standard
network") and `NoisyBatchNorm` (bnlab's `BatchNorm` followed by the noise). No training code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bnlab._checks import FxLeaf, check_num_features, is_integer, is_real, no_torchscript, plain
from bnlab.functional import channel_view, compute_dtype
from bnlab.layers import BatchNorm

__all__ = ["ActivationNoise", "NoisyBatchNorm", "activation_noise", "noise_rows"]

# What `noise_rows` says of the inputs of the noise layers: (offset, total), _WHOLE (each input is
# a whole batch) or None (not said: SyncNoisyBatchNorm then asks the other ranks).
_WHOLE = (0, -1)
_ROWS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "bnlab_noise_rows", default=None)


@contextlib.contextmanager
def noise_rows(offset: int | None = None, total: int | None = None) -> Iterator[None]:
    """Inside, every `ActivationNoise` (so every `NoisyBatchNorm`) in training mode takes its
    input as rows offset … offset + N − 1 of a batch of ``total`` rows (``rows=`` of
    `activation_noise`): a data-parallel loop that shards one global batch says where its
    shard lies, and the ranks' noise is then exactly one process's on the global batch.

    Without arguments every input is a whole batch: a forward that runs the same batch on
    every rank (a probe, an evaluation in training mode) draws one process's noise for it,
    where `bnlab.distributed.SyncNoisyBatchNorm` would otherwise take it for a shard.
    """
    if (offset is None) != (total is None):
        raise ValueError(f"noise_rows: give both offset and total or neither, got offset="
                         f"{offset!r}, total={total!r}")
    rows = _WHOLE if offset is None else _check_rows((offset, total), 0)
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


def _check_noise_args(n_mu: float, n_sigma: float, r_mu: float, r_sigma: float,
                      who: str) -> None:
    for name, value, low in (("n_mu", n_mu, 0.0), ("n_sigma", n_sigma, 1.0),
                             ("r_mu", r_mu, 0.0), ("r_sigma", r_sigma, 0.0)):
        # comparisons, not math.isfinite: see _checks.check_eps (symbolic floats)
        if isinstance(value, bool) or not is_real(value) or not low <= value < math.inf:
            raise ValueError(f"{who}: {name} must be a finite number >= {low}, got {value!r}")


def _check_seed(seed: Any, who: str) -> None:
    """A generator seed: an integer in [0, 2**64) (what torch.Generator.manual_seed takes)."""
    if seed is not None and (not is_integer(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"{who}: seed must be an integer in [0, 2**64) or None, got {seed!r}")


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality where "cuda" means the current CUDA device ("cuda" vs "cuda:0")."""
    if a.type != b.type:
        return False
    if a.index == b.index or a.type == "cpu":
        return True
    current = torch.get_device_module(a.type).current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current)


def activation_noise(
    a: Tensor,
    *,
    n_mu: float = 0.5,
    n_sigma: float = 1.25,
    r_mu: float = 0.1,
    r_sigma: float = 0.1,
    generator: torch.Generator | None = None,
    rows: tuple[int, int] | None = None,
) -> Tensor:
    r"""Apply one step of Santurkar et al. (2018), Algorithm 1, to activations ``a``.

    Per channel j (one draw for the whole batch, fresh at every call = every time step t)::

        μ_j ~ U(−n_μ, n_μ)          σ_j ~ U(1, n_σ)

    and per element i of channel j (i runs over the batch and, for convolutional inputs, the
    spatial positions: "treating the height and width dimensions as part of the batch")::

        m_ij ~ U(μ_j − r_μ, μ_j + r_μ)      s_ij ~ N(σ_j, r_σ²)      a_ij ← s_ij·a_ij + m_ij

    ``r_σ`` is a standard deviation (the paper writes N(σ, r_σ) without saying; a std is the
    common reading). The noise is a constant for autograd: ∂a'/∂a = s.

    Args:
        a: activations of shape (N, C, *); channel = dimension 1.
        n_mu, n_sigma, r_mu, r_sigma: the paper's constants (defaults 0.5, 1.25, 0.1, 0.1).
        generator: the source of randomness; must live on ``a.device`` (None: the global one).
        rows: (offset, total): ``a`` holds rows offset … offset + N − 1 of a batch of
            ``total`` rows (a data-parallel shard). The noise drawn is the whole batch's and
            ``a`` gets its rows of it, so shards drawing from equal generators together get
            one call's noise on the batch, and the generators stay equal (uneven shards too).

    Returns:
        A tensor like ``a``. Noise is drawn in float32 (or wider) for half/bfloat16 input.
    """
    _check_noise_args(n_mu, n_sigma, r_mu, r_sigma, "activation_noise")
    if not isinstance(a, Tensor):
        raise TypeError(f"activation_noise: a must be a torch.Tensor, got {type(a).__name__}")
    if a.dim() < 2:
        raise ValueError(f"activation_noise: expected input of rank >= 2 (N, C, *), got shape "
                         f"{tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"activation_noise: a must be floating point, got dtype {a.dtype}")
    offset, total = _check_rows(rows, a.shape[0])
    ct = compute_dtype(a.dtype)
    opts: dict[str, Any] = {"device": a.device, "dtype": ct, "generator": generator}
    c = a.shape[1]
    # Per-channel distribution D_j^t: (C,) each.
    mu = (torch.rand(c, **opts) * 2 - 1) * n_mu
    sigma = 1 + torch.rand(c, **opts) * (n_sigma - 1)
    # Per-element draws for the (total, C, *) batch, contiguous whatever a's layout: the same
    # seed gives the same noise for NCHW and channels_last input, and shards of one batch,
    # whose layouts may differ (an empty one has none), consume their generators alike.
    like = torch.empty((total, *a.shape[1:]), dtype=ct, device=a.device)
    m = like.uniform_(generator=generator).mul_(2 * r_mu).add_(channel_view(mu - r_mu, a))
    s = torch.empty_like(like).normal_(generator=generator).mul_(r_sigma)
    s.add_(channel_view(sigma, a))
    if total != a.shape[0]:  # (total, C, *) -> this shard's (N, C, *)
        m, s = m[offset:offset + a.shape[0]], s[offset:offset + a.shape[0]]
    # s·a + m with a as the first operand, whose memory format the result takes (channels_last
    # stays channels_last; addcmul(m, s, a) would follow the contiguous m).
    return (a.to(ct) * s).add_(m).to(a.dtype)


def _context_rows() -> tuple[int, int] | None:
    rows = _ROWS.get()
    return None if rows is _WHOLE else rows


def _check_rows(rows: Any, n: int) -> tuple[int, int]:
    """(offset, total) of ``rows`` (None: the batch is all of ``a``), checked against N."""
    if rows is None:
        return 0, n
    ok = (isinstance(rows, tuple) and len(rows) == 2 and all(is_integer(v) for v in rows)
          and rows[0] >= 0 and rows[0] + n <= rows[1])
    if not ok:
        raise ValueError(f"activation_noise: rows must be (offset, total) with 0 <= offset and "
                         f"offset + N <= total for input of N = {n} rows, got {rows!r}")
    return int(rows[0]), int(rows[1])


class ActivationNoise(FxLeaf, nn.Module):
    """Algorithm 1's noise alone, drawn in training mode; eval mode applies its expectation,
    E[s·a + m] = a·(1 + n_σ)/2 (E[s] = E[σ] = (1 + n_σ)/2, E[m] = 0), as dropout's weight
    scaling makes inference the mean of the training-time function. (The identity there left
    every noisy layer's activations 1/E[s] of what training saw: a 12-layer VGG trained with
    the noise lost 12–38 points of accuracy at evaluation.)

    Use it as ``norm_layer`` to add "the same amount of noise to the activations of the standard
    network" (Santurkar et al. 2018, Sec. 2.1), the control under which that network does not
    train. It has no parameters or buffers.

    Args:
        num_features: C, the number of channels (checked against the input).
        n_mu, n_sigma, r_mu, r_sigma: see `activation_noise`; ``r_sigma`` is a standard deviation.
        seed: seeds this module's own ``torch.Generator``; None draws a seed from the global
            generator at construction (so ``torch.manual_seed`` makes it reproducible).

    Under ``torch.compile(fullgraph=True)`` the module's own generator cannot be traced (a
    graph break without ``fullgraph``, where the output matches eager).

    The generator lives on the module's device (created at construction on the CPU, re-created
    from ``seed`` when the module moves to another device or sees input on another device). Its
    state is not in the ``state_dict`` (so that a torch BN checkpoint loads into
    `NoisyBatchNorm` unchanged); save ``module.generator.get_state()`` yourself to resume a run
    with the identical noise stream.
    """

    def __init__(self, num_features: int, *, n_mu: float = 0.5, n_sigma: float = 1.25,
                 r_mu: float = 0.1, r_sigma: float = 0.1, seed: int | None = None) -> None:
        super().__init__()
        who = type(self).__name__
        check_num_features(num_features, who)
        _check_noise_args(n_mu, n_sigma, r_mu, r_sigma, who)
        _check_seed(seed, who)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.num_features = int(num_features)
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = map(plain, (n_mu, n_sigma, r_mu,
                                                                       r_sigma))
        self.seed = int(seed)
        self._generator = self._new_generator(torch.device("cpu"))

    def __prepare_scriptable__(self) -> nn.Module:
        no_torchscript(self, foldable=False)

    @property
    def generator(self) -> torch.Generator:
        """The module's generator (on the device the module was last moved to)."""
        return self._generator

    def _new_generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g

    def _apply(self, fn: Any, recurse: bool = True) -> ActivationNoise:
        # `.to(device)`/`.cuda()` pass through here: follow them, so that the generator exists
        # before the first forward on the new device (probes snapshot and restore it).
        super()._apply(fn, recurse)
        try:
            device = fn(torch.empty(0)).device
        except Exception:  # a conversion that does not take a plain tensor: keep the generator
            return self
        if not _same_device(device, self._generator.device) and device.type != "meta":
            self._generator = self._new_generator(device)
        return self

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if not _same_device(device, self._generator.device):  # input elsewhere than the module
            self._generator = self._new_generator(device)
        return self._generator

    def forward(self, input: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
        """``rows``: see `activation_noise` (a shard of a larger batch; default: that of an
        enclosing `noise_rows`, else none)."""
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}): expected input "
                             f"(N, {self.num_features}, *), got shape {tuple(input.shape)}")
        if not input.is_floating_point():
            raise TypeError(f"{type(self).__name__}({self.num_features}): input must be "
                            f"floating point, got dtype {input.dtype}")
        if not self.training:
            return input * self.mean_scale
        # A meta tensor has no values to draw: no generator there (shape propagation only).
        g = None if input.device.type == "meta" else self._generator_for(input.device)
        return activation_noise(input, n_mu=self.n_mu, n_sigma=self.n_sigma, r_mu=self.r_mu,
                                r_sigma=self.r_sigma, generator=g,
                                rows=_context_rows() if rows is None else rows)

    @property
    def mean_scale(self) -> float:
        """E[s] = (1 + n_σ)/2, the noise's mean multiplier (its offset m has mean 0)."""
        return (1.0 + self.n_sigma) / 2

    def extra_repr(self) -> str:
        return (f"{self.num_features}, n_mu={self.n_mu}, n_sigma={self.n_sigma}, "
                f"r_mu={self.r_mu}, r_sigma={self.r_sigma}, seed={self.seed}")


class NoisyBatchNorm(BatchNorm):
    """Batch norm followed by Algorithm 1's noise (Santurkar et al. 2018, Sec. 2.1, App. A.2.1).

    Training: y = noise(γ·x̂ + β), the noise applied after the BN affine (the paper injects it
    into "every batch-normalized activation", whose mean and variance BN would otherwise fix).
    Evaluation: BN with the running statistics times the noise's expectation E[s] = (1 + n_σ)/2
    (see `ActivationNoise`; the paper does not discuss test time, and plain BN there evaluated a
    function 1/E[s] of the trained one per layer). The running statistics are those of the clean
    input x,
    exactly as in `BatchNorm`, whose arguments, buffers and state_dict keys it shares: a
    ``torch.nn.BatchNorm2d`` state_dict loads unchanged.

    The noise follows the ``noise`` child's mode: `bnlab.freeze` fixes the statistics, not the
    noise (a frozen layer in ``train()`` still adds it; ``layer.noise.eval()`` stops it), and
    `bnlab.population_statistics` / `bnlab.recalibrate`, which run the network in training
    mode, let it reach the statistics of the layers after this one and advance its generator
    (as dropout does under torch's ``swa_utils.update_bn``).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: as
            `BatchNorm`.
        n_mu, n_sigma, r_mu, r_sigma, seed: as `ActivationNoise` (r_sigma is a std).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: Any = None,
                 dtype: Any = None, *, n_mu: float = 0.5, n_sigma: float = 1.25,
                 r_mu: float = 0.1, r_sigma: float = 0.1, seed: int | None = None,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias)
        _check_noise_args(n_mu, n_sigma, r_mu, r_sigma, type(self).__name__)  # named as this
        _check_seed(seed, type(self).__name__)
        # A child without parameters or buffers: adds no state_dict keys.
        self.noise = ActivationNoise(num_features, n_mu=n_mu, n_sigma=n_sigma, r_mu=r_mu,
                                     r_sigma=r_sigma, seed=seed)

    def forward(self, input: Tensor) -> Tensor:
        return self.noise(super().forward(input))


def eval_factor(bn: nn.Module) -> float:
    """The factor a BN layer's eval transform ends with: a `NoisyBatchNorm`'s E[s] (its noise's
    `ActivationNoise.mean_scale`), 1 for any other layer. `bnlab.fold` and
    `FrozenBatchNorm.from_batchnorm` fold it into the affine map."""
    return bn.noise.mean_scale if isinstance(bn, NoisyBatchNorm) else 1.0
