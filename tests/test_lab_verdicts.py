"""The verdict rules when runs diverge: a diverged seed counts against the method it tests
(chance accuracy, an infinite loss), never drops out of a check or removes the check. Each case
once graded a failure as a success: an experiment read "reproduced" with every ℓ∞ (or every
noisy-BN) seed diverged, or with BN's loss the mean of its one surviving seed of three."""

from __future__ import annotations

import math

from bnlab.lab.config import to_dict
from bnlab.lab.experiments.ioffe2015 import fig2 as ioffe_fig2
from bnlab.lab.experiments.ioffe2015 import steps_text
from bnlab.lab.experiments.santurkar2018 import dln, fig1, fig2, fig5
from bnlab.lab.report import Inputs, scored_text
from bnlab.lab.train import summarize


class FakeRun:
    """A finished run as the report reads it: summary and metrics."""

    def __init__(self, summary, metrics=()):
        self.summary, self._metrics = summary, list(metrics)

    def metrics(self):
        return self._metrics


def vgg(acc, diverged=(), seeds=3, drift=0.01):
    def dist(t):  # every layer's channel means move by ``drift`` per record
        return {str(k): {"q": [-1, -0.5, 0, 0.5, 1], "mean": [drift * t / 100] * 4,
                         "var": [1.0] * 4} for k in range(1, 14)}

    out = []
    for s in range(seeds):
        div = s in diverged
        out.append(FakeRun({"diverged": div, "train_acc": None if div else acc,
                            "test_acc": None if div else acc - 0.01},
                           [{"step": t, "acc": acc, "train_acc": acc, "dist": dist(t)}
                            for t in range(0, 600, 100)]))
    return out


def dln_runs(loss, diverged=(), seeds=3):
    return [FakeRun({"diverged": s in diverged, "final_loss": None if s in diverged else loss},
                    [{"step": t, "loss": 3 * loss} for t in range(0, 2000, 100)])
            for s in range(seeds)]


def section(mod, runs):
    name = mod.EXPERIMENT.name
    return mod.report(Inputs(name, "paper", to_dict(mod.PRESETS["paper"]), runs, "paper"))


def test_scored_counts_a_diverged_seed_as_the_given_value():
    runs = {"v": [FakeRun({"diverged": False, "acc": 0.8}), FakeRun({"diverged": True}),
                  FakeRun({"diverged": False, "acc": None})]}
    inp = Inputs("x", "paper", {}, runs, "paper")
    assert inp.values("v", "acc") == [0.8] and inp.scored("v", "acc") == [0.8, 0.1]
    assert inp.scored("v", "acc", math.inf) == [0.8, math.inf] and inp.diverged("v") == 1
    assert scored_text([0.8, 0.1], 1) == "0.4500 ± 0.4950 (1 of 2 diverged)"
    assert scored_text([5.0, math.inf], 1, "{:.4g}") == "∞ (1 of 2 diverged)"


def test_santurkar_fig5_with_every_linf_seed_diverged_is_not_reproduced():
    loss = {"none": 2e4, "bn": 9e3, "l1": 5e3, "l2": 9e3, "linf": 1e4}
    runs = {f"vgg-{n}-lr0.1": vgg(a, (0, 1, 2) if n == "linf" else ())
            for n, a in {"none": 0.80, "bn": 0.89, "l1": 0.89, "l2": 0.88, "linf": 0.88}.items()}
    runs |= {f"dln-{n}-lr1e-06": dln_runs(v) for n, v in loss.items()}
    sec = section(fig5, runs)
    assert sec.verdict == "partly"  # it read "reproduced" on the two DLN checks alone
    assert "not within 3 points" in sec.why and "(3 of 3 diverged)" in sec.why


def test_santurkar_fig5_l1_and_bn_both_diverged_is_no_win_for_l1():
    runs = {f"vgg-{n}-lr0.1": vgg(0.89) for n in ("none", "bn", "l1", "l2", "linf")}
    runs |= {f"dln-{n}-lr1e-06": dln_runs(9e3, (0, 1, 2) if n in ("l1", "bn") else ())
             for n in ("none", "bn", "l1", "l2", "linf")}
    assert "ℓ1 ends less than 20% below BN (∞ (3 of 3 diverged)" in section(fig5, runs).why


def test_santurkar_fig2_with_noisy_bn_diverged_fails_its_training_checks():
    runs = {"vgg-none-lr0.1": vgg(0.86, drift=0.2), "vgg-bn-lr0.1": vgg(0.91, drift=0.03),
            "vgg-noisy_bn-lr0.1": vgg(0.90, (0, 1, 2), drift=0.5),
            "vgg-noise-lr0.1": vgg(0.10, drift=0.5)}
    sec = section(fig2, runs)
    assert sec.verdict == "partly" and "noisy BN trains worse than BN" in sec.why
    # one diverged seed of three no longer decides "does not train" for the noise control
    runs["vgg-noise-lr0.1"] = vgg(0.85, (0,), drift=0.5)
    assert "same noise does train" in section(fig2, runs).why


def test_santurkar_fig1_bn_at_the_high_rate_diverged_in_two_seeds_does_not_train():
    runs = {"vgg-bn-lr0.1": vgg(0.90), "vgg-none-lr0.1": vgg(0.85),
            "vgg-bn-lr0.5": vgg(0.91, (0, 1)), "vgg-none-lr0.5": vgg(0.10)}
    sec = section(fig1, runs)
    assert "at lr 0.5 BN does not train" in sec.why and sec.verdict != "reproduced"


def test_santurkar_dln_with_bn_diverged_in_two_seeds_is_not_reproduced():
    runs = {"dln-bn-lr1e-06": dln_runs(500.0, (0, 1)), "dln-none-lr1e-06": dln_runs(1600.0)}
    sec = section(dln, runs)
    assert sec.verdict == "not reproduced" and "not below the standard net's (inf" in sec.why


def _ioffe_runs(level, until=6000, diverged_at=None, steps=6000):
    m = [{"step": t, "acc": min(level, 0.1 + level * t / (steps / 3))}
         for t in range(0, until + 1, 250)]
    if diverged_at:
        m.append({"step": diverged_at, "diverged": True})
    return [FakeRun(summarize(m, diverged_step=diverged_at, wall_s=1.0, steps=steps), m)
            for _ in range(3)]


def test_ioffe_fig2_bn_x30_diverged_does_not_end_above_inception():
    runs = {v: _ioffe_runs(a) for v, a in [
        ("inception", .86), ("inception_lr0.02", .88), ("inception_lr0.04", .885),
        ("inception_x5", .80), ("bn_baseline", .89), ("bn_x5", .90), ("bn_x5_sigmoid", .85),
        ("inception_sigmoid", .1)]}
    runs["bn_x30"] = _ioffe_runs(0.92, until=1500, diverged_at=1510)  # its peak: 0.92
    sec = section(ioffe_fig2, runs)
    assert "BN-x30 ends above Inception: no" in sec.why
    assert "at least half for 'partly'" in sec.why


def test_ioffe_fig1_steps_to_counts_seeds_that_never_reach_at_the_budget():
    """The row showed the mean of the seeds that reached the level only ("1500" for one seed
    of three); fig2's row had been fixed the same way."""
    assert steps_text([1500.0, 2500.0, 2000.0], 50_000) == "2000 ± 500 (3/3 reach it)"
    got = steps_text([1500.0, math.inf, math.inf], 50_000)
    assert got.startswith("33833 ± ") and got.endswith("(1/3 reach it)")


# ----------------------------------------------------------- numbers that stop at divergence


class _Run(FakeRun):
    """A FakeRun with the config and meta that some reports read."""

    def __init__(self, summary, metrics=(), steps=100, seed=0):
        super().__init__(summary, metrics)
        self.config, self.meta = {"train": {"steps": steps}}, {"seed": seed}


def _fig1_runs(final, drift, ramp, diverged_at=None, steps=100):
    """Three seeds of an MLP whose accuracy climbs to ``final`` by step ``ramp`` and whose
    sigmoid percentiles move by ``drift`` over the run; with ``diverged_at`` every seed diverges
    there (after reaching ``final``)."""
    m = [{"step": t, "acc": final * min(1.0, t / ramp),
          "pct": [[drift * t / steps] * 100] * 3} for t in range(0, steps + 1, 10)]
    if diverged_at:
        m = [r for r in m if r["step"] < diverged_at] + [{"step": diverged_at, "diverged": True}]
    return [_Run(summarize(m, diverged_step=diverged_at, wall_s=1.0, steps=steps), m,
                 steps=steps, seed=s) for s in range(3)]


def test_values_leave_out_what_a_diverged_seed_logged_before_it_diverged():
    runs = {"v": [FakeRun({"diverged": True, "final_acc": 0.9}),
                  FakeRun({"diverged": False, "final_acc": 0.8})]}
    inp = Inputs("x", "paper", {}, runs, "paper")
    assert inp.values("v", "final_acc") == [0.8] and inp.scored("v", "final_acc") == [0.1, 0.8]


def test_ioffe_steps_to_counts_a_seed_that_reached_the_level_then_diverged_as_never():
    from bnlab.lab.experiments.ioffe2015 import steps_to

    runs = {"a": _ioffe_runs(0.9, until=3000, diverged_at=3010), "b": _ioffe_runs(0.9)}
    inp = Inputs("x", "paper", {}, runs, "paper")
    assert steps_to(inp, "a", 0.85) == [math.inf] * 3
    assert all(math.isfinite(s) for s in steps_to(inp, "b", 0.85))


def test_ioffe_fig1_with_bn_diverged_after_its_peak_is_not_reproduced():
    """BN reached a higher accuracy, sooner and with steadier percentiles, then diverged in
    every seed: each of fig1's checks once graded it by its numbers before it diverged."""
    from bnlab.lab.experiments.ioffe2015 import fig1 as ioffe_fig1

    runs = {"bn": _fig1_runs(0.95, 0.01, 20, diverged_at=95), "nobn": _fig1_runs(0.85, 1.0, 100)}
    sec = section(ioffe_fig1, runs)
    assert sec.verdict == "not reproduced", sec.why
    healthy = section(ioffe_fig1, {"bn": _fig1_runs(0.95, 0.01, 20),
                                   "nobn": _fig1_runs(0.85, 1.0, 100)})
    assert healthy.verdict == "reproduced", healthy.why


def test_a_diverged_run_caps_a_verdict_whose_checks_do_not_grade_divergence(tmp_path):
    from bnlab.lab.report import Section, _disclose

    runs = {"bn": [_Run({"diverged": True, "diverged_step": 40}, seed=1)],
            "nobn": [_Run({"diverged": False})]}
    inp = Inputs("x", "paper", {}, runs, "paper")
    for grades, want in ((False, "partly"), (True, "reproduced")):
        sec = Section("t", "c", "p", "s", "reproduced", "all checks hold.",
                      grades_divergence=grades)
        _disclose(sec, inp, [], tmp_path)
        assert sec.verdict == want and sec.notes[0] == "Diverged runs: bn seed1 (step 40)."
    assert 'would be "reproduced": all checks hold.' in _capped(inp, tmp_path).why


def _capped(inp, root):
    from bnlab.lab.report import Section, _disclose

    sec = Section("t", "c", "p", "s", "reproduced", "all checks hold.")
    _disclose(sec, inp, [], root)
    return sec


def test_santurkar_fig4_counts_a_blown_up_landscape_against_its_net():
    from bnlab.lab.experiments.santurkar2018._report import per_run
    from bnlab.lab.experiments.santurkar2018.fig4 import _median

    recs = [{"step": t, "landscape": {"loss_min": 1.0, "loss_max": v}}
            for t, v in ((0, 2.0), (10, math.nan), (20, math.inf))]
    assert _median("loss_width")(recs) == math.inf
    inp = Inputs("x", "paper", {}, {"v": [FakeRun({}, recs)]}, "paper")
    assert per_run(inp, "v", _median("loss_width")) == []
    assert per_run(inp, "v", _median("loss_width"), keep_inf=True) == [math.inf]


def test_ioffe_dropout_on_the_whole_training_set_reports_without_dividing_by_zero():
    from bnlab.lab.experiments.ioffe2015.dropout import _subset

    assert _subset({"train_examples": 0}, 8_000) == "the whole training set (8,000 images seen)"
    assert _subset({"train_examples": 2_000}, 8_000) == (
        "the first 2,000 training images (8,000 seen = 4.0 epochs)")


def test_santurkar_fig3_relative_ics_divides_within_one_run():
    """The ratio column zipped the seeds' ℓ2 and gradient-norm medians after each list had
    dropped its own missing values, pairing one seed's ℓ2 with another's norm."""
    from bnlab.lab.experiments.santurkar2018._report import per_run
    from bnlab.lab.experiments.santurkar2018.fig3 import _relative

    def run(l2, norm):
        return FakeRun({}, [{"step": t, "ics": {"k": {"l2": l2, "grad_norm": norm}}}
                            for t in (0, 1, 2)])

    runs = {"v": [run(None, 10.0), run(4.0, 2.0), run(9.0, 3.0)]}
    inp = Inputs("x", "paper", {}, runs, "paper")
    assert per_run(inp, "v", _relative("k")) == [2.0, 3.0]
