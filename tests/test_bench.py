"""`bnlab bench`: the table and JSON it writes, the fused-ReLU modes, and its argument errors.
(Timings themselves are not asserted: they are the benchmark's output, not a test's.)"""

from __future__ import annotations

import json

import pytest

from bnlab.cli import main
from bnlab.kernels import bench


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
    assert "relu_fwd_bwd" in capsys.readouterr().out


@pytest.mark.parametrize("option, value", [("--shapes", "r50-1x1"), ("--modes", "train"),
                                           ("--formats", "nhwc")])
def test_bench_unknown_values_name_the_option_and_the_choices(option, value, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["bench", option, value, "--repeats", "1", "--rounds", "1"]) == 2
    err = capsys.readouterr().err
    assert option in err and repr(value) in err and "choose from" in err
