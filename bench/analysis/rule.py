"""The recommendation rule, over the tidy frame (``bench.analysis.tidy``): size ranges, the
candidates' ranking, the significance test that calls one strategy faster than another, the
recommendation table, the planner's decision and regret, and the cells that changed between
two runs.

Pandas only, no torch: ``auto``'s table (``bench.auto_table``) and the end of a benchmark run
(``bench.run``) use the rule as the report does.

Recommendation rule, per machine, device, dtype and size range of P (docs/DESIGN.md,
"The recommendation rule"):

- Size ranges have edges at 1 and 3 times powers of ten (..., 1,000, 3,000, 10,000, ...):
  a row covers ``P_min <= P < P_max``. Only ranges holding a case appear.
- A range's own ranking rests on its plain nets (no kinds signature: MLPs, however
  written, the users' plain nets), where it holds any (:func:`plain`).
- A strategy is a candidate only if it ran accurately (status "ok") on every case of the
  range that it supports, is not a peer and is not a dispatcher: wrong, out-of-memory,
  skipped or failing cells rule it out; a refusal ("unsupported": the strategy says it
  cannot take that net) does not, as ``auto`` moves on to the next strategy there.
- Candidates are ranked by their time relative to each case's fastest candidate
  (``vs_fastest``: the geometric mean over the cases it ran of its min time over the
  least min time of any candidate on that case). Where every candidate ran the same cases,
  this is the order of the geometric means of their min times. Its time is that geometric
  mean over the cases it ran; its memory the largest ``peak_bytes`` over them.
- Ranges where nothing at all was timed (e.g. CUDA cases on a machine without CUDA) are
  left out; their cells are listed by ``bench.analysis.numbers.not_timed``.
- A cell too slow to repeat (``too_slow``: one round) is left out, as if it had not run;
  a case on which no strategy was repeated ranks nothing and is left out, but a wrong,
  failing or out-of-memory cell on it still rules its strategy out (``FAILED``).
- The fastest is called faster than the runner-up only where the runner-up's time over the
  fastest's, over the cases both ran, is at least ``FASTER_RATIO`` (1.1) and, case by case
  (:func:`versus`), it is faster on more than half of those cases and slower on none;
  otherwise the two tie. On one
  case, a strategy is faster where its median is at least 1.1x smaller and a two-sided
  Mann-Whitney U test over the two cells' rounds gives p < ``ALPHA`` (0.05); where the
  rounds are too few for the test ever to reach that, only a ratio of at least
  ``HUGE_RATIO`` (2x) counts.
- The planner ranks the same way over the cases of each kinds signature of the range
  (:func:`kinds_rankings`: the LayerNorm nets, the transformers, the convnets), and a net of
  that signature by that ranking first (:func:`planner_order`), taken from the nearest range
  below that ranks the signature where its own does not; the recommendation table
  names the range's (its plain nets'), and the decision box, per arch, what the planner
  runs.
- The fastest for a single Hessian of one structure ranks the same candidates by the time of
  their first call where it was recorded (compile included, for strategies that compile),
  else by their min time; the fastest above is the choice for many Hessians.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bench.analysis.tidy import CELL_COLUMNS, with_case_defaults
from bench.problems.grid import ARCH_KINDS
from bench.vocabulary import BASELINE, CRASHED, ERROR, OK, OOM, TIMED, UNSUPPORTED, WRONG

__all__ = [
    "FASTER_RATIO",
    "ALPHA",
    "HUGE_RATIO",
    "DISPATCHERS",
    "FAILED",
    "RECOMMENDATION_FIELDS",
    "testable",
    "compared_rounds",
    "versus",
    "ranked",
    "size_range",
    "regimes",
    "summaries",
    "peak_ratios",
    "recommend",
    "ranking",
    "kinds_rankings",
    "signatures",
    "plain",
    "planner_order",
    "recommendation_records",
    "PLANNER",
    "regrets",
    "decision",
    "changes",
    "geomean",
    "times_over",
]

#: one strategy is faster than another only by at least this ratio (as asv's default)...
FASTER_RATIO = 1.1


#: ...and significantly: a two-sided Mann-Whitney U test over rounds, p below this
ALPHA = 0.05


#: where the rounds are too few for the test to reach ``ALPHA``, only this ratio counts
HUGE_RATIO = 2.0


#: statuses that rule a strategy out of a ranking on any case of it
FAILED = (WRONG, ERROR, OOM, CRASHED)


#: strategies that only choose and run another one (``auto``): timed, never recommended
DISPATCHERS = frozenset({"auto"})


#: the fields of ``recommendations.json`` (docs/DESIGN.md, "recommendations.json")
RECOMMENDATION_FIELDS = (
    "machine",
    "device",
    "dtype",
    "P_min",
    "P_max",
    "fastest",
    "fastest_s",
    f"fastest_vs_{BASELINE}",
    "tie",
    "runner_up",
    "leanest",
    "leanest_peak_bytes",
    f"leanest_vs_{BASELINE}",
    "fastest_single",
    "fastest_single_s",
    "cases",
    "fastest_cases",
)


def size_range(P: int) -> tuple[int, int]:
    """The size range ``(P_min, P_max)`` holding ``P``: edges at 1 and 3 times powers of ten."""
    if P < 1:
        raise ValueError(f"P must be positive, got {P}")
    decade = 10 ** int(math.floor(math.log10(P)))
    if P < 3 * decade:
        return decade, 3 * decade
    return 3 * decade, 10 * decade


def regimes(df: pd.DataFrame) -> Iterator[tuple[dict[str, Any], pd.DataFrame]]:
    """The rows of each machine, device, dtype and size range of P, in sorted order.

    Yields ``(regime, rows)``: ``regime`` is {machine, device, dtype, P_min, P_max}.
    """
    if df.empty:
        return
    df = df.assign(P_min=df["P"].map(lambda p: size_range(int(p))[0]))
    for (machine, device, dtype, p_min), rows in df.groupby(
        ["machine", "device", "dtype", "P_min"], sort=True
    ):
        regime = {"machine": machine, "device": device, "dtype": dtype, "P_min": int(p_min)}
        yield {**regime, "P_max": size_range(int(p_min))[1]}, rows


def geomean(values: pd.Series) -> float:
    return float(np.exp(np.log(values.astype(float)).mean()))


def _geomean_known(values: pd.Series) -> float:
    """:func:`geomean` of the values that are not NaN; NaN where none is."""
    known = values.dropna()
    return geomean(known) if len(known) else math.nan


def testable(n: int, m: int) -> bool:
    """Whether a two-sided Mann-Whitney U test over ``n`` rounds against ``m`` can reach
    p < :data:`ALPHA` at all: its least p-value, ``2 / C(n + m, n)``, is below it."""
    if n < 1 or m < 1:
        return False
    return 2.0 / math.comb(n + m, n) < ALPHA


def _rounds_of(cell: Any) -> list[float]:
    """A cell's round times: its ``rounds_s``, else its min alone (an older run)."""
    data = cell.get("rounds_s") if hasattr(cell, "get") else None
    if isinstance(data, (list, tuple, np.ndarray)) and len(data):
        return [float(t) for t in data]
    return [float(cell["min"])]


def compared_rounds(a: Any, b: Any) -> tuple[list[float], list[float]]:
    """The rounds two cells of one case are compared by: their interleaved rounds
    (``interleaved_s``: timed in turn at the end of the run that timed both,
    docs/DESIGN.md "Close calls") where both have them from the same run, else each one's
    own rounds (:func:`_rounds_of`)."""

    def interleaved(cell: Any) -> Any:
        data = cell.get("interleaved_s") if hasattr(cell, "get") else None
        ok = isinstance(data, (list, tuple, np.ndarray)) and len(data)
        return data if ok else None

    mine, theirs = interleaved(a), interleaved(b)
    if mine is not None and theirs is not None and a.get("source") == b.get("source"):
        return [float(t) for t in mine], [float(t) for t in theirs]
    return _rounds_of(a), _rounds_of(b)


def versus(a: Sequence[float], b: Sequence[float]) -> int:
    """1 where rounds ``a`` are faster than rounds ``b``, -1 where slower, 0 for a tie.

    Faster: ``median(b) / median(a)`` is at least :data:`FASTER_RATIO` and a two-sided
    Mann-Whitney U test (``scipy.stats.mannwhitneyu``) over the rounds gives p < :data:`ALPHA`;
    where the rounds are too few for that (:func:`testable`), the ratio must reach
    :data:`HUGE_RATIO`. Slower is the same the other way round.

    Raises:
        ValueError: either has no rounds, or a round that is not a positive finite time.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    for name, rounds in (("a", a), ("b", b)):
        if rounds.size == 0 or not np.all(np.isfinite(rounds) & (rounds > 0)):
            raise ValueError(f"rounds {name} must be positive finite times, got {rounds.tolist()}")
    ratio = float(np.median(b) / np.median(a))
    sign = 1 if ratio >= 1 else -1
    if max(ratio, 1 / ratio) < FASTER_RATIO:
        return 0
    if testable(a.size, b.size):
        from scipy.stats import mannwhitneyu

        return sign if mannwhitneyu(a, b, alternative="two-sided").pvalue < ALPHA else 0
    return sign if max(ratio, 1 / ratio) >= HUGE_RATIO else 0


def ranked(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows every ranking uses: "ok", and not too slow to repeat."""
    slow = rows["too_slow"].eq(True) if "too_slow" in rows else False
    return rows[(rows["status"] == OK) & ~slow]


def _shared(rows: pd.DataFrame, a: str, b: str) -> tuple[pd.DataFrame, list[str]]:
    """The ranked cells (:func:`ranked`) indexed by case and strategy, and the cases where
    both ``a`` and ``b`` have one, sorted."""
    cells = ranked(rows).set_index(["case", "strategy"])
    ran = cells.index.to_frame(index=False).groupby("strategy")["case"].agg(set)
    both = ran.get(a, set()) & ran.get(b, set())
    return cells, sorted(both)


def times_over(rows: pd.DataFrame, a: str, b: str) -> float:
    """``a``'s time over ``b``'s: the geometric mean of their min times' ratio over the cases
    both ran (:func:`ranked`); NaN where they share none."""
    cells, cases = _shared(rows, a, b)
    if not cases:
        return math.nan
    return geomean(pd.Series([cells.loc[(c, a), "min"] / cells.loc[(c, b), "min"] for c in cases]))


def _faster_on_range(rows: pd.DataFrame, fast: str, slow: str) -> bool:
    """Whether ``fast`` beats ``slow`` case by case over the cases both ran: faster on more
    than half, slower on none."""
    cells, cases = _shared(rows, fast, slow)
    verdicts = [
        versus(*compared_rounds(cells.loc[(case, fast)], cells.loc[(case, slow)])) for case in cases
    ]
    return bool(cases) and -1 not in verdicts and 2 * verdicts.count(1) > len(verdicts)


_SUMMARY_COLUMNS = [
    "time_s",
    "vs_fastest",
    "cost_vs_grad",
    "single_s",
    "single_vs_fastest",
    "spread",
    "peak_bytes",
    "peer",
    "cases",
]


def summaries(rows: pd.DataFrame, cases: set[str]) -> pd.DataFrame:
    """Per strategy that ran accurately on every case in ``cases`` that it supports (a
    refusal, "unsupported", is not held against it), each cell repeated (not too slow to
    repeat, :func:`ranked`): time, spread, memory. Dispatchers are left out (recommending
    one is circular).

    ``vs_fastest`` is the geometric mean, over the cases the strategy ran, of its min time
    over the least min time of a non-peer strategy here on that case: what the rule ranks by.
    ``time_s`` is the geometric mean of its min times, ``cases`` how many it ran.
    ``cost_vs_grad`` is ``vs_fastest`` times the geometric mean over all the cases of the
    fastest's min time over P gradients: on a strategy that ran every case, the geometric
    mean of its own min time over P gradients, and in every case in the order of
    ``vs_fastest`` (what ``auto`` scales to another net by its own P and gradient time).
    ``spread`` is the largest stddev / min, ``peak_bytes`` the largest peak.
    ``single_s`` is the geometric mean of the time of one Hessian of a new structure: the
    first call where it was recorded (strategies that compile), else the min time;
    ``single_vs_fastest`` ranks it as ``vs_fastest`` ranks ``time_s``.
    """
    ok = ranked(rows)
    ok = ok[~ok["strategy"].isin(DISPATCHERS) & ok["case"].isin(cases)]
    if ok.empty:
        return pd.DataFrame(columns=_SUMMARY_COLUMNS)
    # a failure rules its strategy out on any case; a case on which no strategy was
    # repeated (every cell too slow, over budget or over memory) ranks nothing and is left
    # out, rather than ruling out every strategy
    failed = set(rows.loc[rows["status"].isin(FAILED) & rows["case"].isin(cases), "strategy"])
    cases = cases & set(ok["case"])
    refused = rows[(rows["status"] == UNSUPPORTED) & rows["case"].isin(cases)]
    refused = refused.groupby("strategy")["case"].agg(set)
    ran = ok.groupby("strategy")["case"].agg(set)
    complete = {s for s, c in ran.items() if c | refused.get(s, set()) >= cases and s not in failed}
    ok = ok[ok["strategy"].isin(complete)]
    ok = ok.assign(
        rel_spread=ok["stddev"] / ok["min"],
        single=pd.to_numeric(ok.get("first_call_s", pd.Series(np.nan, ok.index))).fillna(ok["min"]),
        # frames made by hand (and rows of older runs) may lack it: NaN, not a KeyError
        cost=pd.to_numeric(ok.get("cost_vs_grad", pd.Series(np.nan, ok.index))),
    )
    own = ok[~ok["peer"].astype(bool)]
    best = own.loc[own.groupby("case")["min"].idxmin()].set_index("case")
    best_single = own.groupby("case")["single"].min()
    ok = ok.assign(
        vs_fastest=ok["min"] / ok["case"].map(best["min"]),
        single_vs=ok["single"] / ok["case"].map(best_single),
    )
    reference_cost = geomean(best["cost"]) if len(best) else math.nan
    summary = ok.groupby("strategy").agg(
        time_s=("min", geomean),
        vs_fastest=("vs_fastest", _geomean_known),
        single_s=("single", geomean),
        single_vs_fastest=("single_vs", _geomean_known),
        spread=("rel_spread", "max"),
        peak_bytes=("peak_bytes", "max"),
        peer=("peer", "any"),
        cases=("case", "nunique"),
    )
    summary["cost_vs_grad"] = summary["vs_fastest"] * reference_cost
    return summary[_SUMMARY_COLUMNS]


def signatures(rows: pd.DataFrame) -> pd.Series:
    """Each row's kinds signature (``ARCH_KINDS`` of its arch; "" for a plain net, and for a
    row without an arch: frames made by hand, rows of older runs)."""
    if "arch" not in rows:
        return pd.Series("", index=rows.index)
    return rows["arch"].map(lambda arch: ARCH_KINDS.get(arch, ""))


def plain(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows a size range's own ranking rests on: those of plain nets (no kinds signature),
    where the range holds any; else all of them. The nets of a signature are ranked on their
    own (:func:`kinds_rankings`): a strategy too slow or out of memory on a convnet is not
    thereby ruled out for the MLPs of its range."""
    mine = rows[signatures(rows) == ""]
    return mine if not mine.empty else rows


def ranking(rows: pd.DataFrame) -> pd.DataFrame:
    """The candidates of a size range, fastest first: :func:`summaries` over the cases of its
    plain nets (:func:`plain`), peers left out, by ``vs_fastest`` (what the recommendation
    ranks and the planner's table keeps)."""
    rows = plain(rows)
    summary = summaries(rows, set(rows["case"]))
    return summary[~summary["peer"].astype(bool)].sort_values(["vs_fastest", "time_s"])


def kinds_rankings(rows: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """:func:`ranking` over the cases of each kinds signature of a size range that is not ""
    (``ARCH_KINDS`` of their arch: "layernorm", "conv", "attention+layernorm"), where it
    ranks any: what the planner ranks a net of that signature by, where a normalisation layer,
    a convolution or attention changes the strategies' costs against a gradient (the
    LayerNorm MLP at P = 1,505: ``kron`` 0.75x ``block_symmetric``, the range's first)."""
    result = {}
    for signature, mine in rows.groupby(signatures(rows), sort=True):
        if signature:
            order = ranking(mine)
            if not order.empty:
                result[signature] = order
    return result


def planner_order(range_order: list[str], kinds_order: list[str] | None) -> list[str]:
    """The order the planner's table ranks a net in: its kinds signature's ranking where the
    range has one, then the rest of the range's ranking."""
    if not kinds_order:
        return list(range_order)
    return list(kinds_order) + [name for name in range_order if name not in kinds_order]


def peak_ratios(rows: pd.DataFrame) -> pd.Series:
    """Per strategy, its largest peak memory over the Hessian's own size on its "ok" cells."""
    ok = rows[rows["status"] == OK]
    return (ok["peak_bytes"] / ok["hessian_bytes"]).groupby(ok["strategy"]).max()


def _recommendation(regime: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    rows = plain(rows)
    cases = set(rows["case"])
    summary = summaries(rows, cases)
    peer = summary["peer"].astype(bool)
    candidates = ranking(rows)
    lean = summary.loc[~peer].sort_values("peak_bytes")
    has_base = BASELINE in summary.index
    record = {
        **dict.fromkeys(RECOMMENDATION_FIELDS),
        **regime,
        "tie": False,
        "peers": {},
        "cases": len(cases),
    }
    if not candidates.empty:
        best = candidates.iloc[0]
        record["fastest"] = candidates.index[0]
        record["fastest_s"] = float(best["time_s"])
        record["fastest_cases"] = int(best["cases"])
        if has_base:
            record[f"fastest_vs_{BASELINE}"] = times_over(rows, BASELINE, candidates.index[0])
        if len(candidates) > 1:
            record["runner_up"] = candidates.index[1]
            ratio = times_over(rows, candidates.index[1], candidates.index[0])
            record["tie"] = not (
                ratio >= FASTER_RATIO
                and _faster_on_range(rows, candidates.index[0], candidates.index[1])
            )
        record["peers"] = {
            name: times_over(rows, name, candidates.index[0]) for name in summary.index[peer]
        }
        single = candidates.sort_values(["single_vs_fastest", "single_s"]).iloc[0]
        record["fastest_single"] = single.name
        record["fastest_single_s"] = float(single["single_s"])
    if not lean.empty and lean["peak_bytes"].notna().any():
        record["leanest"] = lean.index[0]
        record["leanest_peak_bytes"] = int(lean["peak_bytes"].iloc[0])
        if has_base and lean["peak_bytes"].iloc[0] > 0:
            record[f"leanest_vs_{BASELINE}"] = float(
                summary.loc[BASELINE, "peak_bytes"] / lean["peak_bytes"].iloc[0]
            )
    return record


def recommend(df: pd.DataFrame) -> pd.DataFrame:
    """The recommendation table: a row per machine, device, dtype and size range of P.

    See the module docstring for the rule. ``cases`` is the number of cases the row rests on,
    ``fastest_cases`` how many of them the fastest ran (it refused the others);
    ``fastest_single`` is the fastest for one Hessian of a structure (first call included),
    ``fastest`` the fastest for many. ``fastest_vs_torch_func`` is the baseline's time
    over the fastest's (a speedup); ``leanest_vs_torch_func`` is the baseline's peak memory
    over the leanest's. Both are null where the baseline did not run every case of the range.
    ``peers`` maps each peer strategy that ran every case to its time over the fastest's.
    """
    records = [
        _recommendation(regime, rows)
        for regime, rows in regimes(df)
        if rows["status"].isin(TIMED).any()
    ]
    return pd.DataFrame(records, columns=[*RECOMMENDATION_FIELDS, "peers"])


def recommendation_records(table: pd.DataFrame) -> list[dict]:
    """The table as ``recommendations.json`` records: null for missing, ints for sizes."""
    integral = {"P_min", "P_max", "leanest_peak_bytes", "cases", "fastest_cases"}
    records = []
    for row in table[list(RECOMMENDATION_FIELDS)].astype(object).to_dict("records"):
        plain = {k: None if v is None or pd.isna(v) else v for k, v in row.items()}
        plain.update({k: int(plain[k]) for k in integral if plain[k] is not None})
        plain["tie"] = bool(plain["tie"])
        records.append(plain)
    return records


#: the dispatcher whose regret the report gives
PLANNER = "auto"


def regrets(df: pd.DataFrame, planner: str = PLANNER) -> pd.DataFrame:
    """``planner``'s regret per case: its time over the fastest exact strategy's.

    Per machine, device and case where ``planner`` ran: ``fastest`` is the strategy with the
    least min time among those that could be recommended (status "ok", no peer, no
    dispatcher), ``fastest_s`` that time; ``regret`` is the planner's min time over it,
    ``first_call_regret`` its first call (planning included) over it. ``planner_status`` is
    the planner's status on the case; its times are NaN unless "ok", and ``fastest`` is None
    where no other strategy ran exactly. Sorted by regret, largest first.
    """
    columns = [*CELL_COLUMNS, "planner_status", "planner_s", "first_call_s", "fastest", "fastest_s"]
    columns += ["regret", "first_call_regret"]
    rows = with_case_defaults(df)
    mine = rows[rows["strategy"] == planner]
    if mine.empty:
        return pd.DataFrame(columns=columns)
    exact = ranked(rows)
    exact = exact[~exact["peer"].astype(bool) & ~exact["strategy"].isin(DISPATCHERS)]
    best = exact.loc[exact.groupby(["machine", "device", "case"])["min"].idxmin()]
    best = best[["machine", "device", "case", "strategy", "min"]].rename(
        columns={"strategy": "fastest", "min": "fastest_s"}
    )
    ok = mine["status"] == OK
    mine = mine.assign(
        planner_status=mine["status"],
        planner_s=pd.to_numeric(mine["min"]).where(ok),
        first_call_s=pd.to_numeric(mine["first_call_s"]).where(ok),
    )
    table = mine[[*CELL_COLUMNS, "planner_status", "planner_s", "first_call_s"]].merge(
        best, on=["machine", "device", "case"], how="left"
    )
    table = table.assign(
        fastest=table["fastest"].astype(object).where(table["fastest"].notna(), None),
        regret=table["planner_s"] / table["fastest_s"],
        first_call_regret=table["first_call_s"] / table["fastest_s"],
    )
    order = table.sort_values(["regret", "P"], ascending=[False, True], na_position="first")
    return order[columns].reset_index(drop=True)


def changes(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Cells timed accurately in both runs whose time changed, by :func:`versus`: at least
    :data:`FASTER_RATIO` (10%) and significantly, faster or slower (asv's compare).

    Cells are matched by strategy and case (a run of another machine compares too; its
    ``machine`` columns say so). Columns: strategy, case, P, ``old_s`` and ``new_s``
    (medians), ``new_over_old``, ``rounds_old``/``rounds_new``, ``change`` ("faster" or
    "slower"), machines; the largest changes first.
    """
    keys = ["strategy", "case"]
    columns = [*keys, "P", "old_s", "new_s", "new_over_old", "rounds_old", "rounds_new"]
    columns += ["change", "machine_old", "machine_new"]
    both = ranked(old).merge(ranked(new), on=keys, suffixes=("_old", "_new"))
    records = []
    for _, cell in both.iterrows():
        old_rounds = _rounds_of({"rounds_s": cell["rounds_s_old"], "min": cell["min_old"]})
        new_rounds = _rounds_of({"rounds_s": cell["rounds_s_new"], "min": cell["min_new"]})
        verdict = versus(new_rounds, old_rounds)
        if verdict:
            old_s, new_s = float(np.median(old_rounds)), float(np.median(new_rounds))
            records.append(
                {
                    "strategy": cell["strategy"],
                    "case": cell["case"],
                    "P": int(cell["P_new"]),
                    "old_s": old_s,
                    "new_s": new_s,
                    "new_over_old": new_s / old_s,
                    "rounds_old": len(old_rounds),
                    "rounds_new": len(new_rounds),
                    "change": "faster" if verdict > 0 else "slower",
                    "machine_old": cell["machine_old"],
                    "machine_new": cell["machine_new"],
                }
            )
    table = pd.DataFrame(records, columns=columns)
    order = (np.log(table["new_over_old"].astype(float))).abs().sort_values(ascending=False)
    return table.loc[order.index].reset_index(drop=True)


def _nearest(ranked_ranges: list[dict[str, Any]], regime: dict[str, Any]) -> dict[str, Any] | None:
    """The ranked size range of the regime's machine, device and dtype nearest to it on a log
    scale (itself where it is ranked): whose ranking the planner's table applies there."""
    same = [
        r for r in ranked_ranges if all(r[k] == regime[k] for k in ("machine", "device", "dtype"))
    ]
    centre = math.log(regime["P_min"] * regime["P_max"]) / 2
    return min(
        same, key=lambda r: abs(math.log(r["P_min"] * r["P_max"]) / 2 - centre), default=None
    )


def decision(df: pd.DataFrame, planner: str = PLANNER) -> pd.DataFrame:
    """The report's decision box: what ``planner`` runs per machine, device, dtype, size range
    of P and ``arch``, with the evidence.

    The planner ranks by its table (``bench.auto_table``: :func:`ranking` per size range, the
    nearest ranked range where its own has no ranking, ``ranked_in``; for an arch of a kinds
    signature, that signature's ranking in the nearest range, not above, that ranks it first,
    :func:`planner_order`) and
    runs the first strategy that runs the net: per arch, ``runs`` is the first of that ranking that ran
    accurately and repeated (:func:`ranked`) on every case of the arch in the range that it
    supports (:func:`summaries`). ``runner_up`` is the fastest other strategy that did (by
    ``vs_fastest``); ``wins`` and the ratios are over the cases both ran;
    ``tie`` unless ``runs`` beats it by the recommendation rule (:func:`_faster_on_range`),
    ``beaten`` where the runner-up beats ``runs`` by that rule (another arch's cases made
    the range's ranking);
    ``cases``, ``wins`` (cases where ``runs`` is faster by :func:`versus`),
    ``ratio_median``/``_lo``/``_hi`` (the runner-up's min time over that of ``runs``, per
    case: below 1 where the runner-up was faster), and ``regret_cases``, ``regret_median``,
    ``regret_hi`` (:func:`regrets` on those cases where the planner ran). A row where no
    ranked strategy ran every case has ``runs`` None. Devices where nothing was timed are
    left to ``numbers.untimed_devices``.
    """
    columns = ["machine", "device", "dtype", "P_min", "P_max", "arch", "runs", "ranked_in"]
    columns += ["runner_up", "tie", "beaten", "cases", "wins", "ratio_median", "ratio_lo"]
    columns += ["ratio_hi", "regret_cases", "regret_median", "regret_hi"]
    df = with_case_defaults(df)
    regret = regrets(df, planner) if not df.empty else pd.DataFrame(columns=["case", "regret"])
    groups = [(regime, rows) for regime, rows in regimes(df) if rows["status"].isin(TIMED).any()]
    orders, kinds_orders = {}, {}
    for regime, rows in groups:
        order = list(ranking(rows).index)
        if order:
            orders[tuple(regime.values())] = order
            kinds_orders[tuple(regime.values())] = {
                signature: list(summary.index)
                for signature, summary in kinds_rankings(rows).items()
            }
    ranked_ranges = [r for r, _ in groups if tuple(r.values()) in orders]
    records = []
    for regime, rows in groups:
        near = _nearest(ranked_ranges, regime)
        if near is None:
            continue
        for arch, mine in rows.groupby("arch", sort=True):
            signature = ARCH_KINDS.get(arch, "")
            # the signature's ranking in the nearest range, not above, that ranked it
            # (strategies._plan._kinds_costs)
            having = [
                r
                for r in ranked_ranges
                if kinds_orders[tuple(r.values())].get(signature) and r["P_min"] <= regime["P_min"]
            ]
            kinds_near = _nearest(having, regime) if signature else None
            order = planner_order(
                orders[tuple(near.values())],
                None if kinds_near is None else kinds_orders[tuple(kinds_near.values())][signature],
            )
            ran = mine.loc[mine["status"] == OK, "case"].unique()
            mine = mine[mine["case"].isin(ran)]
            if mine.empty:
                continue
            cases = set(mine["case"])
            summary = ranking(mine)  # over the arch's cases, peers left out
            runs = next((name for name in order if name in summary.index), None)
            record = {**dict.fromkeys(columns), **regime, "arch": arch, "runs": runs}
            record.update(ranked_in=(near["P_min"], near["P_max"]), tie=False, beaten=False)
            record.update(cases=len(cases), wins=0, regret_cases=0)
            others = [name for name in summary.index if name != runs]
            if runs is not None and others:
                runner_up = others[0]
                cells, shared = _shared(mine, runs, runner_up)
                fast = [_rounds_of(cells.loc[(c, runs)]) for c in shared]
                slow = [_rounds_of(cells.loc[(c, runner_up)]) for c in shared]
                ratios = [min(b) / min(a) for a, b in zip(fast, slow)] or [math.nan]
                pairs = [
                    compared_rounds(cells.loc[(c, runs)], cells.loc[(c, runner_up)]) for c in shared
                ]
                ratio = times_over(mine, runner_up, runs)
                record.update(
                    runner_up=runner_up,
                    beaten=bool(
                        1 / ratio >= FASTER_RATIO and _faster_on_range(mine, runner_up, runs)
                    ),
                    tie=not (ratio >= FASTER_RATIO and _faster_on_range(mine, runs, runner_up)),
                    wins=sum(versus(a, b) == 1 for a, b in pairs),
                    ratio_median=float(np.median(ratios)),
                    ratio_lo=float(min(ratios)),
                    ratio_hi=float(max(ratios)),
                )
            measured = regret[
                (regret["machine"] == regime["machine"])
                & (regret["device"] == regime["device"])
                & regret["case"].isin(cases)
            ]["regret"].dropna()
            if len(measured):
                record.update(
                    regret_cases=len(measured),
                    regret_median=float(measured.median()),
                    regret_hi=float(measured.max()),
                )
            records.append(record)
    return pd.DataFrame(records, columns=columns)
