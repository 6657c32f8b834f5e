"""Building the CPU kernels (`bnlab.kernels._build`): the one-time compile notice, the fallback
to the reference path with one warning when the build fails (the issue's "warn once" rule), and
`bnlab kernels`, which builds ahead of time and says where the binary is."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnlab.kernels import _build

# A layer's forward and backward with a compiler that does not exist: everything must still
# work (reference path), with one RuntimeWarning naming the cause.
_FAILING_BUILD = textwrap.dedent("""
    import json, warnings, torch, bnlab
    from bnlab import kernels
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    ours, ref = bnlab.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            y, y_ref = ours(x), ref(x)
            (gx,) = torch.autograd.grad(y.square().sum(), x)
            (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    print(json.dumps({
        "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
        "where": [w.filename for w in caught if w.category is RuntimeWarning],
        "supports": kernels.supports(x.detach()),
        "y": (y - y_ref).abs().max().item(), "gx": (gx - gx_ref).abs().max().item(),
        "running": (ours.running_var - ref.running_var).abs().max().item(),
    }))
""")


def _env_without_compiler(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    env.pop("BNLAB_FORCE_REFERENCE", None)
    return env


def test_failed_build_warns_once_and_everything_runs_on_the_reference_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = _env_without_compiler(tmp_path)
    out = subprocess.run([sys.executable, "-c", _FAILING_BUILD], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(res["warnings"]) == 1, res["warnings"]  # two forwards, two backwards: one warning
    msg = res["warnings"][0]
    assert "reference path" in msg and "no-such-c++" in msg and "not found" in msg, msg
    assert "-isystem" not in msg  # the compiler's command lines are left out
    assert res["where"] == ["<string>"], res["where"]  # the user's line: this script's ours(x)
    assert not res["supports"]
    assert res["y"] < 1e-5 and res["gx"] < 1e-4 and res["running"] < 1e-6, res
    assert "compiling the CPU batch-norm kernels" in out.stderr  # the notice came first

    cli = subprocess.run([sys.executable, "-m", "bnlab", "kernels"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert cli.returncode == 1, cli.stdout + cli.stderr[-2000:]
    assert "available: False" in cli.stdout and "not found" in cli.stdout, cli.stdout


def test_bnlab_kernels_reports_the_binary() -> None:
    from bnlab.cli import main

    if not _build.load():
        pytest.skip("bnlab CPU kernels could not be built here")
    out = subprocess.run([sys.executable, "-m", "bnlab", "kernels"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert lines["available"].strip() == "True"
    assert Path(lines["binary"].strip()).is_file()
    assert main(["kernels"]) == 0  # in-process too (already loaded)


def test_needs_build_follows_the_binary_and_the_sources(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "a.cpp").write_text("// source\n")
    (csrc / "a.h").write_text("// header\n")
    monkeypatch.setattr(_build, "_CSRC", csrc)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    so = _build._binary()
    assert so is not None and so.is_relative_to(tmp_path / "ext")
    assert _build._needs_build(so)  # nothing built yet
    so.write_bytes(b"")
    t = (csrc / "a.cpp").stat().st_mtime
    os.utime(so, (t + 10, t + 10))
    assert not _build._needs_build(so)  # built after every source
    os.utime(csrc / "a.h", (t + 20, t + 20))
    assert _build._needs_build(so)  # a header changed since: ninja rebuilds


def test_each_checkout_builds_under_its_own_name(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """torch's versioner rebuilds an extension when its build arguments change; they name the
    source directory, so two checkouts sharing one name rebuilt on every switch."""
    here = _build._name()
    assert here == _build._name()  # stable within a checkout
    monkeypatch.setattr(_build, "_CSRC", tmp_path / "other-checkout" / "csrc")
    assert _build._name() != here
    assert _build._name().startswith("bnlab_kernels_")


@pytest.mark.parametrize("needs", [True, False])
def test_compile_notice_only_when_compiling(needs: bool, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(_build, "_state", {})
    monkeypatch.setattr(_build, "_needs_build", lambda so: needs)
    monkeypatch.setattr(_build, "_do_load", lambda: None)
    with caplog.at_level(logging.WARNING, logger="bnlab"):
        assert _build.load()
    notices = [r for r in caplog.records if "compiling" in r.getMessage()]
    assert len(notices) == (1 if needs else 0)


def test_summary_keeps_diagnostics_and_drops_command_lines() -> None:
    cmd = "/usr/bin/c++ -MMD -MF x.o.d " + "-isystem /torch/include " * 20 + "-c x.cpp -o x.o"
    err = (f"RuntimeError: Error building extension 'bnlab_kernels_x': [1/2] {cmd}\n"
           f"FAILED: x.o\n{cmd}\n"
           "x.cpp:3:1: error: 'foo' was not declared in this scope\n"
           f"[2/2] {cmd}\nFAILED: x.o\nninja: build stopped: subcommand failed.\n")
    got = _build._summary(err)
    assert got.startswith("RuntimeError: Error building extension 'bnlab_kernels_x'")
    assert "x.cpp:3:1: error: 'foo' was not declared" in got
    assert got.count("FAILED: x.o") == 1 and "-isystem" not in got
    assert len(_build._summary(err + "y.cpp:1:1: error: " + "z" * 250 + "\n", limit=120)) == 120


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # torch's build lock is a file it deletes when done and waits on without a timeout: one left
    # by a killed first build made every later process hang at its first BN call
    so = tmp_path / "ext" / "bnlab_kernels_x.so"
    so.parent.mkdir()
    (so.parent / "lock").touch()
    with _build._build_lock(so):
        assert not (so.parent / "lock").exists()
        # held: a second process cannot take it (it would wait for this build)
        probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os
            fd = os.open({str(so.parent / "bnlab.lock")!r}, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                print("taken")
            except BlockingIOError:
                print("held")""")], capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == "held", probe.stderr


_LOAD_THEN_COMPILE = """
import torch, bnlab
from bnlab import functional as F
from bnlab.cli import main
assert main(["kernels"]) == 0  # loads through _build.info(), not kernels.available()
bn = bnlab.BatchNorm2d(3)
y = torch.compile(bn, fullgraph=True, backend="aot_eager")(torch.randn(4, 3, 5, 5))
print(F._fast is not None, tuple(y.shape))
"""


def test_loading_through_the_cli_first_still_registers_the_fake_kernels() -> None:
    # available() registered them only on the first load: after `bnlab kernels` in the same
    # process, compiling found no fake kernel ("does not support running with fake tensors")
    if not _build.load():
        pytest.skip("bnlab CPU kernels could not be built here")
    out = subprocess.run([sys.executable, "-c", _LOAD_THEN_COMPILE], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "True (4, 3, 5, 5)"
