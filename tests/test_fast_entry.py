"""The kernels' C++ entry points (`csrc/bn_fast.cpp`), which take the eager CPU path of
`F.batch_norm_with_flag` past its Python: for ordinary arguments they must call the same op with
the same arguments as the Python path (so results are bit-identical), and for anything else
return None, so that the Python path handles it — errors and their messages included."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import bnlab
from bnlab import functional as F
from bnlab import kernels
from bnlab.kernels import fused

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="bnlab CPU kernels could not be built here")


class Recorder:
    """Stands in for the entry points' module and records whether each call was taken."""

    def __init__(self, module: Any) -> None:
        self.module, self.taken = module, []

    def train(self, *args: Any) -> Any:
        got = self.module.train(*args)
        self.taken.append(got is not None)
        return got

    def eval(self, *args: Any) -> Any:
        got = self.module.eval(*args)
        self.taken.append(got is not None)
        return got

    def fused(self, *args: Any) -> Any:
        got = self.module.fused(*args)
        self.taken.append(got is not None)
        return got

    def count(self, *args: Any) -> bool:
        return bool(self.module.count(*args))


@pytest.fixture
def fast() -> Any:
    assert F._fast is not None  # kernels.available() loaded it
    return F._fast


def run(fn: Callable[[], Any], monkeypatch: pytest.MonkeyPatch, module: Any) -> Any:
    with monkeypatch.context() as m:
        m.setattr(F, "_fast", module)
        return fn()


def same_outcome(call: Callable[[], Any], error: type[Exception] | None,
                 monkeypatch: pytest.MonkeyPatch, fast: Any) -> torch.Tensor | None:
    """With the entry points in place, ``call`` runs (returning its output) when ``error`` is
    None, else raises it with the message the Python path alone gives (returning None)."""
    if error is None:
        return run(call, monkeypatch, fast)[0]
    with pytest.raises(error) as got:
        run(call, monkeypatch, fast)
    with pytest.raises(error) as want:
        run(call, monkeypatch, None)
    assert str(got.value) == str(want.value)
    return None


def case(shape: tuple[int, ...], dtype: torch.dtype, layout: str, affine: bool, buffers: str,
         momentum: str, training: bool, seed: int, kind: str = "bn") -> Callable[[], Any]:
    """A fresh call (new leaves and buffers each time) of batch_norm_with_flag (``kind`` "bn"),
    the fused relu(BN(x)) ("relu") or relu(BN(x) + z) ("add_relu"), returning its output,
    flag, buffers and gradients."""

    def call() -> Any:
        gen = torch.Generator().manual_seed(seed)
        c = shape[1]
        x = torch.randn(shape, generator=gen).mul(3).add(1).to(dtype)
        if layout == "channels_last" and len(shape) == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = x.transpose(0, -1).contiguous().transpose(0, -1)
        x.requires_grad_()
        w = (torch.rand(c, generator=gen) + 0.5).to(dtype).requires_grad_() if affine else None
        b = torch.randn(c, generator=gen).to(dtype).requires_grad_() if affine else None
        rm = torch.randn(c, generator=gen) if buffers in ("both", "mean") else None
        rv = torch.rand(c, generator=gen) + 0.5 if buffers in ("both", "var") else None
        mom: float | torch.Tensor = 0.1 if momentum == "float" else torch.tensor(0.25)
        z = None
        if kind == "bn":
            y, finite = F.batch_norm_with_flag(x, rm, rv, w, b, training, mom, 1e-5, "test")
        else:
            if kind == "add_relu":
                z = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
            y, finite = fused._fused(x, z, rm, rv, w, b, training, mom, 1e-5, "test")
        leaves = [t for t in (x, w, b, z) if t is not None]
        grads = torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=gen).to(dtype))
        return y, finite, rm, rv, grads

    return call


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(rank=st.integers(2, 5), n=st.integers(2, 5), c=st.sampled_from([1, 3, 16, 33]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
       affine=st.booleans(), buffers=st.sampled_from(["both", "none", "mean", "var"]),
       momentum=st.sampled_from(["float", "tensor"]), training=st.booleans(),
       seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["bn", "relu", "add_relu"]))
def test_same_results_as_the_python_path(fast, monkeypatch, rank, n, c, dtype, layout, affine,
                                         buffers, momentum, training, seed, kind):
    if not training and buffers != "both":
        buffers = "both"  # evaluation needs both buffers (without, it is an error: see below)
    shape = (n, c, *[2 + i for i in range(rank - 2)])
    call = case(shape, dtype, layout, affine, buffers, momentum, training, seed, kind)
    recorder = Recorder(fast)
    got, want = run(call, monkeypatch, recorder), run(call, monkeypatch, None)
    assert recorder.taken == [True]  # the entry point ran it
    y, finite, rm, rv, grads = got
    y_ref, finite_ref, rm_ref, rv_ref, grads_ref = want
    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride()
    assert (finite is None) == (finite_ref is None)
    if finite is not None:
        assert torch.equal(finite, finite_ref)
    for a, r in ((rm, rm_ref), (rv, rv_ref), *zip(grads, grads_ref, strict=True)):
        assert (a is None and r is None) or torch.equal(a, r)


class Sub(torch.Tensor):
    pass


class FunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


class DispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        return func(*args, **(kwargs or {}))


def _declined(**change: Any) -> dict[str, Any]:
    args = {"x": torch.randn(4, 3, 2), "rm": torch.zeros(3), "rv": torch.ones(3),
            "w": torch.ones(3), "b": torch.zeros(3), "training": True, "momentum": 0.1,
            "eps": 1e-5}
    args.update(change)
    return args


# Each is handed to the Python path: the error it raises, or None when it runs fine there.
DECLINED = {
    "float64 input": (_declined(x=torch.randn(4, 3, 2, dtype=torch.float64)), None),
    "float16 input": (_declined(x=torch.randn(4, 3, 2).half()), None),
    "meta input": (_declined(x=torch.randn(4, 3, 2, device="meta")), ValueError),
    "rank 1": (_declined(x=torch.randn(4)), ValueError),
    "integer input": (_declined(x=torch.ones(4, 3, dtype=torch.long)), TypeError),
    "subclass input": (_declined(x=torch.randn(4, 3, 2).as_subclass(Sub)), None),
    "empty batch": (_declined(x=torch.randn(0, 3, 2)), None),
    "one value per channel": (_declined(x=torch.randn(1, 3)), ValueError),
    "eps 0": (_declined(eps=0.0), ValueError),
    "eps nan": (_declined(eps=float("nan")), ValueError),
    "integer eps": (_declined(eps=1), None),
    "momentum 1.5": (_declined(momentum=1.5), ValueError),
    "integer momentum": (_declined(momentum=0), None),
    "weight (4,)": (_declined(w=torch.ones(4)), ValueError),
    "bias (3, 1)": (_declined(b=torch.zeros(3, 1)), ValueError),
    "running_var (2,)": (_declined(rv=torch.ones(2)), ValueError),
    "meta weight": (_declined(w=torch.ones(3, device="meta")), ValueError),
    "eval, meta running_mean": (_declined(training=False, rm=torch.zeros(3, device="meta")),
                                ValueError),
    "float64 buffers": (_declined(rm=torch.zeros(3, dtype=torch.float64),
                                  rv=torch.ones(3, dtype=torch.float64)), None),
    "strided buffer": (_declined(rm=torch.zeros(6)[::2]), None),
    "eval without running_var": (_declined(training=False, rv=None), ValueError),
    "eval, integer eps": (_declined(training=False, eps=1), None),
    "eval, momentum -1": (_declined(training=False, momentum=-1.0), ValueError),
    "no buffers, momentum 2": (_declined(rm=None, rv=None, momentum=2.0), ValueError),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_declines_what_the_python_path_decides(fast, monkeypatch, name):
    args, error = DECLINED[name]
    x, rm, rv, w, b = args["x"], args["rm"], args["rv"], args["w"], args["b"]
    if args["training"]:
        assert fast.train(x, w, b, rm, rv, args["momentum"], args["eps"]) is None
    else:
        assert fast.eval(x, rm, rv, w, b, args["momentum"], args["eps"]) is None

    def call() -> Any:
        return F.batch_norm_with_flag(x, rm, rv, w, b, args["training"], args["momentum"],
                                      args["eps"], "test")
    y = same_outcome(call, error, monkeypatch, fast)
    assert y is None or y.shape == x.shape


FUSED_DECLINED = {
    "residual of another shape": ({"z": torch.randn(4, 3, 3)}, ValueError),
    "residual of another dtype": ({"z": torch.randn(4, 3, 2, dtype=torch.float64)}, TypeError),
    "meta residual": ({"z": torch.randn(4, 3, 2, device="meta")}, ValueError),
    "subclass residual": ({"z": torch.randn(4, 3, 2).as_subclass(Sub)}, None),
    "training as 1": ({"training": 1}, TypeError),  # (torch: "must be bool")
    "eval without running_mean": ({"training": False, "rm": None}, ValueError),
    "float64 input": ({"x": torch.randn(4, 3, 2, dtype=torch.float64),
                       "z": torch.randn(4, 3, 2, dtype=torch.float64)}, None),
    "momentum 2": ({"momentum": 2.0}, ValueError),
}


@pytest.mark.parametrize("name", list(FUSED_DECLINED))
def test_fused_declines_what_the_python_path_decides(fast, monkeypatch, name):
    change, error = FUSED_DECLINED[name]
    a = {"x": torch.randn(4, 3, 2), "z": torch.randn(4, 3, 2), "rm": torch.zeros(3),
         "rv": torch.ones(3), "w": torch.ones(3), "b": torch.zeros(3), "training": True,
         "momentum": 0.1, **change}
    args = (a["x"], a["z"], a["rm"], a["rv"], a["w"], a["b"], a["training"], a["momentum"], 1e-5)
    assert fast.fused(*args) is None

    y = same_outcome(lambda: fused._fused(*args, "test"), error, monkeypatch, fast)
    assert y is None or (y.shape == a["x"].shape and bool((y >= 0).all()))


def test_fused_saves_the_mask_only_for_autograd(fast):
    """The mask (the backward's input) is saved when a gradient will be wanted, as in Python:
    a fused layer's output under no_grad carries no graph, and one with grad backpropagates."""
    layer = bnlab.BatchNormReLU2d(3)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    x.requires_grad_()
    (g,) = torch.autograd.grad(layer(x).sum(), x)
    layer_ref = bnlab.BatchNormReLU2d(3)
    x_ref = x.detach().clone().requires_grad_()
    saved = F._fast
    try:
        F._fast = None
        (g_ref,) = torch.autograd.grad(layer_ref(x_ref).sum(), x_ref)
    finally:
        F._fast = saved
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("mode", [FunctionMode, DispatchMode])
def test_declines_under_python_modes(fast, mode):
    """A __torch_function__ or __torch_dispatch__ mode sees bnlab's ops as before (through the
    Python path's torch.ops calls)."""
    x = torch.randn(4, 3, 2)
    with mode():
        assert fast.train(x, None, None, torch.zeros(3), torch.ones(3), 0.1, 1e-5) is None
        assert fast.eval(x, torch.zeros(3), torch.ones(3), None, None, 0.1, 1e-5) is None
    assert fast.train(x, None, None, torch.zeros(3), torch.ones(3), 0.1, 1e-5) is not None


def test_declines_inside_torch_func_transforms(fast):
    def f(x: torch.Tensor) -> torch.Tensor:
        assert fast.train(x, None, None, None, None, 0.1, 1e-5) is None
        return F.batch_norm(x, None, None, training=True)
    y = torch.func.vmap(f)(torch.randn(2, 4, 3))
    assert y.shape == (2, 4, 3)


def test_python_states_close_it(monkeypatch, fast):
    """BNLAB_FORCE_REFERENCE and a forward-AD level send calls to the Python path (the entry
    points cannot see them); so does torch.compile's tracing (see test_toolchain)."""
    recorder = Recorder(fast)
    monkeypatch.setattr(F, "_fast", recorder)
    layer = bnlab.BatchNorm1d(3)
    layer(torch.randn(4, 3))
    assert recorder.taken == [True]
    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", "1")
    assert "BatchNormTrain" in type(layer(torch.randn(4, 3, requires_grad=True)).grad_fn).__name__
    monkeypatch.delenv("BNLAB_FORCE_REFERENCE")
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(4, 3), torch.randn(4, 3))
        assert fwAD.unpack_dual(layer(x)).tangent is not None
    assert recorder.taken == [True]


def test_nonfinite_batch_warns_and_counts_as_the_python_path_does(fast, monkeypatch):
    def step() -> tuple[Any, Any, Any]:
        layer = bnlab.BatchNorm1d(2)
        bad = torch.randn(8, 2)
        bad[0, 0] = float("nan")
        monkeypatch.setattr(F, "_warned_nonfinite", False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            layer(bad)
        (w,) = [w for w in seen if "non-finite batch statistics" in str(w.message)]
        return w, layer.num_nonfinite_batches.item(), layer.running_mean.clone()

    recorder = Recorder(fast)
    got = run(step, monkeypatch, recorder)
    want = run(step, monkeypatch, None)
    assert recorder.taken == [True]
    assert got[0].category is want[0].category is RuntimeWarning
    assert (got[0].filename, got[0].lineno) == (want[0].filename, want[0].lineno)
    assert got[1] == want[1] == 1
    assert torch.equal(got[2], torch.zeros(2)) and torch.equal(want[2], torch.zeros(2))


def test_counters_as_the_python_path_counts(fast, monkeypatch):
    """`count` does the layers' two adds (finite and non-finite batches) in C++, with their
    version bumps, and declines where an add must be seen or cannot be done."""
    def steps() -> list[tuple[int, int, int, int]]:
        layer = bnlab.BatchNorm1d(2)
        seen = []
        for i in range(4):
            x = torch.randn(8, 2)
            if i == 2:
                x[0, 0] = float("inf")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer(x)
            seen.append((layer.num_batches_tracked.item(), layer.num_nonfinite_batches.item(),
                         layer.num_batches_tracked._version,
                         layer.num_nonfinite_batches._version))
        return seen

    got, want = run(steps, monkeypatch, fast), run(steps, monkeypatch, None)
    assert got == want
    assert [s[:2] for s in got] == [(1, 0), (2, 0), (2, 1), (3, 1)]
    n, bad, flag = torch.tensor(0), torch.tensor(0), torch.tensor(True)
    with DispatchMode():
        assert not fast.count(n, bad, flag)
    assert not fast.count(n.int(), bad, flag)  # int32: the add's promotion rules, in Python
    assert not fast.count(n, bad, torch.tensor(1))
    with torch.inference_mode():
        inf_n = torch.tensor(0)
    assert not fast.count(inf_n, bad, flag)
    assert n.item() == 0 and bad.item() == 0
    assert fast.count(n, bad, flag) and (n.item(), bad.item()) == (1, 0)


def test_profilers_see_the_same_op(fast):
    layer = bnlab.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 4)
    with torch.profiler.profile() as prof:
        layer(x)
        layer.eval()
        layer(x)
    names = {e.key for e in prof.key_averages()}
    assert {"bnlab::bn_train_fwd_update", "bnlab::bn_eval_fwd"} <= names
