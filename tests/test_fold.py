"""Folding BN into conv/linear for inference (Alg. 2, step 11): equivalence, structure, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnlab
from bnlab.convert import ChannelAffine, fold, fold_pairs
from bnlab.stats import is_batchnorm


def _train_a_little(model, shape, steps=5):
    for _ in range(steps):
        model(torch.randn(shape) * 2 + 0.5)
    with torch.no_grad():
        for m in model.modules():
            if is_batchnorm(m) and m.affine:
                m.weight.uniform_(0.3, 2.0)
                m.bias.normal_()
    return model.eval()


class SmallCNN(nn.Module):
    """A module graph (not a Sequential): fx finds conv→BN pairs; one BN has no conv before it."""

    def __init__(self, norm2d=bnlab.BatchNorm2d, norm1d=bnlab.BatchNorm1d):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = norm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = norm2d(8)
        self.bn_pool = norm2d(8)  # after pooling: nothing to fold into
        self.deconv = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn3 = norm2d(6)
        self.fc = nn.Linear(6, 10)
        self.bn4 = norm1d(10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.bn_pool(nn.functional.max_pool2d(x, 2))
        x = torch.relu(self.bn3(self.deconv(x)))
        return self.bn4(self.fc(x.mean((2, 3))))


def _max_rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("norms", [(bnlab.BatchNorm2d, bnlab.BatchNorm1d),
                                   (nn.BatchNorm2d, nn.BatchNorm1d)])
def test_fold_small_cnn_graph(norms):
    model = _train_a_little(SmallCNN(*norms), (16, 3, 8, 8))
    assert sorted(fold_pairs(model)) == [("conv1", "bn1"), ("conv2", "bn2"), ("deconv", "bn3"),
                                         ("fc", "bn4")]
    folded = fold(model)
    assert not any(is_batchnorm(m) for m in folded.modules())
    assert isinstance(folded.bn_pool, ChannelAffine) and isinstance(folded.bn1, nn.Identity)
    assert type(folded) is SmallCNN and not folded.training
    x = torch.randn(7, 3, 8, 8)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5
    # the original is untouched
    assert is_batchnorm(model.bn1)


def test_fold_mlp_sequential_with_biasless_linears():
    model = nn.Sequential(
        nn.Linear(20, 30, bias=False), bnlab.BatchNorm1d(30), nn.Sigmoid(),
        nn.Linear(30, 30, bias=False), bnlab.BatchNorm1d(30), nn.Sigmoid(),
        nn.Linear(30, 10),
    )
    model = _train_a_little(model, (32, 20))
    folded = fold(model)
    assert folded[0].bias is not None  # a bias appears where BN's β and mean went
    x = torch.randn(9, 20)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 4, 3), bnlab.BatchNorm1d(4), nn.ReLU())
        self.bn = bnlab.BatchNorm1d(4)

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.bn(self.body(x))


def test_fold_falls_back_to_sequential_when_fx_fails():
    model = _train_a_little(Untraceable(), (8, 2, 9))
    assert fold_pairs(model) == [("body.0", "body.1")]
    with pytest.warns(UserWarning, match=r"cannot trace the model \(TraceError.*assuming that "
                      r"each layer's output feeds only its BN: body.0 -> body.1$"):
        folded = fold(model)
    assert isinstance(folded.body[1], nn.Identity) and isinstance(folded.bn, ChannelAffine)
    x = torch.randn(5, 2, 9)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5


def test_conv_feeding_two_consumers_is_not_folded():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.bn = bnlab.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = _train_a_little(Branch(), (4, 2, 3, 3))
    assert fold_pairs(model) == []
    folded = fold(model)
    x = torch.randn(2, 2, 3, 3)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5


def test_fold_precision_with_tiny_running_var():
    """Folding happens in float64: a tiny running_var (huge scale) stays accurate, and with
    β ≈ μ·s (a large mean that the bias nearly cancels) the folded bias is the float64
    s·(b − μ) + β rounded once (a float32 fold was off by 0.07 here; the float32 model, which
    cancels the same way, could not tell)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4, eps=1e-8)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(1e-6)
        model[1].running_mean.normal_()
    x = torch.randn(2, 3, 6, 6)
    assert _max_rel_err(fold(model)(x), model(x)) <= 1e-5
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(900, 1100)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        s = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        bn.bias.copy_(s * bn.running_mean.double() + torch.rand(4, dtype=torch.float64))
    folded = fold(nn.Sequential(conv, bn))[0]
    want_w = conv.weight.double() * s.view(-1, 1, 1, 1)
    want_b = s * (conv.bias.double() - bn.running_mean.double()) + bn.bias.double()
    assert torch.equal(folded.weight, want_w.float()) and torch.equal(folded.bias, want_b.float())


def test_fold_refuses_without_running_stats():
    model = nn.Sequential(nn.Linear(3, 3), bnlab.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"layer '1' has no running statistics"):
        fold(model)


def test_fold_frozen_batchnorm():
    model = _train_a_little(SmallCNN(), (16, 3, 8, 8))
    frozen = bnlab.replace_norm(model, bnlab.FrozenBatchNorm2d)
    folded = fold(frozen)
    assert not any(isinstance(m, bnlab.FrozenBatchNorm) for m in folded.modules())
    x = torch.randn(3, 3, 8, 8)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5


@pytest.mark.parametrize("cls", [bnlab.BatchNorm2d, bnlab.BatchNormReLU2d, nn.BatchNorm2d])
def test_fold_a_bare_batchnorm_returns_its_affine(cls):  # type: ignore[no-untyped-def]
    """A BN passed as the model itself becomes its ChannelAffine (+ ReLU), as replace_norm
    returns the new module for a bare BN; before, the root was left with a '' child."""
    bn = cls(3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
    folded = fold(bn)
    assert not any(is_batchnorm(m) for m in folded.modules())
    assert not folded.training and bn.training  # a copy, in eval mode; the original untouched
    x = torch.randn(4, 3, 5, 5)
    assert _max_rel_err(folded(x), bn.eval()(x)) <= 1e-5


def _conv_bn(conv: nn.Module) -> nn.Sequential:
    return _train_a_little(nn.Sequential(conv, bnlab.BatchNorm2d(4)), (6, 3, 5, 5))


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda m: nn.utils.parametrizations.weight_norm(m), id="weight_norm"),
    pytest.param(lambda m: nn.utils.parametrizations.spectral_norm(m), id="spectral_norm"),
    pytest.param(lambda m: nn.utils.weight_norm(m), id="weight_norm_hook"),
    pytest.param(lambda m: nn.utils.spectral_norm(m), id="spectral_norm_hook"),
])
@pytest.mark.filterwarnings("ignore:.*is deprecated:FutureWarning")
def test_a_parametrized_weight_is_folded_as_computed(wrap) -> None:
    """The fold scales the weight the layer computes (W = g·v/‖v‖, W/σ), not a tensor that the
    parametrization recomputes from its originals on the next call."""
    model = _conv_bn(wrap(nn.Conv2d(3, 4, 3)))
    x = torch.randn(2, 3, 5, 5)
    want = model(x)
    hooked = not nn.utils.parametrize.is_parametrized(model[0])
    if hooked:  # torch cannot deep-copy these after a forward; fold says what to do instead
        with pytest.raises(RuntimeError, match=r"fold: the model cannot be deep-copied.*inplace"):
            fold(model)
    else:
        folded = fold(model)
        assert isinstance(folded[1], nn.Identity)
        assert _max_rel_err(folded(x), want) <= 1e-5
        torch.testing.assert_close(model(x), want)  # the original still parametrized, intact
    folded = fold(model, inplace=True)
    assert folded is model and isinstance(folded[1], nn.Identity)
    assert _max_rel_err(folded(x), want) <= 1e-5


def test_a_layer_with_another_hook_is_not_folded() -> None:
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_hook(lambda m, args, out: out.clamp(min=-0.5))  # not linear
    model = _conv_bn(conv)
    folded = fold(model)
    assert isinstance(folded[1], ChannelAffine)
    x = torch.randn(2, 3, 5, 5)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5


def test_tied_weights_keep_their_other_users_and_sizes_must_match() -> None:
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
            self.b.weight = self.a.weight  # shared: folding into a must not change b
            self.bn = bnlab.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.b(x)

    model = _train_a_little(Tied(), (6, 3, 5, 5))
    folded = fold(model)
    assert isinstance(folded.bn, nn.Identity)
    x = torch.randn(2, 3, 5, 5)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5
    # A Linear on (N, C, L) maps L, while BN normalizes C: with L != C it is no pair (it was
    # a broadcast error in the fold).
    seq = _train_a_little(nn.Sequential(nn.Linear(6, 6), bnlab.BatchNorm1d(4)), (8, 4, 6))
    folded = fold(seq)
    assert isinstance(folded[1], ChannelAffine)
    x = torch.randn(3, 4, 6)
    assert _max_rel_err(folded(x), seq(x)) <= 1e-5


class _Group:
    """Stands in for a torch.distributed process group: a handle that cannot be deep-copied."""

    def __deepcopy__(self, memo: dict) -> _Group:
        raise TypeError("cannot pickle 'ProcessGroup' object")


@pytest.mark.parametrize("sync", [nn.SyncBatchNorm, bnlab.SyncBatchNorm])
def test_fold_and_batchnormify_copy_a_model_sharing_its_process_group(sync: type) -> None:
    group = _Group()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), sync(4, process_group=group), nn.ReLU(),
                          nn.Conv2d(4, 2, 1), nn.ReLU())
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    folded = fold(model)  # a deep copy: TypeError before
    assert isinstance(folded[1], nn.Identity)
    assert _max_rel_err(folded(x), model(x)) <= 1e-5
    more = bnlab.batchnormify(model)
    assert more[1].process_group is group


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channel_affine_computes_half_input_in_float32(dtype: torch.dtype) -> None:
    # A BN that cannot fold becomes scale·x + shift, which cancels where |E[x]| ≫ √Var[x]:
    # in bfloat16 its error was 15x the BN's own (mean 20, std 0.5).
    torch.manual_seed(0)
    bn = bnlab.BatchNorm2d(8)
    with torch.no_grad():
        bn.running_mean.uniform_(18, 22)
        bn.running_var.uniform_(0.2, 0.3)
        bn.weight.uniform_(0.5, 1.5)
    bn = bn.eval().to(dtype)
    affine = fold(bn)
    x = (bn.running_mean.float().view(1, -1, 1, 1) + 0.5 * torch.randn(16, 8, 4, 4)).to(dtype)
    want = bn.double()(x.double())
    bn_err = (bn.to(dtype)(x).double() - want).abs().max()
    assert (affine(x).double() - want).abs().max() <= 2 * bn_err
    assert affine(x).dtype == dtype


def test_hook_handles_still_remove_the_hooks_after_an_inplace_fold() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Identity(), bnlab.BatchNorm2d(4))
    calls: list[int] = []
    handle = model[2].register_forward_hook(lambda m, a, out: calls.append(1))
    fold(model, inplace=True)
    model(torch.randn(2, 3, 2, 2))
    handle.remove()
    model(torch.randn(2, 3, 2, 2))
    assert calls == [1]
