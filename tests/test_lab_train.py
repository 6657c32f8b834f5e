"""The shared training loop: resume equals uninterrupted, divergence detection, run dirs that are
never silently overwritten, atomic checkpoints."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from _lab_idx import write_dataset
from bnlab import BatchNorm1d
from bnlab.lab import runs
from bnlab.lab import train as train_mod
from bnlab.lab.config import DataConfig, OptimConfig, TrainConfig
from bnlab.lab.data import load
from bnlab.lab.train import fit, lr_at, seed_all

TRAIN = TrainConfig(steps=24, batch_size=20, eval_every=4, checkpoint_every=8)
OPTIM = OptimConfig(lr=0.05, momentum=0.9, weight_decay=1e-4, decay_rate=0.5, decay_steps=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = write_dataset(tmp_path_factory.mktemp("idx"), n_train=200, n_test=60)
    cfg = DataConfig(dir=str(d), eval_examples=60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and robust on a shared machine
    yield cfg, load(cfg)
    torch.set_num_threads(threads)


def model() -> nn.Module:
    # BN (running buffers) and dropout (RNG) both have to survive a checkpoint.
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32, bias=False), BatchNorm1d(32),
                         nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))


def new_run(path, cfg=None):
    run, action = runs.prepare(path, {"config": cfg or {"a": 1}})
    assert action == "new"
    return run


def train(run, data, *, probes=(), resume=False, optim=OPTIM):
    cfg, ds = data
    seed_all(0)
    m = model()
    s = fit(m, ds, run, train=TRAIN, optim=optim, data_cfg=cfg, seed=0, probes=probes,
            progress=False, resume=resume)
    return m, s


class SigintAt:
    """A probe that presses Ctrl-C at one evaluation step (the loop must checkpoint and stop)."""

    def __init__(self, step):
        self.step = step

    def __call__(self, ctx):
        if ctx.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
        return {}


def test_resume_equals_uninterrupted(tmp_path, data):
    ref_model, ref = train(new_run(tmp_path / "a"), data)
    run = new_run(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        train(run, data, probes=[SigintAt(12)])
    assert run.checkpoint_path.exists() and not run.finished
    assert torch.load(run.checkpoint_path, weights_only=False)["step"] == 12
    assert not list(run.path.glob("*.tmp"))  # written atomically
    again, action = runs.prepare(run.path, {"config": {"a": 1}}, resume=True)
    assert action == "resume"
    m, s = train(again, data, probes=[SigintAt(-1)], resume=True)
    for (k, a), b in zip(ref_model.state_dict().items(), m.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    assert runs.Run(tmp_path / "a").metrics() == again.metrics()  # same records, no duplicates
    assert s["final_acc"] == ref["final_acc"] and not s["diverged"]


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_scheduler_stop_checkpoints_like_ctrl_c(tmp_path, data, sig):
    """SIGTERM (a scheduler, `timeout`, `docker stop`) or SIGHUP (a closed terminal) killed
    the run and lost every step since its last periodic checkpoint."""

    class SignalAt(SigintAt):
        def __call__(self, ctx):
            if ctx.step == self.step:
                os.kill(os.getpid(), getattr(signal, sig))
            return {}

    run = new_run(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 12"):
        train(run, data, probes=[SignalAt(12)])
    assert torch.load(run.checkpoint_path, weights_only=False)["step"] == 12
    assert signal.getsignal(getattr(signal, sig)) is signal.SIG_DFL  # restored


def test_a_checkpoint_of_another_number_of_processes_resumes_with_a_warning(tmp_path, data):
    """Every rank's random state is in the checkpoint; resumed with another number of
    processes, the run continues from rank 0's and says that its draws differ."""
    ref_model, _ = train(new_run(tmp_path / "a"), data)
    run = new_run(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(run, data, probes=[SigintAt(12)])
    state = torch.load(run.checkpoint_path, weights_only=False)
    assert len(state["rng"]) == 1  # one process: one state
    state["rng"] = [state["rng"][0], {"torch": torch.get_rng_state(), "noise": []}]
    run.save_checkpoint(state)
    again, _ = runs.prepare(run.path, {"config": {"a": 1}}, resume=True)
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), this run has 1"):
        m, _ = train(again, data, probes=[SigintAt(-1)], resume=True)
    for (k, a), b in zip(ref_model.state_dict().items(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # rank 0's state is this process's own


def test_an_interrupt_after_training_resumes_without_training_again(tmp_path, data):
    """The experiment's own work after fit (a final evaluation, artefacts) may be interrupted:
    fit's checkpoint of the finished training lets --resume go straight back to it."""
    ref_model, ref = train(new_run(tmp_path / "a"), data)
    run = new_run(tmp_path / "b")
    train(run, data)  # the caller is "interrupted" before run.finish
    state = torch.load(run.checkpoint_path, weights_only=False)
    assert state["step"] == TRAIN.steps and state["done"]
    again, action = runs.prepare(run.path, {"config": {"a": 1}}, resume=True)
    assert action == "resume"
    m, calls = model(), []
    m.register_forward_hook(lambda *_: calls.append(1))
    s = fit(m, data[1], again, train=TRAIN, optim=OPTIM, data_cfg=data[0], seed=0,
            progress=False, resume=True)
    assert not calls  # not a step, not an evaluation
    for a, b in zip(ref_model.state_dict().values(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert again.metrics() == runs.Run(tmp_path / "a").metrics()
    assert s["final_acc"] == ref["final_acc"] and s["steps_done"] == TRAIN.steps
    again.finish(s)
    assert not again.checkpoint_path.exists()


def test_progress_without_a_terminal_is_plain_lines(tmp_path, data, capsys, monkeypatch):
    """Where stderr is not a terminal (a log file; pytest's capture) there is no bar, but a long
    run still says how far it is: a line per evaluation, at most one per LOG_EVERY_S, and the
    last one; nothing with progress off."""
    cfg, ds = data
    fit(model(), ds, new_run(tmp_path / "a"), train=TRAIN, optim=OPTIM, data_cfg=cfg, seed=0,
        desc="exp bn seed0")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("exp bn seed0: step 24/24 train_loss=")
    assert " loss=" in lines[0] and " acc=" in lines[0]
    monkeypatch.setattr(train_mod, "LOG_EVERY_S", 0.0)
    fit(model(), ds, new_run(tmp_path / "b"), train=TRAIN, optim=OPTIM, data_cfg=cfg, seed=0)
    steps = [line.split()[2] for line in capsys.readouterr().err.splitlines()]
    assert steps == [f"{s}/24" for s in range(4, 25, 4)]
    train(new_run(tmp_path / "c"), data)  # progress=False
    assert capsys.readouterr().err == ""


@pytest.mark.filterwarnings("ignore:bnlab. a training batch had non-finite")
def test_divergence_is_detected_and_stops_cleanly(tmp_path, data):
    run = new_run(tmp_path / "d")
    _, s = train(run, data, optim=OptimConfig(lr=1e30, momentum=0.9))
    assert s["diverged"] and 1 <= s["diverged_step"] < TRAIN.steps
    last = run.metrics()[-1]
    assert last["diverged"] is True and last["step"] == s["diverged_step"]
    # Resumed after its end, a diverged run stays diverged and is not trained further.
    resumed = fit(model(), data[1], run, train=TRAIN, optim=OPTIM, data_cfg=data[0], seed=0,
                  progress=False, resume=True)
    assert resumed["diverged_step"] == s["diverged_step"] and run.metrics()[-1] == last
    _, ok = train(new_run(tmp_path / "ok"), data)
    assert not ok["diverged"] and ok["diverged_step"] is None and ok["steps_done"] == 24


def test_lr_decays_exponentially():
    assert lr_at(OPTIM, 0) == 0.05
    assert lr_at(OPTIM, 10) == pytest.approx(0.025)
    assert lr_at(OPTIM, 25) == pytest.approx(0.05 * 0.5 ** 2.5)


def test_finished_run_is_never_silently_overwritten(tmp_path):
    run = new_run(tmp_path / "r", {"lr": 1})
    run.finish({"final_acc": 0.5})
    assert runs.prepare(run.path, {"config": {"lr": 1}})[1] == "skip"
    with pytest.raises(runs.RunExistsError, match="--force"):
        runs.prepare(run.path, {"config": {"lr": 2}})
    with pytest.raises(runs.RunExistsError):
        runs.prepare(run.path, {"config": {"lr": 2}}, resume=True)
    again, action = runs.prepare(run.path, {"config": {"lr": 2}}, force=True)
    assert action == "new" and not again.finished
    assert json.loads((again.path / "config.json").read_text())["config"] == {"lr": 2}
    assert {"torch", "git", "python"} <= set(json.loads((again.path / "env.json").read_text()))


def test_unfinished_run_needs_resume(tmp_path):
    run = new_run(tmp_path / "u")
    run.save_checkpoint({"step": 3})
    with pytest.raises(runs.RunExistsError, match="--resume"):
        runs.prepare(run.path, {"config": {"a": 1}})
    with pytest.raises(runs.RunExistsError, match="differs"):
        runs.prepare(run.path, {"config": {"a": 2}}, resume=True)
    assert runs.prepare(run.path, {"config": {"a": 1}}, resume=True)[1] == "resume"


def test_cumulative_batch_stats_average_only_training_batches():
    from bnlab.lab.probes import CumulativeBatchStats

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3, bias=False), BatchNorm1d(3))
    cum = CumulativeBatchStats(net)
    xs = [torch.randn(8, 4) * (i + 1) for i in range(3)]
    for x in xs:
        net(x)  # training forward with grad: counted
    with torch.no_grad():
        net(torch.randn(8, 4) * 100)  # no_grad (e.g. a probe): not counted
    net.eval()
    net(torch.randn(8, 4) * 100)  # eval: not counted
    z = [net[0](x).detach() for x in xs]
    twin = nn.Sequential(nn.Linear(4, 3, bias=False), BatchNorm1d(3))
    cum.load_into(twin)
    torch.testing.assert_close(twin[1].running_mean, torch.stack([a.mean(0) for a in z]).mean(0))
    torch.testing.assert_close(twin[1].running_var, torch.stack([a.var(0) for a in z]).mean(0))


def test_a_record_cut_short_by_a_kill_is_dropped_and_a_corrupt_one_named(tmp_path):
    run = new_run(tmp_path / "k")
    run.log({"step": 0, "acc": 0.1})
    with open(run.path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "ac')  # SIGKILL in the middle of a write
    assert run.metrics() == [{"step": 0, "acc": 0.1}]
    run.truncate_metrics(0)  # what --resume does: the file is whole again
    run.log({"step": 4, "acc": 0.2})
    assert [r["step"] for r in run.metrics()] == [0, 4]
    (run.path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 4, "ac\n{"step": 8}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        run.metrics()


def test_probes_see_the_next_steps_batch_and_weights_before_it_is_taken(tmp_path, data):
    """Santurkar's Def. 2.1 measures G at W^(t) on x^(t): a probe after t steps gets the batch
    and learning rate of step t (0-based), with the weights that step then starts from, not the
    batch step t − 1 has just fitted."""
    inputs, weights, seen = [], [], []

    def trained_on(module, args):
        if module.training and torch.is_grad_enabled():  # training steps, not evaluations
            inputs.append(args[0].detach().clone())
            weights.append(module[1].weight.detach().clone())

    def probe(ctx):
        if ctx.batch is not None:
            seen.append((ctx.step, ctx.batch[0].clone(), ctx.lr,
                         ctx.model[1].weight.detach().clone()))
        return {}

    cfg, ds = data
    seed_all(0)
    m = model()
    m.register_forward_pre_hook(trained_on)
    fit(m, ds, new_run(tmp_path / "r"), train=TRAIN, optim=OPTIM, data_cfg=cfg, seed=0,
        probes=[probe], progress=False)
    assert [s for s, *_ in seen] == list(range(4, TRAIN.steps + 1, 4))
    for step, x, lr, w in seen[:-1]:  # the last evaluation has no step after it
        assert torch.equal(x, inputs[step]) and not torch.equal(x, inputs[step - 1])
        assert torch.equal(w, weights[step]) and lr == lr_at(OPTIM, step)
