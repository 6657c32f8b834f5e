"""bnlab.BatchNorm{1,2,3}d against torch.nn.BatchNorm{1,2,3}d: outputs, buffers, state_dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import bnlab
from bnlab.variants import GhostBatchNorm, LpNorm
from conftest import SHAPES, layer_pair


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_layer_matches_torch(shape, momentum, affine, track):
    ours, ref = layer_pair(len(shape), shape[1], momentum=momentum, affine=affine,
                           track_running_stats=track)
    ours, ref = ours.double(), ref.double()
    for _ in range(4):  # buffers must agree after several steps
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        torch.testing.assert_close(ours(x), ref(x))
    if track:
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 4
    ours.eval()
    ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("cls", [bnlab.BatchNorm2d, bnlab.SyncBatchNorm,
                                 bnlab.BatchNormReLU2d])
def test_flag_and_buffers_changed_after_construction_follow_torch(cls):
    """torch decides eval from the buffers (batch statistics only where they are None) and
    updates from the flag: turning track_running_stats off on a trained layer, a fine-tuning
    idiom, stops the updates and keeps eval on the running statistics."""
    ours, ref = cls(3), torch.nn.BatchNorm2d(3)
    relu = torch.relu if cls is bnlab.BatchNormReLU2d else (lambda y: y)
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    ours(x), ref(x)
    ours.track_running_stats = ref.track_running_stats = False
    x = torch.randn(6, 3, 4, 4) * 5
    torch.testing.assert_close(ours(x), relu(ref(x)))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert ours.num_batches_tracked == ref.num_batches_tracked == 1
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), relu(ref(x)))
    for m in (ours, ref):  # no buffers, flag on: batch statistics in eval and in training
        m.running_mean = m.running_var = None
        m.track_running_stats = True
    for mode in (False, True):
        ours.train(mode), ref.train(mode)
        torch.testing.assert_close(ours(x), relu(ref(x)))


@pytest.mark.parametrize("cls", [bnlab.BatchNorm2d, bnlab.BatchNormReLU2d, bnlab.SyncBatchNorm,
                                 GhostBatchNorm])
def test_buffers_set_to_none_by_hand_behave_as_in_torch(cls) -> None:
    """Both running statistics None: batch statistics, and torch still counts the batches.
    One of them None: torch refuses it (ours trained silently on batch statistics)."""
    ours, ref = cls(3), torch.nn.BatchNorm2d(3)
    for m in (ours, ref):
        m.running_mean = m.running_var = None
    for _ in range(3):
        ours(torch.randn(6, 3, 4, 4))
        ref(torch.randn(6, 3, 4, 4))
    ours.eval()(torch.randn(6, 3, 4, 4))  # eval counts nothing
    assert ours.num_batches_tracked == ref.num_batches_tracked == 3
    ours.reset_running_stats()  # resets what exists (torch's raises an AttributeError)
    assert ours.num_batches_tracked == 0
    ours, ref = cls(3), torch.nn.BatchNorm2d(3)
    ours.running_var = ref.running_var = None
    with pytest.raises(ValueError, match="both be None or neither"):
        ref(torch.randn(6, 3, 4, 4))
    for mode in (True, False):
        with pytest.raises(ValueError, match=r"\(3\): running_mean and running_var must both be "
                           r"None or neither, got running_var None only"):
            ours.train(mode)(torch.randn(6, 3, 4, 4))


def test_a_one_element_step_counter_of_any_shape_averages_as_in_torch() -> None:
    """momentum=None divides by the counter: torch's float(n) takes a (1,) tensor too."""
    ours, ref = bnlab.BatchNorm2d(3, momentum=None), torch.nn.BatchNorm2d(3, momentum=None)
    ours.num_batches_tracked, ref.num_batches_tracked = torch.tensor([5]), torch.tensor([5])
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert ours.num_batches_tracked.tolist() == ref.num_batches_tracked.tolist() == [6]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls", [bnlab.BatchNorm2d, bnlab.BatchNormReLU2d, LpNorm])
def test_a_deleted_step_counter_trains_on_as_in_torch(cls, momentum) -> None:
    """torch's BN with num_batches_tracked set to None trains without counting (momentum=None
    then averages with a factor of 0: the running statistics stay); ours did the same until an
    AttributeError at the count."""
    ours, ref = cls(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    ours.num_batches_tracked = ref.num_batches_tracked = None
    for _ in range(2):
        x = torch.randn(6, 3, 4, 4) * 2 + 1
        y, y_ref = ours(x), ref(x)
    if cls is not LpNorm:  # (LpNorm's statistics are its own; it only has to train on)
        relu = torch.relu if cls is bnlab.BatchNormReLU2d else (lambda y: y)
        torch.testing.assert_close(y, relu(y_ref))
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked is None


def test_torch_state_dict_loads_and_matches_in_train_and_eval():
    ref = torch.nn.BatchNorm2d(5)
    x = torch.randn(8, 5, 6, 6) * 3 + 1
    for _ in range(3):
        ref(torch.randn(8, 5, 6, 6) * 2)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.normal_()
    ours = bnlab.BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())  # strict: same keys
    assert list(ours.state_dict()) == list(ref.state_dict())
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    # and back: ours into torch
    ref2 = torch.nn.BatchNorm2d(5)
    ref2.load_state_dict(ours.state_dict())


def test_old_checkpoint_without_num_batches_tracked_loads():
    ours = bnlab.BatchNorm1d(3)
    sd = {k: v for k, v in ours.state_dict().items() if k != "num_batches_tracked"}
    ours.load_state_dict(sd, strict=False)
    from collections import OrderedDict

    sd = OrderedDict(sd)
    sd._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    ours.load_state_dict(sd)  # strict, version 1: num_batches_tracked defaults to 0
    assert ours.num_batches_tracked.item() == 0
    # A layer that has counted batches keeps its count, as torch's does
    ref = torch.nn.BatchNorm1d(3)
    for _ in range(5):
        x = torch.randn(4, 3)
        ours(x), ref(x)
    ours.load_state_dict(sd)
    ref.load_state_dict(sd)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 5


def test_repr_matches_torch():
    assert repr(bnlab.BatchNorm2d(4, momentum=None)).split("(", 1)[1] == \
        repr(torch.nn.BatchNorm2d(4, momentum=None)).split("(", 1)[1]


def test_channels_last_module():
    ours, ref = layer_pair(4, 3)
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_bfloat16_module_parameters():
    ours, ref = layer_pair(4, 3)
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x).float(), ref(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: bnlab.BatchNorm2d(0), "num_features must be an integer >= 1, got 0"),
        (lambda: bnlab.BatchNorm2d(3, eps=-1e-5), "eps must be a finite number >= 0, got"),
        (lambda: bnlab.BatchNorm2d(3, eps=float("nan")), "eps must be a finite number >= 0"),
        (lambda: bnlab.BatchNorm2d(3, momentum=1.5), r"momentum must be in \[0, 1\].*got 1.5"),
        (lambda: bnlab.BatchNorm2d(3, momentum=-0.1), "momentum must be in"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_eps_zero_builds_and_evaluates_and_refuses_to_train_as_torch():
    x = torch.randn(6, 3, 4, 4)
    ours, ref = bnlab.BatchNorm2d(3, eps=0.0), torch.nn.BatchNorm2d(3, eps=0.0)
    with torch.no_grad():
        ref.running_var.uniform_(0.5, 2.0)
        ours.running_var.copy_(ref.running_var)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0 when training, "
                       r"got 0.0"):
        ours.train()(x)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0, got -1.0"):
        bnlab.functional.batch_norm(x, ours.running_mean, ours.running_var, eps=-1.0)
    y = bnlab.functional.batch_norm(x, ref.running_mean, ref.running_var, eps=0.0)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(
        x, ref.running_mean, ref.running_var, eps=0.0))


def test_numpy_sizes_and_tensor_momenta_are_taken_as_torch_takes_them():
    layer = bnlab.BatchNorm1d(np.int64(3), momentum=torch.tensor(0.25))
    assert type(layer.num_features) is int and layer.momentum == 0.25
    ref = torch.nn.BatchNorm1d(3, momentum=0.25)
    x = torch.randn(8, 3)
    layer(x), ref(x)
    torch.testing.assert_close(layer.running_mean, ref.running_mean)


def test_grad_over_functional_call_with_state_dict_buffers():
    from torch.func import functional_call, grad

    for make in (bnlab.BatchNorm1d, torch.nn.BatchNorm1d):  # MAML-style: torch's works
        m = make(3)
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = {k: v.clone() for k, v in m.state_dict().items() if k not in params}
        x = torch.randn(8, 3)
        g = grad(lambda p, b, m=m, x=x: functional_call(m, (p, b), (x,)).pow(3).sum())(
            params, buffers)
        assert set(g) == {"weight", "bias"} and bool(torch.isfinite(g["weight"]).all())


@pytest.mark.parametrize(
    ("layer", "x", "exc", "match"),
    [
        (bnlab.BatchNorm2d(3), torch.randn(2, 3, 4), ValueError,
         r"BatchNorm2d\(3\): expected 4D \(N, C, H, W\) input, got 3D"),
        (bnlab.BatchNorm1d(3), torch.randn(2, 3, 4, 4), ValueError, "expected 2D .* or 3D"),
        (bnlab.BatchNorm2d(3), torch.randn(2, 4, 5, 5), ValueError,
         "expected 3 channels in dimension 1 of the input, got 4"),
        (bnlab.BatchNorm2d(3), torch.ones(2, 3, 4, 4, dtype=torch.long), TypeError,
         "must be floating point, got dtype torch.int64"),
        (bnlab.BatchNorm1d(3), torch.randn(1, 3), ValueError,
         r"expected more than 1 value per channel when training, got input of shape \(1, 3\)"),
        (bnlab.BatchNorm2d(3), torch.randn(1, 3, 1, 1), ValueError, "more than 1 value"),
        (bnlab.BatchNorm3d(2), torch.randn(2, 2, 3, 3), ValueError, "expected 5D"),
    ],
)
def test_forward_errors(layer, x, exc, match):
    with pytest.raises(exc, match=match):
        layer(x)


def test_single_value_per_channel_is_fine_in_eval():
    bn = bnlab.BatchNorm2d(3).eval()
    assert bn(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_functional_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\).*got \(4,\)"):
        bnlab.functional.batch_norm(x, None, None, torch.ones(4), training=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        bnlab.functional.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="momentum must be"):
        bnlab.functional.batch_norm(x, None, None, training=True, momentum=2.0)
    # (A meta-device weight with a CPU input used to run on whatever the kernel read.)
    with pytest.raises(ValueError, match=r"weight must be on the input's device \(cpu\), got meta"):
        bnlab.functional.batch_norm(x, None, None, torch.ones(3, device="meta"), training=True)
    with pytest.raises(ValueError, match=r"running_var must be on the input's device"):
        bnlab.functional.batch_norm(x, torch.zeros(3), torch.ones(3, device="meta"))


def test_affine_without_bias_matches_torch():
    ours, ref = layer_pair(4, 3, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(ours(x), ref(x))


def test_cumulative_average_is_exact_in_float64() -> None:
    """momentum=None in a float64 layer: 1/n in the buffers' dtype, as exact as torch's (a
    float32 1/n put the average 1e-8 off)."""
    torch.manual_seed(0)
    ours = bnlab.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    for _ in range(7):
        x = torch.randn(5, 3, dtype=torch.float64) * 3 + 1 / 3
        ours(x), ref(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("cls", [bnlab.BatchNorm1d, LpNorm])
def test_cumulative_average_keeps_moving_in_float16_past_65504_batches(cls) -> None:
    """momentum=None in a float16 layer: n + 1 in float16 is inf from 65504 on, and the factor
    1/(n + 1) was 0 (the statistics stopped); torch computes it in double."""
    ours, ref = cls(2, momentum=None).half(), torch.nn.BatchNorm1d(2, momentum=None).half()
    x = torch.tensor([[100.0, 200.0], [300.0, 400.0]], dtype=torch.half)
    for m in (ours, ref):
        m.num_batches_tracked.fill_(70000)
        m(x)
    assert ours.running_mean.gt(0).all()
    if cls is bnlab.BatchNorm1d:
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=0)


LAYOUTS = {  # input layouts whose output strides torch decides (suggest_memory_format)
    "permuted": (4, lambda: torch.randn(2, 6, 5, 7).permute(0, 2, 1, 3)),
    "channels_last": (4, lambda: torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last)),
    "nhwc_swapped": (4, lambda: torch.randn(2, 7, 6, 5).permute(0, 3, 2, 1)),
    "transposed_2d": (2, lambda: torch.randn(5, 8).t()),
    "nlc_transposed": (3, lambda: torch.randn(4, 7, 5).transpose(1, 2)),
    "channels_last_3d": (5, lambda: torch.randn(2, 5, 3, 4, 6).to(
        memory_format=torch.channels_last_3d)),
}


@pytest.mark.parametrize("force", ["0", "1"], ids=["kernels", "reference"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_output_strides_are_torchs(layout: str, train: bool, force: str, monkeypatch) -> None:
    """Contiguous output but for channels_last 4-D/5-D input, as torch's: a BN1d on
    x.transpose(1, 2) returned the transposed layout, and a following .view() failed."""
    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", force)
    rank, make = LAYOUTS[layout]
    cls = {2: (torch.nn.BatchNorm1d, bnlab.BatchNorm1d), 3: (torch.nn.BatchNorm1d,
           bnlab.BatchNorm1d), 4: (torch.nn.BatchNorm2d, bnlab.BatchNorm2d),
           5: (torch.nn.BatchNorm3d, bnlab.BatchNorm3d)}[rank]
    x = make()
    ref, ours = cls[0](5).train(train), cls[1](5).train(train)
    y_ref, y = ref(x), ours(x)
    assert y.stride() == y_ref.stride()
    torch.testing.assert_close(y, y_ref)
    if y_ref.is_contiguous():
        y.view(y.shape[0], -1)


@pytest.mark.parametrize("force", ["0", "1"], ids=["kernels", "reference"])
def test_an_hwc_images_channels_last_view_stays_channels_last(force: str, monkeypatch) -> None:
    # permute(2, 0, 1).unsqueeze(0) of an (H, W, C) image is channels_last with an odd size-1
    # batch stride, which suggest_memory_format does not take: the reference path returned
    # NCHW (torch's BN and the kernels, channels_last)
    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", force)
    x = torch.randn(8, 6, 3).permute(2, 0, 1).unsqueeze(0)
    for dtype in (torch.float32, torch.float64):
        y = bnlab.BatchNorm2d(3, dtype=dtype)(x.to(dtype))
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.nn.BatchNorm2d(3, dtype=dtype)(x.to(dtype)).is_contiguous(
            memory_format=torch.channels_last)


@pytest.mark.parametrize("force", ["0", "1"], ids=["kernels", "reference"])
@pytest.mark.parametrize("momentum", [0.1, 0.0])
def test_an_infinite_running_variance_stays_infinite_as_torchs(force: str, momentum,
                                                               monkeypatch) -> None:
    # r + w·(s − r) is NaN at r = inf (momentum 0 included); torch's (1 − w)·r + w·s keeps inf,
    # so eval gives β there, not NaN. (A float16 running_var overflows so: variance > 65504.)
    # (momentum=None's first factor is 1: 0·inf is NaN in torch's formula too.)
    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", force)
    ours, ref = bnlab.BatchNorm2d(2, momentum=momentum), torch.nn.BatchNorm2d(2, momentum=momentum)
    for m in (ours, ref):
        m.running_var[1] = float("inf")
    x = torch.randn(4, 2, 3, 3)
    for _ in range(2):
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.running_var[1].isinf()
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))
