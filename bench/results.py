"""Analysis of benchmark and audit JSON: tidy frame, families, recommendation rule, growth.

Everything here is pandas over the JSON files, so it reads runs from any machine; loading and
the recommendation rule need no torch (only :func:`strategy_facts` imports the registry).
The HTML report (``bench.report``), the figures (``bench.report.plots``) and ``auto``'s table
(``bench.auto_table``) all draw on it; none of them re-derives what is defined here.

Recommendation rule, per machine, device, dtype and size range of P (docs/DESIGN.md,
"The recommendation rule"):

- Size ranges have edges at 1 and 3 times powers of ten (..., 1,000, 3,000, 10,000, ...):
  a row covers ``P_min <= P < P_max``. Only ranges holding a case appear.
- A strategy is a candidate only if it ran accurately (status "ok") on every case of the
  range, is not a peer and is not a dispatcher: wrong, out-of-memory, skipped or failing
  cells rule it out.
- Its time is the geometric mean over the range's cases of its min time; its memory is the
  largest ``peak_bytes`` over those cases.
- Ranges where nothing at all was timed (e.g. CUDA cases on a machine without CUDA) are
  left out; their cells are listed by :func:`not_timed`.
- A cell too slow to repeat (``too_slow``: one round) is left out, as if it had not run.
- The fastest is called faster than the runner-up only where ``runner_up_s / fastest_s``
  is at least ``FASTER_RATIO`` (1.1) and, case by case (:func:`versus`), it is faster on
  more than half of the range's cases and slower on none; otherwise the two tie. On one
  case, a strategy is faster where its median is at least 1.1x smaller and a two-sided
  Mann-Whitney U test over the two cells' rounds gives p < ``ALPHA`` (0.05); where the
  rounds are too few for the test ever to reach that, only a ratio of at least
  ``HUGE_RATIO`` (2x) counts.
- The fastest for a single Hessian of one structure ranks the same candidates by the time of
  their first call where it was recorded (compile included, for strategies that compile),
  else by their min time; the fastest above is the choice for many Hessians.

Strategy families (``strategies.FAMILIES``) and compiled variants' eager forms come from the
registry through :func:`strategy_facts` alone. The numbers of the report's summary (half vs
full loop, the choice per way of writing the net, much slower strategies, compiled vs eager,
devices with nothing run, the audit's findings) are computed here; docs/DESIGN.md, "The
report", says how the page words them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.problems.grid import Case
from bench.vocabulary import (
    AUDIT_KIND,
    BASELINE,
    ERROR,
    OK,
    TIMED,
    UNSUPPORTED,
    WRONG,
    canonical_status,
)

__all__ = [
    "InputFileError",
    "STAT_FIELDS",
    "NOT_IN_CSV",
    "FASTER_RATIO",
    "NOISY_IQR",
    "ALPHA",
    "HUGE_RATIO",
    "DISPATCHERS",
    "FULL_LOOP",
    "HALF_LOOP",
    "SLOW_FACTOR",
    "OTHER_FAMILY",
    "RECOMMENDATION_FIELDS",
    "load",
    "load_runs",
    "merge",
    "family",
    "strategy_facts",
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
    "recommendation_records",
    "growth_exponents",
    "speedups",
    "much_slower",
    "compiled_vs_eager",
    "compile_summary",
    "device_timed",
    "untimed_devices",
    "not_timed",
    "first_calls",
    "PLANNER",
    "regrets",
    "decision",
    "case_cells",
    "multiples",
    "accuracy_of_timed",
    "not_timed_counts",
    "runs",
    "changes",
    "audit_frame",
    "NOT_RUN",
    "accuracy_statuses",
    "accuracy_matrix",
    "REFUSALS",
    "counts_against",
    "audit_findings",
    "wrong_kinds",
    "merged_wrong_kinds",
]

#: pytest-benchmark's statistics kept per timed cell (seconds; ``rounds`` a count)
STAT_FIELDS = ("min", "max", "mean", "stddev", "median", "iqr", "rounds")
#: the round times of a timed cell (a list, from pytest-benchmark's ``stats.data``): in the
#: frame for the tests, never in a CSV (which keeps the JSON's statistics)
NOT_IN_CSV = ("rounds_s", "interleaved_s")
#: one strategy is faster than another only by at least this ratio (as asv's default)...
FASTER_RATIO = 1.1
#: ...and significantly: a two-sided Mann-Whitney U test over rounds, p below this
ALPHA = 0.05
#: where the rounds are too few for the test to reach ``ALPHA``, only this ratio counts
HUGE_RATIO = 2.0
#: a cell is noisy where its IQR over its median exceeds this (torch.utils.benchmark.Compare)
NOISY_IQR = 0.1
#: strategies that only choose and run another one (``auto``): timed, never recommended
DISPATCHERS = frozenset({"auto"})
#: the loop most users write first, and the same loop over half the Hessian: whether the
#: half pays is the question the report answers first
FULL_LOOP = "full_autograd"
HALF_LOOP = "symmetric_half"
#: "much slower": at least this many times the fastest's time (an order of magnitude)
SLOW_FACTOR = 10.0
#: the family of a strategy the registry does not know (an older or foreign run)
OTHER_FAMILY = "other"
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
)
_CASE_FIELDS = tuple(f.name for f in dataclasses.fields(Case))
_CASE_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(Case) if f.default is not dataclasses.MISSING
}


class InputFileError(ValueError):
    """An input file is missing, not JSON, or neither a hessbench benchmark JSON nor an audit JSON."""


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        # an unquoted shell pattern that matched nothing arrives as itself
        hint = " (a shell pattern that matched nothing?)" if set("*?[") & set(str(path)) else ""
        raise InputFileError(f"{path}: no such file{hint}") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: a directory, not a JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read as JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("kind") == AUDIT_KIND:
        _check_audit(path, data)
        return data
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        if isinstance(data.get("machine_info"), dict):
            _check_benchmark(path, data)
            return data
    raise InputFileError(
        f"{path}: not a pytest-benchmark JSON (needs 'benchmarks' and 'machine_info') "
        f'nor an audit JSON (needs "kind": "{AUDIT_KIND}")'
    )


#: what every cell of a benchmark JSON names, timed or not: the analysis keys on these
_CELL_KEYS = ("strategy", "case", "P", *(f for f in _CASE_FIELDS if f not in _CASE_DEFAULTS))


def _check_benchmark(path: Path, data: dict) -> None:
    """Refuse a pytest-benchmark JSON that is not a hessbench run, naming what is missing."""
    meta = data.get("hessbench", {})
    outcomes = meta.get("outcomes", []) if isinstance(meta, dict) else None
    if not isinstance(outcomes, list):
        raise InputFileError(f"{path}: 'hessbench' must hold a list of 'outcomes'")
    if not data["benchmarks"] and "hessbench" not in data:
        raise InputFileError(f"{path}: a pytest-benchmark JSON with no cells and no 'hessbench'")
    for i, bench in enumerate(data["benchmarks"]):
        extra = bench.get("extra_info") if isinstance(bench, dict) else None
        missing = [k for k in _CELL_KEYS if not isinstance(extra, dict) or k not in extra]
        if missing:
            name = bench.get("fullname", bench.get("name")) if isinstance(bench, dict) else bench
            raise InputFileError(
                f"{path}: benchmark {i} ({name}) is not a hessbench cell: its extra_info lacks "
                f"{missing} (another suite's pytest-benchmark JSON?)"
            )
    for i, outcome in enumerate(outcomes):
        missing = [
            k for k in (*_CELL_KEYS, "status") if not isinstance(outcome, dict) or k not in outcome
        ]
        if missing:
            raise InputFileError(f"{path}: hessbench outcome {i} lacks {missing}")
        _check_fields(path, f"hessbench outcome {i}", outcome)
    if not isinstance(data.get("commit_info") or {}, dict):
        kind = type(data["commit_info"]).__name__
        raise InputFileError(f"{path}: 'commit_info' must be an object, got a {kind}")
    timed = []
    for i, bench in enumerate(data["benchmarks"]):
        _check_fields(path, f"benchmark {i}", bench["extra_info"])
        stats = bench.get("stats")
        if stats is not None and not isinstance(stats, dict):
            raise InputFileError(
                f"{path}: benchmark {i}: 'stats' must be an object, got a {type(stats).__name__}"
            )
        for key, value in (stats or {}).items():
            if key in STAT_FIELDS and value is not None and not _is_number(value):
                raise InputFileError(
                    f"{path}: benchmark {i}: stats.{key} must be a number, got {value!r}"
                )
        timed.append((stats or {}).get("min"))
    if timed and not any(_is_number(t) and math.isfinite(t) for t in timed):
        raise InputFileError(
            f"{path}: no benchmark has a finite stats.min (every one is {timed[0]!r}): "
            "nothing in it was timed"
        )


#: the type each field of a cell must have, where given (extra_info and outcomes)
_FIELD_TYPES = {
    "strategy": str,
    "case": str,
    "P": int,
    **{f.name: f.type for f in dataclasses.fields(Case)},
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fields(path: Path, where: str, cell: dict) -> None:
    """Refuse a cell whose fields the analysis keys on have the wrong type."""
    for key, kind in _FIELD_TYPES.items():
        if key not in cell:
            continue
        value = cell[key]
        expected = {"int": int, "str": str}.get(kind, kind) if isinstance(kind, str) else kind
        if expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            wanted = "a positive integer"
        else:
            ok = isinstance(value, expected)
            wanted = "a string"
        if not ok:
            raise InputFileError(f"{path}: {where}: {key} must be {wanted}, got {value!r}")


def _check_audit(path: Path, data: dict) -> None:
    """Refuse an audit JSON whose records do not name their strategy, model and status."""
    records = data.get("records", [])
    if not isinstance(records, list):
        raise InputFileError(f"{path}: an audit JSON's 'records' must be a list")
    for i, record in enumerate(records):
        keys = ("strategy", "model", "status")
        missing = [k for k in keys if not isinstance(record, dict) or k not in record]
        if missing:
            raise InputFileError(f"{path}: audit record {i} lacks {missing}")


def _machine_label(info: dict) -> str:
    if info.get("machine_label"):
        return str(info["machine_label"])
    cpu = info.get("cpu") or {}
    return f"{info.get('node', '?')} / {cpu.get('brand_raw', info.get('processor', '?'))}"


def _status(path: Path, status: str) -> str:
    """The one place where a status read from a file is mapped into the current vocabulary."""
    try:
        return canonical_status(status)
    except ValueError as exc:
        raise InputFileError(f"{path}: {exc}") from exc


def _benchmark_rows(path: Path, data: dict) -> pd.DataFrame:
    info = data["machine_info"]
    meta = data.get("hessbench") or {}
    commit = data.get("commit_info") or {}
    run = {
        "machine": _machine_label(info),
        "torch_version": info.get("torch_version"),
        "source": str(path),
        "grid": meta.get("grid"),
        "command": meta.get("command"),
        "commit": f"{commit['id']}{' (dirty)' if commit.get('dirty') else ''}"
        if commit.get("id")
        else None,
        "run_datetime": data.get("datetime"),
    }
    rows = []
    for bench in data["benchmarks"]:
        extra = dict(bench.get("extra_info") or {})
        extra.setdefault("strategy", (bench.get("params") or {}).get("strategy"))
        extra.setdefault("case", (bench.get("params") or {}).get("case", bench.get("group")))
        extra["status"] = _status(path, extra.get("status", OK))
        # A timed row is "ok" only if it was also accurate; anything else must not be trusted.
        if extra["status"] == OK and extra.get("accurate") is False:
            extra["status"] = WRONG
        stats = bench.get("stats") or {}
        data = stats.get("data")
        rows.append(
            {
                **run,
                **extra,
                **{k: stats.get(k) for k in STAT_FIELDS},
                "rounds_s": [float(t) for t in data] if isinstance(data, list) else None,
            }
        )
    interleaved = {
        (case, name): [float(t) for t in seconds]
        for case, entry in (meta.get("interleaved") or {}).items()
        for name, seconds in (entry.get("rounds_s") or {}).items()
    }
    for row in rows:
        row["interleaved_s"] = interleaved.get((row.get("case"), row.get("strategy")))
    for outcome in meta.get("outcomes") or []:
        rows.append({**run, **outcome, "status": _status(path, outcome["status"])})
    frame = pd.DataFrame(rows)
    # a run where nothing was timed has outcomes only: the timed rows' columns are empty
    for column in _TIMED_COLUMNS:
        if column not in frame:
            frame[column] = None
    # case fields added after a run was made take their default (e.g. arch "mlp")
    for column, default in _CASE_DEFAULTS.items():
        frame[column] = frame[column].fillna(default) if column in frame else default
    if "min" not in frame:
        for column in STAT_FIELDS:
            frame[column] = np.nan
    return frame


#: columns of timed rows that the analysis reads, present (empty) in every frame
_TIMED_COLUMNS = (
    "reason",
    "peer",
    "hessian_bytes",
    "peak_bytes",
    "peak_note",
    "max_abs_err",
    "max_rel_err",
    "accurate",
    "tolerance",
    "grad_s",
    "gemm_s",
    "cost_vs_grad",
    "vs_gemm",
    "first_call_s",
    "threads",
    "rounds_s",
    "interleaved_s",
)


def _audit(path: Path, data: dict) -> dict:
    records = [{**r, "status": _status(path, r["status"])} for r in data.get("records") or []]
    return {**data, "records": records, "source": str(path)}


def load_runs(paths: Sequence[str | Path]) -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Each benchmark file's own tidy frame, by its path (``source``), and the audits.

    A file's frame holds all of its cells, whatever other files hold: it is what the file's
    CSV is made from (``bench.report``, less :data:`NOT_IN_CSV`). ``merge`` merges them.

    Raises:
        InputFileError: as ``load``.
    """
    runs, audits = {}, []
    for path in map(Path, paths):
        data = _read(path)
        if data.get("kind") == AUDIT_KIND:
            audits.append(_audit(path, data))
        else:
            runs[str(path)] = _tidy([_benchmark_rows(path, data)])
    return runs, audits


_CELL_KEY = ["machine", "strategy", "case"]


def _tidy(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        empty = ["machine", "source", "strategy", "case", "status", "P", "peer"]
        return pd.DataFrame(columns=empty)
    df = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
    # Outcomes carry no "peer" flag: borrow it from the strategy's timed rows.
    peers = df.dropna(subset=["peer"]).groupby("strategy")["peer"].any()
    df["peer"] = df["strategy"].map(peers).eq(True)
    for column in ("P", "hessian_bytes"):
        df[column] = pd.to_numeric(df[column])
    return df


def merge(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """One tidy frame of runs' frames, the same whatever their order (docs/DESIGN.md, "The
    recommendation rule").

    Where several runs hold the same cell of one machine, the merged cell is the first by:
    timed before not timed; repeated before too slow to repeat; more rounds; the smaller
    median; then the source's name. ``runs`` counts the runs that timed the cell and
    ``runs_lo_s``/``runs_hi_s`` give the range of their min times (the spread across runs).
    Adds ``too_slow`` (false where a run predates the flag) and ``noisy`` (IQR over median
    above :data:`NOISY_IQR`).
    """
    df = _tidy(list(frames))
    if df.empty:
        return df
    df["too_slow"] = df["too_slow"].eq(True) if "too_slow" in df else False
    timed = df["status"].isin(TIMED)
    for column in ("min", "median", "iqr", "rounds"):
        df[column] = pd.to_numeric(df[column])
    df["noisy"] = (df["iqr"] / df["median"] > NOISY_IQR) & timed
    order = df.assign(
        _untimed=~timed, _rounds=-df["rounds"].fillna(0), _median=df["median"].fillna(np.inf)
    ).sort_values(["_untimed", "too_slow", "_rounds", "_median", "source"], kind="stable")
    spread = (
        df[timed]
        .groupby(_CELL_KEY)["min"]
        .agg(runs="count", runs_lo_s="min", runs_hi_s="max")
        .reset_index()
    )
    df = order.drop_duplicates(_CELL_KEY, keep="first").drop(
        columns=["_untimed", "_rounds", "_median"]
    )
    df = df.merge(spread, on=_CELL_KEY, how="left")
    df["runs"] = df["runs"].fillna(0).astype(int)
    keys = [k for k in ("machine", "device", "P", "case", "strategy") if k in df]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def load(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """Read benchmark and audit JSON files into one tidy DataFrame and a list of audits.

    The DataFrame has a row per strategy x case x machine, timed or not: the run (machine,
    torch_version, source, grid, command, commit, run_datetime), the case fields, the
    extra_info keys, pytest-benchmark's stats (min, max, mean, stddev, median, iqr, rounds;
    NaN for cells not timed), ``status`` and ``reason``. Where two files hold the same cell
    of one machine, ``merge`` chooses by a rule that does not depend on the files' order. Each audit dict gains a ``source`` key. Statuses of
    both kinds are in ``bench.vocabulary``'s words, whichever words the file used.

    Raises:
        InputFileError: a file is missing, not JSON of either kind (e.g. another suite's
            pytest-benchmark JSON), or holds an unknown status; the message names it.
    """
    runs, audits = load_runs(paths)
    return merge(runs.values()), audits


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def family(rows: pd.DataFrame) -> pd.Series:
    """Each row's case family, ``grid.Case.family``: cases that differ only in the net's size.

    ``rows`` needs the case fields (input, width, ..., device); a line through one family's
    cells in order of P shows how a strategy grows with the size of the net.
    """
    families = [
        Case(**{k: _plain(v) for k, v in zip(_CASE_FIELDS, values)}).family
        for values in _with_case_defaults(rows)[list(_CASE_FIELDS)].itertuples(index=False)
    ]
    return pd.Series(families, index=rows.index, dtype=object, name="family")


def strategy_facts(names: Iterable[str]) -> pd.DataFrame:
    """Each strategy's family and, for a compiled variant, the eager strategy it compiles.

    The one place where the analysis asks the registry (``strategies.get(name).family`` and
    ``.eager``). A name it does not know (an older or foreign run) is in family
    :data:`OTHER_FAMILY`, with no eager form. The eager form of each compiled variant among
    ``names`` gets a row too. Indexed by strategy, in family order (``strategies.FAMILIES``,
    then "other"), then registration order with each compiled variant right after its eager
    form, unknown names last by name. Columns: ``family`` (a Categorical whose categories are
    the families in order) and ``eager`` (name, or None).
    """
    # The registry imports torch: only the report's families and compiled pairs need it, so
    # loading and the recommendation rule stay pandas only.
    import strategies

    order = {name: i for i, name in enumerate(strategies.names())}
    facts: dict[str, tuple[str, str | None]] = {}
    pending = list(dict.fromkeys(names))
    while pending:
        name = pending.pop()
        if name in facts:
            continue
        if name in order:
            strategy = strategies.get(name)
            facts[name] = (strategy.family, strategy.eager)
            if strategy.eager:
                pending.append(strategy.eager)
        else:
            facts[name] = (OTHER_FAMILY, None)
    families = [*strategies.FAMILIES, OTHER_FAMILY]

    def key(name: str) -> tuple:
        fam, eager = facts[name]
        base = eager or name
        return (families.index(fam), order.get(base, len(order)), base, eager is not None, name)

    ordered = sorted(facts, key=key)
    return pd.DataFrame(
        {
            "family": pd.Categorical([facts[n][0] for n in ordered], categories=families),
            "eager": [facts[n][1] for n in ordered],
        },
        index=pd.Index(ordered, name="strategy"),
    )


def _with_case_defaults(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with the case fields that have a default (added after older runs) filled in."""
    return rows.assign(**{k: v for k, v in _CASE_DEFAULTS.items() if k not in rows})


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


def _geomean(values: pd.Series) -> float:
    return float(np.exp(np.log(values.astype(float)).mean()))


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


def _faster_on_range(rows: pd.DataFrame, fast: str, slow: str) -> bool:
    """Whether ``fast`` beats ``slow`` case by case: faster on more than half, slower on none."""
    cells = ranked(rows).set_index(["case", "strategy"])
    verdicts = [
        versus(*compared_rounds(cells.loc[(case, fast)], cells.loc[(case, slow)]))
        for case in sorted(set(rows["case"]))
    ]
    return -1 not in verdicts and 2 * verdicts.count(1) > len(verdicts)


def summaries(rows: pd.DataFrame, cases: set[str]) -> pd.DataFrame:
    """Per strategy that ran accurately on every case in ``cases``, each cell repeated (not
    too slow to repeat, :func:`ranked`): time, spread, memory.

    ``time_s`` is the geometric mean of the min times, ``cost_vs_grad`` that of min time over
    P gradients (the same ranking, as every candidate ran the same cases: what ``auto``
    scales to another net by its own P and gradient time), ``spread`` the largest
    stddev / min, ``peak_bytes`` the largest peak; dispatchers are left out (recommending one
    is circular).
    ``single_s`` is the geometric mean of the time of one Hessian of a new structure: the
    first call where it was recorded (strategies that compile), else the min time.
    """
    ok = ranked(rows)
    ok = ok[~ok["strategy"].isin(DISPATCHERS)]
    if ok.empty:
        return pd.DataFrame(
            columns=["time_s", "cost_vs_grad", "single_s", "spread", "peak_bytes", "peer"]
        )
    complete = ok.groupby("strategy")["case"].agg(lambda c: set(c) == cases)
    ok = ok[ok["strategy"].map(complete)]
    ok = ok.assign(
        rel_spread=ok["stddev"] / ok["min"],
        single=pd.to_numeric(ok.get("first_call_s", pd.Series(np.nan, ok.index))).fillna(ok["min"]),
        # frames made by hand (and rows of older runs) may lack it: NaN, not a KeyError
        cost=pd.to_numeric(ok.get("cost_vs_grad", pd.Series(np.nan, ok.index))),
    )
    return ok.groupby("strategy").agg(
        time_s=("min", _geomean),
        cost_vs_grad=("cost", _geomean),
        single_s=("single", _geomean),
        spread=("rel_spread", "max"),
        peak_bytes=("peak_bytes", "max"),
        peer=("peer", "any"),
    )


def ranking(rows: pd.DataFrame) -> pd.DataFrame:
    """The candidates of a size range, fastest first: :func:`summaries` over all its cases,
    peers left out (what the recommendation ranks and the planner's table keeps)."""
    summary = summaries(rows, set(rows["case"]))
    return summary[~summary["peer"].astype(bool)].sort_values("time_s")


def peak_ratios(rows: pd.DataFrame) -> pd.Series:
    """Per strategy, its largest peak memory over the Hessian's own size on its "ok" cells."""
    ok = rows[rows["status"] == OK]
    return (ok["peak_bytes"] / ok["hessian_bytes"]).groupby(ok["strategy"]).max()


def _recommendation(regime: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    cases = set(rows["case"])
    summary = summaries(rows, cases)
    peer = summary["peer"].astype(bool)
    candidates = ranking(rows)
    lean = summary.loc[~peer].sort_values("peak_bytes")
    base = summary.loc[BASELINE] if BASELINE in summary.index else None
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
        if base is not None:
            record[f"fastest_vs_{BASELINE}"] = float(base["time_s"] / best["time_s"])
        if len(candidates) > 1:
            second = candidates.iloc[1]
            record["runner_up"] = candidates.index[1]
            ratio = second["time_s"] / best["time_s"]
            record["tie"] = not (
                ratio >= FASTER_RATIO
                and _faster_on_range(rows, candidates.index[0], candidates.index[1])
            )
        record["peers"] = {
            name: float(row["time_s"] / best["time_s"])
            for name, row in summary.loc[peer].iterrows()
        }
        single = candidates["single_s"].astype(float)
        record["fastest_single"] = single.idxmin()
        record["fastest_single_s"] = float(single.min())
    if not lean.empty and lean["peak_bytes"].notna().any():
        record["leanest"] = lean.index[0]
        record["leanest_peak_bytes"] = int(lean["peak_bytes"].iloc[0])
        if base is not None and lean["peak_bytes"].iloc[0] > 0:
            record[f"leanest_vs_{BASELINE}"] = float(
                base["peak_bytes"] / lean["peak_bytes"].iloc[0]
            )
    return record


def recommend(df: pd.DataFrame) -> pd.DataFrame:
    """The recommendation table: a row per machine, device, dtype and size range of P.

    See the module docstring for the rule. ``cases`` is the number of cases the row rests on;
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
    integral = {"P_min", "P_max", "leanest_peak_bytes", "cases"}
    records = []
    for row in table[list(RECOMMENDATION_FIELDS)].astype(object).to_dict("records"):
        plain = {k: None if v is None or pd.isna(v) else v for k, v in row.items()}
        plain.update({k: int(plain[k]) for k in integral if plain[k] is not None})
        plain["tie"] = bool(plain["tie"])
        records.append(plain)
    return records


def _slope(x: pd.Series, y: pd.Series) -> float:
    return float(np.polyfit(np.log(x.astype(float)), np.log(y.astype(float)), 1)[0])


def growth_exponents(df: pd.DataFrame) -> pd.DataFrame:
    """Exponent of min time in P and in batch size, from log-log least-squares fits.

    In P: over the cases of one family (:func:`family`). In batch: over cases that differ
    only in batch. Each fit needs at least two distinct values; a strategy's exponent is the
    mean over its fits, with the fit count.
    """
    ok = _with_case_defaults(df[df["status"] == OK])
    keys = ["machine", "device", "dtype", "strategy"]
    sweeps = {
        "P": [family(ok)],
        "batch": [f for f in _CASE_FIELDS if f != "batch"],
    }
    parts = []
    for variable, fixed in sweeps.items():
        fits = [
            {**dict(zip(keys, key)), "exponent": _slope(g[variable], g["min"])}
            for key, g in ok.groupby(keys + fixed, sort=True)
            if g[variable].nunique() >= 2
        ]
        if fits:
            part = pd.DataFrame(fits).groupby(keys)["exponent"].agg(["mean", "count"])
            parts.append(part.set_axis([f"exponent_in_{variable}", f"fits_in_{variable}"], axis=1))
    if not parts:
        columns = ["exponent_in_P", "fits_in_P", "exponent_in_batch", "fits_in_batch"]
        return pd.DataFrame(columns=keys + columns)
    return pd.concat(parts, axis=1).reset_index()


_CELL = ["machine", "device", "dtype", "arch", "case", "P"]


def _beside(df: pd.DataFrame, partner: dict[str, str]) -> pd.DataFrame:
    """Each "ok" row of a strategy in ``partner`` beside its partner's "ok" row on its case.

    Adds ``partner`` (the name) and ``partner_s`` (its min time); cases where either did not
    run accurately are left out.
    """
    ok = _with_case_defaults(df[df["status"] == OK])
    left = ok[ok["strategy"].isin(partner)]
    left = left.assign(partner=left["strategy"].map(partner))
    right = ok[[*_CELL, "strategy", "min"]].rename(
        columns={"strategy": "partner", "min": "partner_s"}
    )
    return left.merge(right, on=[*_CELL, "partner"]).sort_values(["machine", "device", "P", "case"])


def speedups(df: pd.DataFrame, strategy: str, other: str) -> pd.DataFrame:
    """Per case where both ran "ok": ``speedup``, the other's min time over the strategy's.

    Columns: machine, device, dtype, arch, case, P, speedup (above 1: ``strategy`` faster).
    """
    pairs = _beside(df, {strategy: other})
    return pairs[_CELL].assign(speedup=pairs["partner_s"] / pairs["min"]).reset_index(drop=True)


def _timed_groups(df: pd.DataFrame, keys: list[str]) -> Iterator[tuple[tuple, pd.DataFrame]]:
    for key, rows in df.groupby(keys, sort=True):
        if rows["status"].isin(TIMED).any():
            yield key, rows


def much_slower(df: pd.DataFrame, factor: float = SLOW_FACTOR) -> pd.DataFrame:
    """Strategies at least ``factor`` times slower than the fastest on the cases they ran.

    Per machine and device: on each case, the fastest min time of the strategies that could
    be recommended (status "ok", no peer, no dispatcher); each such strategy's
    ``times_fastest`` is the geometric mean over its "ok" cases of its min over that, with
    the count of ``cases``. Sorted slowest first.
    """
    ok = df[(df["status"] == OK) & ~df["peer"].astype(bool) & ~df["strategy"].isin(DISPATCHERS)]
    keys = ["machine", "device"]
    ok = ok.assign(ratio=ok["min"] / ok.groupby([*keys, "case"])["min"].transform("min"))
    table = (
        ok.groupby([*keys, "strategy"])
        .agg(times_fastest=("ratio", _geomean), cases=("case", "nunique"))
        .reset_index()
    )
    table = table[table["times_fastest"] >= factor]
    return table.sort_values([*keys, "times_fastest"], ascending=[True, True, False]).reset_index(
        drop=True
    )


def compiled_vs_eager(df: pd.DataFrame) -> pd.DataFrame:
    """Each compiled variant beside its eager form, per case where both ran "ok".

    Columns: machine, device, dtype, arch, case, P, ``strategy`` (the compiled variant),
    ``eager``, ``eager_s`` and ``compiled_s`` (min times), ``compiled_over_eager``,
    ``first_call_s`` (the compiled variant's first call, compile included) and
    ``break_even``: ``first_call_s / (eager_s - compiled_s)``, about the number of Hessians
    of one structure after which compiling pays; infinite where the compiled variant is not
    faster, null where its first call was not recorded.
    """
    facts = strategy_facts(df["strategy"].unique())
    pairs = _beside(df, facts["eager"].dropna().to_dict())
    saved = pairs["partner_s"] - pairs["min"]
    first = pd.to_numeric(pairs["first_call_s"])
    table = pairs[_CELL].assign(
        strategy=pairs["strategy"],
        eager=pairs["partner"],
        eager_s=pairs["partner_s"],
        compiled_s=pairs["min"],
        compiled_over_eager=pairs["min"] / pairs["partner_s"],
        first_call_s=first,
        break_even=(first / saved).where(saved > 0, np.where(first.notna(), np.inf, np.nan)),
    )
    return table.reset_index(drop=True)


def compile_summary(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`compiled_vs_eager` per machine, device and compiled variant, over its cases.

    Columns: machine, device, strategy, eager, cases, ``faster`` (cases where the compiled
    variant's min time beats the eager one's), ``first_call_lo``/``_hi``, ``eager_lo``/``_hi``
    (the eager min times) and ``break_even_lo``/``_hi``.
    """
    pairs = compiled_vs_eager(df)
    return (
        pairs.assign(faster=pairs["compiled_s"] < pairs["eager_s"])
        .groupby(["machine", "device", "strategy", "eager"], sort=True)
        .agg(
            cases=("case", "nunique"),
            faster=("faster", "sum"),
            first_call_lo=("first_call_s", "min"),
            first_call_hi=("first_call_s", "max"),
            eager_lo=("eager_s", "min"),
            eager_hi=("eager_s", "max"),
            break_even_lo=("break_even", "min"),
            break_even_hi=("break_even", "max"),
        )
        .reset_index()
    )


def device_timed(df: pd.DataFrame) -> pd.Series:
    """Whether anything was timed on each row's machine and device (a bool per row)."""
    timed = df["status"].isin(TIMED).groupby([df["machine"], df["device"]]).transform("any")
    return timed.astype(bool)


def untimed_devices(df: pd.DataFrame) -> pd.DataFrame:
    """Machines' devices where nothing was timed, one row per status and reason.

    Columns: machine, device, status, reason, ``cells``, ``cases`` and ``strategies``
    (counts); e.g. every CUDA cell of a machine without CUDA in one row.
    """
    rows = df[~device_timed(df)]
    columns = ["machine", "device", "status", "reason", "cells", "cases", "strategies"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    keys = ["machine", "device", "status", "reason"]
    table = rows.assign(reason=rows["reason"].fillna("no reason recorded")).groupby(keys)
    return table.agg(
        cells=("case", "size"), cases=("case", "nunique"), strategies=("strategy", "nunique")
    ).reset_index()[columns]


def not_timed(df: pd.DataFrame) -> pd.DataFrame:
    """Cells without a trusted time: every status but "ok", with the reason."""
    rows = df[df["status"] != OK].copy()
    wrong = rows["status"] == WRONG
    rows.loc[wrong, "reason"] = [
        f"max_rel_err {err:.2g} > tolerance {tol:.2g}"
        for err, tol in zip(rows.loc[wrong, "max_rel_err"], rows.loc[wrong, "tolerance"])
    ]
    columns = ["machine", "device", "case", "P", "strategy", "status", "reason"]
    return rows[columns].sort_values(["machine", "device", "P", "case", "strategy"])


def first_calls(df: pd.DataFrame) -> pd.DataFrame:
    """First call (compile) against steady state, for strategies that compile and ran "ok"."""
    first = df[df["first_call_s"].notna() & (df["status"] == OK)]
    first = first.assign(first_call_over_steady=first["first_call_s"] / first["min"])
    columns = ["machine", "device", "case", "strategy", "first_call_s", "min"]
    return first[[*columns, "first_call_over_steady"]]


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
    columns = [*_CELL, "planner_status", "planner_s", "first_call_s", "fastest", "fastest_s"]
    columns += ["regret", "first_call_regret"]
    rows = _with_case_defaults(df)
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
    table = mine[[*_CELL, "planner_status", "planner_s", "first_call_s"]].merge(
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
    nearest ranked range where its own has no ranking, ``ranked_in``) and runs the first
    strategy that runs the net: per arch, ``runs`` is the first of that ranking that ran
    accurately and repeated (:func:`ranked`) on every case of the arch in the range.
    ``runner_up`` is the fastest other strategy that did (geometric mean of min times);
    ``tie`` unless ``runs`` beats it by the recommendation rule (:func:`_faster_on_range`),
    ``beaten`` where the runner-up beats ``runs`` by that rule (another arch's cases made
    the range's ranking);
    ``cases``, ``wins`` (cases where ``runs`` is faster by :func:`versus`),
    ``ratio_median``/``_lo``/``_hi`` (the runner-up's min time over that of ``runs``, per
    case: below 1 where the runner-up was faster), and ``regret_cases``, ``regret_median``,
    ``regret_hi`` (:func:`regrets` on those cases where the planner ran). A row where no
    ranked strategy ran every case has ``runs`` None. Devices where nothing was timed are
    left to :func:`untimed_devices`.
    """
    columns = ["machine", "device", "dtype", "P_min", "P_max", "arch", "runs", "ranked_in"]
    columns += ["runner_up", "tie", "beaten", "cases", "wins", "ratio_median", "ratio_lo"]
    columns += ["ratio_hi", "regret_cases", "regret_median", "regret_hi"]
    df = _with_case_defaults(df)
    regret = regrets(df, planner) if not df.empty else pd.DataFrame(columns=["case", "regret"])
    groups = [(regime, rows) for regime, rows in regimes(df) if rows["status"].isin(TIMED).any()]
    orders = {}
    for regime, rows in groups:
        order = list(ranking(rows).index)
        if order:
            orders[tuple(regime.values())] = order
    ranked_ranges = [r for r, _ in groups if tuple(r.values()) in orders]
    records = []
    for regime, rows in groups:
        near = _nearest(ranked_ranges, regime)
        if near is None:
            continue
        order = orders[tuple(near.values())]
        for arch, mine in rows.groupby("arch", sort=True):
            ran = mine.loc[mine["status"] == OK, "case"].unique()
            mine = mine[mine["case"].isin(ran)]
            if mine.empty:
                continue
            cases = set(mine["case"])
            summary = summaries(mine, cases)
            summary = summary[~summary["peer"].astype(bool)].sort_values("time_s")
            runs = next((name for name in order if name in summary.index), None)
            record = {**dict.fromkeys(columns), **regime, "arch": arch, "runs": runs}
            record.update(ranked_in=(near["P_min"], near["P_max"]), tie=False, beaten=False)
            record.update(cases=len(cases), wins=0, regret_cases=0)
            others = [name for name in summary.index if name != runs]
            if runs is not None and others:
                runner_up = others[0]
                cells = ranked(mine).set_index(["case", "strategy"])
                fast = [_rounds_of(cells.loc[(c, runs)]) for c in sorted(cases)]
                slow = [_rounds_of(cells.loc[(c, runner_up)]) for c in sorted(cases)]
                ratios = [min(b) / min(a) for a, b in zip(fast, slow)]
                pairs = [
                    compared_rounds(cells.loc[(c, runs)], cells.loc[(c, runner_up)])
                    for c in sorted(cases)
                ]
                ratio = summary.loc[runner_up, "time_s"] / summary.loc[runs, "time_s"]
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


def case_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Every ranked cell (:func:`ranked`; peers and dispatchers included) with its multiples:
    ``times_grad``, its median over one gradient of the same loss (``grad_s``, curvlinops'
    convention), and ``times_fastest``, its median over the least median of the case among
    the strategies that could be recommended; ``rank`` within its case by median.

    Columns: machine, device, dtype, case, P, strategy, rank, median, min, max, rounds,
    noisy, max_rel_err, times_grad, times_fastest.
    """
    columns = ["machine", "device", "dtype", "case", "P", "strategy", "rank", "median", "min"]
    columns += ["max", "rounds", "noisy", "max_rel_err", "times_grad", "times_fastest"]
    cells = ranked(df)
    if cells.empty:
        return pd.DataFrame(columns=columns)
    keys = ["machine", "device", "case"]
    median = pd.to_numeric(cells["median"]).fillna(pd.to_numeric(cells["min"]))
    eligible = ~cells["peer"].astype(bool) & ~cells["strategy"].isin(DISPATCHERS)
    fastest = median.where(eligible).groupby([cells[k] for k in keys]).transform("min")
    cells = cells.assign(
        median=median,
        times_grad=median / pd.to_numeric(cells["grad_s"]),
        times_fastest=median / fastest,
        rank=median.groupby([cells[k] for k in keys]).rank(method="first").astype(int),
        noisy=cells["noisy"] if "noisy" in cells else False,
    )
    return cells.sort_values([*keys[:2], "P", "case", "rank"])[columns].reset_index(drop=True)


def multiples(df: pd.DataFrame) -> pd.DataFrame:
    """Per machine, device and strategy, over its ranked cells (:func:`case_cells`): ``cases``,
    ``times_grad`` (median over cases) and ``times_fastest`` (geometric mean, with its range),
    fastest first."""
    cells = case_cells(df)
    columns = ["machine", "device", "strategy", "cases", "times_grad", "times_fastest"]
    columns += ["times_fastest_lo", "times_fastest_hi"]
    if cells.empty:
        return pd.DataFrame(columns=columns)
    table = (
        cells.groupby(["machine", "device", "strategy"])
        .agg(
            cases=("case", "nunique"),
            times_grad=("times_grad", "median"),
            times_fastest=("times_fastest", _geomean),
            times_fastest_lo=("times_fastest", "min"),
            times_fastest_hi=("times_fastest", "max"),
        )
        .reset_index()
    )
    return table.sort_values(["machine", "device", "times_fastest"])[columns].reset_index(drop=True)


def accuracy_of_timed(df: pd.DataFrame) -> dict[str, Any]:
    """How accurate the timed cells were: ``cells``, ``wrong`` (beyond tolerance), and the
    worst ``max_rel_err`` with its ``strategy`` and ``case`` (None where nothing was timed)."""
    timed = df[df["status"].isin(TIMED)]
    record: dict[str, Any] = {"cells": len(timed), "wrong": int((timed["status"] == WRONG).sum())}
    errors = pd.to_numeric(timed["max_rel_err"]).dropna()
    record.update(worst=None, strategy=None, case=None)
    if len(errors):
        worst = timed.loc[errors.idxmax()]
        record.update(worst=float(errors.max()), strategy=worst["strategy"], case=worst["case"])
    return record


def not_timed_counts(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`not_timed` folded: per status and reason with its numbers written ``N``, the
    count of ``cells``, ``cases`` and ``strategies``, most cells first."""
    rows = not_timed(df)
    columns = ["status", "reason", "cells", "cases", "strategies"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    reason = rows["reason"].fillna("no reason recorded").astype(str)
    rows = rows.assign(reason=reason.str.replace(r"\d[\d.,]*(?:e[+-]?\d+)?", "N", regex=True))
    table = rows.groupby(["status", "reason"]).agg(
        cells=("case", "size"), cases=("case", "nunique"), strategies=("strategy", "nunique")
    )
    return table.reset_index().sort_values("cells", ascending=False, kind="stable")[columns]


def runs(df: pd.DataFrame, audits: list[dict]) -> pd.DataFrame:
    """One row per input file: where it came from (source, machine, torch, grid, command...)."""
    columns = ["source", "machine", "torch_version", "grid", "command", "commit", "run_datetime"]
    benchmarks = df[columns].drop_duplicates("source").copy() if not df.empty else pd.DataFrame()
    audit_runs = [
        {
            "source": a["source"],
            "machine": a.get("machine_label"),
            "torch_version": a.get("torch_version"),
            "grid": "audit",
            "command": a.get("command"),
        }
        for a in audits
    ]
    return pd.concat([benchmarks, pd.DataFrame(audit_runs)], ignore_index=True)


def audit_frame(audits: list[dict]) -> pd.DataFrame:
    """All audit records in one DataFrame, with the audit's machine, torch and source."""
    rows = [
        {
            "machine": audit.get("machine_label"),
            "torch_version": audit.get("torch_version"),
            "source": audit["source"],
            **record,
        }
        for audit in audits
        for record in audit.get("records") or []
    ]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(
            columns=["machine", "source", "strategy", "model", "model_kind", "status"]
        )
    frame["model_kind"] = frame["model_kind"].map(
        lambda k: ", ".join(k) if isinstance(k, list) else k
    )
    return frame


def _cell_text(record: pd.Series) -> str:
    status = record["status"]
    if status == WRONG and pd.notna(record.get("max_rel_err")):
        return f"{WRONG} (rel err {record['max_rel_err']:.2g})"
    if status == ERROR and record.get("exception"):
        return f"{ERROR} ({record['exception']})"
    return str(status)


#: an accuracy-matrix cell where the audit has no record of the pair
NOT_RUN = "not run"


def _audit_pivot(records: pd.DataFrame, values: pd.Series) -> pd.DataFrame:
    """Strategy x model of ``values`` (one per record), models in the audit's order."""
    table = records.assign(cell=values).pivot_table(
        index="strategy", columns="model", values="cell", aggfunc="first"
    )
    return table[list(dict.fromkeys(records["model"]))].fillna(NOT_RUN)


def accuracy_statuses(records: pd.DataFrame) -> pd.DataFrame:
    """Strategy x model matrix of audit statuses ("ok", "wrong", ..., "not run")."""
    if records.empty:
        return pd.DataFrame()
    return _audit_pivot(records, records["status"])


def accuracy_matrix(records: pd.DataFrame) -> pd.DataFrame:
    """Strategy x model matrix of audit outcomes as text ("ok", "wrong (rel err ..)", ...)."""
    if records.empty:
        return pd.DataFrame()
    return _audit_pivot(records, records.apply(_cell_text, axis=1))


#: exceptions by which a strategy refuses a net it does not handle (the strategy contract:
#: bad input raises ValueError or TypeError naming the problem), not a failure
REFUSALS = frozenset({"ValueError", "TypeError"})


def counts_against(status: str, exception: Any = None) -> bool:
    """Whether an audit cell counts against its strategy: a wrong Hessian (no error raised),
    or an exception that is not a refusal (:data:`REFUSALS`). A refusal is the strategy
    contract at work, a clear error in place of a wrong matrix: it counts against nothing.
    The one rule of ``audit_findings`` (the report) and ``wrong_kinds`` (``auto``'s routing)."""
    return status == WRONG or (status == ERROR and exception not in REFUSALS)


def audit_findings(audits: list[dict[str, Any]]) -> pd.DataFrame:
    """What the audits found against each strategy: silently wrong, or failing.

    One row per strategy and status, "wrong" (a wrong Hessian, no error raised) or "error"
    (an exception other than a refusal, :data:`REFUSALS`): ``kinds`` and ``models`` (sorted
    tuples), ``max_rel_err`` (wrong), ``exceptions`` (error), ``upstream`` (the known bugs'
    upstream references naming the strategy and one of those models) and ``refused``:
    whether an audit run that honours ``supports()`` found every one of those pairs
    "unsupported" (the strategy now refuses them).
    """
    records = audit_frame(audits)
    columns = ["strategy", "status", "kinds", "models", "max_rel_err", "exceptions"]
    columns += ["upstream", "refused"]
    if "exception" not in records:
        records = records.assign(exception=None)
    against = [counts_against(s, e) for s, e in zip(records["status"], records["exception"])]
    found = records[pd.Series(against, index=records.index, dtype=bool)]
    if found.empty:
        return pd.DataFrame(columns=columns)
    unsupported = set(
        zip(*records.loc[records["status"] == UNSUPPORTED, ["strategy", "model"]].T.values)
    )
    bugs = [bug for audit in audits for bug in audit.get("known_bugs") or []]
    rows = []
    for (strategy, status), part in found.groupby(["strategy", "status"], sort=True):
        models = tuple(sorted(set(part["model"])))
        upstream = {
            bug["upstream"]
            for bug in bugs
            if bug.get("upstream")
            and strategy in (bug.get("strategies") or [])
            and set(models) & set(bug.get("models") or [])
        }
        kinds = {k.strip() for tags in part["model_kind"] for k in str(tags).split(",")}
        rows.append(
            {
                "strategy": strategy,
                "status": status,
                "kinds": tuple(sorted(kinds)),
                "models": models,
                "max_rel_err": float(part["max_rel_err"].max()) if status == WRONG else None,
                "exceptions": tuple(sorted(set(part["exception"].dropna())))
                if status == ERROR
                else (),
                "upstream": tuple(sorted(upstream)),
                "refused": all((strategy, m) in unsupported for m in models),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def wrong_kinds(audit: dict[str, Any]) -> dict[str, set[str]]:
    """For each audited strategy, the model_kind tags of models where it was wrong or failed
    (``counts_against``: a refusal is neither)."""
    out: dict[str, set[str]] = {}
    for r in audit["records"]:
        kinds = out.setdefault(r["strategy"], set())
        if counts_against(r["status"], r.get("exception")):
            kinds.update(r["model_kind"])
    return out


def merged_wrong_kinds(audits: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """``wrong_kinds`` over several audits, for the strategies wrong or failing somewhere."""
    merged: dict[str, set[str]] = {}
    for audit in audits:
        for name, kinds in wrong_kinds(audit).items():
            merged.setdefault(name, set()).update(kinds)
    return {name: sorted(kinds) for name, kinds in sorted(merged.items()) if kinds}
