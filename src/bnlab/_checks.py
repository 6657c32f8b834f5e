"""Argument validation shared by the functional ops and the layers, and the layers' behaviour
under torch's program capture (`FxLeaf` for torch.fx, `no_torchscript` for TorchScript), and
where bnlab's warnings point (`user_stacklevel`: the user's line).

Every error names the layer or function, the argument, the expected and the actual value:
silent acceptance of a wrong shape is how BN bugs hide (peers.md, pain points 1 and 15).
"""

from __future__ import annotations

import argparse
import functools
import math
import numbers
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn, cast

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.lazy import LazyModuleMixin

_RANK_NAMES = {2: "(N, C)", 3: "(N, C, L)", 4: "(N, C, H, W)", 5: "(N, C, D, H, W)"}


def check_num_features(num_features: int, who: str) -> None:
    check_sizes(who, num_features=num_features)


def check_sizes(who: str, **sizes: Any) -> None:
    """Each named size (channels, classes, features, image side) an integer >= 1."""
    for name, v in sizes.items():
        if not is_integer(v) or v < 1:
            raise ValueError(f"{who}: {name} must be an integer >= 1, got {v!r}")


def check_width(who: str, width: Any) -> None:
    """A width multiplier: a finite number > 0 (comparisons: NaN fails them)."""
    if isinstance(width, bool) or not is_real(width) or not 0 < width < math.inf:
        raise ValueError(f"{who}: width must be a finite number > 0, got {width!r}")


def check_materialized(model: nn.Module, who: str) -> None:
    """Model-wide tools (conversion, folding, freezing, statistics) need every layer's shapes: a
    lazy module (``LazyBatchNorm2d``, ``LazyConv2d``, torch's or bnlab's) has none before its
    first forward, and would fail deep inside torch ("Attempted to use an uninitialized
    parameter") or, for SyncBN conversion, silently stay local."""
    for name, m in model.named_modules():
        # torch types the mixin's self as a Protocol that LazyModuleMixin itself does not
        # satisfy (torch's own lazy modules ignore this error too)
        if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params():  # type: ignore[misc]
            raise ValueError(f"{who}: {name or 'the model'} ({type(m).__name__}) is not "
                             "initialized yet: run the model once on a batch (or load a "
                             "state_dict) first")


def positive_int(text: str) -> int:
    """argparse type for counts (seeds, threads, rounds): an integer >= 1; argparse names the
    option in its error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _numpy_scalar(x: Any, kind: type) -> bool:
    # NumPy's scalars (np.float32(1e-3), the np.int64 of np.prod) are numbers.Real/Integral;
    # checked by module so that the core needs no NumPy, and only after the int/float test.
    return type(x).__module__ == "numpy" and isinstance(x, kind)


def is_real(x: Any) -> bool:
    """An int or float, or a NumPy scalar of either (torch takes those too)."""
    return isinstance(x, (int, float)) or _numpy_scalar(x, numbers.Real)


def is_integer(x: Any) -> bool:
    """An int (not a bool) or a NumPy integer scalar."""
    return (isinstance(x, int) and not isinstance(x, bool)) or _numpy_scalar(x, numbers.Integral)


def plain(x: Any) -> Any:
    """A NumPy scalar, or a 0-d floating-point tensor (torch's BN takes momentum=tensor(0.1)),
    as the Python number it holds (what a layer stores); anything else as is."""
    if isinstance(x, Tensor) and x.dim() == 0 and x.is_floating_point():
        return float(x)
    return x.item() if type(x).__module__ == "numpy" else x


def check_eps(eps: float, who: str, *, allow_zero: bool = False) -> None:
    """ε a finite number > 0, or >= 0 with ``allow_zero``: torch builds a BN with ε = 0 and
    evaluates it (a frozen or converted model's), refusing it only when training."""
    value = plain(eps)  # a 0-d tensor too, as torch takes one (the message shows eps as given)
    # Comparisons, not math.isfinite: torch.compile(dynamic=True) traces a module's float
    # attributes as symbolic floats, which math.isfinite cannot take. NaN fails both.
    if (not is_real(value) or not (value >= 0 if allow_zero else value > 0)
            or not value < math.inf):
        raise ValueError(f"{who}: eps must be a finite number "
                         f"{'>= 0' if allow_zero else '> 0 when training'}, got {eps!r}")


def check_momentum(momentum: float | None, who: str, *, allow_none: bool = True) -> None:
    if momentum is None:
        if allow_none:
            return
        raise ValueError(f"{who}: momentum must be a number in [0, 1], got None")
    if not is_real(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{who}: momentum must be in [0, 1]{' (or None)' if allow_none else ''}"
                         f", got {momentum!r}")


def check_input(x: Tensor, who: str, ranks: tuple[int, ...], num_features: int) -> None:
    """Rank, dtype and channel count of a layer's input."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ranks:
        want = " or ".join(f"{r}D {_RANK_NAMES.get(r, '')}".strip() for r in ranks)
        raise ValueError(f"{who}: expected {want} input, got {x.dim()}D input of shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: input must be floating point, got dtype {x.dtype}")
    if x.shape[1] != num_features:
        raise ValueError(f"{who}: expected {num_features} channels in dimension 1 of the input, "
                         f"got {x.shape[1]} (input shape {tuple(x.shape)})")


def check_training_size(x: Tensor, who: str) -> None:
    """Training needs more than one value per channel: σ²_B of one value is 0 (Alg. 1). An
    empty batch (no values) passes, as in torch: it has no statistics to normalize with, so the
    callers return an empty output and leave the running statistics alone."""
    if x.numel() and x.numel() == x.shape[1]:  # one value per channel
        raise ValueError(
            f"{who}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)} (1 value per channel). Use a batch of at least 2, eval mode, or "
            "a frozen/ghost BN for tiny batches."
        )


def check_per_channel(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                      weight: Tensor | None, bias: Tensor | None, who: str,
                      var_name: str = "running_var") -> None:
    """Input rank/dtype, and the (C,) shape and the input's device for every per-channel tensor
    (``var_name`` names the second running statistic in errors: lp_norm's is
    ``running_scale``)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{who}: expected input of rank >= 2 (N, C, *), got shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: input must be floating point, got dtype {x.dtype}")
    c = x.shape[1]
    for name, t in (("running_mean", running_mean), (var_name, running_var),
                    ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):  # (a NumPy array has .shape and, in NumPy 2, .device)
            raise TypeError(f"{who}: {name} must be a torch.Tensor or None, got "
                            f"{type(t).__name__}")
        if t.shape != (c,):  # torch.Size compares as a tuple
            raise ValueError(f"{who}: {name} must have shape ({c},) to match the input's "
                             f"{c} channels, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{who}: {name} must be on the input's device ({x.device}), got "
                             f"{t.device}")
        if not t.is_floating_point():  # (an integer buffer failed inside torch.lerp, unnamed)
            raise TypeError(f"{who}: {name} must be floating point, got dtype {t.dtype}")


def call_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The input of a module call, as a forward pre-hook registered ``with_kwargs`` sees it: the
    first positional argument, or the only keyword one (``bn(input=x)``); None otherwise."""
    if args:
        return args[0]
    return next(iter(kwargs.values())) if len(kwargs) == 1 else None


def no_torchscript(module: object, *, foldable: bool) -> NoReturn:
    """Raised from a module's ``__prepare_scriptable__``, which `torch.jit.script` calls on every
    submodule before compiling: bnlab's layers are Python (input checks, the kernels' dispatch),
    which TorchScript cannot compile, and without this it fails deep in the compiler with
    "Expression of type dots cannot be used in a type expression"."""
    n = getattr(module, "num_features", None)
    if n == 0:  # a lazy layer before its first forward
        n = "uninitialized"
    who = f"{type(module).__name__}({n})" if n is not None else type(module).__name__
    fold = (" or, for inference, script bnlab.fold(model.eval()), whose folded layers "
            "TorchScript compiles") if foldable else ""
    raise RuntimeError(f"{who}: torch.jit.script cannot compile bnlab's normalization layers "
                       "(and TorchScript is deprecated in torch 2.x): use torch.compile or "
                       f"torch.export, which both support them{fold}")


def _fx_leaf(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward``, recording the module as one ``call_module`` node when given an fx Proxy."""
    @functools.wraps(forward)
    def wrapper(self: Any, input: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(input, fx.Proxy):
            # A proxy that reaches a module's forward comes from an fx.Tracer (symbolic_trace),
            # which defines path_of_module; the attribute is typed as the TracerBase base.
            tracer = cast(fx.Tracer, input.tracer)
            return tracer.create_proxy("call_module", tracer.path_of_module(self),
                                       (input, *args), kwargs)
        return forward(self, input, *args, **kwargs)
    wrapper._bnlab_fx_leaf = True  # type: ignore[attr-defined]
    return wrapper


class FxLeaf:
    """Mixin for bnlab's modules: `torch.fx.symbolic_trace` records each as one ``call_module``
    node, as it does torch.nn's own BatchNorm (fx treats only torch.nn modules as leaves).
    Traced through, a forward would run its input checks and its choice of mode (training,
    frozen, eval) on proxies, and fail ("input must be a torch.Tensor, got Proxy") or bake one
    mode into the graph; as a node, the module runs at call time on real tensors.

    The ``forward`` of every subclass is wrapped, users' subclasses included: an unwrapped
    override calling ``super().forward`` would record the module at that inner call and then
    trace its own extra ops, which the graph would run twice.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "_bnlab_fx_leaf", False):
            cls.forward = _fx_leaf(forward)  # type: ignore[attr-defined]


# Frames a warning skips to reach the user's line: bnlab's library (not its lab, whose lines are
# worth pointing at) and torch's own (nn.Module.__call__, autograd.Function.apply, ...).
_BNLAB_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_LAB_DIR = _BNLAB_DIR + "lab" + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def _internal(filename: str) -> bool:
    return (filename.startswith(_TORCH_DIR)
            or (filename.startswith(_BNLAB_DIR) and not filename.startswith(_LAB_DIR)))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a `warnings.warn` made by this function's caller that names the
    first frame outside bnlab's library and torch: the user's ``model(x)``, not bnlab's
    functional.py (whose depth below the user differs between the layers, the functional API
    and the fused ops). Python 3.12's ``skip_file_prefixes`` does this; we support 3.10."""
    frame = sys._getframe(1)  # the caller, which warnings.warn counts as stacklevel 1
    level = 1
    while frame.f_back is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    return level


def host_readable(flag: Tensor) -> bool:
    """Whether ``flag``'s value may be read on the host: a plain CPU tensor (no device
    synchronisation; a FakeTensor has no value), outside torch.compile (no graph break), torch.func
    transforms (where a tensor in Python control flow is an error) and dispatch modes such as
    FakeTensorMode (memory and shape estimation)."""
    return (type(flag) is Tensor and flag.is_cpu and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and not torch._C._len_torch_dispatch_stack())


def check_training(training: bool, who: str) -> None:
    """``training`` is a bool, as torch's ``batch_norm`` demands: a float there (momentum one
    slot early) or a string would pick a mode by its truthiness and move the running
    statistics of an evaluation."""
    if training is not True and training is not False:
        raise TypeError(f"{who}: training must be a bool, got {type(training).__name__} "
                        f"{training!r}")


def check_step_momentum(momentum: float | Tensor, device: torch.device, who: str) -> None:
    """A running update's factor: a number in [0, 1], or a 0-d floating-point tensor on
    ``device`` (or the CPU) whose value, where it can be read without a host sync, is in
    [0, 1] (a NaN one overwrote both buffers with NaN)."""
    if not isinstance(momentum, Tensor):
        check_momentum(momentum, who, allow_none=False)
    elif momentum.dim() != 0 or not momentum.is_floating_point():
        raise ValueError(f"{who}: momentum must be a number in [0, 1] or a 0-d floating-point "
                         f"tensor, got a tensor of shape {tuple(momentum.shape)} and dtype "
                         f"{momentum.dtype}")
    elif momentum.device != device and not momentum.is_cpu:
        raise ValueError(f"{who}: momentum must be on the input's device ({device}) or "
                         f"a CPU scalar, got a tensor on {momentum.device}")
    elif host_readable(momentum) and not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{who}: momentum must be in [0, 1], got {float(momentum)!r}")


def check_args(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None, bias: Tensor | None, training: bool,
               momentum: float | Tensor, eps: float, who: str,
               var_name: str = "running_var", *, local_size: bool = True) -> None:
    """The argument checks of `batch_norm` (and the fused `bnlab.kernels.bn_relu`, and
    `lp_norm` with ``var_name="running_scale"``): ε, momentum (a number in [0, 1] or a 0-d
    tensor), per-channel shapes, more than one value per channel when training (unless not
    ``local_size``: a SyncBatchNorm shard, whose global batch is checked instead), running
    statistics when not."""
    check_training(training, who)
    check_eps(eps, who, allow_zero=not training)
    check_step_momentum(momentum, input.device, who)
    check_per_channel(input, running_mean, running_var, weight, bias, who, var_name)
    if training:
        if local_size:
            check_training_size(input, who)
    elif running_mean is None or running_var is None:
        raise ValueError(
            f"{who}: running_mean and {var_name} are required when training=False, "
            f"got running_mean={type(running_mean).__name__}, "
            f"{var_name}={type(running_var).__name__}"
        )


# os.environ.get of an unset variable costs ~0.6 µs (it raises and catches KeyError inside),
# a tenth of a small BN call. On POSIX CPython the mapping's backing dict (bytes keys, kept in
# sync by os.environ's setters, e.g. pytest's monkeypatch.setenv) answers in ~40 ns.
_ENV = getattr(os.environ, "_data", None)
_ENV_KEY = b"BNLAB_FORCE_REFERENCE"


_ON, _OFF = (b"1", b"true", b"yes", b"on"), (b"", b"0", b"false", b"no", b"off")
_FLAGS: dict[bytes, bool] = {}  # each value seen, parsed once (and warned about once)


def force_reference() -> bool:
    """Whether ``BNLAB_FORCE_REFERENCE`` is on: 1/true/yes/on (any case); 0/false/no/off and ""
    are off, and any other value is on, with a warning naming it."""
    if isinstance(_ENV, dict) and os.name == "posix":
        value = _ENV.get(_ENV_KEY)
    else:
        text = os.environ.get("BNLAB_FORCE_REFERENCE")
        value = None if text is None else os.fsencode(text)
    if value is None or value in (b"", b"0"):
        return False
    if value == b"1":
        return True
    flag = _FLAGS.get(value)
    if flag is None:
        if torch.compiler.is_compiling():  # Dynamo traces no bytes methods: on, as before
            return True
        flag = _FLAGS[value] = _parse_flag(value)
    return flag


def _parse_flag(value: bytes) -> bool:
    v = value.strip().lower()
    if v in _OFF:
        return False
    if v not in _ON:
        warnings.warn(f"BNLAB_FORCE_REFERENCE={value.decode(errors='replace')!r} is neither "
                      "1/true/yes/on nor 0/false/no/off: taken as on (the reference path)",
                      RuntimeWarning, stacklevel=3)
    return True
