"""Fast CPU batch-norm kernels (float32 and bfloat16, NCHW and channels_last).

The math is Ioffe & Szegedy (2015), Alg. 1 (training: batch statistics, normalize, scale and
shift), its backward (Sec. 3) and the inference transform of Alg. 2, computed at close to the
memory-bandwidth limit (see `docs/design.md`, "Performance model"): one read of x for the
statistics and a normalize sweep that hits cache, fused per block of channels. The C++ loops live
in `csrc/`, are built just in time on first use (`_build.py`, cached) and are registered as
`torch.library` ops with fake kernels and autograd (`ops.py`), so autograd and `torch.compile`
work through them.

`bnlab.functional` calls `supports(x)` and then `_train_update` / `_eval` (`batch_norm_train_update`
and `batch_norm_eval` without the argument checks it has made); when `supports` says no
(another device, another dtype, the build failed, or ``BNLAB_FORCE_REFERENCE=1``) the
reference path runs. In eager mode the common case skips that
Python: the extension is also a Python module (`csrc/bn_fast.cpp`) whose entry points check the
arguments and call the same op in C++, and hand anything unusual back (`functional._fast`).
`bn_relu` and `bn_add_relu` are the fused variants with PyTorch-style signatures.
"""

from __future__ import annotations

import sys

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from bnlab import functional as _F
from bnlab._checks import check_per_channel as _check_per_channel
from bnlab._checks import check_step_momentum as _check_step_momentum
from bnlab._checks import is_integer as _is_integer
from bnlab.kernels import _build

__all__ = [
    "available",
    "batch_norm_eval",
    "batch_norm_train",
    "batch_norm_train_update",
    "bn_add_relu",
    "bn_relu",
    "supports",
    "update_running_stats",
]

_DTYPES = (torch.float32, torch.bfloat16)
_registered = False  # the fake kernels and the eager entry points (`available`)


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call; warns once if
    the build fails). Ignores ``BNLAB_FORCE_REFERENCE``."""
    global _registered
    ok = _build._state.get("ok")
    if ok is None:
        ok = _build.load()
    if ok and not _registered:
        # (keyed on this, not on the first load: `bnlab kernels` loads through `_build.info()`,
        # and compiling afterwards found no fake kernels)
        from bnlab.kernels import ops

        ops.register()
        _F._fast = _build.module()  # the C++ entry points of the eager path
        _registered = True
    # `functional` sets this when it is imported; set again here in case it was reset (as a
    # test does), since a compiled model's first call would otherwise change a global that
    # Dynamo guards on (one spurious recompile).
    _F._kernels = sys.modules[__name__]
    return bool(ok)


def _require() -> None:
    if not available():
        raise RuntimeError(f"bnlab: the CPU kernels are not available ({_build.build_error()}); "
                           "check bnlab.kernels.supports(x) first")


def supports(x: Tensor) -> bool:
    """Whether the fast kernels handle this input: a dense CPU float32/bfloat16 tensor of rank
    >= 2, the kernels built, and ``BNLAB_FORCE_REFERENCE`` unset (or "0"). Inside torch.func
    transforms, forward-mode AD and torch.export the reference path is used (standard ops
    only), and so is torch.jit.trace."""
    # Cheapest tests first: this runs on every BN call (`is_cpu`, not `device.type`, which
    # builds a device object).
    if not x.is_cpu or x.dtype not in _DTYPES or x.layout != torch.strided:
        return False
    if x.dim() < 2 or x.is_quantized:
        return False
    if _F._force_reference():
        return False
    if torch._C._are_functorch_transforms_active():  # C++ autograd.Functions cannot be vmapped
        return False
    if torch.jit.is_tracing():
        # The tracer records ATen ops only: the running update (and the counters' C++ add)
        # would not replay, and BN+ReLU's saved mask follows grad mode, which the trace check
        # varies. Standard ops also keep the traced module free of this extension.
        return False
    if _forward_ad._current_level >= 0:
        # Inside torch.autograd.forward_ad.dual_level: the C++ autograd node has no jvp (torch's
        # C++ custom-Function API has none), the reference path's Function has.
        return False
    if torch.compiler.is_compiling():
        # Export (torch.export, ONNX) keeps standard ops so the program runs without this
        # extension; torch.compile uses the kernels if already loaded and their fake kernels
        # registered (`available`; building is not traced).
        return _registered and not torch.compiler.is_exporting()
    return available()


def batch_norm_train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
                     eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BN (Alg. 1): returns (y, μ_B, σ²_B) with the biased σ²_B in float32.

    Differentiable in x, weight and bias; the backward is the fused C++ kernel (the reference
    formula under ``create_graph=True``). The arguments are checked as `bnlab.functional`'s.

    Shape:
        x: (N, C, *); weight, bias: (C,) or None. Returns y like x and two (C,) tensors.
    """
    _F.check_args(x, None, None, weight, bias, True, 0.0, eps, "batch_norm_train")
    if x.numel() == 0:  # no statistics (NaN, as torch's mean of nothing): `functional`'s output
        nan = torch.full((x.shape[1],), float("nan"), device=x.device)
        return _F.empty_batch(x, weight, bias), nan, nan.clone()
    _require()
    return _train(x, weight, bias, eps)


def _train(x: Tensor, weight: Tensor | None, bias: Tensor | None,
           eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """`batch_norm_train` for callers that checked the arguments (and `supports(x)`)."""
    y, mean, var, _ = torch.ops.bnlab.bn_train_fwd(x, weight, bias, eps, None, False, False)
    return y, mean, var


def batch_norm_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                    bias: Tensor | None, eps: float) -> Tensor:
    """Inference-mode BN (Alg. 2, step 11): y = γ(x − E[x])/√(Var[x] + ε) + β, per channel.
    Running statistics that require grad get it, through the reference path (the kernel
    treats them as constants)."""
    _F.check_args(x, running_mean, running_var, weight, bias, False, 0.0, eps,
                  "batch_norm_eval")
    if _F.buffers_need_grad(running_mean, running_var):
        return _F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    _require()
    return _eval(x, running_mean, running_var, weight, bias, eps)


def _eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
          bias: Tensor | None, eps: float) -> Tensor:
    """`batch_norm_eval` for callers that checked the arguments (and `supports(x)`)."""
    y, _ = torch.ops.bnlab.bn_eval_fwd(x, running_mean, running_var, weight, bias, eps, None,
                                       False, False)
    return y


def _fast_buffers(*bufs: Tensor | None) -> bool:
    """Buffers the C++ update writes: contiguous float32 on the CPU, and not made under
    torch.inference_mode unless in it (the dispatcher refuses the op's in-place write there;
    `bnlab.functional.lerp_buffer_` writes them as torch's native update does)."""
    # (dynamo cannot trace the inference-mode tests; compiled code makes no inference tensors)
    writable = torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
    return all(b is None or (b.dtype is torch.float32 and b.is_cpu and b.is_contiguous()
                             and (writable or not b.is_inference()))
               for b in bufs)


def batch_norm_train_update(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                            running_mean: Tensor | None, running_var: Tensor | None,
                            momentum: float | Tensor) -> tuple[Tensor, Tensor | None]:
    """`batch_norm_train` plus the running-statistics update of
    `bnlab.functional.update_running_stats` (same semantics); returns (y, finite flag or None
    without buffers). In eager mode with float32 buffers this is one C++ call. The arguments
    are checked as `bnlab.functional`'s."""
    _F.check_args(x, running_mean, running_var, weight, bias, True, momentum, eps,
                  "batch_norm_train_update")
    if x.numel() == 0:  # as `functional.batch_norm`: an empty output, nothing updated
        return _F.empty_batch(x, weight, bias), None
    _require()
    return _train_update(x, weight, bias, eps, running_mean, running_var, momentum)


def _train_update(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                  running_mean: Tensor | None, running_var: Tensor | None,
                  momentum: float | Tensor) -> tuple[Tensor, Tensor | None]:
    """`batch_norm_train_update` for callers that checked the arguments."""
    if running_mean is None and running_var is None:
        return _train(x, weight, bias, eps)[0], None
    count = x.numel() // x.shape[1]
    if _fast_buffers(running_mean, running_var) and not torch.compiler.is_compiling():
        _require()
        mom_t = momentum if isinstance(momentum, Tensor) else None
        mom_f = 0.0 if mom_t is not None else float(momentum)
        y, _, _, finite = torch.ops.bnlab.bn_train_fwd_update.default(
            x, weight, bias, eps, running_mean, running_var, count, mom_f, mom_t)
        _F._warn_once_if_nonfinite(finite)
        return y, finite
    y, mean, var = _train(x, weight, bias, eps)
    return y, _update(running_mean, running_var, mean, var, count, momentum)


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor,
                         var: Tensor, count: int, momentum: float | Tensor) -> Tensor:
    """`bnlab.functional.update_running_stats` (same semantics: unbiased σ², non-finite batches
    skipped, returns the finite flag) in one C++ call for contiguous float32 CPU buffers; other
    buffers, or no kernels, go to the reference function. Checked: (C,) statistics of the
    buffers' shape, ``count`` >= 1 values per channel, ``momentum`` in [0, 1]."""
    who = "update_running_stats"
    _check_per_channel(mean.reshape(1, -1), running_mean, running_var, None, None, who)
    if var.shape != mean.shape:
        raise ValueError(f"{who}: var must have mean's shape {tuple(mean.shape)}, got "
                         f"{tuple(var.shape)}")
    if not _is_integer(count) or count < 1:
        raise ValueError(f"{who}: count must be an integer >= 1 (values per channel), got "
                         f"{count!r}")
    _check_step_momentum(momentum, mean.device, who)
    if not available():
        return _F.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return _update(running_mean, running_var, mean, var, count, momentum)


def _update(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
            count: int, momentum: float | Tensor) -> Tensor:
    """`update_running_stats` for callers that checked the arguments, with the kernels built."""
    if not _fast_buffers(running_mean, running_var):
        return _F.update_running_stats(running_mean, running_var, mean, var, count, momentum)
    if isinstance(momentum, Tensor):
        finite = torch.ops.bnlab.bn_update_running(running_mean, running_var, mean, var, count,
                                                   0.0, momentum)
    else:
        finite = torch.ops.bnlab.bn_update_running(running_mean, running_var, mean, var, count,
                                                   float(momentum), None)
    _F._warn_once_if_nonfinite(finite)
    return finite


from bnlab.kernels.fused import bn_add_relu, bn_relu  # noqa: E402  (uses the names above)
