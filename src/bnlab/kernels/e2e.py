"""End-to-end cost of BN in a training step (`bnlab bench --e2e`).

Two nets of this module, each taking ``norm_layer`` (a factory ``C -> nn.Module``): a VGG-style
conv-BN-ReLU stack on 32x32 inputs (batch 128) and an Inception-style block net on 28x28 inputs
(batch 32), wider than the lab's (`STAND_INS`). `bnlab bench --e2e` adds the lab's own VGG and
Inception at the widths and batch sizes of their experiments (`bnlab.lab.models.e2e_nets`: the
core may not import the lab). Those are narrow (8 to 64 channels in the VGG), so a layer's
fixed cost (module call, dispatch, autograd node, allocation) weighs more there.

A step (forward, cross-entropy, backward, SGD update) is timed with no normalization
(``nn.Identity``; the lab's nets: no norm layer), torch's BN, bnlab's BN and bnlab's BN+ReLU (the
ReLU after it fused), interleaved step by step in a balanced order (`step_orders`); the figure of
merit is the step time relative to the net without BN. The nets run in NCHW (the target's figure)
or channels_last: on CPU, torch's NCHW max-pool is scalar and branches on the data (the 3x3
stride-1 pool of (32, 112, 28, 28) takes ~27 ms against ~2 ms in channels_last), so the memory
format changes both the step and how much of it BN is.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from bnlab._checks import is_integer as _is_integer

__all__ = ["STAND_INS", "TARGET_OVERHEAD", "InceptionNet", "Net", "TorchBatchNorm", "VGGNet",
           "any_rank_norms", "meets_target", "print_e2e", "run_e2e", "step_orders"]

NormLayer = Callable[[int], nn.Module]
# A training step with bnlab's BN may cost at most this much more than without BN (median).
TARGET_OVERHEAD = 0.10
# Profiled steps per net; each op's (and BN's) time is the least over them.
PROFILED_STEPS = 5
# A timed step's phases (`_train_step`).
PHASES = ("forward", "backward", "update")


def meets_target(overhead: float) -> bool:
    """Whether a median overhead of bnlab's BN over no BN is within `TARGET_OVERHEAD` (a
    step exactly 10% slower counts as met, whatever the float rounding of the ratio)."""
    return overhead <= TARGET_OVERHEAD + 1e-9


def _conv_bn_relu(cin: int, cout: int, k: int, norm_layer: NormLayer) -> nn.Sequential:
    from bnlab.layers import BatchNormReLU

    norm = norm_layer(cout)
    # A fused BN+ReLU layer already applies the ReLU.
    act = nn.Identity() if isinstance(norm, BatchNormReLU) else nn.ReLU(inplace=True)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), norm, act)


class VGGNet(nn.Module):
    """VGG-style: [64, 64, M, 128, 128, M, 256, 256, M] conv3x3-norm-ReLU, then a linear head.

    Shape: (N, 3, 32, 32) -> (N, num_classes).
    """

    def __init__(self, norm_layer: NormLayer, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(_conv_bn_relu(cin, int(v), 3, norm_layer))
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(256 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # (N, 256, 4, 4) -> (N, 4096)


class Inception(nn.Module):
    """Four branches (1x1; 1x1-3x3; 1x1-3x3-3x3; pool-1x1), each conv followed by norm+ReLU,
    concatenated on channels (Szegedy et al. 2015's block, the BN-Inception variant)."""

    def __init__(self, cin: int, c1: int, c3: int, c5: int, cp: int,
                 norm_layer: NormLayer) -> None:
        super().__init__()
        self.b1 = _conv_bn_relu(cin, c1, 1, norm_layer)
        self.b3 = nn.Sequential(_conv_bn_relu(cin, c3 // 2, 1, norm_layer),
                                _conv_bn_relu(c3 // 2, c3, 3, norm_layer))
        self.b5 = nn.Sequential(_conv_bn_relu(cin, c5 // 2, 1, norm_layer),
                                _conv_bn_relu(c5 // 2, c5, 3, norm_layer),
                                _conv_bn_relu(c5, c5, 3, norm_layer))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn_relu(cin, cp, 1, norm_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class InceptionNet(nn.Module):
    """Stem conv, two Inception blocks at 28x28, a pool, two more at 14x14, a linear head.

    Shape: (N, 1, 28, 28) -> (N, num_classes).
    """

    def __init__(self, norm_layer: NormLayer, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(1, 32, 3, norm_layer)
        self.blocks = nn.Sequential(
            Inception(32, 32, 48, 16, 16, norm_layer),    # -> 112 channels
            Inception(112, 48, 64, 32, 32, norm_layer),   # -> 176
            nn.MaxPool2d(2),
            Inception(176, 64, 96, 32, 32, norm_layer),   # -> 224
            Inception(224, 64, 96, 48, 48, norm_layer),   # -> 256
        )
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))  # global average pool: (N, 256, 14, 14) -> (N, 256)


def _norms() -> dict[str, NormLayer]:
    import bnlab

    return {"none": lambda c: nn.Identity(), "torch_bn": nn.BatchNorm2d,
            "bnlab_bn": bnlab.BatchNorm2d, "bnlab_bn_relu": bnlab.BatchNormReLU2d}


class TorchBatchNorm(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d``'s computation on (N, C) to (N, C, D, H, W) input: torch's
    counterpart of ``bnlab.BatchNorm`` for nets that normalize after both convs and linear
    layers (the lab's VGG)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if not 2 <= input.dim() <= 5:
            raise ValueError(f"TorchBatchNorm: expected 2-D to 5-D input, got {input.dim()}-D")


def any_rank_norms() -> dict[str, NormLayer]:
    """`_norms`'s four kinds as layers that take input of any rank (for nets built elsewhere,
    e.g. the lab's, whose norms follow linear layers too)."""
    import bnlab

    return {"none": lambda c: nn.Identity(), "torch_bn": TorchBatchNorm,
            "bnlab_bn": bnlab.BatchNorm, "bnlab_bn_relu": bnlab.BatchNormReLU}


# The nets timed: name -> (build(norm kind) -> net, batch size, image (C, H, W)); a norm kind is
# a key of `_norms`. "bnlab_bn_relu" must give a net without the ReLU that the layer fuses.
Net = tuple[Callable[[str], nn.Module], int, tuple[int, int, int]]
STAND_INS: dict[str, Net] = {
    "vgg_b128_32x32": (lambda kind: VGGNet(_norms()[kind]), 128, (3, 32, 32)),
    "inception_b32_28x28": (lambda kind: InceptionNet(_norms()[kind]), 32, (1, 28, 28)),
}


def _memory_format(name: str) -> torch.memory_format:
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    if name not in formats:
        raise ValueError(f"memory_format must be one of {list(formats)}, got {name!r}")
    return formats[name]


def _build(make: Callable[[], nn.Module], batch: int, image: tuple[int, int, int],
           memory_format: str = "nchw") -> tuple[nn.Module, Tensor]:
    """A freshly built net ``make()`` (seed 0) and a random input batch, both in
    ``memory_format`` ("nchw" or "channels_last")."""
    fmt = _memory_format(memory_format)
    torch.manual_seed(0)
    # (torch's stubs omit Module.to's memory_format, which it takes)
    model = make().to(memory_format=fmt)  # type: ignore[call-overload]
    return model, torch.randn(batch, *image).contiguous(memory_format=fmt)


Phases = tuple[float, float, float]


def _train_step(model: nn.Module, x: Tensor) -> Callable[[], Phases]:
    """One training step on ``x``: forward, cross-entropy on fixed labels, backward, SGD. It
    returns the seconds of its phases: (zero_grad + forward + loss, backward, SGD update)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    y = torch.randint(0, 10, (x.shape[0],))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> Phases:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2
    return step


def _is_bn_op(name: str) -> bool:
    """Whether a profiler event is batch norm's own work: its ops (torch's native_batch_norm*,
    ours bnlab::*) and their autograd nodes."""
    return (name.startswith("bnlab::") or "batch_norm" in name or "BatchNorm" in name
            or "bnk::" in name)


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """File descriptor 2 to /dev/null: torch 2.13's profiler (kineto) writes two "USDT: ...
    profiler_start/stop" lines to the process's stderr per use, whatever its log level.
    (Python exceptions still propagate.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_steps(step: Callable[[], object],
                  steps: int = PROFILED_STEPS) -> list[dict[str, float]]:
    """Self CPU time (ms) per op name, for each of `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for _ in range(steps):
        with _quiet_fd2(), profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        out.append({e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()})
    return out


def bn_op_ms(profiles: list[dict[str, float]]) -> float:
    """The least, over the profiled steps (`profile_steps`), of the self CPU time (ms) of batch
    norm's ops: BN's own cost in a step, apart from what it does to the other ops' time (see
    `other_op_deltas`). The least, not the median: on this shared machine a busy spell can last
    several steps, and then torch's and bnlab's backward alike took 5x longer in 2 of 3
    profiled steps."""
    return min(sum(ms for k, ms in p.items() if _is_bn_op(k)) for p in profiles)


def other_op_deltas(base: list[dict[str, float]], with_bn: list[dict[str, float]],
                    top: int = 3) -> dict[str, float]:
    """The ops other than BN's whose self time (ms, least over the profiled steps) grows most
    from the net without BN (`base`) to the net with it: the part of BN's overhead that is not
    BN's own work. (On the Inception-style net torch's max-pool branches on the data: timed
    alone on the activations captured from both nets, in two runs, its last three calls took
    11-23% longer on the BN net's, the first two within ±3%.) Ops the BN net runs more often
    (the optimizer's updates of γ and β, the layers' step counters) count too; ops that got
    faster do not."""
    def least(profiles: list[dict[str, float]]) -> dict[str, float]:
        keys = set().union(*profiles)
        return {k: min(p.get(k, 0.0) for p in profiles) for k in keys}

    a, b = least(base), least(with_bn)
    deltas = {k: v - a.get(k, 0.0) for k, v in b.items() if not _is_bn_op(k)}
    grown = sorted(((d, k) for k, d in deltas.items() if d > 0.0), reverse=True)[:top]
    return {k: d for d, k in grown}


def step_orders(keys: list[str], n_steps: int) -> list[list[str]]:
    """The order of the nets in each interleaved step, from a Williams design (a balanced Latin
    square): over len(keys) consecutive steps (2·len(keys) when odd) each net runs right after
    each of the others equally often. In a fixed order each net always ran after the same one,
    in whatever state of the caches and the allocator that one left behind; rotating a fixed
    order does not help, as it keeps every pair's neighbourhood."""
    n = len(keys)
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:  # 0, 1, n-1, 2, n-2, ...
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(j + i) % n for j in first] for i in range(n)]
    if n % 2:
        rows += [r[::-1] for r in rows]
    return [[keys[j] for j in rows[s % len(rows)]] for s in range(n_steps)]


def _minor_faults() -> int:
    """The process's minor page faults so far (-1 where the OS does not say): each is a page of
    memory the allocator had returned to the OS and touched again."""
    try:
        import resource
    except ImportError:  # Windows
        return -1
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_e2e(steps: int = 8, rounds: int = 3, memory_format: str = "nchw",
            nets: dict[str, Net] | None = None) -> dict[str, Any]:
    """Median step time (ms) per net and norm, the overhead of BN over no normalization, and
    the profiled time of BN's own ops per step; nets and inputs in ``memory_format``. ``nets``
    (default `STAND_INS`; `bnlab bench --e2e` adds the lab's own nets) as in `STAND_INS`."""
    _memory_format(memory_format)  # bad arguments fail before minutes of timing
    for name, value in (("steps", steps), ("rounds", rounds)):
        if not _is_integer(value) or value < 1:
            raise ValueError(f"run_e2e: {name} must be an integer >= 1, got {value!r}")
    out: dict[str, Any] = {}
    for net_name, (build, batch, image) in (STAND_INS if nets is None else nets).items():
        steppers = {k: _train_step(*_build(functools.partial(build, k), batch, image,
                                            memory_format))
                    for k in _norms()}
        for s in steppers.values():  # warm-up
            s()
            s()
        times: dict[str, list[float]] = {k: [] for k in steppers}
        phases: dict[str, list[Phases]] = {k: [] for k in steppers}
        faults = dict.fromkeys(steppers, 0)
        # Step by step, so a busy spell hits all of them.
        for order in step_orders(list(steppers), rounds * steps):
            for k in order:
                f0 = _minor_faults()
                t0 = time.perf_counter()
                phases[k].append(steppers[k]())
                times[k].append(time.perf_counter() - t0)
                faults[k] += _minor_faults() - f0
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        profiles = {k: profile_steps(s) for k, s in steppers.items()}
        bn_ms = {k: bn_op_ms(p) for k, p in profiles.items() if k != "none"}
        low = {k: min(v) * 1e3 for k, v in times.items()}
        out[net_name] = {
            "step_ms": med,
            "step_ms_min": low,
            "overhead_torch_bn": med["torch_bn"] / med["none"] - 1.0,
            "overhead_bnlab_bn": med["bnlab_bn"] / med["none"] - 1.0,
            "overhead_torch_bn_min": low["torch_bn"] / low["none"] - 1.0,
            "overhead_bnlab_bn_min": low["bnlab_bn"] / low["none"] - 1.0,
            "overhead_bnlab_bn_relu": med["bnlab_bn_relu"] / med["none"] - 1.0,
            "overhead_bnlab_bn_relu_min": low["bnlab_bn_relu"] / low["none"] - 1.0,
            "bn_op_ms": bn_ms,
            "other_op_delta_ms": other_op_deltas(profiles["none"], profiles["bnlab_bn"]),
            "page_faults_per_step": ({k: f / len(times[k]) for k, f in faults.items()}
                                     if _minor_faults() >= 0 else None),
            # each phase's median on its own (they need not add up to the step's median)
            "phase_ms": {k: dict(zip(PHASES, (statistics.median(p[i] for p in v) * 1e3
                                              for i in range(3)), strict=True))
                         for k, v in phases.items()},
        }
        out[net_name].update(target_overhead=TARGET_OVERHEAD,
                             target_met=meets_target(out[net_name]["overhead_bnlab_bn"]))
    return out


def print_e2e(result: dict[str, Any], memory_format: str = "nchw") -> None:
    print(f"memory format: {memory_format}")
    print(f"{'net (statistic)':<27}{'no BN ms':>9}{'torch BN':>10}{'bnlab BN':>10}"
          f"{'fused':>9}{'torch +%':>10}{'bnlab +%':>10}{'fused +%':>10}")
    for name, r in result.items():
        for tag, key in (("median", ""), ("min", "_min")):
            s = r["step_ms" + key]
            print(f"{name + ' ' + tag:<27}{s['none']:>9.1f}{s['torch_bn']:>10.1f}"
                  f"{s['bnlab_bn']:>10.1f}{s['bnlab_bn_relu']:>9.1f}"
                  f"{100 * r['overhead_torch_bn' + key]:>9.1f}%"
                  f"{100 * r['overhead_bnlab_bn' + key]:>9.1f}%"
                  f"{100 * r['overhead_bnlab_bn_relu' + key]:>9.1f}%")
    print("fused = bnlab.BatchNormReLU2d in place of BatchNorm2d + ReLU (one sweep, saved mask)")
    print(f"target: a step with bnlab's BN at most +{100 * TARGET_OVERHEAD:.0f}% over no BN "
          "(median): " + ", ".join(
              f"{name} {'met' if meets_target(r['overhead_bnlab_bn']) else 'missed'}"
              for name, r in result.items()))
    print(f"BN's own ops per step (profiled self time, least of {PROFILED_STEPS} steps):")
    for name, r in result.items():
        base = r["step_ms"]["none"]
        print(f"  {name:<25}" + "   ".join(f"{k} {v:.1f} ms ({100 * v / base:.1f}%)"
                                           for k, v in r["bn_op_ms"].items()))
    print("  (bnlab_bn_relu's figure includes the ReLU it fuses; the others' ReLU is not BN's)")
    if all("phase_ms" in r for r in result.values()):
        print("a step's phases (median ms): forward (with the loss) / backward / SGD update, "
              "and each norm's difference from no BN:")
        for name, r in result.items():
            ph = r["phase_ms"]
            base = "/".join(f"{ph['none'][p]:.1f}" for p in PHASES)
            print(f"  {name:<25}none {base}   " + "   ".join(
                f"{k} " + "/".join(f"{ph[k][p] - ph['none'][p]:+.1f}" for p in PHASES)
                for k in ph if k != "none"))
    print("other ops that take longer with bnlab's BN than without (profiled self time, least "
          f"of {PROFILED_STEPS} steps; the rest of the overhead: smaller ops, cache effects, "
          "noise):")
    for name, r in result.items():
        base = r["step_ms"]["none"]
        print(f"  {name:<25}" + ("   ".join(f"{k} +{v:.1f} ms ({100 * v / base:.1f}%)"
                                            for k, v in r["other_op_delta_ms"].items())
                                 or "none"))
    if all(r.get("page_faults_per_step") is not None for r in result.values()):
        # glibc's malloc hands freed memory back to the OS and faults it in again (zeroed) on
        # the next allocation: run to run, 0 to ~9000 faults (~36 MB) per step of the lab's VGG
        # were seen, a cost that lands on whichever ops allocate (and on no BN too).
        print("minor page faults per timed step (memory returned to the OS and touched again):")
        for name, r in result.items():
            print(f"  {name:<25}" + "   ".join(f"{k} {v:.0f}"
                                               for k, v in r["page_faults_per_step"].items()))
