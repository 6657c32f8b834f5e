"""bnlab's layers under torch.compile (fullgraph), torch.export, ONNX, torch.func, torch.fx and
TorchScript."""

from __future__ import annotations

import copy
import functools
import inspect
import warnings

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call, grad

import bnlab
import bnlab.convert
import bnlab.variants
from _modules import MODULES
from bnlab.variants import BatchRenorm2d, FrozenBatchNorm2d, GhostBatchNorm

NORMS = {
    "bn": bnlab.BatchNorm2d,
    "bn_cumulative": functools.partial(bnlab.BatchNorm2d, momentum=None),
    "renorm": BatchRenorm2d,
    "ghost": functools.partial(GhostBatchNorm, virtual_batch_size=4),
    "frozen": FrozenBatchNorm2d,
    "sync_single_process": bnlab.SyncBatchNorm,
}


def _net(norm=bnlab.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), norm(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3), bnlab.BatchNorm1d(3))


@pytest.mark.parametrize("setting", ["kernels", "reference", "dynamic"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", NORMS)
def test_compile_fullgraph_matches_eager(kind: str, train: bool, setting: str,
                                         monkeypatch) -> None:
    """fullgraph=True: any graph break (``.item()``, data-dependent Python) would raise. Two
    batch sizes, so the second call recompiles with a symbolic batch size; "reference" forces
    the reference path (the path of a process whose kernels are not loaded yet, or failed to
    build); "dynamic" compiles with dynamic=True, which also makes the layers' float attributes
    (eps, momentum) symbolic."""
    torch._dynamo.reset()
    if setting == "reference":
        monkeypatch.setenv("BNLAB_FORCE_REFERENCE", "1")
    eager = _net(NORMS[kind]).train(train)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True,
                             dynamic=True if setting == "dynamic" else None)
    for n in (8, 5):
        x = torch.randn(n, 2, 6, 6) * 2 + 1
        y, y_ref = compiled(x), eager(x)
        torch.testing.assert_close(y, y_ref)
        if train:
            y.square().sum().backward()
            y_ref.square().sum().backward()
    for a, b in zip(model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(a, b)
    if train:
        for a, b in zip(model.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("norm", [bnlab.BatchNorm2d, bnlab.BatchNormReLU2d])
@pytest.mark.parametrize("force", ["0", "1"], ids=["kernels", "reference"])
def test_compiled_training_is_not_specialized_to_each_batch_size(norm, force: str,
                                                                 monkeypatch) -> None:
    """Two graphs for ten batch sizes, as torch's BN (the static one, then a symbolic batch):
    the running update's count m = N·H·W is a SymInt in the ops' schema, an int specialized
    every batch size until Dynamo's recompile limit (fullgraph=True then raised)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", force)
    norm(3)(torch.randn(2, 3, 2, 2))  # the kernels loaded before tracing (README)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_net(norm), backend="aot_eager", fullgraph=True)
    for n in range(2, 12):
        compiled(torch.randn(n, 2, 6, 6)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2


def test_loading_the_kernels_by_available_causes_no_recompile(monkeypatch) -> None:
    """README's ways to load the kernels before tracing include `bnlab.kernels.available()`;
    it must leave nothing for the first compiled call to change (Dynamo guards on globals)."""
    from torch._dynamo.utils import counters

    from bnlab import functional, kernels

    monkeypatch.setattr(functional, "_kernels", None)  # as in a process with no BN call yet
    if not kernels.available():
        pytest.skip("bnlab CPU kernels not built here")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(bnlab.BatchNorm2d(4), backend="eager")
    x = torch.randn(8, 4, 5, 5)
    for _ in range(3):
        compiled(x)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_respects_freeze_and_no_stats_update() -> None:
    torch._dynamo.reset()
    model = _net()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 2, 6, 6)
    compiled(x)
    before = [b.clone() for b in model.buffers()]
    with bnlab.no_stats_update(model):
        compiled(x)
    bnlab.freeze(model)
    model.train()
    y = compiled(x)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
    torch.testing.assert_close(y, copy.deepcopy(model).eval()(x))


@pytest.mark.parametrize("fused", [False, True], ids=["bn", "bn_relu"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_compiled_graphs_use_the_kernels_for_training_and_fusable_ops_for_eval(
        train: bool, fused: bool) -> None:
    """torch.compile gets the kernels' op in training and the reference's pointwise ops in
    eval, which inductor fuses with their neighbours (`functional._use_kernels_eval`)."""
    from bnlab import kernels

    if not kernels.available():
        pytest.skip("bnlab CPU kernels not built here")
    torch._dynamo.reset()
    targets: list[str] = []

    def capture(gm: fx.GraphModule, _inputs: list) -> fx.GraphModule:
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    norm = bnlab.BatchNormReLU2d if fused else bnlab.BatchNorm2d
    model = nn.Sequential(nn.Conv2d(2, 4, 3), norm(4)).train(train)
    torch.compile(model, backend=capture, fullgraph=True)(torch.randn(8, 2, 6, 6))
    assert any("bnlab." in t for t in targets) == train, targets


def test_compile_inductor_eval() -> None:
    torch._dynamo.reset()
    model = _net()
    model.train()(torch.randn(16, 2, 6, 6))
    model.eval()
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def _trained_eval_net() -> nn.Sequential:
    model = _net()
    model.train()(torch.randn(16, 2, 6, 6) * 2 + 1)
    return model.eval()


@pytest.mark.parametrize("folded", [False, True], ids=["eval", "folded"])
def test_torch_export(folded: bool) -> None:
    model = _trained_eval_net()
    target = bnlab.fold(model) if folded else model
    x = torch.randn(4, 2, 6, 6)
    program = torch.export.export(target, (x,))
    torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
    if folded:  # nothing of BN is left: only conv, linear and elementwise ops
        ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert not any("rsqrt" in op or "batch_norm" in op for op in ops), ops


def test_strict_export_in_a_fresh_process_finds_no_side_effects() -> None:
    """The layers write nothing while traced, even on a process's first BN call (the kernels'
    module reference was set then, and the layer's name cached: strict export warned)."""
    import subprocess
    import sys

    code = ("import warnings, torch, bnlab\n"
            "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4)).eval()\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    torch.export.export(m, (torch.randn(2, 3, 6, 6),), strict=True)\n"
            "print([str(x.message) for x in w if 'side effects' in str(x.message)])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("folded", [False, True], ids=["eval", "folded"])
def test_onnx_export_runs_under_onnxruntime(folded: bool, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _trained_eval_net()
    target = bnlab.fold(model) if folded else model
    x = torch.randn(4, 2, 6, 6)
    path = tmp_path / "model.onnx"
    torch.onnx.export(target, (x,), str(path), dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), model(x).detach(), rtol=1e-5, atol=1e-5)


def test_functional_call_train_mode_updates_the_given_buffers() -> None:
    model = _net()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    own = [b.clone() for b in model.buffers()]
    reference = copy.deepcopy(model)
    x = torch.randn(8, 2, 6, 6)
    y = functional_call(model, state, (x,))
    torch.testing.assert_close(y, reference(x))
    assert all(torch.equal(a, b) for a, b in zip(own, model.buffers(), strict=True))
    torch.testing.assert_close(state["1.running_mean"], reference[1].running_mean)
    torch.testing.assert_close(state["5.num_batches_tracked"], torch.tensor(1))


def test_func_grad_eval_mode_matches_autograd() -> None:
    model = _trained_eval_net()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.randn(4, 2, 6, 6)

    def loss(p):
        return functional_call(model, {**p, **buffers}, (x,)).square().sum()

    grads = grad(loss)(params)
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


# Layers that bnlab.fold turns into Identity or ChannelAffine, so their TorchScript error points
# to scripting the folded model.
FOLDABLE = {k for k in MODULES if k not in ("ActivationNoise", "LpNorm", "ChannelAffine")}


def test_the_module_table_covers_every_exported_module() -> None:
    exported = {name for ns in (bnlab, bnlab.variants, bnlab.convert) for name, obj in
                vars(ns).items() if inspect.isclass(obj) and issubclass(obj, nn.Module)
                and obj.__module__.startswith("bnlab") and not name.startswith("_")}
    assert exported == set(MODULES)


def _input(rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((6, 4, 3, 2, 2)[:rank], generator=g) * 2 + 1


@pytest.mark.parametrize("name", MODULES)
def test_fx_records_each_module_as_one_node_that_runs_at_call_time(name: str) -> None:
    """As for torch.nn's BatchNorm: one call_module node, so the mode (and the running
    statistics' update) is the module's at call time, not frozen in at trace time."""
    make, rank = MODULES[name]
    torch.manual_seed(0)
    traced = fx.symbolic_trace(nn.Sequential(make()))
    torch.manual_seed(0)
    eager = nn.Sequential(make())
    ops = [(n.op, n.target) for n in traced.graph.nodes]
    assert ops == [("placeholder", "input"), ("call_module", "0"), ("output", "output")]
    for seed, train in ((1, True), (2, True), (3, False)):
        traced.train(train)
        eager.train(train)
        x = _input(rank, seed)
        torch.testing.assert_close(traced(x), eager(x))
    for (k, a), b in zip(traced.state_dict().items(), eager.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


class _Doubled(bnlab.BatchNorm2d):
    """A user's subclass whose forward adds work after BN's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


def test_fx_records_a_users_subclass_whole() -> None:
    """Its forward is wrapped too (FxLeaf): recorded at the inner super().forward, the graph
    would run the module and then double its output again."""
    torch.manual_seed(0)
    traced = fx.symbolic_trace(nn.Sequential(_Doubled(4)))
    eager = nn.Sequential(_Doubled(4))
    assert [n.op for n in traced.graph.nodes] == ["placeholder", "call_module", "output"]
    x = _input(4)
    torch.testing.assert_close(traced(x), eager(x))


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is, in torch 2.x
        return torch.jit.script(module)


def test_a_folded_model_compiles_with_torchscript() -> None:
    """TorchScript cannot compile bnlab's layers; the folded model (Identity, ChannelAffine and
    torch's own modules) is their scriptable inference form."""
    torch.manual_seed(0)
    model = nn.Sequential(_net(), nn.ReLU(), bnlab.BatchNorm1d(3))  # the last folds into nothing
    model.train()(torch.randn(16, 2, 6, 6) * 2 + 1)
    model.eval()
    folded = bnlab.fold(model)
    assert isinstance(folded[2], bnlab.convert.ChannelAffine)
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(_script(folded)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"ChannelAffine"}))
def test_torchscript_names_the_layer_and_the_ways_that_work(name: str) -> None:
    layer = MODULES[name][0]()
    size = "uninitialized" if name.startswith("Lazy") else "4"
    with pytest.raises(RuntimeError, match=rf"^{type(layer).__name__}\({size}\): torch.jit.script "
                       r"cannot compile .* use torch.compile or torch.export") as err:
        _script(nn.Sequential(nn.Identity(), layer))
    assert ("bnlab.fold(model.eval())" in str(err.value)) == (name in FOLDABLE)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("norm", [bnlab.BatchNorm2d, bnlab.BatchNormReLU2d])
def test_jit_trace_replays_the_running_update_and_traces_bn_relu(norm, momentum) -> None:
    """torch.jit.trace records ATen ops only: traced on the reference path, a training-mode
    module replays its running update and counter (the kernels' C++ count was not recorded,
    so num_batches_tracked stayed 0), and an eval BN+ReLU passes the trace check (the kernels'
    saved mask followed grad mode, which the check varies)."""
    torch.manual_seed(0)
    xs = [torch.randn(8, 4, 3, 3) * 2 + i for i in range(4)]
    layer, ref = norm(4, momentum=momentum), nn.BatchNorm2d(4, momentum=momentum)
    traced = torch.jit.trace(layer, xs[0], check_trace=False)
    layer.load_state_dict(ref.state_dict())  # back to the initial statistics
    for x in xs[1:]:
        traced(x), ref(x)
    assert int(layer.num_batches_tracked) == 3
    torch.testing.assert_close(layer.running_mean, ref.running_mean)
    torch.testing.assert_close(layer.running_var, ref.running_var)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), norm(4)).eval()
    x = torch.randn(6, 3, 5, 5)
    torch.testing.assert_close(torch.jit.trace(net, x)(x), net(x))  # check_trace on


def test_training_under_fake_tensor_mode() -> None:
    """Shape and memory estimation runs the model under FakeTensorMode, where no value can be
    read: the layers' finite checks must not try."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for norm in (*NORMS.values(), bnlab.BatchNormReLU2d):
        with FakeTensorMode():
            model = _net(norm).train()
            y = model(torch.randn(8, 2, 6, 6))
            y.sum().backward()
        assert y.shape == (8, 3)


def test_type_matching_tools_work_after_replace_norm_to_torchs_layers() -> None:
    """Eager-mode quantization's fuse_modules looks modules up by type, so it refuses bnlab's
    BN; `bnlab.replace_norm(model, nn.BatchNorm2d)` (same state) makes the model fusable, and the
    fused model computes what the bnlab model did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU())
    model.train()(torch.randn(16, 2, 6, 6) * 2 + 1)
    model.eval()
    x = torch.randn(4, 2, 6, 6)
    ref = model(x)
    with pytest.raises(AssertionError, match="did not find fuser method"):
        torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["0", "1", "2"]])
    torch_bn = bnlab.replace_norm(model, nn.BatchNorm2d)
    assert type(torch_bn[1]) is nn.BatchNorm2d
    fused = torch.ao.quantization.fuse_modules(torch_bn, [["0", "1", "2"]])
    assert isinstance(fused[1], nn.Identity)
    torch.testing.assert_close(fused(x), ref, rtol=1e-5, atol=1e-5)
