"""The report: every finished run under ``runs/`` → ``report/report.md`` (PNG figures beside it)
and a self-contained ``report/index.html`` (figures embedded). Reads run directories only.

Each experiment's ``report`` turns an `Inputs` (its finished runs of one preset) into a
`Section`: the paper's claim and numbers, ours (mean ± std over seeds), the data substitution
and a plain verdict.
"""

from __future__ import annotations

import base64
import html
import math
import re
import shlex
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.lab import runs as runs_mod
from bnlab.lab.config import override_key
from bnlab.lab.experiments import CITATIONS
from bnlab.lab.plots import Curve

__all__ = ["CHANCE", "Inputs", "Section", "Table", "curve", "mean_std", "scored_text",
           "write_report"]

# The lab's data sets have 10 classes: a diverged run's accuracy in a verdict's checks.
CHANCE = 0.1

VERDICTS = ("reproduced", "partly", "not reproduced", "inconclusive")


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    """What an experiment reports for one preset."""

    title: str
    claim: str
    paper: str  # the paper's numbers, in words (markdown)
    substitution: str  # which data replaces the paper's and what else is scaled
    verdict: str  # one of VERDICTS
    why: str  # the verdict's reason, with our numbers
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG)
    notes: list[str] = field(default_factory=list)
    # Whether the checks count a diverged seed against the method it tests (`Inputs.scored`,
    # an infinite step count or loss); where they do not, a diverged run caps the verdict.
    grades_divergence: bool = False


@dataclass
class Inputs:
    """An experiment's finished runs of one preset tag: variant → runs sorted by seed."""

    experiment: str
    tag: str
    config: dict[str, Any]
    runs: dict[str, list[runs_mod.Run]]
    preset: str = ""
    overrides: list[str] = field(default_factory=list)  # the --set items behind the tag
    unfinished: list[str] = field(default_factory=list)  # "<variant> seed<k>" of this tag

    @property
    def data_dir(self) -> str | None:
        """The runs' ``--data-dir`` (None: the default, Fashion-MNIST; or no data set)."""
        return (self.config.get("data") or {}).get("dir")

    @property
    def seeds(self) -> int:
        return max((len(v) for v in self.runs.values()), default=0)

    def overridden(self, key: str) -> bool:
        """Whether ``--set key=...`` changed the preset (e.g. "optim.lr")."""
        return any(override_key(o) == key for o in self.overrides)

    def summaries(self, variant: str) -> list[dict[str, Any]]:
        return [r.summary or {} for r in self.runs.get(variant, [])]

    def values(self, variant: str, key: str) -> list[float]:
        """``key`` of every seed's summary that did not diverge (None values dropped): a
        diverged run's numbers are those from before it diverged."""
        return [s[key] for s in self.summaries(variant)
                if s.get(key) is not None and not s.get("diverged")]

    def scored(self, variant: str, key: str, diverged: float = CHANCE) -> list[float]:
        """``key`` of every finished seed for a verdict's checks, a diverged seed counting as
        ``diverged`` (the outcome against the method: chance accuracy, an infinite loss). With
        `values` a diverged seed drops out, and a check of the survivors (or of none, which
        skipped the check) passed where the method had failed."""
        out = []
        for s in self.summaries(variant):
            if s.get("diverged"):
                out.append(diverged)
            elif s.get(key) is not None:
                out.append(float(s[key]))
        return out

    def diverged(self, variant: str) -> int:
        """How many seeds of ``variant`` diverged."""
        return sum(bool(s.get("diverged")) for s in self.summaries(variant))


def scored_text(values: Sequence[float], diverged: int, fmt: str = "{:.4f}") -> str:
    """`mean_std` of `Inputs.scored` values, saying how many seeds diverged (an infinite loss
    among them makes the mean ∞)."""
    text = "∞" if any(math.isinf(v) for v in values) else mean_std(values, fmt)
    return text + (f" ({diverged} of {len(values)} diverged)" if diverged else "")


def mean_std(values: Sequence[float], fmt: str = "{:.4f}", *, n: bool = False) -> str:
    """"m ± s" over seeds (just "m" for one seed; "–" for none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "–"
    text = fmt.format(statistics.fmean(vals))
    if len(vals) > 1:
        text += " ± " + fmt.format(statistics.stdev(vals))
    return text + (f" (n={len(vals)})" if n else "")


def curve(inputs: Inputs, variant: str, key: str = "acc") -> Curve:
    """Mean and std over seeds of metric ``key`` at every logged step (seeds that stopped early,
    e.g. diverged, drop out of later steps)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for run in inputs.runs.get(variant, []):
        for rec in run.metrics():
            if isinstance(rec.get(key), (int, float)):
                by_step[rec["step"]].append(float(rec[key]))
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    stds = [statistics.pstdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps]
    return steps, means, stds


_META_KEYS = ("experiment", "preset", "variant", "seed")


def _read_meta(run: runs_mod.Run) -> tuple[dict[str, Any], str | None]:
    """(``run``'s config.json, why the run cannot be reported or None): a config.json that is
    no bnlab run's (another tool's, under --runs), or a damaged file."""
    try:
        meta = run.meta
        lacking = [k for k in _META_KEYS if k not in meta]
        if lacking:
            return meta, f"not a bnlab run (its config.json has no {', '.join(lacking)})"
        if run.finished:
            run.summary  # noqa: B018 (parsed now, so that a damaged one is named here)
    except ValueError as e:
        return {}, str(e)
    return meta, None


def collect(root: str | Path, problems: list[str] | None = None) -> list[Inputs]:
    """Group the finished runs under ``root`` by (experiment, preset tag). Directories that
    cannot be read are skipped, each with its reason appended to ``problems``; groups with
    unfinished runs only come back with no runs (the report lists how to finish them)."""
    groups: dict[tuple[str, str], dict[str, list[runs_mod.Run]]] = defaultdict(
        lambda: defaultdict(list))
    metas: dict[tuple[str, str], dict[str, Any]] = {}
    unfinished: dict[tuple[str, str], list[str]] = defaultdict(list)
    for run in runs_mod.find_runs(root):
        meta, why = _read_meta(run)
        if why is not None:
            if problems is not None:
                problems.append(f"skipped {run.path}: {why}")
            continue
        key = (meta["experiment"], meta.get("tag", meta["preset"]))
        metas.setdefault(key, meta)
        if not run.finished:  # interrupted, or running now: not graded, but named
            unfinished[key].append(f"{meta['variant']} seed{meta['seed']}")
            groups.setdefault(key, defaultdict(list))  # listed with how to finish it
            continue
        groups[key][meta["variant"]].append(run)
        metas[key] = meta
    order = {"paper": 0, "quick": 1, "smoke": 2}
    out = []
    for (exp, tag), by_variant in sorted(
            groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1].split("-")[0], 3),
                                            kv[0][1])):
        variants = {v: sorted(rs, key=lambda r: r.meta["seed"]) for v, rs in by_variant.items()}
        meta = metas[(exp, tag)]
        out.append(Inputs(exp, tag, meta["config"], variants, meta["preset"],
                          list(meta.get("overrides", [])), sorted(unfinished[(exp, tag)])))
    return out


def _incomplete(exp: Any, inp: Inputs) -> list[str]:
    """The runs of ``inp``'s experiment and tag that are unfinished or missing: every variant of
    its config at every seed that any variant reached ("<variant> seed<k>")."""
    missing = list(inp.unfinished)
    try:  # the config the runs were made with: the preset, its --set items and its data dir
        expected = list(exp.variants(exp.config(inp.preset, inp.overrides, inp.data_dir)))
    except Exception:  # an experiment changed since (a renamed preset or key): only what exists
        expected = list(inp.runs)
    for variant in expected:
        have = {r.meta["seed"] for r in inp.runs.get(variant, [])}
        missing += [f"{variant} seed{k}" for k in range(inp.seeds) if k not in have
                    and f"{variant} seed{k}" not in inp.unfinished]
    return sorted(set(missing))


def _md_table(t: Table) -> str:
    def row(cells: Sequence[str]) -> str:  # a "|" in a cell (|log10 s|) would split it
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    lines = [row(t.headers), "|" + "---|" * len(t.headers), *map(row, t.rows)]
    return (f"*{t.caption}*\n\n" if t.caption else "") + "\n".join(lines)


def _html(text: str) -> str:
    """Markdown prose as HTML: escaped, with its `code` spans as <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def resume_command(experiment: str, preset: str, overrides: Sequence[str], data_dir: str | None,
                   root: str | Path, seeds: int) -> str:
    """The command that finishes a preset's runs where they stopped (the same config, so the
    same run directories)."""
    parts = ["bnlab", "run", experiment, "--preset", preset, "--seeds", str(seeds), "--resume",
             "--out", str(root)]
    for o in overrides:
        parts += ["--set", o]
    if data_dir is not None and not any(override_key(o) == "data.dir" for o in overrides):
        parts += ["--data-dir", data_dir]
    return shlex.join(parts)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in t.rows)
    cap = f"<caption>{html.escape(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
        "line-height:1.45}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left}caption{font-style:italic;text-align:left}"
        "img{max-width:100%}.v{font-weight:bold}.reproduced{color:#186a18}.partly{color:#9a6a00}"
        ".not{color:#a01818}h2{border-top:1px solid #ccc;padding-top:1em}")


def _disclose(sec: Section, inp: Inputs, incomplete: list[str], root: str | Path) -> None:
    """Say what the section's numbers rest on where it is not the preset as run in full: a
    verdict over an incomplete set of runs is inconclusive, and runs on other data than
    Fashion-MNIST, or with --set overrides, say so."""
    if incomplete:
        shown = ", ".join(incomplete[:8]) + (f" and {len(incomplete) - 8} more"
                                              if len(incomplete) > 8 else "")
        cmd = resume_command(inp.experiment, inp.preset, inp.overrides, inp.data_dir, root,
                             inp.seeds)
        sec.why = (f"{len(incomplete)} run(s) of this preset are unfinished or missing "
                   f"({shown}): finish them with `{cmd}`. On the finished runs alone the "
                   f"verdict would be \"{sec.verdict}\": {sec.why}")
        sec.verdict = "inconclusive"
    diverged = [f"{v} seed{r.meta.get('seed', '?')} (step {(r.summary or {}).get('diverged_step')})"
                for v, rs in inp.runs.items() for r in rs if (r.summary or {}).get("diverged")]
    if diverged:
        sec.notes.insert(0, f"Diverged runs: {', '.join(diverged)}.")
    if diverged and not sec.grades_divergence and sec.verdict == "reproduced":
        sec.why = (f"{len(diverged)} run(s) diverged, and this experiment's checks read numbers "
                   "that stop where a run diverged: the verdict is at most \"partly\". "
                   f"Without that rule it would be \"reproduced\": {sec.why}")
        sec.verdict = "partly"
    if inp.data_dir is not None:
        sec.substitution = (f"These runs used the IDX data in `{inp.data_dir}` (--data-dir), not "
                            f"Fashion-MNIST; the default substitution reads: "
                            f"{sec.substitution}")
    if inp.overrides:
        sec.notes.insert(0, "Overrides of the preset: "
                         + ", ".join(f"`--set {o}`" for o in inp.overrides) + ".")


def _seeds_started(inp: Inputs) -> int:
    """Seeds 0..k−1 that some run of ``inp`` reached, finished or not."""
    started = [int(u.rsplit("seed", 1)[1]) + 1 for u in inp.unfinished]
    return max([inp.seeds, *started])


def _section(exp: Any, inp: Inputs, root: str | Path, figures: Path) -> tuple[list[str], list[str]]:
    """The markdown and HTML lines of one experiment's section (its PNGs written to
    ``figures``)."""
    sec: Section = exp.report(inp)
    if sec.verdict not in VERDICTS:  # (a section that fails is listed under Problems)
        raise ValueError(f"verdict must be one of {VERDICTS}, got {sec.verdict!r}")
    _disclose(sec, inp, _incomplete(exp, inp), root)
    head = f"{inp.experiment} — {sec.title} (preset `{inp.tag}`, {inp.seeds} seed(s))"
    md = ["", f"## {head}", "", f"**Claim (paper).** {sec.claim}", "",
          f"**Paper's numbers.** {sec.paper}", "", f"**Data substitution.** "
          f"{sec.substitution}", "", f"**Verdict: {sec.verdict}.** {sec.why}"]
    vclass = sec.verdict.split()[0]
    hb = [f"<h2>{_html(head)}</h2>",
          f"<p><b>Claim (paper).</b> {_html(sec.claim)}</p>",
          f"<p><b>Paper's numbers.</b> {_html(sec.paper)}</p>",
          f"<p><b>Data substitution.</b> {_html(sec.substitution)}</p>",
          f"<p class='v {vclass}'>Verdict: {html.escape(sec.verdict)}. "
          f"<span style='font-weight:normal;color:black'>{_html(sec.why)}</span></p>"]
    for t in sec.tables:
        md += ["", _md_table(t)]
        hb.append(_html_table(t))
    for i, (caption, png) in enumerate(sec.figures):
        name = f"{inp.experiment}-{inp.tag}-{i}.png"
        (figures / name).write_bytes(png)
        md += ["", f"![{caption}](figures/{name})", "", f"*{caption}*"]
        b64 = base64.b64encode(png).decode()
        hb.append(f"<figure><img src='data:image/png;base64,{b64}' "
                  f"alt='{html.escape(caption)}'><figcaption>{_html(caption)}</figcaption></figure>")
    for note in sec.notes:
        md += ["", note]
        hb.append(f"<p>{_html(note)}</p>")
    return md, hb


def write_report(root: str | Path = "runs", out: str | Path = "report",
                 problems: list[str] | None = None) -> Path:
    """Write ``out/report.md`` (+ ``out/figures/*.png``) and ``out/index.html``; return the
    HTML path. Experiments with no finished run are listed as not run, or, where runs were
    started, with the command that finishes them. Run directories that cannot be read are
    skipped, and a section that fails is left out; both are listed under "Problems" in the
    report and appended to ``problems`` (section failures start with "section ")."""
    from bnlab.lab.registry import all_experiments

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    exps = all_experiments()
    found: list[str] = []
    inputs = [i for i in collect(root, found) if i.experiment in exps]
    md = ["# bnlab report", "", f"Finished runs read from `{root}`. The papers (sections"
          " name their figures in these versions):", ""]
    md += [f"- [{key}] {cite}" for key, cite in CITATIONS.items()]
    hb = ["<!doctype html><meta charset='utf-8'><title>bnlab report</title>",
          f"<style>{_CSS}</style><h1>bnlab report</h1>",
          f"<p>Finished runs read from <code>{html.escape(str(root))}</code>. The papers "
          "(sections name their figures in these versions):</p><ul>"
          + "".join(f"<li>[{key}] {html.escape(cite)}</li>" for key, cite in CITATIONS.items())
          + "</ul>"]
    started: list[str] = []
    for inp in inputs:
        if not inp.runs:  # only unfinished runs: nothing to grade yet
            cmd = resume_command(inp.experiment, inp.preset, inp.overrides, inp.data_dir, root,
                                 _seeds_started(inp))
            started.append(f"`{inp.experiment}` (preset `{inp.tag}`, "
                           f"{len(inp.unfinished)} unfinished run(s)): `{cmd}`")
            continue
        try:
            sec_md, sec_hb = _section(exps[inp.experiment], inp, root, out / "figures")
        except Exception as e:  # one experiment's report must not take the others with it
            found.append(f"section {inp.experiment} (preset {inp.tag}) failed: "
                         f"{type(e).__name__}: {e}")
            continue
        md += sec_md
        hb += sec_hb
    reached = {i.experiment for i in inputs}
    lists = [("Unfinished", started),
             ("Not run yet", [f"`{n}`: `bnlab run {n} --preset paper`"
                              for n in exps if n not in reached]),
             ("Problems", found)]
    for title, items in lists:
        if items:
            md += ["", f"## {title}", ""] + [f"- {item}" for item in items]
            hb.append(f"<h2>{title}</h2><ul>"
                      + "".join(f"<li>{_html(item)}</li>" for item in items) + "</ul>")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "index.html").write_text("\n".join(hb) + "\n")
    if problems is not None:
        problems.extend(found)
    return out / "index.html"
