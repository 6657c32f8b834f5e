"""The training loop shared by every experiment: SGD with momentum, exponential learning-rate
decay, L2 weight decay; periodic held-out evaluation with probes; divergence detection (the
paper's "machine infinity", Ioffe & Szegedy 2015 Sec. 4.2.2); atomic checkpoints, Ctrl-C and
exact resume. Holds no plotting and no file layout (that is `runs`).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from bnlab import ddp
from bnlab.lab import parallel
from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig
from bnlab.lab.data import Batches, Dataset
from bnlab.lab.runs import Run
from bnlab.stats import BufferSnapshot
from bnlab.variants import ActivationNoise, noise_rows

__all__ = ["Probe", "ProbeContext", "evaluate", "fit", "lr_at", "params_finite", "seed_all"]


@dataclass
class ProbeContext:
    """What a probe sees at an evaluation step, after ``step`` optimizer steps: the weights
    W^(t) and the training batch x^(t) of step t = ``step`` (the next one), before that step is
    taken, as Santurkar et al.'s Def. 2.1 (G at W^(t) on x^(t)) and Sec. 3.2 (∇L(w_t)) ask; a
    probe on the batch just trained on would see its loss and gradient lowered by that step."""

    model: nn.Module
    step: int  # optimizer steps done so far
    batch: tuple[Tensor, Tensor] | None  # the batch of the next step (None at step 0)
    optimizer: torch.optim.Optimizer
    lr: float  # the next step's learning rate
    data: Dataset
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy  # the training loss


class Probe(Protocol):
    """A measurement taken at every evaluation step; its dict is merged into the metrics record.

    Probes that keep state across steps also define ``state_dict()`` and ``load_state_dict()``
    so that it survives a checkpoint. Probes must leave the model as they found it.
    """

    def __call__(self, ctx: ProbeContext) -> dict[str, Any]: ...


def seed_all(seed: int) -> None:
    """Seed torch's global generator (init, dropout); batch order has its own (`Batches`)."""
    torch.manual_seed(seed)


def lr_at(optim: OptimConfig, step: int) -> float:
    """Exponential decay lr · rate^(step / decay_steps) (Inception's schedule, Sec. 4.2.1)."""
    return optim.lr * optim.decay_rate ** (step / optim.decay_steps)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000,
             train_mode: bool = False) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on (x, y), in eval mode unless ``train_mode``.

    ``train_mode=True`` normalizes every BN layer by the statistics of each evaluation batch
    (its running buffers are saved and restored), for the train-versus-eval gap of Alg. 2.
    """
    modes = {m: m.training for m in model.modules()}  # (a noise switched off stays off)
    snapshot = BufferSnapshot(model) if train_mode else None
    model.train(train_mode)
    # Batch boundaries: a last batch of one example would have no batch variance in train
    # mode (an error), so a short remainder joins the batch before it.
    starts = list(range(0, len(x), batch_size))
    if train_mode and len(starts) > 1 and len(x) - starts[-1] < 2:
        starts.pop()
    ends = [*starts[1:], len(x)]
    correct, loss = 0, 0.0
    try:
        for i, j in zip(starts, ends, strict=True):
            out = model(x[i:j])
            yb = y[i:j]
            loss += float(F.cross_entropy(out.float(), yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        if snapshot is not None:
            snapshot.restore()
        for m, mode in modes.items():
            m.training = mode
    return correct / len(x), loss / len(x)


def params_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _rng_state(noise: Sequence[ActivationNoise]) -> dict[str, Any]:
    """This process's random state: torch's global generator (dropout) and the noise modules'
    own generators (which no state_dict holds)."""
    return {"torch": torch.get_rng_state(), "noise": [m.generator.get_state() for m in noise]}


def _set_rng_state(noise: Sequence[ActivationNoise], state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["noise"] is not None:
        for m, g in zip(noise, state["noise"], strict=True):
            m.generator.set_state(g)


def _upgrade_checkpoint(state: dict[str, Any], probes: int) -> bool:
    """Bring a checkpoint of bnlab before 2026-12-08 to today's layout, in place: its "rng" was
    torch's global state alone, and the Santurkar VGG runs kept their noise generators as a last
    probe's state (``{"generators": [...]}``, in the model's module order). True if it was."""
    if not isinstance(state["rng"], Tensor):
        return False
    noise, extra = None, state["probes"][probes:]
    if len(extra) == 1 and isinstance(extra[0], dict) and set(extra[0]) == {"generators"}:
        noise, state["probes"] = extra[0]["generators"], state["probes"][:probes]
    state["rng"] = [{"torch": state["rng"], "noise": noise}]
    return True


def _resume_rng(noise: Sequence[ActivationNoise], ranks: list[dict[str, Any]], *, seed: int,
                step: int, legacy: bool) -> None:
    """Each rank continues from its own saved random state. A checkpoint of another number of
    processes (or of an older bnlab) has none for some ranks: those continue from rank 0's,
    decorrelated; one without the noise layers' states restarts them from their seeds."""
    par = parallel.current()
    lost = []
    if len(ranks) != par.world:
        lost.append("the other ranks' draws (dropout, noise) continue from rank 0's saved "
                    "state" if legacy else f"it was written by {len(ranks)} process(es), this "
                    f"run has {par.world}: any random draws continue from rank 0's saved state")
    if noise and ranks[0]["noise"] is None:
        lost.append("the noise layers' generators restart from their seeds")
    if lost and par.main:
        old = "a checkpoint of bnlab before 2026-12-08" if legacy else "the checkpoint"
        warnings.warn(f"resuming {old}: {'; '.join(lost)}, not as in an uninterrupted run",
                      stacklevel=3)
    if len(ranks) == par.world:
        _set_rng_state(noise, ranks[par.rank])
        return
    _set_rng_state(noise, ranks[0])
    parallel.decorrelate(seed, step)


# Ctrl-C, and what a scheduler, `timeout`, `docker stop` or a closed terminal sends.
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, n))


class _Interrupt:
    """First Ctrl-C (or SIGTERM, SIGHUP): finish the current step, checkpoint and stop; a
    second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in _STOP_SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


LOG_EVERY_S = 60.0  # the most often a progress line is written where there is no bar


class _LogLines:
    """Progress where stderr is not a terminal (a log file, nohup, a CI job), which gets no bar:
    one plain line per held-out evaluation, at most one per LOG_EVERY_S seconds, and the last."""

    def __init__(self, desc: str, total: int, enabled: bool) -> None:
        self.desc, self.total, self.enabled, self.every = desc, total, enabled, LOG_EVERY_S
        self._last = time.perf_counter()

    def __call__(self, step: int, rec: dict[str, Any]) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last < self.every and step < self.total):
            return
        self._last = now
        shown = {k: rec[k] for k in ("train_loss", "loss", "acc") if rec.get(k) is not None}
        values = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
        print(f"{self.desc or 'fit'}: step {step}/{self.total} {values}".rstrip(),
              file=sys.stderr, flush=True)


def fit(
    model: nn.Module,
    data: Dataset,
    run: Run,
    *,
    train: TrainConfig,
    optim: OptimConfig,
    data_cfg: DataConfig,
    seed: int,
    probes: Sequence[Probe] = (),
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    loss_reduction: Literal["mean", "sum"] = "mean",
    progress: bool = True,
    desc: str = "",
    resume: bool = False,
    evaluate_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``train.steps`` SGD steps, logging to ``run``; return the summary.

    Every ``train.eval_every`` steps (and at steps 0 and the last) the held-out accuracy and
    loss, the mean training loss since the last record, the learning rate (``lr``: of the step
    that led to the record, the first step's at step 0; probes get the next step's,
    `ProbeContext.lr`) and every probe's output go to ``metrics.jsonl``. A non-finite loss or
    parameter marks the run diverged at that step and ends it cleanly. ``resume`` continues
    from ``run``'s checkpoint; batch order and every rank's random state (torch's global
    generator, the noise layers' own) are restored, so the result equals an uninterrupted
    run's.
    ``evaluate_fn(model) -> dict`` replaces the held-out classification evaluation (e.g. the
    full-batch regression loss of a deep linear network); its dict is merged into the record.
    ``loss_reduction`` says whether ``loss_fn`` averages or sums over the samples: under
    torchrun the ranks' shards are combined accordingly, so that either loss (and its
    gradient) is the single process's on the global batch.

    Returns:
        The summary: final/best accuracy, best step, steps done, diverged (and its step),
        wall time; ``run.finish`` is left to the caller, which may add to it.
    """
    # Subnormal floats (e.g. gradients through saturated sigmoids) slow CPU math 10-100x;
    # flushing them to zero changes nothing measurable and keeps steps at their normal speed.
    torch.set_flush_denormal(True)
    # Under torchrun: SyncBN if asked (in place, parameters shared) and a DDP wrapper; `model`
    # stays the plain module for evaluation, probes and checkpoints. Identity otherwise.
    net, par = parallel.prepare_model(model), parallel.current()
    noise = [m for m in model.modules() if isinstance(m, ActivationNoise)]
    parallel.decorrelate(seed)  # (the model is built: its initialization stays the same)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                          weight_decay=optim.weight_decay)
    batches = Batches(len(data.train_x), train.batch_size, seed, shuffle=data_cfg.shuffle,
                      shards=data_cfg.shards)
    ex, ey = data.test_x[:data_cfg.eval_examples], data.test_y[:data_cfg.eval_examples]
    start, loss_sum, loss_n, elapsed = 0, 0.0, 0, 0.0
    diverged_step: int | None = None
    state = run.load_checkpoint() if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, (loss_sum, loss_n), elapsed = state["step"], state["loss"], state["elapsed"]
        diverged_step = state.get("diverged_step")
        legacy = _upgrade_checkpoint(state, len(probes))
        for p, s in zip(probes, state["probes"], strict=True):
            if s is not None:
                p.load_state_dict(s)  # type: ignore[attr-defined]
        _resume_rng(noise, state["rng"], seed=seed, step=start, legacy=legacy)
        run.truncate_metrics(start)

    def checkpoint(step: int, *, done: bool = False) -> None:
        rng = parallel.gather(_rng_state(noise))  # every rank's (a collective under torchrun)
        run.save_checkpoint({
            "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": rng, "loss": (loss_sum, loss_n),
            "elapsed": elapsed + time.perf_counter() - t0,
            "probes": [p.state_dict() if hasattr(p, "state_dict") else None for p in probes],
            "done": done, "diverged_step": diverged_step})

    def record(step: int, batch: tuple[Tensor, Tensor] | None, lr: float) -> dict[str, Any]:
        # Every rank evaluates and probes the same (whole) batches: noise drawn there is one
        # process's (a SyncNoisyBatchNorm would take the input for a shard of a bigger batch).
        with noise_rows():
            return _record(step, batch, lr)

    def _record(step: int, batch: tuple[Tensor, Tensor] | None, lr: float) -> dict[str, Any]:
        if evaluate_fn is None:
            acc, loss = evaluate(model, ex, ey, batch_size=train.eval_batch_size)
            held = {"acc": acc, "loss": loss}
        else:
            held = evaluate_fn(model)
        rec: dict[str, Any] = {"step": step, **held, "lr": lr,
                               "train_loss": loss_sum / loss_n if loss_n else None}
        ctx = ProbeContext(model, step, batch, opt, lr_at(optim, step), data, loss_fn)
        for p in probes:
            rec.update(p(ctx))
        return rec

    t0 = time.perf_counter()
    if state is not None and state.get("done"):
        # Training had ended (the caller's evaluation after it was interrupted): not a step more.
        return summarize(run.metrics(), diverged_step=diverged_step, wall_s=elapsed,
                         steps=train.steps)
    tty = sys.stderr.isatty()
    bar = tqdm(total=train.steps, initial=start, desc=desc, leave=False, dynamic_ncols=True,
               disable=not (progress and tty), mininterval=0.5)
    lines = _LogLines(desc, train.steps, progress and not tty and par.main)
    model.train()
    with _Interrupt() as interrupt, bar:
        if start == 0:
            run.log(record(0, None, lr_at(optim, 0)))
        for step in range(start, train.steps):
            lr = lr_at(optim, step)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = batches.indices(step)
            x, y = data.train_x[idx], data.train_y[idx]
            opt.zero_grad(set_to_none=True)
            if par.world == 1:
                loss = loss_fn(net(x), y)
                loss.backward()
                value = loss.item()
            else:  # this rank's shard: Σ_shard ℓ, then the global batch's mean (or sum) loss
                xs, ys, rows = parallel.shard(x, y)
                with noise_rows(*rows):  # every rank's noise: its rows of the global batch's
                    out = net(xs)
                if not len(ys):
                    local = out.sum() * 0.0
                else:
                    local = loss_fn(out, ys) * (len(ys) if loss_reduction == "mean" else 1)
                per = len(y) if loss_reduction == "mean" else 1  # global_mean(·, 1): the sum
                ddp.global_mean(local, per).backward()
                value = float(ddp.all_reduce_sum(local.detach())) / per
            opt.step()
            done = step + 1
            bar.update(1)
            if not math.isfinite(value):
                diverged_step = done
            else:
                loss_sum, loss_n = loss_sum + value, loss_n + 1
            if diverged_step is None and (done % train.eval_every == 0 or done == train.steps):
                if not params_finite(model):
                    diverged_step = done
                else:
                    nxt = batches.indices(done)  # step `done`'s batch, not yet trained on
                    rec = record(done, (data.train_x[nxt], data.train_y[nxt]), lr)
                    loss_sum, loss_n = 0.0, 0
                    run.log(rec)
                    lines(done, rec)
                    bar.set_postfix(loss=f"{value:.3f}", acc=f"{rec.get('acc', float('nan')):.4f}",
                                    refresh=False)
                    if done % train.checkpoint_every == 0 and done < train.steps:
                        checkpoint(done)
            if diverged_step is not None:
                run.log({"step": diverged_step, "diverged": True, "lr": lr})
                break
            # A Ctrl-C on any rank, at any point of the step (its evaluation too), stops every
            # rank after it: they checkpoint (a collective) and stop together.
            if parallel.any_rank(interrupt.requested):
                checkpoint(done)
                where = "saved" if par.main else "saved by rank 0"  # the others keep no files
                raise KeyboardInterrupt(f"interrupted after step {done}; checkpoint {where} in "
                                        f"{run.path} (continue with --resume)")
    # What the caller computes after training (a final evaluation of 20k examples, artefacts)
    # may be interrupted too: this checkpoint lets --resume go straight to it.
    checkpoint(train.steps if diverged_step is None else diverged_step, done=True)
    return summarize(run.metrics(), diverged_step=diverged_step,
                     wall_s=elapsed + time.perf_counter() - t0, steps=train.steps)


def summarize(metrics: list[dict[str, Any]], *, diverged_step: int | None, wall_s: float,
              steps: int) -> dict[str, Any]:
    """Final and best held-out accuracy of a metrics log, and how the run ended."""
    evals = [m for m in metrics if "acc" in m]
    best = max(evals, key=lambda m: m["acc"]) if evals else {"acc": None, "step": None}
    last = evals[-1] if evals else {"acc": None, "step": 0}
    return {"final_acc": last["acc"], "best_acc": best["acc"], "best_step": best["step"],
            "steps_done": diverged_step or steps, "steps": steps,
            "diverged": diverged_step is not None, "diverged_step": diverged_step,
            "wall_s": round(wall_s, 2),
            "ms_per_step": round(1e3 * wall_s / max(1, diverged_step or steps), 3)}
