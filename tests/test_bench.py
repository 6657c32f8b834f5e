"""`bnlab bench`: the table and JSON it writes, the fused-ReLU modes, and its argument errors.
(Timings themselves are not asserted: they are the benchmark's output, not a test's.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bnlab.cli import main
from bnlab.kernels import ab, bench


def test_bench_writes_every_case_summary_and_machine_info(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench.json"
    modes = bench.MODES + bench.RELU_MODES
    rc = main(["bench", "--shapes", "mlp-60x100", "--modes", ",".join(modes), "--repeats", "1",
               "--rounds", "1", "--threads", "1", "--json", str(out)])
    assert rc == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [r["mode"] for r in rows] == list(modes)  # (N, C) has one layout: nchw only
    for r in rows:
        assert r["dims"] == [60, 100] and r["format"] == "nchw"
        assert r["clone_ms"] > 0 and r["torch"] > 0 and r["bnlab"] > 0
        assert r["speedup"] == pytest.approx(r["torch"] / r["bnlab"])
    assert set(payload["summary"]) == set(modes)
    assert payload["machine"]["threads"] == 1
    assert {"cpu", "cores", "torch", "kernels", "malloc_tuned"} <= set(payload["machine"])
    # what the figures depend on: the build's vector target and the sampling
    assert payload["machine"]["rounds"] == 1 and payload["machine"]["repeats"] == 1
    assert payload["machine"]["kernels_target"] == (os.environ.get("BNLAB_KERNELS_MARCH",
                                                                   "native")
                                                    or "(compiler default)")
    printed = capsys.readouterr().out
    assert "relu_fwd_bwd" in printed
    assert [(t["mode"], t["statistic"]) for t in payload["targets"]] == \
        [(m, st) for m, st, _, _ in bench.TARGETS]
    assert not payload["full_shape_set"] and "only indicative" in printed


def test_targets_compare_each_statistic_with_its_bound() -> None:
    summary = {"train_fwd": {"median_bnlab": 1.6}, "bwd": {"median_bnlab": 2.51},
               "fwd_bwd": {"geomean_speedup": 3.2, "min_speedup": 0.94}}
    got = {(t["mode"], t["statistic"]): (t["met"], t["target"])
           for t in bench.check_targets(summary)}
    assert got == {("train_fwd", "median_bnlab"): (True, "<= 1.6"),  # the bound itself is met
                   ("bwd", "median_bnlab"): (False, "<= 2.5"),
                   ("fwd_bwd", "geomean_speedup"): (True, ">= 3.0"),
                   ("fwd_bwd", "min_speedup"): (False, ">= 0.95")}  # eval was not run


@pytest.mark.parametrize("option, value", [("--shapes", "r50-1x1"), ("--modes", "train"),
                                           ("--formats", "nhwc")])
def test_bench_unknown_values_name_the_option_and_the_choices(option, value, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", option, value, "--repeats", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert option in err and repr(value) in err and "choose from" in err


@pytest.mark.parametrize("args, needle", [
    (["--e2e", "--modes", "eval"], "--modes: apply to the per-shape benchmark, not --e2e"),
    (["--e2e", "--shapes", "nope", "--formats", "nhwc"], "--shapes, --formats: apply"),
    (["--e2e", "--repeats", "3", "--stat", "min"], "--repeats, --stat: apply to the per-shape"),
    (["--e2e-format", "channels_last"], "--e2e-format: only apply with --e2e"),
    (["--e2e-steps", "3"], "--e2e-steps: only apply with --e2e"),
    (["--shapes", "mlp-60x100", "--formats", "channels_last"], "no case (channels_last"),
])
def test_bench_options_that_select_nothing_or_belong_elsewhere_are_refused_before_timing(
        args, needle, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """They were ignored: --e2e ran its nets whatever --modes said, and an empty selection
    printed an empty table and exited 0."""
    from bnlab.kernels import e2e

    def timed(*_a, **_k):  # type: ignore[no-untyped-def]
        raise AssertionError("timed something")
    monkeypatch.setattr(e2e, "run_e2e", timed)
    monkeypatch.setattr(bench, "bench_case", timed)
    assert main(["bench", *args]) == 2
    assert needle in capsys.readouterr().err


def test_e2e_printout_says_which_nets_meet_the_overhead_target(capsys) -> None:  # type: ignore[no-untyped-def]
    from bnlab.kernels import e2e

    def net(bnlab_ms: float) -> dict:  # type: ignore[type-arg]
        steps = {"none": 100.0, "torch_bn": 115.0, "bnlab_bn": bnlab_ms, "bnlab_bn_relu": 104.0}
        over = {f"overhead_{k}{tag}": v / 100.0 - 1.0 for k, v in steps.items() if k != "none"
                for tag in ("", "_min")}
        return {"step_ms": steps, "step_ms_min": steps, **over, "bn_op_ms": {"torch_bn": 14.0},
                "other_op_delta_ms": {"aten::max_pool2d_with_indices": 4.5},
                "page_faults_per_step": {"none": 0.0, "torch_bn": 812.4},
                "phase_ms": {"none": {"forward": 40.0, "backward": 55.0, "update": 5.0},
                             "bnlab_bn": {"forward": 44.5, "backward": 59.0, "update": 5.25}}}

    e2e.print_e2e({"vgg": net(110.0), "inception": net(110.5)})  # +10% exactly is met
    out = capsys.readouterr().out
    assert "at most +10% over no BN (median): vgg met, inception missed" in out
    assert "aten::max_pool2d_with_indices +4.5 ms (4.5%)" in out
    assert "page faults per timed step" in out and "none 0   torch_bn 812" in out
    assert "none 40.0/55.0/5.0   bnlab_bn +4.5/+4.0/+0.2" in out


def test_e2e_counts_the_page_faults_of_fresh_memory() -> None:
    """`_minor_faults` sees pages that are touched for the first time (here a fresh 32 MB
    buffer, which the allocator maps from the OS)."""
    import numpy as np

    from bnlab.kernels import e2e

    before = e2e._minor_faults()
    if before < 0:
        pytest.skip("the OS reports no page faults (no `resource` module)")
    buf = np.empty(8 << 20, dtype=np.float32)
    buf.fill(1.0)
    assert e2e._minor_faults() > before


def test_e2e_other_op_deltas_take_the_least_time_per_op_and_leave_out_bn() -> None:
    """The non-BN ops that grew most, each op's time the least over the profiled steps (a
    busy step does not count), BN's own ops and ops that got faster left out."""
    from bnlab.kernels import e2e

    base = [{"aten::max_pool2d": 10.0, "aten::conv": 50.0, "aten::relu": 1.0},
            {"aten::max_pool2d": 30.0, "aten::conv": 49.0, "aten::relu": 1.0}]
    with_bn = [{"aten::max_pool2d": 40.0, "aten::conv": 48.0, "bnlab::bn_bwd": 9.0,
                "aten::add_": 0.5, "aten::relu": 1.0},
               {"aten::max_pool2d": 12.5, "aten::conv": 60.0, "bnlab::bn_bwd": 8.0,
                "aten::add_": 0.7, "aten::relu": 1.25}]
    got = e2e.other_op_deltas(base, with_bn, top=2)
    assert got == {"aten::max_pool2d": 2.5, "aten::add_": 0.5}
    assert e2e.bn_op_ms(with_bn) == 8.0


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_e2e_step_orders_give_each_net_every_predecessor_equally_often(n) -> None:  # type: ignore[no-untyped-def]
    from collections import Counter
    from itertools import pairwise

    from bnlab.kernels import e2e

    keys = [f"k{i}" for i in range(n)]
    period = n if n % 2 == 0 else 2 * n
    orders = e2e.step_orders(keys, 3 * period)
    assert len(orders) == 3 * period
    assert all(sorted(o) == keys for o in orders)  # every net once per step
    pairs = Counter((a, b) for o in orders[:period] for a, b in pairwise(o))
    want = {(a, b) for a in keys for b in keys if a != b}
    assert set(pairs) == want
    assert len(set(pairs.values())) <= 1  # each ordered pair equally often
    assert orders[period:2 * period] == orders[:period]


@pytest.mark.parametrize("memory_format", ["nchw", "channels_last"])
def test_e2e_nets_train_in_the_asked_memory_format(memory_format: str) -> None:
    """One step of each norm's Inception-style net trains (its weights move) with weights and
    activations in the asked layout; an unknown layout is refused before any timing."""
    from bnlab.kernels import e2e

    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    outs: list[torch.Tensor] = []
    for name, norm in e2e._norms().items():
        model, x = e2e._build(lambda norm=norm: e2e.InceptionNet(norm), 4, (1, 28, 28),
                              memory_format)
        assert x.is_contiguous(memory_format=fmt), name
        outs.clear()
        hook = model.blocks[0].b3.register_forward_hook(lambda m, i, o: outs.append(o))
        before = model.stem[0].weight.detach().clone()
        t0 = time.perf_counter()
        phases = e2e._train_step(model, x)()
        wall = time.perf_counter() - t0
        hook.remove()
        # forward, backward and update, each timed, within the step's own time
        assert len(phases) == 3 and min(phases) > 0.0 and sum(phases) <= wall, name
        # (C = 1 input and stem weight are contiguous in both layouts: these are not)
        assert outs[0].is_contiguous(memory_format=fmt), name
        conv3 = model.blocks[0].b3[1][0].weight  # (48, 24, 3, 3)
        assert conv3.is_contiguous(memory_format=fmt) and not conv3.is_contiguous(
            memory_format=torch.channels_last if fmt == torch.contiguous_format
            else torch.contiguous_format), name
        assert not torch.equal(before, model.stem[0].weight), name
    with pytest.raises(ValueError, match="memory_format must be one of"):
        e2e.run_e2e(1, 1, "nhwc")


def test_ab_renames_every_op_reference_of_the_sources() -> None:
    """The baseline's library must register and look up its ops under its own namespace only,
    or loading it beside bnlab's would clash (or silently time bnlab's ops twice)."""
    csrc = Path(ab.__file__).with_name("csrc")
    for path in csrc.glob("*.cpp"):
        out = ab.rename_namespace(path.read_text())
        assert '"bnlab::' not in out and "(bnlab," not in out, path.name
    text = ab.rename_namespace('TORCH_LIBRARY_IMPL(bnlab, CPU, m) "bnlab::bn_bwd" namespace bnk')
    assert text == 'TORCH_LIBRARY_IMPL(bnlab_ab, CPU, m) "bnlab_ab::bn_bwd" namespace bnk'


@pytest.mark.slow
def test_ab_against_the_same_sources_builds_runs_and_agrees(capsys) -> None:  # type: ignore[no-untyped-def]
    """`python -m bnlab.kernels.ab` with this checkout's own csrc as the baseline: it builds the
    baseline beside the loaded kernels (about a minute the first time), times both, and the
    two compute the same outputs to the bit."""
    from bnlab import kernels

    if not kernels.available():
        pytest.skip("bnlab CPU kernels could not be built here")
    base = str(Path(ab.__file__).with_name("csrc"))
    assert ab.main(["--base", base, "--modes", "train,update,bwd,fwd_bwd", "--shapes", "4x16x7x7",
                    "--formats", "nchw,channels_last", "--rounds", "1", "--repeats", "1",
                    "--threads", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith(("train", "update", "bwd", "fwd_bwd"))]
    assert len(lines) == 8
    assert all(ln.endswith("max diff 0.0e+00") for ln in lines), lines


def test_ab_names_a_bad_base() -> None:  # type: ignore[no-untyped-def]
    from bnlab import kernels

    if not kernels.available():
        pytest.skip("bnlab CPU kernels could not be built here")
    with pytest.raises(SystemExit, match="--base: expected a directory"):
        ab.main(["--base", "no-such-revision-xyz", "--shapes", "4x16x7x7"])


@pytest.mark.parametrize(("args", "option", "got"), [
    (["--rounds", "0"], "--rounds", "got 0"),
    (["--threads", "-2"], "--threads", "got -2"),
    (["--shapes", "32x0x7x7"], "--shapes", "'32x0x7x7'"),
    (["--shapes", "32xabc"], "--shapes", "'32xabc'"),
    (["--shapes", "7"], "--shapes", "'7'"),
    (["--formats", "nhwc"], "--formats", "nhwc"),
])
def test_ab_bad_options_name_the_option_and_value_before_any_build(args, option, got,
                                                                    capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exc:
        ab.main(["--base", "no-such-revision-xyz", *args])
    assert exc.value.code == 2  # argparse's usage error, raised before the baseline's build
    err = capsys.readouterr().err
    assert option in err and got in err, err


@pytest.mark.parametrize("name", ["lab_vgg_b128_32x32", "lab_inception_b32_28x28"])
def test_e2e_lab_nets_are_the_labs_models_with_each_norm_kind(name: str) -> None:
    """`bnlab bench --e2e` times the lab's own nets (the issue's target names them): each kind
    builds the lab's model with that norm after every conv and hidden linear layer (none: no
    norm layer at all), the fused kind drops the ReLUs it fuses, and one step trains."""
    import bnlab
    from bnlab.kernels import e2e
    from bnlab.lab.models import VGG, Inception, e2e_nets

    build, batch, image = e2e_nets()[name]
    counts = {}
    for kind, layer in (("none", None), ("torch_bn", e2e.TorchBatchNorm),
                        ("bnlab_bn", bnlab.BatchNorm), ("bnlab_bn_relu", bnlab.BatchNormReLU)):
        model, x = e2e._build(lambda k=kind: build(k), 4, image)
        assert isinstance(model, VGG if "vgg" in name else Inception)
        norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, bnlab.BatchNorm))]
        assert all(type(m) is layer for m in norms), kind
        relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
        counts[kind] = (len(norms), relus)
        before = [p.detach().clone() for p in model.parameters()]
        e2e._train_step(model, x)()
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), kind
    assert counts["none"][0] == 0 and counts["torch_bn"] == counts["bnlab_bn"]
    n_norms, n_relus = counts["bnlab_bn"]
    assert n_norms > 0 and counts["bnlab_bn_relu"] == (n_norms, n_relus - n_norms)
    assert batch == (128 if "vgg" in name else 32)


def test_torch_batch_norm_of_e2e_takes_any_rank_with_torchs_result() -> None:
    from bnlab.kernels import e2e

    for shape in ((6, 4), (6, 4, 5), (6, 4, 3, 3), (6, 4, 2, 2, 2)):
        x = torch.randn(shape)
        ref = nn.functional.batch_norm(x, None, None, training=True)
        assert torch.allclose(e2e.TorchBatchNorm(4)(x), ref, atol=1e-6)
    with pytest.raises(ValueError, match="expected 2-D to 5-D input, got 1-D"):
        e2e.TorchBatchNorm(4)(torch.randn(4))


def test_cli_bench_e2e_times_the_stand_ins_and_the_labs_nets(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from bnlab.kernels import e2e

    seen: dict[str, object] = {}

    def fake_run(args, e2e_nets=None):  # type: ignore[no-untyped-def]
        seen["nets"] = e2e_nets
        return 0
    monkeypatch.setattr(bench, "run", fake_run)
    assert main(["bench", "--e2e"]) == 0
    assert list(seen["nets"]) == [*e2e.STAND_INS, "lab_vgg_b128_32x32",  # type: ignore[arg-type]
                                  "lab_inception_b32_28x28"]
    assert main(["bench", "--modes", "eval"]) == 0 and seen["nets"] is None


def test_repeated_values_are_timed_once_and_forced_reference_is_recorded(capsys, monkeypatch,
                                                                          tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    timed = []

    def fake_case(shape, fmt, mode, repeats, rounds, stat="median"):  # type: ignore[no-untyped-def]
        timed.append((shape, fmt, mode))
        return {"clone_ms": 1.0, "torch": 2.0, "bnlab": 1.0, "speedup": 2.0}
    monkeypatch.setattr(bench, "bench_case", fake_case)
    monkeypatch.setenv("BNLAB_FORCE_REFERENCE", "1")
    out = tmp_path / "b.json"
    assert main(["bench", "--shapes", "mlp-60x100,mlp-60x100", "--modes", "eval,eval",
                 "--formats", "nchw", "--json", str(out)]) == 0
    assert len(timed) == 1
    assert "BNLAB_FORCE_REFERENCE is on" in capsys.readouterr().err
    assert json.loads(out.read_text())["machine"]["force_reference"] is True


@pytest.mark.parametrize(("kw", "name"), [({"steps": 0}, "steps"), ({"rounds": -1}, "rounds"),
                                          ({"steps": 2.5}, "steps")])
def test_run_e2e_names_a_bad_count_before_building_anything(kw, name) -> None:  # type: ignore[no-untyped-def]
    from bnlab.kernels import e2e

    def never(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("built a net")
    with pytest.raises(ValueError, match=f"run_e2e: {name} must be an integer >= 1"):
        e2e.run_e2e(**kw, nets={"x": (never, 2, 8)})
