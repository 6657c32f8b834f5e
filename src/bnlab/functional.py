"""The math of batch normalization (Ioffe & Szegedy 2015, Alg. 1) and its running statistics.

Holds pure functions only: statistics, normalization, the running-average update and the
`batch_norm` entry point that picks an implementation: `bnlab.kernels` on CPU when built,
PyTorch's native op on accelerators, the reference path otherwise (and as the tests' oracle).
Modules that hold state live in `bnlab.layers`; the hand-written backward in `bnlab._autograd`.
"""

from __future__ import annotations

import contextlib
import warnings
from types import ModuleType
from typing import Any

import torch
import torch._prims_common as _prims_common
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from bnlab import _autograd
from bnlab._checks import (  # check_args, host_readable: part of this module's API
    check_args,
    host_readable,
    plain,
    user_stacklevel,
)
from bnlab._checks import force_reference as _force_reference

__all__ = [
    "batch_norm",
    "batch_norm_with_flag",
    "batch_stats",
    "buffers_need_grad",
    "channel_view",
    "check_args",
    "compute_dtype",
    "empty_batch",
    "host_readable",
    "lerp_buffer_",
    "normalize",
    "reduce_dims",
    "suggest_memory_format",
    "update_running_stats",
]

_warned_nonfinite = False


def reduce_dims(x: Tensor) -> list[int]:
    """Dimensions a BN statistic reduces over: all but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def channel_view(t: Tensor, x: Tensor) -> Tensor:
    """View a per-channel vector (C,) so that it broadcasts against x of shape (N, C, *)."""
    return t.view(1, -1, *([1] * (x.dim() - 2)))  # (C,) -> (1, C, 1, ...)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are computed in float32 or wider: half and bfloat16 inputs are upcast."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mini-batch mean μ_B and biased variance σ²_B (Ioffe & Szegedy 2015, Alg. 1).

    Computed in `compute_dtype(x.dtype)` by PyTorch's Welford reduction (never E[x²] − E[x]²,
    which cancels catastrophically for large means).

    Shape:
        x: (N, C, *); returns two (C,) tensors.
    """
    xc = x.to(compute_dtype(x.dtype))
    var, mean = torch.var_mean(xc, dim=reduce_dims(x), correction=0)
    return mean, var


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """y = γ·(x − μ)/√(σ² + ε) + β, per channel, in the statistics' dtype, returned in x's dtype.

    `(x − μ)·scale + β` rather than `x·scale + shift`: the latter cancels when |μ| ≫ σ.
    """
    ct = compute_dtype(x.dtype)
    scale = torch.rsqrt(var.to(ct) + eps)
    if weight is not None:
        scale = scale * weight.to(ct)
    y = (x.to(ct) - channel_view(mean.to(ct), x)) * channel_view(scale, x)
    if bias is not None:
        y = y + channel_view(bias.to(ct), x)
    # Elementwise ops keep any dense permutation of x; torch's BN returns its suggested memory
    # format (channels_last 4-D/5-D, else contiguous), which code after it may .view().
    return y.to(x.dtype).contiguous(memory_format=output_memory_format(x))


def suggest_memory_format(x: Tensor) -> torch.memory_format:
    """torch's ``Tensor.suggest_memory_format`` (the layout of its BN's output): channels_last
    or channels_last_3d where x's strides are ordered so, a crop or strided view of such a
    tensor included, else contiguous. (torch exposes it to Python only in `torch._prims_common`,
    which torch.compile's own decompositions use.)"""
    return _prims_common.suggest_memory_format(x)


def output_memory_format(x: Tensor) -> torch.memory_format:
    """The output layout for ``x``, as torch's BN gives it: contiguous where x is, channels_last
    where x is that (an HWC image's ``permute(2, 0, 1).unsqueeze(0)``, whose size-1 batch
    stride `suggest_memory_format` does not take), else `suggest_memory_format`."""
    if x.dim() in (4, 5) and not x.is_contiguous():
        last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        return last if x.is_contiguous(memory_format=last) else suggest_memory_format(x)
    return torch.contiguous_format


def empty_batch(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The training-mode output for a batch with no values per channel (N = 0 or an empty
    spatial size): an empty tensor like ``x``. It has no statistics, so nothing is normalized
    and no running statistic may move; the output still depends on γ and β, so their gradients
    are zeros, as with torch's BN (a detection head with no proposals, a rank's empty shard)."""
    zero = x.new_zeros((x.shape[1],), dtype=compute_dtype(x.dtype))
    return normalize(x, zero, zero + 1.0, weight, bias, 0.0)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float | Tensor,
) -> Tensor:
    """r ← (1 − momentum)·r + momentum·s in place, storing the unbiased variance m/(m−1)·σ²_B.

    A batch whose statistics are not all finite leaves both buffers untouched (AMP overflow
    would otherwise poison them for good). No host synchronisation: the choice is a
    `torch.where`, so the update stays traceable by `torch.compile`.

    Returns:
        A 0-d bool tensor, True when the batch's statistics were finite and were used.
    """
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    unbiased = var * (count / (count - 1)) if count > 1 else var
    for name, buf, stat in (("running_mean", running_mean, mean),
                            ("running_var", running_var, unbiased)):
        if buf is not None:
            lerp_buffer_(buf, stat, momentum, finite, name)
    _warn_once_if_nonfinite(finite)
    return finite


def lerp_buffer_(buf: Tensor, stat: Tensor, momentum: float | Tensor, finite: Tensor,
                 name: str) -> None:
    """buf ← (1 − momentum)·buf + momentum·stat in place where ``finite``, else unchanged
    (``name`` names the buffer in errors)."""
    # In float32 at least (as torch's native update): a float16 buffer would round a
    # cumulative average's factor 1/n to a few bits, or to 0.
    ct = torch.promote_types(buf.dtype, torch.float32)
    w = momentum.to(ct) if isinstance(momentum, Tensor) else momentum
    try:
        # r + w·(s − r) = (1 − w)·r + w·s; torch.where keeps r when the batch was not finite.
        r = buf.to(ct)
        # A buffer made under torch.inference_mode (a model built there, then trained) takes
        # in-place writes only inside it; torch's native update writes it anyway. (Dynamo
        # cannot trace these tests; compiled code makes no inference tensors.)
        inference = (not torch.compiler.is_compiling() and buf.is_inference()
                     and not torch.is_inference_mode_enabled())
        s = stat.to(ct)
        # A buffer holding ±inf (a float16 one that overflowed, a checkpoint's): lerp gives NaN
        # there, torch's (1 − w)·r + w·s keeps it (eval then gives β, not NaN).
        upd = torch.where(r.isfinite(), torch.lerp(r, s, w), r * (1 - w) + s * w)
        with torch.inference_mode() if inference else contextlib.nullcontext():
            buf.copy_(torch.where(finite, upd, r))
    except RuntimeError as e:
        if "vmap" not in str(e):
            raise
        # functorch's own words blame "inplace arithmetic" and suggest filing a bug
        raise RuntimeError(
            "bnlab: torch.func.vmap maps this training-mode normalization over a batched input, "
            f"but its buffer {name} is not batched and is updated in place. Use "
            "track_running_stats=False (as for torch's BatchNorm under vmap), eval mode, or "
            "batched buffers (torch.func.stack_module_state with functional_call)") from e


def _warn_once_if_nonfinite(finite: Tensor) -> None:
    # Checking needs the value on the host: only done where host_readable, so GPU training
    # never synchronises for it (the counter in the layers still counts there).
    if _warned_nonfinite or not host_readable(finite):
        return
    if not bool(finite):
        _warn_nonfinite()


def _warn_nonfinite() -> None:
    """The once-per-process warning about a skipped running update, shown at the user's line
    (`user_stacklevel`)."""
    global _warned_nonfinite
    if _warned_nonfinite:
        return
    _warned_nonfinite = True
    warnings.warn(
        "bnlab: a training batch had non-finite batch statistics; the running statistics "
        "were left unchanged (counted in each layer's `num_nonfinite_batches`). "
        "This warning is shown once.",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


_kernels: ModuleType | None = None
# `csrc/bn_fast.cpp`'s Python entry points, set by `bnlab.kernels` once the kernels load.
_fast: Any = None


def _fast_allowed() -> bool:
    """What `bnlab.kernels.supports` asks of Python's state (the C++ entry points check the
    tensors, modes and torch.jit.trace): not traced by torch.compile, no
    ``BNLAB_FORCE_REFERENCE``, no forward-AD level."""
    return (not torch.compiler.is_compiling() and not _force_reference()
            and _forward_ad._current_level < 0)


def _kernels_module() -> ModuleType:
    """`bnlab.kernels` (it imports this module, and builds lazily); imported when this module
    is (below), and again here should a test have reset it."""
    global _kernels
    if _kernels is None:
        from bnlab import kernels

        _kernels = kernels
    return _kernels


def _use_kernels(x: Tensor) -> bool:
    return _kernels_module().supports(x)  # also honours BNLAB_FORCE_REFERENCE


def _use_kernels_eval(x: Tensor) -> bool:
    """`_use_kernels` for the inference transform, which torch.compile gets as the reference's
    few pointwise ops: inductor fuses them with their neighbours (ReLU, a residual add), which
    it cannot do with the kernels' opaque op. Compiled eval of BN-ReLU-conv-BN-ReLU, bnlab's
    time over torch BN's in the same process (2 threads): 0.93-1.02x this way (four runs),
    1.08-1.27x through the kernel (three). (Compiled training measured the same both ways, one
    run each, 0.98x and 0.99x: it keeps the kernels.)"""
    return _use_kernels(x) and not torch.compiler.is_compiling()


def buffers_need_grad(running_mean: Tensor | None, running_var: Tensor | None) -> bool:
    """Whether an evaluation must differentiate through the running statistics (test-time
    adaptation of E[x], Var[x]): only the reference path does; the kernels' op has no such
    gradient, and torch's native op refuses one."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (running_mean, running_var))


def _use_native(x: Tensor) -> bool:
    """PyTorch's own op (cuDNN/MIOpen) for accelerators: the fastest correct path there (design
    doc, "Dispatch"). Not inside torch.func transforms, which take the reference path."""
    return (not x.is_cpu and not x.is_meta and not _force_reference()
            and not torch._C._are_functorch_transforms_active())


def _native_takes(x: Tensor, *params: Tensor | None) -> bool:
    """Whether torch's op takes these dtypes: every parameter and buffer in x's dtype, or all in
    float32 for half/bfloat16 x (its one mixed case; CPU and CUDA alike refuse others, which
    bnlab takes: the reference path computes them)."""
    dtypes = {t.dtype for t in params if t is not None}
    return dtypes <= {x.dtype} or (x.dtype in (torch.float16, torch.bfloat16)
                                   and dtypes == {torch.float32})


def native_train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y, μ_B, σ²_B) from ``torch.native_batch_norm`` (autograd through PyTorch's backward).

    The op returns 1/√(σ²_B + ε), so σ²_B = invstd⁻² − ε: exact to float32 rounding of invstd
    relative to σ²_B + ε, so to σ²_B only where σ²_B is not far below ε (σ = 1e-4 with ε = 1e-3:
    0.5%; the running variance then feeds √(Var + ε), where it is lost beside ε anyway);
    statistics in float32 for half input, as cuDNN keeps them.
    """
    y, mean, invstd = torch.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    var = (invstd.detach().pow(-2) - eps).clamp_min(0)
    return y, mean.detach(), var


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch-normalize ``input`` per channel (Ioffe & Szegedy 2015, Alg. 1 and 2).

    Same signature and semantics as ``torch.nn.functional.batch_norm``. With m = N·(spatial
    size) values per channel::

        μ_B  = (1/m) Σ x_i
        σ²_B = (1/m) Σ (x_i − μ_B)²          # biased: used to normalize
        x̂_i = (x_i − μ_B) / √(σ²_B + ε)
        y_i  = γ·x̂_i + β                     # γ = weight, β = bias

    Conventions:
        * Training normalizes with the biased σ²_B and, when buffers are given, stores the
          unbiased m/(m−1)·σ²_B: ``r ← (1 − momentum)·r + momentum·s`` (PyTorch's momentum,
          which is 1 − Keras/Flax "decay"; see ``bnlab.convert``).
        * Evaluation (``training=False``) normalizes with the buffers,
          y = γ(x − E[x])/√(Var[x] + ε) + β (Alg. 2's inference transform): it depends on the
          buffers only.
        * Statistics are computed in float32 for float16/bfloat16 input; the output keeps the
          input's dtype. A batch with non-finite statistics never updates the buffers.
        * An empty batch (N = 0, or an empty spatial size) in training returns an empty
          output and leaves the buffers alone, as torch does; one value per channel is an error.
        * The backward is hand-written from the paper's chain rule (`bnlab._autograd`); double
          backward works.

    Shape:
        input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), any memory format;
        running_mean, running_var, weight, bias: (C,). Returns a tensor like ``input``.

    Raises:
        ValueError: a bad argument (the message names it, the expected and the actual value).
    """
    # (a 0-d tensor ε, as torch's takes, as the number it holds: the kernels take a double)
    y, _ = batch_norm_with_flag(input, running_mean, running_var, weight, bias, training,
                                momentum, plain(eps), "batch_norm")
    return y


def batch_norm_with_flag(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float | Tensor,
    eps: float,
    who: str,
) -> tuple[Tensor, Tensor | None]:
    """`batch_norm` that also returns the finite flag of the running-statistics update.

    ``momentum`` may be a 0-d tensor (the layers' cumulative average 1/n uses one, which keeps
    their forward free of host synchronisation). ``who`` names the caller in error messages.
    """
    if _fast is not None and _fast_allowed():
        # The kernels' C++ entry points: the checks and routing below, for plain CPU float32 /
        # bfloat16 tensors and valid arguments, then the same op with the same arguments; None
        # for anything else, which the Python below then handles (and raises its errors; a
        # ``training`` that is not a bool takes neither branch: check_args names it).
        if training is True:
            got = _fast.train(input, weight, bias, running_mean, running_var, momentum, eps)
            if got is not None:
                y, finite, ok = got
                if not ok:
                    _warn_nonfinite()
                return y, finite
        elif training is False:
            y = _fast.eval(input, running_mean, running_var, weight, bias, momentum, eps)
            if y is not None:
                return y, None
    check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, who)
    if training and input.numel() == 0:
        return empty_batch(input, weight, bias), None  # no statistics, nothing to count
    if training:
        if _use_kernels(input):
            # normalize + the same running update as below, in one C++ call where it can
            return _kernels_module()._train_update(input, weight, bias, eps, running_mean,
                                                   running_var, momentum)
        if _use_native(input) and _native_takes(input, weight, bias):
            y, mean, var = native_train(input, weight, bias, eps)
        else:
            y, mean, var = _autograd.batch_norm_train(input, weight, bias, eps)
        finite = None
        if running_mean is not None or running_var is not None:
            count = input.numel() // input.shape[1]
            finite = update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return y, finite
    assert running_mean is not None and running_var is not None  # check_args: eval needs both
    if buffers_need_grad(running_mean, running_var):
        return normalize(input, running_mean, running_var, weight, bias, eps), None
    if _use_kernels_eval(input):
        return (_kernels_module()._eval(input, running_mean, running_var, weight, bias, eps),
                None)
    if _use_native(input) and _native_takes(input, running_mean, running_var, weight, bias):
        return torch.native_batch_norm(input, weight, bias, running_mean, running_var, False, 0.0,
                                       eps)[0], None
    return normalize(input, running_mean, running_var, weight, bias, eps), None


# `bnlab.kernels` (which imports this module, and builds nothing until asked) is imported here,
# not on the first BN call: an import there would set a global while torch.export or
# torch.compile traces that call (a side effect strict export warns about, and a guard change
# that costs a compiled model a recompile).
_kernels_module()
