"""bnlab's layers under torch.compile (fullgraph), torch.export, ONNX and torch.func."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

import bnlab
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


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", NORMS)
def test_compile_fullgraph_matches_eager(kind: str, train: bool) -> None:
    """fullgraph=True: any graph break (``.item()``, data-dependent Python) would raise."""
    torch._dynamo.reset()
    eager = _net(NORMS[kind]).train(train)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(8, 2, 6, 6) * 2 + 1
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
