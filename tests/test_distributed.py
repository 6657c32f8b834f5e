"""SyncBatchNorm across 2 gloo processes equals BN on the concatenated batch; DDP smoke run.

The 2-process part starts `tests/dist_worker.py` twice on 127.0.0.1 (a free port, the
environment torchrun would set), with a hard 120 s deadline after which both are killed; the
workers compare against the single-process oracle themselves and report max errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab import ddp
from bnlab.distributed import (
    SyncBatchNorm,
    SyncBatchNormReLU,
    SyncBatchRenorm,
    SyncNoisyBatchNorm,
    convert_sync_batchnorm,
    register_sync_conversion,
)
from bnlab.variants import BatchRenorm2d, FrozenBatchNorm2d, GhostBatchNorm, NoisyBatchNorm
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
TOL = 1e-6


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    procs, logs = [], []
    try:
        for rank in range(2):
            log = open(out / f"log{rank}.txt", "w")  # noqa: SIM115 (closed in finally)
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(out)], stdout=log, stderr=subprocess.STDOUT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        deadline = time.monotonic() + 120
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail("distributed workers did not finish within 120 s (killed)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, (out / f"log{rank}.txt").read_text()[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


CASES = ["even", "uneven", "one_empty", "empty_first", "single_sample_each",
         "one_value_per_rank", "no_running_stats", "momentum_none", "no_affine",
         "process_group", "singleton_groups", "relu", "no_bias"]


@pytest.mark.parametrize("case", CASES)
def test_sync_bn_equals_bn_on_concatenated_batch(results: list[dict], case: str) -> None:
    for rank, res in enumerate(results):
        errors = res["sync_bn"][case]
        assert set(errors) == {"y", "dx", "dw", "db", "running"}, errors
        assert max(errors.values()) < TOL, (rank, errors)


def test_sync_batch_renorm_equals_renorm_on_concatenated_batch(results: list[dict]) -> None:
    for res in results:
        assert max(res["renorm"].values()) < TOL, res["renorm"]


def test_an_all_empty_global_batch_gives_empty_outputs_and_moves_nothing(
        results: list[dict]) -> None:
    for rank, res in enumerate(results):
        d = res["all_empty"]
        assert d == {"bn_shape_ok": 1.0, "bn_state_moved": 0.0, "bn_grad": 0.0,
                     "renorm_shape_ok": 1.0, "renorm_state_moved": 0.0, "renorm_grad": 0.0,
                     "one_value_refused": 1.0}, (rank, d)


def test_the_labs_cumulative_probe_records_the_global_batch(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        c = res["cumulative"]
        assert c["counts"] == 1.0 and c["mean"] < 1e-5 and c["var"] < 1e-4, (rank, c)


def test_sync_noisy_bn_is_one_process_noisy_bn_noise_included(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        assert res["noisy"].keys() == {"uneven", "empty", "channels_last", "same_batch"}
        assert all(e < TOL for e in res["noisy"].values()), (rank, res["noisy"])


def test_recalibrate_averages_the_global_batches_of_sync_bn(results: list[dict]) -> None:
    """Each rank recorded its own shard's statistics (count 12 of 24; different running
    statistics on each rank, matching neither)."""
    for rank, res in enumerate(results):
        d = dict(res["recalibrate"])
        assert d.pop("uneven_raises") == 1.0, (rank, "one batch fewer on rank 1 must raise")
        assert d.keys() == {"count", "1", "4"} and max(d.values()) < TOL, (rank, d)


def test_ddp_broadcasts_the_buffers_of_layers_that_stay_local(results: list[dict]) -> None:
    """With --sync-bn, a Ghost BN keeps its statistics per rank: without rank 0's broadcast
    the ranks' running statistics drifted apart."""
    for rank, res in enumerate(results):
        d = res["ddp_local"]
        assert d["start_of_step_diff"] == 0.0 and d["moved"] == 1.0, (rank, d)


def test_arguments_are_checked_and_batches_counted_as_in_one_process(
        results: list[dict]) -> None:
    for rank, res in enumerate(results):
        assert res["checks"] == {"eps_refused": 1.0, "renorm_eps_refused": 1.0,
                                 "momentum_refused": 1.0, "untracked_counted": 1.0}, (rank, res)


def test_ddp_helpers_reuse_the_group_and_wrap_what_ddp_takes(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        assert res["ddp_helpers"] == {"reuses_group": 1.0, "frozen_unwrapped": 1.0,
                                      "frozen_rank0_buffers": 1.0, "unused_ok": 1.0}, (rank, res)


def test_eval_mode_does_no_collective(results: list[dict]) -> None:
    for res in results:
        assert res["eval"] == {"eval_calls": 0.0, "train_calls": 1.0}


def test_ddp_sync_bn_two_processes_match_one(results: list[dict]) -> None:
    for rank, res in enumerate(results):
        d = res["ddp"]
        assert d["is_main"] == 1.0
        assert max(d["loss"], d["params"], d["buffers"]) < TOL, (rank, d)


# --- single process: fallback, conversion, helpers ------------------------------------------

def test_sync_bn_without_process_group_is_bn() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    sync, ref = SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm2d(3, dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x))
    torch.testing.assert_close(sync.running_var, ref.running_var)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync(torch.randn(1, 3, dtype=torch.float64))


class _BNAct(nn.BatchNorm2d):
    """A BN fused with an activation (as timm's BatchNormAct2d): must not be downgraded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def test_convert_sync_batchnorm_keeps_variants_and_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), bnlab.BatchNorm2d(3, momentum=None),
                          BatchRenorm2d(3, r_max=2.0), GhostBatchNorm(3, virtual_batch_size=2),
                          FrozenBatchNorm2d(3), _BNAct(3), nn.Conv2d(3, 3, 1))
    for m in model[:3]:
        m.running_mean.uniform_()
    bnlab.freeze(model[1], affine=False)
    weight = model[0].weight
    with pytest.warns(UserWarning, match=r"5 \(_BNAct\)"):
        out = convert_sync_batchnorm(model)
    assert out is model
    kinds = [type(m) for m in model]
    assert kinds == [SyncBatchNorm, SyncBatchNorm, SyncBatchRenorm, GhostBatchNorm,
                     FrozenBatchNorm2d, _BNAct, nn.Conv2d]
    assert model[0].weight is weight  # the same Parameter: optimizers keep working
    assert model[1].momentum is None and model[1].frozen
    assert model[2].r_max == 2.0 and model[2].momentum == 0.01
    assert model[2].running_mean.min() > 0


def test_converting_again_and_the_labs_in_place_conversion_keep_the_modules() -> None:
    """A layer already synchronized (same group) stays the same object, and
    `bnlab.ddp.sync_in_place` converts bnlab's layers by class, so hooks and references that
    the lab's probes took before training still see the layers that run."""
    from bnlab.ddp import sync_in_place

    model = nn.Sequential(bnlab.BatchNorm2d(3), BatchRenorm2d(3), nn.BatchNorm2d(3))
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(type(m)))
    bn, renorm = model[0], model[1]
    assert sync_in_place(model) is model
    assert model[0] is bn and model[1] is renorm and type(model[2]) is SyncBatchNorm
    assert type(bn) is SyncBatchNorm and type(renorm) is SyncBatchRenorm
    assert bn.process_group is None and renorm.r_max == 3.0
    again = [*model]
    convert_sync_batchnorm(model)
    assert all(a is b for a, b in zip(again, model, strict=True))
    model(torch.randn(4, 3, 2, 2))
    assert seen == [SyncBatchNorm]


def test_convert_sync_batchnorm_root_and_registry() -> None:
    bn = nn.BatchNorm1d(4).eval()
    sync = convert_sync_batchnorm(bn)
    assert isinstance(sync, SyncBatchNorm) and not sync.training
    register_sync_conversion(_BNAct, None)  # declared local: no warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert isinstance(convert_sync_batchnorm(_BNAct(2)), _BNAct)
    finally:
        from bnlab import distributed

        distributed._SYNC.pop(_BNAct)


def test_convert_sync_batchnorm_has_torchs_classmethod_spelling() -> None:
    """`nn.SyncBatchNorm.convert_sync_batchnorm(model, pg)` is the idiom: with bnlab's class
    in its place it converts bnlab's and torch's layers alike, passing the group on."""
    group = object()  # stored as given; never used without an initialized process group
    model = nn.Sequential(nn.BatchNorm2d(3), bnlab.BatchNorm2d(3), BatchRenorm2d(3))
    out = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert out is model
    assert [type(m) for m in model] == [SyncBatchNorm, SyncBatchNorm, SyncBatchRenorm]
    assert all(m.process_group is group for m in model)


def test_converted_model_eval_outputs_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    model.train()(torch.randn(8, 2, 6, 6))
    model.eval()
    x = torch.randn(4, 2, 6, 6)
    ref = model(x)
    torch.testing.assert_close(convert_sync_batchnorm(model)(x), ref)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8])
def test_shard_batch_partitions_in_order(n: int) -> None:
    x, y = torch.arange(n * 2.0).view(n, 2), torch.arange(n)
    parts = [ddp.shard_batch(x, y, r, 3) for r in range(3)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), x)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), y)
    sizes = [p[0].shape[0] for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        ddp.shard_batch(x, y, 3, 3)


def test_ddp_helpers_single_process() -> None:
    assert ddp.world() == (0, 1) and ddp.is_main()
    os.environ.pop("WORLD_SIZE", None)
    assert ddp.setup_from_env("cpu")[:2] == (0, 1)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    wrapped = ddp.wrap_ddp(model, sync_bn=True)
    assert isinstance(wrapped[1], SyncBatchNorm)
    loss = torch.tensor(6.0)
    assert float(ddp.global_mean(loss, 3)) == 2.0
    assert ddp.all_reduce_sum(loss) is loss
    ddp.teardown()


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "1"}, r"RANK=1 but WORLD_SIZE is unset"),
    ({"WORLD_SIZE": "1", "LOCAL_RANK": "2"}, r"LOCAL_RANK=2 but WORLD_SIZE is 1"),
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE must be an integer >= 1, got 'two'"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE must be an integer >= 1, got '0'"),
    ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 but RANK is unset"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, r"RANK must be in \[0, 2\) \(WORLD_SIZE=2\), got 5"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK must be an integer >= 0, got '-1'"),
])
def test_setup_from_env_names_a_bad_environment_at_once(env, message, monkeypatch) -> None:
    # a missing or wrong RANK waited out the 300 s timeout, then failed with a network error
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        ddp.setup_from_env("cpu", timeout_s=5)
    assert not dist.is_initialized()


def test_shard_helpers_name_bad_arguments() -> None:
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="x and y must have the same length, got 6 and 4"):
        ddp.shard_batch(x, torch.randn(4), 0, 2)
    with pytest.raises(TypeError, match="x must be a tensor with a batch dimension, got tuple"):
        ddp.shard_batch((x,), None, 0, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shard_range: world_size must be >= 1"):
        ddp.shard_range(5, 0, 0)
    with pytest.raises(ValueError, match="global_batch_size must be >= 1, got 0"):
        ddp.global_mean(torch.tensor(1.0), 0)


def test_conversion_keeps_none_bias_and_none_buffers() -> None:
    """torch 2.13's bias=False BN (γ only) and a BN whose running buffers were deleted (batch
    statistics in eval): the synchronized layer has no β and no buffers either, so checkpoints
    load and outputs stay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3, bias=False), nn.SyncBatchNorm(3, bias=False),
                          nn.BatchNorm2d(3))
    model[2].running_mean = model[2].running_var = None
    state = model.state_dict()
    x = torch.randn(4, 3, 2, 2)
    want = model.eval()(x)
    convert_sync_batchnorm(model)
    assert [type(m) for m in model] == [SyncBatchNorm] * 3
    assert model[0].bias is None and model[1].bias is None and "bias=False" in repr(model[0])
    assert model[2].running_mean is None and model[2].running_var is None
    model.load_state_dict(state)  # strict: the same keys
    torch.testing.assert_close(model(x), want)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "1.weight", "2.weight",
                                                        "2.bias"]


def test_in_place_conversion_keeps_synchronized_layers_and_their_groups() -> None:
    from bnlab.ddp import local_running_stats, sync_in_place

    class MySync(SyncBatchNorm):  # a user's subclass: already synchronized, no warning
        pass

    group = object()  # stored as given; never used without an initialized process group
    model = nn.Sequential(SyncBatchNorm(3, process_group=group), MySync(3),
                          bnlab.BatchNormReLU2d(3), NoisyBatchNorm(3, seed=7),
                          GhostBatchNorm(3), bnlab.variants.LpNorm(3), FrozenBatchNorm2d(3))
    kept = [*model]
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sync_in_place(model)
    assert all(a is b for a, b in zip(kept, model, strict=True))  # same objects, hooks and all
    assert model[0].process_group is group and type(model[1]) is MySync
    assert type(model[2]) is SyncBatchNormReLU and type(model[3]) is SyncNoisyBatchNorm
    assert model[3].noise.seed == 7 and torch.equal(torch.get_rng_state(), rng)
    assert local_running_stats(model) == ["4", "5"]  # ghost and lp keep local statistics


def test_converting_noisy_bn_keeps_its_noise_and_seed() -> None:
    noisy = NoisyBatchNorm(3, seed=11, n_mu=0.2)
    rng = torch.get_rng_state()
    sync = convert_sync_batchnorm(nn.Sequential(noisy))[0]
    assert type(sync) is SyncNoisyBatchNorm and sync.noise is noisy.noise
    assert torch.equal(torch.get_rng_state(), rng)  # no seed drawn from the global generator
    x = torch.randn(8, 3, 2, 2)
    sync.noise.generator.manual_seed(0)
    y = sync(x)
    noisy.noise.generator.manual_seed(0)
    torch.testing.assert_close(y, noisy(x))  # one process: NoisyBatchNorm, noise included
