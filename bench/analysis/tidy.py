"""The tidy frame of benchmark and audit JSON: files read and checked, statuses mapped, runs
merged; case families and strategy families.

Everything here is pandas over the JSON files, so it reads runs from any machine; loading
needs no torch (only :func:`strategy_facts` imports the registry). The recommendation rule
(``bench.analysis.rule``), the summary's numbers (``bench.analysis.numbers``), the HTML
report (``bench.report``), the figures (``bench.report.plots``) and ``auto``'s table
(``bench.auto_table``) all read the frame made here; none of them re-derives what is defined
here.

Strategy families (``strategies.FAMILIES``) and compiled variants' eager forms come from the
registry through :func:`strategy_facts` alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.problems.grid import Case
from bench.vocabulary import AUDIT_KIND, OK, TIMED, WRONG, canonical_status

__all__ = [
    "InputFileError",
    "STAT_FIELDS",
    "NOT_IN_CSV",
    "NOISY_IQR",
    "OTHER_FAMILY",
    "load",
    "load_runs",
    "merge",
    "family",
    "strategy_facts",
    "runs",
    "CASE_FIELDS",
    "with_case_defaults",
    "CELL_COLUMNS",
]

#: pytest-benchmark's statistics kept per timed cell (seconds; ``rounds`` a count)
STAT_FIELDS = ("min", "max", "mean", "stddev", "median", "iqr", "rounds")


#: the round times of a timed cell (a list, from pytest-benchmark's ``stats.data``): in the
#: frame for the tests, never in a CSV (which keeps the JSON's statistics)
NOT_IN_CSV = ("rounds_s", "interleaved_s")


#: a cell is noisy where its IQR over its median exceeds this (torch.utils.benchmark.Compare)
NOISY_IQR = 0.1


#: the family of a strategy the registry does not know (an older or foreign run)
OTHER_FAMILY = "other"


CASE_FIELDS = tuple(f.name for f in dataclasses.fields(Case))


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
_CELL_KEYS = ("strategy", "case", "P", *(f for f in CASE_FIELDS if f not in _CASE_DEFAULTS))


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
        Case(**{k: _plain(v) for k, v in zip(CASE_FIELDS, values)}).family
        for values in with_case_defaults(rows)[list(CASE_FIELDS)].itertuples(index=False)
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


def with_case_defaults(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with the case fields that have a default (added after older runs) filled in."""
    return rows.assign(**{k: v for k, v in _CASE_DEFAULTS.items() if k not in rows})


CELL_COLUMNS = ["machine", "device", "dtype", "arch", "case", "P"]


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
