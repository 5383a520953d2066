"""The HTML report and the command that builds every output of a report from JSON files.

Usage::

    python -m bench.report results/*.json [--plots-dir plots] [--html PATH] [--title TEXT]

Each pytest-benchmark JSON gets a tidy CSV next to it (a row per strategy x case x machine,
timed or not); each audit JSON gets its accuracy matrix as CSV next to it; the recommendation
table goes to ``recommendations.json`` in the plots directory; PNG figures and the
self-contained HTML report go to the plots directory.

The page opens with a summary in plain words, every number in it computed from the inputs:
whether the symmetric-half loop beats the full loop and by how much, what to use for each way
of writing the net, what to avoid and why, and what was not measured. The analysis (loading,
statuses, the recommendation rule) is ``bench.analysis``; the figures are ``bench.report.plots``. ``recommendations.json`` is a list of ``rule.RECOMMENDATION_FIELDS``
records; ``fastest`` and ``leanest`` are null where no strategy qualified (docs/DESIGN.md,
"recommendations.json").
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import shlex
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from bench import cli
from bench.analysis import audit_tables, numbers, rule, tidy
from bench.problems.grid import ARCHS, MLP_ARCHS
from bench.report import plots
from bench.vocabulary import BASELINE, TIMED, WRONG

__all__ = ["render_html", "main"]


def _img(drawn: plots.Drawn) -> str:
    data = base64.b64encode(drawn.png).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(drawn.caption)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(drawn.caption)}</figcaption></figure>"
    )


def _table(frame: pd.DataFrame, table_id: str, escape: bool = True) -> str:
    """``frame`` as an HTML table; with ``escape=False`` its cells are HTML already."""
    if frame.empty:
        return "<p>(none)</p>"
    return frame.to_html(
        index=False, na_rep="—", table_id=table_id, float_format="{:.4g}".format, escape=escape
    )


def _ratio(value: float | None) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.2f}×"


def _bytes(value: float | None) -> str:
    if value is None or pd.isna(value):
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


# --- words -----------------------------------------------------------------------------------

#: how the summary names each way of writing the net (``bench.problems.grid.ARCHS``)
_ARCH_WORDS = {
    "mlp": "an MLP written as <code>nn.Sequential</code>",
    "custom": "a custom module (the same weights, a forward ending in <code>squeeze(-1)</code>, "
    "a hand-written MSE)",
    "layernorm": "a net with a LayerNorm after each hidden layer",
    "forum": "a forum thread's two-Linear Model",
    "cnn": "a CNN classifier's Linear head",
    "pinn_grad": "a PINN whose forward calls <code>torch.autograd.grad</code>",
    "pinn_hessian": "a PINN whose forward calls <code>vmap(hessian)</code> in the inputs",
    "transformer": "a transformer block with per-token logits",
    "weighted": "a GELU MLP with a per-sample-weighted MSE",
    "convnet": "a CNN (2 conv + 2 Linear) with all its weights",
}


def _code(name: str) -> str:
    return f"<code>{html.escape(str(name))}</code>"


def _listing(items: Iterable[str], conjunction: str = "and") -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def _times(lo: float, hi: float) -> str:
    """A ratio or a range of ratios, two significant digits: '2.4×' or '2.4× to 31×'."""
    lo_text, hi_text = f"{lo:.2g}×", f"{hi:.2g}×"
    return lo_text if lo_text == hi_text else f"{lo_text} to {hi_text}"


def _seconds(lo: float, hi: float | None = None) -> str:
    hi = lo if hi is None else hi
    lo_text, hi_text = f"{lo:.3g}", f"{hi:.3g}"
    return f"{lo_text} s" if lo_text == hi_text else f"{lo_text} to {hi_text} s"


def _count(value: float) -> str:
    """A break-even count of Hessians: 'never' where compiling does not pay."""
    if value is None or pd.isna(value):
        return "—"
    return "never" if math.isinf(value) else f"{math.ceil(value):,}"


def _counts(lo: float, hi: float) -> str:
    """A range of break-even counts: '7 to 100 Hessians', '100 Hessians', or never on some."""
    if math.isinf(hi) and not math.isinf(lo):
        return f"{_count(lo)} Hessians on some cases, never on others"
    return (
        f"{_count(lo)} Hessians"
        if _count(lo) == _count(hi)
        else f"{_count(lo)} to {_count(hi)} Hessians"
    )


def _P(lo: int, hi: int) -> str:
    return f"P = {lo:,}" if lo == hi else f"P {lo:,} to {hi:,}"


def _range(lo: int, hi: int) -> str:
    """A size range of P, as HTML."""
    return html.escape(f"{lo:,} ≤ P < {hi:,}")


def _cases(n: int) -> str:
    return f"{n} case{'s' if n != 1 else ''}"


def _prefix(groups: list[tuple[str, str]], machine: str, device: str) -> str:
    """'On <machine> (<device>), ' where the report holds several; '' where one."""
    return f"On {html.escape(machine)} ({device}), " if len(groups) > 1 else ""


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _not_run_line(row: pd.Series) -> str:
    """One line for a device where nothing was timed, e.g. 'cuda: 70 cells not run: ...'."""
    return (
        f"{row['device']} on {html.escape(row['machine'])}: {row['cells']} cells not run "
        f"({row['status']}, {_cases(row['cases'])} × {row['strategies']} strategies): "
        f"{html.escape(str(row['reason']))}"
    )


def _status_counts(df: pd.DataFrame, strategy: str) -> str:
    rows = df[df["strategy"] == strategy]
    if rows.empty:
        return f"{_code(strategy)} did not run"
    counts = rows["status"].value_counts()
    return f"{_code(strategy)}: " + ", ".join(f"{s} on {_cases(n)}" for s, n in counts.items())


def _loop_sentences(df: pd.DataFrame, groups: list[tuple[str, str]]) -> list[str]:
    """Whether the symmetric-half loop beats the full loop, and by how much, per group."""
    half, full = _code(numbers.HALF_LOOP), _code(numbers.FULL_LOOP)
    ratios = numbers.speedups(df, numbers.HALF_LOOP, numbers.FULL_LOOP)
    sentences = []
    for machine, device in groups or [(None, None)]:
        mine = (df["machine"] == machine) & (df["device"] == device) if machine else df.index >= 0
        part = ratios[(ratios["machine"] == machine) & (ratios["device"] == device)]
        if part.empty:
            answer = (
                f"no case ran both {half} and {full} accurately, so this cannot say whether "
                f"computing half the Hessian pays ({_status_counts(df[mine], numbers.HALF_LOOP)}"
                f"; {_status_counts(df[mine], numbers.FULL_LOOP)})"
            )
            sentences.append(_capital(f"{_prefix(groups, machine, device)}{answer}."))
            continue
        n, faster = len(part), int((part["speedup"] > 1).sum())
        lo, hi = part["speedup"].min(), part["speedup"].max()
        where = f"{_cases(n)} both ran accurately ({_P(part['P'].min(), part['P'].max())})"
        if faster == n:
            answer = (
                f"yes: {half}, the loop over half the Hessian, beats the full loop {full} on "
                f"all {where}, {_times(lo, hi)} faster"
            )
        elif faster == 0:
            answer = (
                f"no: {half} is slower than {full} on all {where}; it takes "
                f"{_times(1 / hi, 1 / lo)} the full loop's time"
            )
        else:
            answer = (
                f"only sometimes: {half} beats {full} on {faster} of the {where}; the full "
                f"loop's time over the half loop's ranges from {_times(lo, hi)}"
            )
        sentences.append(_capital(f"{_prefix(groups, machine, device)}{answer}."))
    return sentences


def _arch_sentence(arch: str, choices: pd.DataFrame, rows: pd.DataFrame, winners: set[str]) -> str:
    """What the planner runs on one way of writing the net, per size range: the decision
    box's rows of that arch (``rule.decision``), never another rule."""
    words = _ARCH_WORDS.get(arch, html.escape(str(arch)))
    parts = []
    for choice in choices.sort_values("P_min").to_dict("records"):
        where = _range(choice["P_min"], choice["P_max"])
        if not isinstance(choice["runs"], str):  # None, or NaN in a string column
            parts.append(
                f"what its estimates pick at {where} (no ranked strategy ran its "
                f"{_cases(choice['cases'])})"
            )
            continue
        text = f"<b>{_code(choice['runs'])}</b> at {where}"
        if isinstance(choice["runner_up"], str) and choice["tie"]:
            verdict = "slower than" if choice["beaten"] else "tied with"
            text += f" ({verdict} {_code(choice['runner_up'])})"
        parts.append(text)
    text = f"for {words}, {_code(rule.PLANNER)} runs {_listing(parts)}"
    # What the planner runs on another way of writing the net that does not run this one.
    for other in sorted(winners - set(choices["runs"].dropna())):
        refused = rows[(rows["strategy"] == other) & ~rows["status"].isin(TIMED)]
        if not refused.empty:
            first = refused.iloc[0]
            text += (
                f"; {_code(other)} does not run it ({first['status']}: "
                f"{html.escape(str(first['reason']))})"
            )
    return text


def _use_sentences(df: pd.DataFrame, groups: list[tuple[str, str]]) -> list[str]:
    """What the planner runs for each way of writing the net, per machine and device with
    timings: the decision box's rows, grouped by arch."""
    choices = rule.decision(df)
    if choices.empty:
        return ["Nothing was timed in these runs, so there is no choice."]
    cells = df.assign(arch=df["arch"].fillna("mlp")) if "arch" in df else df.assign(arch="mlp")
    sentences = []
    for machine, device in groups:
        mine = choices[(choices["machine"] == machine) & (choices["device"] == device)]
        winners = set(mine["runs"].dropna())
        rows = cells[(cells["machine"] == machine) & (cells["device"] == device)]
        parts = []
        for arch in ARCHS:
            choice = mine[mine["arch"] == arch]
            if choice.empty and arch not in MLP_ARCHS:
                continue  # the users' and structured nets are named only where runs hold them
            if choice.empty:
                parts.append(f"for {_ARCH_WORDS[arch]}, these runs hold no timed case")
            else:
                parts.append(_arch_sentence(arch, choice, rows[rows["arch"] == arch], winners))
        sentences.append(_capital(_prefix(groups, machine, device) + "; ".join(parts) + "."))
    return sentences


def _one_or_many_sentences(df: pd.DataFrame, recommendations: pd.DataFrame) -> list[str]:
    """Whether compiling changes the choice between one Hessian and many."""
    if numbers.compiled_vs_eager(df).empty:
        return [
            "No compiled variant ran beside its eager form, so the choice is the same for one "
            "Hessian or many (an eager strategy's first call is not recorded apart)."
        ]
    rows = recommendations.dropna(subset=["fastest"])
    differ = rows[rows["fastest_single"] != rows["fastest"]]
    if differ.empty:
        return [
            "Compiling does not change the choice: in every size range the fastest for many "
            "Hessians is also the fastest for one, first call (compile) included."
        ]
    several = rows["machine"].nunique() > 1
    parts = [
        f"for {_range(lo, hi)} ({html.escape(machine) + ', ' if several else ''}{device}, "
        f"{dtype}) {_code(single)} for a single Hessian of one structure (first call "
        f"included) but {_code(many)} for many"
        for machine, device, dtype, lo, hi, single, many in differ[
            ["machine", "device", "dtype", "P_min", "P_max", "fastest_single", "fastest"]
        ].itertuples(index=False)
    ]
    return [
        f"The choice differs in {len(differ)} of the {len(rows)} size ranges: "
        + "; ".join(parts)
        + "."
    ]


def _audit_sentences(audits: list[dict]) -> list[str]:
    if not audits:
        return [
            "no audit among these inputs, so correctness on nets beyond the benchmark's is "
            "unchecked (<code>python -m bench.audit</code>)"
        ]
    findings = audit_tables.audit_findings(audits)
    if findings.empty:
        return ["the audit found no strategy wrong or failing on any of its models"]
    order = list(tidy.strategy_facts(findings["strategy"]).index)
    findings = findings.sort_values("strategy", key=lambda names: names.map(order.index))
    sentences = []
    wrong = findings[findings["status"] == WRONG]
    for (kinds, refused), part in wrong.groupby(["kinds", "refused"], sort=False):
        upstream = sorted(set().union(*part["upstream"]))
        their = "their" if len(part) > 1 else "its"
        sentence = (
            f"avoid {_listing(map(_code, part['strategy']))} on nets with "
            f"{_listing(kinds, 'or')} layers: the audit found {their} Hessians wrong there with "
            f"no error raised (relative error up to {part['max_rel_err'].max():.2g}"
            + (f"; upstream {', '.join(upstream)}" if upstream else "")
            + ")"
        )
        sentence += (
            f", and with <code>supports()</code> honoured {'they refuse' if len(part) > 1 else 'it refuses'} such nets"
            if refused
            else ""
        )
        sentences.append(sentence)
    for _, row in findings[findings["status"] != WRONG].iterrows():
        sentences.append(
            f"{_code(row['strategy'])} raises {', '.join(row['exceptions'])} on "
            f"{_listing(row['kinds'], 'and')} nets"
        )
    return sentences


def _avoid_sentences(df: pd.DataFrame, audits: list[dict], groups: list) -> list[str]:
    """What to avoid and why: wrong Hessians, much slower strategies, costly compiles."""
    sentences = _audit_sentences(audits)
    wrong = df[df["status"] == WRONG]
    if not wrong.empty:
        counts = wrong.groupby("strategy")["case"].nunique()
        sentences.append(
            "the benchmark found "
            + _listing(f"{_code(s)} beyond tolerance on {_cases(n)}" for s, n in counts.items())
            + " (see 'Cells not timed')"
        )
    slow = numbers.much_slower(df)
    for machine, device in groups:
        part = slow[(slow["machine"] == machine) & (slow["device"] == device)]
        if part.empty:
            continue
        listed = _listing(
            f"{_code(r['strategy'])} ({r['times_fastest']:.0f}×)" for _, r in part.iterrows()
        )
        sentences.append(
            f"{_prefix(groups, machine, device)}much slower than the fastest on the same "
            f"cases, at least {numbers.SLOW_FACTOR:g}× its time (geometric mean over the cases "
            f"each ran): {listed}"
        )
    for _, row in numbers.compile_summary(df).iterrows():
        name, eager = _code(row["strategy"]), _code(row["eager"])
        if row["faster"] == 0:
            sentences.append(
                f"{name} is never faster than {eager} once compiled (on its "
                f"{_cases(row['cases'])}), and its first call takes "
                f"{_seconds(row['first_call_lo'], row['first_call_hi'])}: use {eager}"
            )
        else:
            sentences.append(
                f"for one Hessian, {name}'s first call (compile included) takes "
                f"{_seconds(row['first_call_lo'], row['first_call_hi'])} against "
                f"{_seconds(row['eager_lo'], row['eager_hi'])} for {eager}; compiling pays after "
                f"{_counts(row['break_even_lo'], row['break_even_hi'])} of one structure "
                f"(faster once compiled on {row['faster']} of {_cases(row['cases'])})"
            )
    return [_capital(sentence) + "." for sentence in sentences]


def _block(heading: str, sentences: list[str], per_group: bool = False) -> str:
    """A paragraph under a bold lead; sentences for several machines or devices as a list."""
    if per_group and len(sentences) > 1:
        items = "".join(f"<li>{sentence}</li>" for sentence in sentences)
        return f"<p><b>{heading}</b></p><ul>{items}</ul>"
    return f"<p><b>{heading}</b> {' '.join(sentences)}</p>"


def _summary_html(df: pd.DataFrame, audits: list[dict], recommendations: pd.DataFrame) -> str:
    """The opening paragraphs: the user's questions answered with this run's numbers."""
    if df.empty:
        return (
            "<div id='summary'><p>No benchmark run among these inputs: nothing was timed, so "
            "there is no recommendation. "
            + " ".join(_capital(sentence) + "." for sentence in _audit_sentences(audits))
            + "</p></div>"
        )
    timed = df[numbers.device_timed(df)]
    groups = sorted(set(zip(timed["machine"], timed["device"])))
    where = _listing(f"{html.escape(machine)} ({device})" for machine, device in groups)
    blocks = [
        f"<p>Timed on {where or 'no device: nothing was timed'}.</p>",
        _block(
            "Is the symmetric-half loop faster than the full loop?",
            _loop_sentences(df, groups),
            True,
        ),
        _block("What to use:", _use_sentences(df, groups), True),
        _block("One Hessian or many:", _one_or_many_sentences(df, recommendations)),
        _block("What to avoid:", _avoid_sentences(df, audits, groups)),
    ]
    missing = numbers.untimed_devices(df)
    if not missing.empty:
        lines = list(map(_not_run_line, missing.to_dict("records")))
        blocks.append(_block("Not measured:", [f"{'; '.join(lines)}."]))
    return "<div id='summary'>" + "".join(blocks) + "</div>"


# --- tables ----------------------------------------------------------------------------------


def _recommendation_view(table: pd.DataFrame, audits: list[dict]) -> pd.DataFrame:
    """The recommendation table as HTML cells: the recommended strategy in bold."""
    findings = audit_tables.audit_findings(audits)
    notes = {
        strategy: "; ".join(
            f"{status} on {', '.join(kinds)}"
            for status, kinds in zip(part["status"], part["kinds"])
        )
        for strategy, part in findings.groupby("strategy")
    }

    def name(strategy: str | None, bold: bool = False) -> str:
        if strategy is None or pd.isna(strategy):
            return "none ran every case it supports"
        text = f"<b>{html.escape(strategy)}</b>" if bold else html.escape(strategy)
        if strategy in notes:
            return f"{text} (audit: {html.escape(notes[strategy])})"
        return text

    return pd.DataFrame(
        {
            "machine": table["machine"].map(html.escape),
            "device": table["device"],
            "dtype": table["dtype"],
            "P range": [_range(lo, hi) for lo, hi in zip(table["P_min"], table["P_max"])],
            "cases": [
                f"{n} ({html.escape(f)} refused {n - k})" if pd.notna(k) and k < n else f"{n}"
                for n, k, f in zip(table["cases"], table["fastest_cases"], table["fastest"])
            ],
            "fastest (many Hessians)": [
                f"tie: {name(f, True)} ≈ {name(r)}" if tie else name(f, True)
                for f, r, tie in zip(table["fastest"], table["runner_up"], table["tie"])
            ],
            "fastest time (s, geo-mean of min)": table["fastest_s"].map("{:.4g}".format),
            f"speedup vs {BASELINE}": table[f"fastest_vs_{BASELINE}"].map(_ratio),
            "runner-up": table["runner_up"].map(name),
            "fastest for one Hessian (first call included)": [
                f"{name(s)} ({t:.4g} s)" if isinstance(s, str) else name(s)
                for s, t in zip(table["fastest_single"], table["fastest_single_s"])
            ],
            "peers (time / fastest)": table["peers"].map(
                lambda p: ", ".join(f"{html.escape(k)}: {_ratio(v)}" for k, v in p.items()) or "—"
            ),
            "leanest": table["leanest"].map(name),
            "leanest peak": table["leanest_peak_bytes"].map(_bytes),
            f"memory vs {BASELINE} (× less)": table[f"leanest_vs_{BASELINE}"].map(_ratio),
        }
    )


#: compiled-vs-eager rows shown per machine, device, dtype and compiled variant: the largest P
_LARGEST_CASES = 3


def _compiled_html(df: pd.DataFrame) -> str:
    """Compiled variants beside their eager forms at the largest cases, with break-even."""
    pairs = numbers.compiled_vs_eager(df)
    if pairs.empty:
        return (
            "<p>No compiled variant (<code>torch.compile</code>) ran beside its eager form in "
            "these runs.</p>"
        )
    keys = ["machine", "device", "dtype", "strategy"]
    largest = pairs.sort_values("P", ascending=False).groupby(keys).head(_LARGEST_CASES)
    largest = largest.sort_values([*keys, "P"])
    view = pd.DataFrame(
        {
            "machine": largest["machine"],
            "device": largest["device"],
            "case": largest["case"],
            "P": largest["P"].map("{:,}".format),
            "compiled": largest["strategy"],
            "eager": largest["eager"],
            "eager min (s)": largest["eager_s"],
            "compiled min (s)": largest["compiled_s"],
            "compiled / eager": largest["compiled_over_eager"].map(_ratio),
            "compile: first call (s)": largest["first_call_s"],
            "break-even (Hessians)": largest["break_even"].map(_count),
        }
    )
    return (
        "<p>Each compiled variant beside the eager strategy it compiles, on its "
        f"{_LARGEST_CASES} largest cases. Break-even is first call / (eager min − compiled "
        "min): about the number of Hessians of one structure after which compiling pays; "
        "'never' where the compiled variant is not faster.</p>" + _table(view, "compiled")
    )


_CSS = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1600px; line-height: 1.35; }
#summary p { max-width: 75em; }
#decision { border: 2px solid #333; padding: 0 1em; margin-bottom: 1.5em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f0f0f0; }
figure { margin: 1em 0; } img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
""" + "".join(
    f"td.{status.replace(' ', '-')} {{ background: {colour}; }}\n"
    for status, colour in plots.STATUS_COLOURS.items()
)


def _decision_html(df: pd.DataFrame) -> str:
    """The decision box, first on the page: the default is the planner; what it runs per
    device, arch and size, with the evidence and its regret (``rule.decision``); devices
    not measured."""
    planner = _code(rule.PLANNER)
    rows = []
    for r in rule.decision(df).to_dict("records"):
        if not isinstance(r["runs"], str):  # None, or NaN in a string column
            runs = "no ranked strategy ran every case it supports"
            evidence = f"{_cases(r['cases'])}; {planner} falls back to its estimates"
        elif isinstance(r["runner_up"], str):
            runs = _code(r["runs"])
            verdict = "slower than" if r["beaten"] else "tied with" if r["tie"] else "faster than"
            evidence = (
                f"{_cases(r['cases'])}; {verdict} {_code(r['runner_up'])}: wins "
                f"{r['wins']} of {r['cases']}; runner-up / it {r['ratio_median']:.2f}× median "
                f"[{r['ratio_lo']:.2f}×–{r['ratio_hi']:.2f}×]"
            )
        else:
            runs = _code(r["runs"])
            evidence = f"the only strategy repeated on all {_cases(r['cases'])}"
        if isinstance(r["runs"], str) and r["ranked_in"] != (r["P_min"], r["P_max"]):
            evidence += (
                f"; no strategy repeated on every case of this range: the ranking of "
                f"{_range(*r['ranked_in'])}"
            )
        regret = (
            f"{r['regret_median']:.2f}× median, {r['regret_hi']:.2f}× at most "
            f"({_cases(r['regret_cases'])})"
            if r["regret_cases"]
            else "not measured"
        )
        arch = html.escape(str(r["arch"]))
        rows.append(
            f"<tr><td>{html.escape(r['device'])}, {html.escape(r['dtype'])}</td>"
            f"<td>{arch}</td><td>{_range(r['P_min'], r['P_max'])}</td><td>{runs}</td>"
            f"<td>{evidence}</td><td>{regret}</td></tr>"
        )
    measured = set(df.loc[numbers.device_timed(df), "device"]) if not df.empty else set()
    for device in sorted({"cpu", "cuda"} - measured):
        rows.append(
            f"<tr><td>{device}</td><td>any</td><td>any P</td><td>not measured</td>"
            f"<td>no {device.upper() if device == 'cuda' else device} run exists: {planner} "
            "has no measured ranking there (its estimates say never measured on this "
            "device) until one is committed</td><td>not measured</td></tr>"
        )
    threads = sorted(pd.to_numeric(df.get("threads", pd.Series(dtype=float))).dropna().unique())
    note = (
        f" Timed with {_listing(f'{int(t)}' for t in threads)} thread(s): a many-core CPU "
        "may rank differently."
        if threads
        else ""
    )
    return (
        f"<div id='decision'><h2>Decision: the default is {planner}</h2>"
        f"<p>{planner} plans per net: it takes the ranking of the net's device and size range "
        "(the recommendation rule below, as its table keeps it: the range's plain nets; for a "
        "net whose derivatives pass through LayerNorm, convolution or attention layers, first "
        "the ranking of the range's nets with the same layers, where it has any), runs the "
        "first strategy there "
        "that runs the net, and verifies the result; per way of writing the net (arch), that "
        "is the first of the ranking that ran every case of the arch it supports. Evidence: the fastest "
        "other strategy on those cases (the runner-up), its min time over the choice's per "
        f"case (below 1× where it was faster); a win is at least {rule.FASTER_RATIO:g}× "
        f"and significant (Mann-Whitney U over rounds). Regret: {planner}'s own time over the "
        f"fastest strategy's on the same case.{note}</p>"
        "<table id='decision-table'><tr><th>device</th><th>arch</th><th>size</th>"
        f"<th>{planner} runs</th><th>evidence</th><th>{planner}'s regret</th></tr>"
        f"{''.join(rows)}</table></div>"
    )


def _matrix_html(matrix: pd.DataFrame, statuses: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(m))}</th>" for m in matrix.columns)
    body = []
    for strategy, row in matrix.iterrows():
        cells = "".join(
            f"<td class='{html.escape(status.replace(' ', '-'))}'>{html.escape(str(text))}</td>"
            for text, status in zip(row, statuses.loc[strategy])
        )
        body.append(f"<tr><th>{html.escape(str(strategy))}</th>{cells}</tr>")
    return (
        f"<table id='accuracy-matrix'><tr><th>strategy \\ model</th>{head}</tr>"
        f"{''.join(body)}</table>"
    )


def _bugs_html(audits: list[dict]) -> str:
    """Each known bug once, however many audits list it (the first audit's word on it)."""
    parts, seen = [], set()
    for audit in audits:
        for bug in audit.get("known_bugs") or []:
            if bug.get("title") in seen:
                continue
            seen.add(bug.get("title"))
            still = "still reproduces" if bug.get("reproduces") else "no longer reproduces"
            parts.append(
                f"<h3>{html.escape(str(bug.get('title')))}</h3><p>upstream: "
                f"{html.escape(str(bug.get('upstream')))}; strategies: "
                f"{html.escape(', '.join(bug.get('strategies') or []))}; models: "
                f"{html.escape(', '.join(bug.get('models') or []))}; <b>{still}</b> with torch "
                f"{html.escape(str(audit.get('torch_version')))}</p>"
                "<details><summary>reproduction</summary>"
                f"<pre>{html.escape(str(bug.get('reproduction')))}</pre></details>"
            )
    return "".join(parts) or "<p>(none)</p>"


def _not_timed_html(df: pd.DataFrame) -> str:
    """Devices where nothing ran, one line per reason; then every other untimed cell."""
    lines = "".join(
        f"<li>{_not_run_line(row)}</li>" for row in numbers.untimed_devices(df).to_dict("records")
    )
    timed_devices = df[numbers.device_timed(df)]
    return (
        (f"<ul id='not-run'>{lines}</ul>" if lines else "")
        + _table(numbers.not_timed_counts(timed_devices), "not-timed-counts")
        + "<details><summary>Every cell not timed, with its reason</summary>"
        + _table(numbers.not_timed(timed_devices), "not-timed")
        + "</details>"
    )


#: how many of each case's fastest strategies the case table shows
CASE_TOP = 5


def _case_html(df: pd.DataFrame) -> str:
    """Cases x their fastest ``CASE_TOP`` strategies, each cell its median [min–max], rounds,
    relative error; then every strategy as a multiple of one gradient and of the fastest."""
    cells = numbers.case_cells(df)
    rows = []
    for (machine, device, case), group in cells.groupby(["machine", "device", "case"], sort=False):
        entries = []
        for c in group[group["rank"] <= CASE_TOP].to_dict("records"):
            noisy = " <b>noisy</b>" if c["noisy"] else ""
            entries.append(
                f"<td>{_code(c['strategy'])} {c['median']:.3g} s "
                f"[{c['min']:.3g}–{c['max']:.3g}], {int(c['rounds'])} rounds, "
                f"err {c['max_rel_err']:.1e}{noisy}</td>"
            )
        entries += ["<td></td>"] * (CASE_TOP - len(entries))
        where = f"{machine}, {device}" if cells["machine"].nunique() > 1 else device
        rows.append(
            f"<tr><td>{html.escape(where)}</td><td>{html.escape(case)}</td>"
            f"<td>{int(group['P'].iloc[0]):,}</td>{''.join(entries)}</tr>"
        )
    head = "".join(f"<th>#{k}</th>" for k in range(1, CASE_TOP + 1))
    accuracy = numbers.accuracy_of_timed(df)
    worst = (
        f"; the worst relative error {accuracy['worst']:.2g} ({_code(accuracy['strategy'])} on "
        f"{html.escape(str(accuracy['case']))})"
        if accuracy["worst"] is not None
        else ""
    )
    wrong = accuracy["wrong"]
    stated = (
        f"<p id='timed-accuracy'>Accuracy of the timed cells: {accuracy['cells'] - wrong} of "
        f"{accuracy['cells']} within tolerance against the float64 reference{worst}.</p>"
    )
    multiples = numbers.multiples(df).rename(
        columns={
            "times_grad": "× one gradient (median)",
            "times_fastest": "× the case's fastest (geo-mean)",
            "times_fastest_lo": "lowest",
            "times_fastest_hi": "highest",
        }
    )
    return (
        stated
        + "<p>Per case, its five fastest ranked cells (not too slow to repeat) by median: median [min–max] of "
        "rounds, rounds, largest relative error; noisy where IQR / median > "
        f"{tidy.NOISY_IQR:g}.</p>"
        + f"<table id='cases'><tr><th>device</th><th>case</th><th>P</th>{head}</tr>"
        + "".join(rows)
        + "</table><h3>Every strategy as a multiple of one gradient and of the fastest</h3>"
        + _table(multiples, "multiples")
    )


def _regret_html(df: pd.DataFrame) -> str:
    """The planner's regret per case (``rule.regrets``), largest first, with its worst."""
    table = rule.regrets(df)
    planner = _code(rule.PLANNER)
    if table.empty:
        return f"<p>{planner} was not timed in these runs.</p>"
    intro = (
        f"<p>Per case: {planner}'s min time over that of the fastest strategy that ran "
        "accurately (peers and dispatchers excluded), and its first call, planning included, "
        "over the same; later calls of the same problem structure go straight to its plan.</p>"
    )
    timed = table.dropna(subset=["regret"])
    if not timed.empty:
        worst = timed.iloc[0]
        intro += (
            f"<p>Largest regret: <b>{worst['regret']:.2f}</b> on {_code(worst['case'])} "
            f"(fastest {_code(worst['fastest'])}); median {timed['regret'].median():.2f} over "
            f"{len(timed)} cases.</p>"
        )
    return intro + _table(table, "regrets")


def render_html(
    title: str,
    df: pd.DataFrame,
    audits: list[dict],
    figures: dict[str, plots.Drawn],
    recommendations: pd.DataFrame,
) -> str:
    """The self-contained report: summary, recommendation, figures, tables, the audit.

    ``figures`` is ``plots.write_figures``' result; the accuracy heat map goes with the audit.
    """
    audit_figure = figures.get("accuracy")
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        _decision_html(df),
        "<h2>Summary</h2>",
        _summary_html(df, audits, recommendations),
        "<h2>Recommendation</h2>",
        "<p>Per machine, device, dtype and range of P, over the range's plain nets (no "
        "LayerNorm, convolution or attention on the derivatives' path, where the range holds "
        "any; the others are ranked on their own, in the decision box): the fastest strategy "
        "among those that ran accurately on every case of the range they support (peers and dispatchers "
        "excluded; ranked by their time over each case's fastest, over the cases they ran), "
        "how many cases that rests on and how many the fastest refused, the fastest for one Hessian when the first call (compile "
        "included) counts, and the leanest in peak memory. A tie means the fastest is not "
        f"at least {rule.FASTER_RATIO:g}x faster than the runner-up and significantly so "
        "(Mann-Whitney U over rounds) on most of the range's cases. Size ranges have edges at 1 and 3 times "
        "powers of ten.</p>",
        _table(_recommendation_view(recommendations, audits), "recommendations", escape=False),
    ]
    if not df.empty:
        sections += ["<h2>Cases</h2>", _case_html(df)]
        sections += [f"<h2>{_code(rule.PLANNER)}'s regret</h2>", _regret_html(df)]
        sections += ["<h2>Compiled vs eager</h2>", _compiled_html(df)]
    sections += [_img(drawn) for name, drawn in figures.items() if name != "accuracy"]
    if not df.empty:
        sections += [
            "<h2>Cells not timed</h2>",
            _not_timed_html(df),
            "<h2>Growth exponents (log-log fit of min time)</h2>",
            _table(numbers.growth_exponents(df), "growth"),
            "<h2>First call (compile or plan) vs steady state</h2>",
            _table(numbers.first_calls(df), "first-call"),
        ]
    if audits:
        records = audit_tables.audit_frame(audits)
        sections += [
            "<h2>Accuracy audit (strategy × model)</h2>",
            _img(audit_figure) if audit_figure else "",
            "<details><summary>The same as a table</summary>",
            _matrix_html(
                audit_tables.accuracy_matrix(records), audit_tables.accuracy_statuses(records)
            ),
            "</details>",
            "<h2>Known upstream bugs</h2>",
            _bugs_html(audits),
        ]
    sections += ["<h2>Runs</h2>", _table(tidy.runs(df, audits), "runs")]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("files", nargs="*", type=Path, help="benchmark and audit JSON files")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="list the cells whose time changed by 10%% or more, significantly, from OLD to NEW",
    )
    parser.add_argument("--plots-dir", type=Path, default=Path("plots"))
    parser.add_argument("--html", type=Path, default=None, help="default: PLOTS_DIR/report.html")
    parser.add_argument("--title", default="hessbench report")
    return parser


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` unless the file already holds exactly it (left untouched)."""
    if not (path.is_file() and path.read_text() == text):
        path.write_text(text)


def _csv_paths(runs: dict[str, pd.DataFrame], audits: list[dict]) -> dict[str, Path]:
    """Each input's CSV: ``<run>.csv`` beside a benchmark JSON, ``<audit>_matrix.csv`` beside
    an audit JSON.

    Raises:
        tidy.InputFileError: two inputs would write one CSV, or a CSV would be an input.
    """
    paths = {source: Path(source).with_suffix(".csv") for source in runs}
    for source in (Path(a["source"]) for a in audits):
        paths[str(source)] = source.with_name(f"{source.stem}_matrix.csv")
    taken = {Path(source): source for source in paths}
    for source, path in paths.items():
        if path in taken and taken[path] != source:
            raise tidy.InputFileError(f"{taken[path]} and {source} would both be {path}")
        taken[path] = source
    return paths


def _write_csvs(runs: dict[str, pd.DataFrame], audits: list[dict]) -> None:
    """Each input's own CSV, with all of its cells; a file already holding it is not rewritten.

    One CSV per input, never the merged frame: two runs of one machine share cells, and the
    merged frame keeps one of them (`tidy.merge`).
    """
    paths = _csv_paths(runs, audits)
    for source, frame in runs.items():
        _write_if_changed(
            paths[source],
            frame.drop(columns=["source", *tidy.NOT_IN_CSV]).to_csv(index=False),
        )
    for source, rows in audit_tables.audit_frame(audits).groupby("source"):
        _write_if_changed(paths[source], audit_tables.accuracy_matrix(rows).to_csv())


def _compare(prog: str, old: Path, new: Path) -> int:
    """Print the cells that changed from ``old`` to ``new`` (``rule.changes``); 0, or 2."""
    try:
        frames = [tidy.load([path])[0] for path in (old, new)]
    except tidy.InputFileError as exc:
        return cli.fail(prog, str(exc))
    table = rule.changes(*frames)
    print(
        f"{len(table)} cells changed by {rule.FASTER_RATIO - 1:.0%} or more, significantly "
        f"(Mann-Whitney U over rounds, p < {rule.ALPHA:g}), from {old} to {new}:"
    )
    for row in table.itertuples():
        print(
            f"  {row.change:6} {row.new_over_old:6.2f}x  {row.strategy} on {row.case} "
            f"(P = {row.P:,}): {row.old_s:.4g} s -> {row.new_s:.4g} s "
            f"({row.rounds_old} -> {row.rounds_new} rounds)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Build the report; returns 0, or 2 (one line on stderr) for a bad argument or input."""
    parser = _parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.compare:
        if args.files:
            return cli.fail(prog, "--compare OLD NEW takes no other files")
        return _compare(prog, *args.compare)
    if not args.files:
        return cli.fail(prog, "no input files (benchmark and audit JSON, or --compare OLD NEW)")
    try:
        runs, audits = tidy.load_runs(args.files)
        df = tidy.merge(runs.values())
        _write_csvs(runs, audits)
        recommendations = rule.recommend(df)
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        if runs:
            # beside the figures, not the inputs: `results/*.json` must stay inputs only
            out = args.plots_dir / "recommendations.json"
            out.write_text(json.dumps(rule.recommendation_records(recommendations), indent=1))
        figures = plots.write_figures(df, args.plots_dir, audits)
        html_path = args.html or args.plots_dir / "report.html"
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(render_html(args.title, df, audits, figures, recommendations))
    except tidy.InputFileError as exc:
        return cli.fail(prog, str(exc))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        return cli.fail(prog, f"cannot write{where}: {exc.strerror or exc}")
    print(f"bench.report: wrote {html_path} ({len(df)} cells; {shlex.join(map(str, args.files))})")
    return 0
