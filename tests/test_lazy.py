"""bnlab.LazyBatchNorm{1,2,3}d against torch.nn.LazyBatchNorm{1,2,3}d: C from the first input,
then the plain layer; clear errors for a bad first input and for model-wide tools that meet a
layer before its first forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab

LAZY = {2: (bnlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnlab.BatchNorm1d, (10, 5)),
        3: (bnlab.LazyBatchNorm1d, nn.LazyBatchNorm1d, bnlab.BatchNorm1d, (10, 5, 7)),
        4: (bnlab.LazyBatchNorm2d, nn.LazyBatchNorm2d, bnlab.BatchNorm2d, (6, 5, 4, 3)),
        5: (bnlab.LazyBatchNorm3d, nn.LazyBatchNorm3d, bnlab.BatchNorm3d, (4, 5, 3, 2, 3))}


@pytest.mark.parametrize("rank", sorted(LAZY))
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"bias": False}, {"track_running_stats": False}])
def test_lazy_layer_matches_torchs_and_becomes_the_plain_layer(rank, kwargs) -> None:  # type: ignore[no-untyped-def]
    lazy, torch_lazy, plain, shape = LAZY[rank]
    ours = lazy(dtype=torch.float64, **kwargs)
    ref = torch_lazy(dtype=torch.float64, **kwargs)
    assert ours.num_features == 0 and ours.has_uninitialized_params() == (
        ours.affine or ours.track_running_stats)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1
        xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        yo, yr = ours(xo), ref(xr)
        torch.testing.assert_close(yo, yr)
        gy = torch.randn(shape, generator=g, dtype=torch.float64)
        yo.backward(gy)
        yr.backward(gy)
        torch.testing.assert_close(xo.grad, xr.grad)
    assert type(ours) is plain and ours.num_features == shape[1]
    assert repr(ours).startswith(f"{plain.__name__}({shape[1]},")
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)
    for (k, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p.grad, q.grad, msg=k)
    ours.eval()
    ref.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


def test_a_bad_first_input_names_the_layer_and_materializes_nothing() -> None:
    m = bnlab.LazyBatchNorm2d()
    with pytest.raises(ValueError, match=r"^LazyBatchNorm2d\(uninitialized\): expected 4D "
                       r"\(N, C, H, W\) input, got 2D input of shape \(3, 4\)"):
        m(torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"^LazyBatchNorm2d\(uninitialized\): input must be "
                       r"floating point, got dtype torch.int64"):
        m(torch.ones(2, 3, 2, 2, dtype=torch.long))
    assert type(m) is bnlab.LazyBatchNorm2d and m.has_uninitialized_params()
    m(torch.randn(2, 3, 2, 2))  # a good input still initializes it
    assert type(m) is bnlab.BatchNorm2d and m.num_features == 3


def test_a_state_dict_loaded_first_sets_the_channels() -> None:
    """As torch's lazy modules: a state_dict loaded before the first forward materializes the
    tensors, so the trained values (not γ = 1, β = 0) are used and C comes from them."""
    torch.manual_seed(0)
    src = bnlab.BatchNorm2d(5)
    for _ in range(3):
        src(torch.randn(8, 5, 3, 3) * 2 + 1)
    with torch.no_grad():
        src.weight.uniform_(0.5, 2)
        src.bias.normal_()
    m = bnlab.LazyBatchNorm2d()
    m.load_state_dict(src.state_dict())
    src.eval()
    m.eval()
    x = torch.randn(4, 5, 3, 3)
    torch.testing.assert_close(m(x), src(x))
    assert type(m) is bnlab.BatchNorm2d and m.num_features == 5
    with pytest.raises(ValueError, match=r"expected 5 channels in dimension 1 of the input, "
                       r"got 4"):
        m(torch.randn(4, 4, 3, 3))


def test_optimizer_and_torch_compile_see_the_materialized_layer() -> None:
    """The documented lazy workflow: one dry forward, then the optimizer; and torch.compile of a
    model whose lazy layer is initialized inside the compiled call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), bnlab.LazyBatchNorm2d(), nn.ReLU())
    model(torch.randn(2, 2, 5, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[1].weight.detach().clone()
    model(torch.randn(4, 2, 5, 5)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, before)
    compiled_model = nn.Sequential(nn.Conv2d(2, 4, 3), bnlab.LazyBatchNorm2d())
    eager = nn.Sequential(nn.Conv2d(2, 4, 3), bnlab.LazyBatchNorm2d())
    eager.load_state_dict(compiled_model[0].state_dict(prefix="0."), strict=False)
    x = torch.randn(4, 2, 5, 5)
    torch.testing.assert_close(torch.compile(compiled_model)(x), eager(x))
    assert type(compiled_model[1]) is bnlab.BatchNorm2d


TOOLS = {
    "replace_norm": lambda m: bnlab.replace_norm(m, bnlab.BatchNorm2d),
    "fold": lambda m: bnlab.fold(m.eval()),
    "convert_sync_batchnorm": bnlab.convert_sync_batchnorm,
    "freeze": bnlab.freeze,
    "unfreeze": bnlab.unfreeze,
    "batchnormify": bnlab.batchnormify,
    "population_statistics": lambda m: bnlab.population_statistics(m, [torch.randn(4, 3, 6, 6)]),
}


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("lazy", [bnlab.LazyBatchNorm2d, nn.LazyBatchNorm2d])
def test_model_tools_refuse_an_uninitialized_lazy_layer_by_name(tool, lazy) -> None:  # type: ignore[no-untyped-def]
    """Instead of torch's "Attempted to use an uninitialized parameter" from deep inside a
    deepcopy, or (SyncBN conversion) a layer left local without a word."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), lazy(), nn.ReLU())
    with pytest.raises(ValueError, match=rf"^{tool}: 1 \({lazy.__name__}\) is not initialized "
                       r"yet: run the model once on a batch"):
        TOOLS[tool](model)
    model(torch.randn(2, 3, 6, 6))
    TOOLS[tool](model)  # initialized: works
