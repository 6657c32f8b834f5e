"""One of the gloo processes started by tests/test_distributed.py (not collected by pytest).

Environment as torchrun sets it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
Every rank rebuilds the same global data from a seed, runs its shard through bnlab's
SyncBatchNorm / DDP, compares with the single-process oracle on the concatenated batch and
writes the largest absolute errors to OUT_DIR/rank{r}.json. Usage: dist_worker.py OUT_DIR.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import bnlab
from bnlab import BatchNorm1d, BatchNorm2d, ddp
from bnlab.distributed import (
    SyncBatchNorm,
    SyncBatchNormReLU,
    SyncBatchRenorm,
    SyncNoisyBatchNorm,
    convert_sync_batchnorm,
)
from bnlab.variants import BatchRenorm2d, GhostBatchNorm, NoisyBatchNorm, noise_rows

F64 = torch.float64
C = 3


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def shard(t: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def init_affine(*mods: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    w, b = torch.rand(C, generator=g, dtype=F64) + 0.5, torch.randn(C, generator=g, dtype=F64)
    for m in mods:
        if m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(w)
                m.bias.copy_(b)


def compare(sync: nn.Module, ref: nn.Module, sizes: tuple[int, ...], rank: int,
            steps: int = 2, reduce: bool = True,
            spatial: tuple[int, ...] = (4, 5)) -> dict[str, float]:
    """`steps` training steps of `sync` on this rank's shard vs `ref` on the whole batch."""
    out = {"y": 0.0, "dx": 0.0, "dw": 0.0, "db": 0.0, "running": 0.0}
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(sum(sizes), C, *spatial, generator=g, dtype=F64) * 3 + 7
        gy = torch.randn(x.shape, generator=g, dtype=F64)
        xr = x.clone().requires_grad_(True)
        yr = ref(xr)
        yr.backward(gy)
        xs = shard(x, sizes, rank).clone().requires_grad_(True)
        ys = sync(xs)
        ys.backward(shard(gy, sizes, rank))
        out["y"] = max(out["y"], err(ys, shard(yr, sizes, rank)))
        out["dx"] = max(out["dx"], err(xs.grad, shard(xr.grad, sizes, rank)))
        for name in ("weight", "bias"):
            if getattr(sync, name) is None:
                continue
            grad = getattr(sync, name).grad.clone()
            if reduce:  # each rank holds its share; DDP would sum them
                dist.all_reduce(grad)
            key = "d" + name[0]
            out[key] = max(out[key], err(grad, getattr(ref, name).grad))
            for m in (sync, ref):
                getattr(m, name).grad = None
    if ref.running_mean is not None:
        out["running"] = max(err(sync.running_mean, ref.running_mean),
                             err(sync.running_var, ref.running_var),
                             float(sync.num_batches_tracked != ref.num_batches_tracked))
    return out


def sync_bn_cases(rank: int) -> dict[str, dict[str, float]]:
    res = {}
    for name, sizes, kw in [("even", (4, 4), {}), ("uneven", (5, 2), {}),
                            ("one_empty", (6, 0), {}), ("empty_first", (0, 5), {}),
                            ("single_sample_each", (1, 1), {}),
                            ("no_running_stats", (5, 2), {"track_running_stats": False}),
                            ("momentum_none", (3, 6), {"momentum": None}),
                            ("no_affine", (2, 5), {"affine": False})]:
        sync = SyncBatchNorm(C, dtype=F64, **kw)
        ref = nn.BatchNorm2d(C, dtype=F64, **kw)
        init_affine(sync, ref)
        res[name] = compare(sync, ref, sizes, rank)
    # BN + ReLU (bnlab.BatchNormReLU's synchronized form), and BN without β (torch's bias=False).
    sync, ref = SyncBatchNormReLU(C, dtype=F64), _BNReLU(C, dtype=F64)
    init_affine(sync, ref)
    res["relu"] = compare(sync, ref, (3, 4), rank)
    sync, ref = SyncBatchNorm(C, dtype=F64, bias=False), nn.BatchNorm2d(C, dtype=F64, bias=False)
    with torch.no_grad():
        sync.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        ref.weight.copy_(sync.weight)
    res["no_bias"] = compare(sync, ref, (4, 3), rank)
    # One value per channel on each rank: local BN would refuse, the global batch has two.
    sync, ref = SyncBatchNorm(C, dtype=F64), nn.BatchNorm1d(C, dtype=F64)
    init_affine(sync, ref)
    res["one_value_per_rank"] = compare(sync, ref, (1, 1), rank, spatial=())
    # A process group that is not the default one (all ranks, created explicitly).
    group = dist.new_group([0, 1])
    sync, ref = SyncBatchNorm(C, dtype=F64, process_group=group), nn.BatchNorm2d(C, dtype=F64)
    init_affine(sync, ref)
    res["process_group"] = compare(sync, ref, (3, 4), rank)
    # One group per rank: each rank is its own world, so SyncBN is BN on the local shard.
    singles = [dist.new_group([r]) for r in range(2)]
    sync, ref = SyncBatchNorm(C, dtype=F64, process_group=singles[rank]), BatchNorm2d(C, dtype=F64)
    init_affine(sync, ref)
    res["singleton_groups"] = compare(sync, ref, (4,), 0, reduce=False)
    return res


class _BNReLU(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def noisy_case(rank: int) -> dict[str, float]:
    """SyncNoisyBatchNorm equals one process's NoisyBatchNorm on the global batch, noise
    included, over three steps (the ranks' generators stay equal): uneven shards, an empty
    shard, channels_last input; and the same whole batch on every rank inside noise_rows()."""
    out = {}
    for name, sizes, fmt in (("uneven", (3, 4), torch.contiguous_format),
                             ("empty", (0, 7), torch.contiguous_format),
                             ("channels_last", (4, 3), torch.channels_last)):
        sync = SyncNoisyBatchNorm(C, dtype=F64, seed=5)
        ref = NoisyBatchNorm(C, dtype=F64, seed=5)
        g = torch.Generator().manual_seed(4)
        worst = 0.0
        for _ in range(3):
            x = (torch.randn(7, C, 4, 5, generator=g, dtype=F64) * 2 + 3).contiguous(
                memory_format=fmt)
            y = sync(shard(x, sizes, rank))
            worst = max(worst, err(y, shard(ref(x), sizes, rank)))
        out[name] = max(worst, err(sync.running_mean, ref.running_mean),
                        err(sync.running_var, ref.running_var))
    # Every rank on the same whole batch (a probe), which noise_rows() says: one process's noise
    # (the global statistics of two copies of a batch are its own).
    sync = SyncNoisyBatchNorm(C, dtype=F64, seed=5)
    ref = NoisyBatchNorm(C, dtype=F64, seed=5)
    x = torch.randn(6, C, 4, 5, generator=torch.Generator().manual_seed(8), dtype=F64)
    with noise_rows():
        y = sync(x)
    out["same_batch"] = err(y, ref(x))
    return out


def cumulative_probe_case(rank: int) -> dict[str, float]:
    """The lab's CumulativeBatchStats (ioffe2015.alg2) on a synchronized layer records the
    global batch's statistics, as one process's probe on the concatenated batch."""
    from bnlab.lab.probes import CumulativeBatchStats

    sync, ref = nn.Sequential(SyncBatchNorm(C)), nn.Sequential(BatchNorm2d(C))
    got, want = CumulativeBatchStats(sync), CumulativeBatchStats(ref)
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        x = torch.randn(7, C, 4, 5, generator=g) * 2 + 3
        sync(shard(x, (3, 4), rank))
        ref(x)
    return {"mean": err(got.sums["0"][0], want.sums["0"][0]),
            "var": err(got.sums["0"][1], want.sums["0"][1]),
            "counts": float(got.count["0"] == want.count["0"] == 3)}


def ddp_local_layer(rank: int, world: int) -> dict[str, float]:
    """DDP with sync_bn and a layer that stays local (Ghost BN): rank 0's running statistics
    are broadcast at every forward, so every rank starts each step from the same buffers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), GhostBatchNorm(4, virtual_batch_size=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(F64)
    par = ddp.wrap_ddp(model, sync_bn=True)
    seen: list[torch.Tensor] = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append(m.running_mean.clone()))
    opt = torch.optim.SGD(par.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)  # each rank its own data: local statistics differ
    for _ in range(3):
        x, y = torch.randn(4, 1, 8, 8, generator=g, dtype=F64), torch.randint(3, (4,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(par(x), y).backward()
        opt.step()
    both = [torch.empty(3 * 4, dtype=F64) for _ in range(world)]
    dist.all_gather(both, torch.cat(seen))
    return {"start_of_step_diff": err(both[0], both[1]),
            "moved": float(seen[-1].abs().max() > 0)}


def renorm_case(rank: int) -> dict[str, float]:
    kw = {"r_max": 1.5, "d_max": 0.5, "warmup_steps": 0, "r_max_steps": 0, "d_max_steps": 0}
    sync, ref = SyncBatchRenorm(C, dtype=F64, **kw), BatchRenorm2d(C, dtype=F64, **kw)
    init_affine(sync, ref)
    for m in (sync, ref):  # moving statistics far enough from the batch's for r, d to clip
        m.running_mean.fill_(6.0)
        m.running_var.fill_(4.0)
    return compare(sync, ref, (5, 2), rank, steps=3)


def all_empty_case(rank: int) -> dict[str, float]:
    """Every shard empty: empty outputs, zero gradients, no buffer or counter moves; and a global
    batch of one value per channel (1 + 0 samples) is refused on every rank, after the collective
    (so no rank hangs)."""
    out = {}
    for name, cls in (("bn", SyncBatchNorm), ("renorm", SyncBatchRenorm)):
        sync = cls(C, dtype=F64)
        init_affine(sync)
        before = {k: v.clone() for k, v in sync.state_dict().items()}
        x = torch.randn(0, C, 4, 5, dtype=F64, requires_grad=True)
        y = sync(x)
        y.sum().backward()
        out[f"{name}_shape_ok"] = float(y.shape == x.shape and x.grad.shape == x.shape)
        out[f"{name}_state_moved"] = max(err(v, before[k].to(v.dtype))
                                         for k, v in sync.state_dict().items())
        out[f"{name}_grad"] = max(float(sync.weight.grad.abs().max()),
                                  float(sync.bias.grad.abs().max()))
    try:
        SyncBatchNorm(C, dtype=F64)(torch.randn((1, 0)[rank], C, dtype=F64))
        out["one_value_refused"] = 0.0
    except ValueError as e:
        out["one_value_refused"] = float("more than 1 value per channel" in str(e))
    return out


def checks_and_counts_case(rank: int) -> dict[str, float]:
    """The training path across ranks checks the layer's arguments as one process does (eps = 0
    gave NaN on a constant channel, momentum 1.5 extrapolated), before any collective; and a
    layer whose buffers were set to None counts the global batch on a rank with an empty shard
    (its num_batches_tracked stayed behind: the ranks' buffers differed)."""
    out = {}
    x = torch.randn(4, C, 2, 2, dtype=F64)
    for name, make in (("eps", lambda: SyncBatchNorm(C, eps=0.0, dtype=F64)),
                       ("renorm_eps", lambda: SyncBatchRenorm(C, eps=0.0, dtype=F64)),
                       ("momentum", lambda: SyncBatchNorm(C, momentum=0.5, dtype=F64))):
        m = make()
        m.momentum = 1.5 if name == "momentum" else m.momentum
        try:
            m(x)
            out[f"{name}_refused"] = 0.0
        except ValueError as e:
            out[f"{name}_refused"] = float(("eps must be" if "eps" in name else "momentum must")
                                           in str(e))
    untracked = SyncBatchNorm(C, dtype=F64)
    untracked.running_mean = untracked.running_var = None
    untracked(x if rank == 0 else x[:0])
    out["untracked_counted"] = float(untracked.num_batches_tracked)
    return out


def ddp_helpers_case(rank: int) -> dict[str, float]:
    """setup_from_env uses a group that exists (without WORLD_SIZE it answered "rank 0 of 1"
    on every rank); wrap_ddp passes DDP's options on, and leaves a model with nothing to
    train unwrapped (DDP refuses one) with rank 0's buffers."""
    saved = os.environ.pop("WORLD_SIZE")
    try:
        reuses = ddp.setup_from_env("cpu")[:2] == (rank, 2)
    finally:
        os.environ["WORLD_SIZE"] = saved
    frozen = nn.Sequential(bnlab.variants.FrozenBatchNorm1d(C))
    frozen[0].running_mean.fill_(float(rank + 1))
    same = ddp.wrap_ddp(frozen)
    unused = nn.ModuleDict({"used": nn.Linear(C, 1), "unused": nn.Linear(C, 1)})
    unused.forward = lambda x: unused["used"](x)  # type: ignore[method-assign]
    par = ddp.wrap_ddp(unused, find_unused_parameters=True)
    for _ in range(2):  # without find_unused_parameters the second step raises
        par(torch.randn(3, C)).sum().backward()
    return {"reuses_group": float(reuses), "frozen_unwrapped": float(same is frozen),
            "frozen_rank0_buffers": float(frozen[0].running_mean.eq(1.0).all()),
            "unused_ok": 1.0}


def eval_has_no_collective(rank: int) -> dict[str, float]:
    calls = {"n": 0}
    names = ("all_gather_single", "all_gather_into_tensor", "all_reduce")
    real = {n: getattr(dist, n) for n in names if hasattr(dist, n)}

    def counting(fn):
        def wrapped(*a, **k):
            calls["n"] += 1
            return fn(*a, **k)
        return wrapped

    for n, f in real.items():
        setattr(dist, n, counting(f))
    try:
        bn = SyncBatchNorm(C, dtype=F64).eval()
        if rank == 0:  # only one rank: a collective here would hang the test
            bn(torch.randn(4, C, 2, 2, dtype=F64))
        eval_calls = calls["n"]
        bn.train()(torch.randn(4, C, 2, 2, dtype=F64))  # both ranks: must communicate
        train_calls = calls["n"] - eval_calls
    finally:
        for n, f in real.items():
            setattr(dist, n, f)
    return {"eval_calls": float(eval_calls), "train_calls": float(train_calls)}


def ddp_smoke(rank: int, world: int) -> dict[str, float]:
    """3 SGD steps: DDP + SyncBN on shards vs one process on the global batch of 7."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 5, bias=False),
                          nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    ref = copy.deepcopy(model)
    par = ddp.wrap_ddp(copy.deepcopy(model), sync_bn=True)
    opt = torch.optim.SGD(par.parameters(), lr=0.2, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    out = {"loss": 0.0, "params": 0.0, "buffers": 0.0}
    n = 7
    for _ in range(3):
        x, y = torch.randn(n, 1, 8, 8, generator=g, dtype=F64), torch.randint(3, (n,), generator=g)
        xs, ys = ddp.shard_batch(x, y, rank, world)
        loss_sum = nn.functional.cross_entropy(par(xs), ys, reduction="sum")
        opt.zero_grad()
        ddp.global_mean(loss_sum, n).backward()
        opt.step()
        metric = ddp.all_reduce_sum(loss_sum.detach()) / n
        ref_loss = nn.functional.cross_entropy(ref(x), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        out["loss"] = max(out["loss"], abs(float(metric - ref_loss.detach())))
    assert ddp.unwrap(par) is par.module and ddp.unwrap(ref) is ref
    ours, theirs = par.module.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys(), (ours.keys(), theirs.keys())
    params = dict(ref.named_parameters())
    for k, v in ours.items():
        kind = "params" if k in params else "buffers"
        out[kind] = max(out[kind], err(v.double(), theirs[k].double()))
    out["is_main"] = float(ddp.is_main() == (rank == 0))
    return out


def recalibrate_case(rank: int) -> dict[str, float]:
    """Alg. 2 over SyncBN's global batches: each rank feeds its shard (uneven: 5 + 3 of 8), and
    every rank must end with the statistics of one process on the whole batches."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 4), BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2),
                        BatchNorm1d(2)).to(F64)
    sync = convert_sync_batchnorm(copy.deepcopy(ref))
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, generator=g, dtype=F64) * 2 + 1 for _ in range(3)]
    want = bnlab.recalibrate(ref, batches)
    got = bnlab.recalibrate(sync, [shard(b, (5, 3), rank) for b in batches])
    out = {"count": max(abs(got[n].count - want[n].count) for n in want)}
    for name in want:
        a, b = sync.get_submodule(name), ref.get_submodule(name)
        out[name] = max(err(a.running_mean, b.running_mean), err(a.running_var, b.running_var))
    # Rank 1 feeds one batch fewer: every rank raises, naming the cause (it hung)
    try:
        bnlab.recalibrate(sync, [shard(b, (5, 3), rank) for b in batches[:3 - rank]])
        out["uneven_raises"] = 0.0
    except ValueError as e:
        out["uneven_raises"] = float("fed different numbers of batches (after 2" in str(e))
    return out


def main(out_dir: str) -> None:
    rank, world, _ = ddp.setup_from_env("cpu", timeout_s=60)
    assert world == 2, world
    res = {"sync_bn": sync_bn_cases(rank), "renorm": renorm_case(rank),
           "eval": eval_has_no_collective(rank), "all_empty": all_empty_case(rank),
           "ddp": ddp_smoke(rank, world), "noisy": noisy_case(rank),
           "ddp_local": ddp_local_layer(rank, world), "recalibrate": recalibrate_case(rank),
           "cumulative": cumulative_probe_case(rank), "checks": checks_and_counts_case(rank),
           "ddp_helpers": ddp_helpers_case(rank)}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    ddp.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
