"""Analysis of benchmark and audit JSON: tidy frame, families, recommendation rule, growth.

Everything here is pandas over the JSON files (no torch), so it reads runs from any machine.
The HTML report (``bench.report``), the figures (``bench.plots``) and ``auto``'s table
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
- The fastest is a tie with the runner-up unless ``runner_up_s / fastest_s - 1`` exceeds the
  spread of rounds, the largest ``stddev / min`` of the two strategies over the range's cases.
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

from bench.grid import Case
from bench.vocabulary import (
    AUDIT_KIND,
    BASELINE,
    ERROR,
    FAILED,
    OK,
    TIMED,
    WRONG,
    canonical_status,
)

__all__ = [
    "InputFileError",
    "STAT_FIELDS",
    "DISPATCHERS",
    "RECOMMENDATION_FIELDS",
    "load",
    "load_runs",
    "merge",
    "family",
    "size_range",
    "regimes",
    "summaries",
    "peak_ratios",
    "recommend",
    "recommendation_records",
    "growth_exponents",
    "not_timed",
    "first_calls",
    "runs",
    "audit_frame",
    "accuracy_matrix",
    "wrong_kinds",
    "merged_wrong_kinds",
]

#: pytest-benchmark's statistics kept per timed cell (seconds; ``rounds`` a count)
STAT_FIELDS = ("min", "max", "mean", "stddev", "median", "iqr", "rounds")
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
        rows.append({**run, **extra, **{k: stats.get(k) for k in STAT_FIELDS}})
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
)


def _audit(path: Path, data: dict) -> dict:
    records = [{**r, "status": _status(path, r["status"])} for r in data.get("records") or []]
    return {**data, "records": records, "source": str(path)}


def load_runs(paths: Sequence[str | Path]) -> tuple[dict[str, pd.DataFrame], list[dict]]:
    """Each benchmark file's own tidy frame, by its path (``source``), and the audits.

    A file's frame holds all of its cells, whatever other files hold: it is what the file's
    CSV is made from (``bench.report``). ``load`` merges them.

    Raises:
        InputFileError: as ``load``.
    """
    runs, audits = {}, []
    for path in map(Path, paths):
        data = _read(path)
        if data.get("kind") == AUDIT_KIND:
            audits.append(_audit(path, data))
        else:
            runs[str(path)] = merge([_benchmark_rows(path, data)])
    return runs, audits


def merge(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """One tidy frame of runs' frames; where two hold the same cell of one machine, the later wins."""
    frames = list(frames)
    if not frames:
        empty = ["machine", "source", "strategy", "case", "status", "P", "peer"]
        return pd.DataFrame(columns=empty)
    df = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
    df = df.drop_duplicates(["machine", "strategy", "case"], keep="last").reset_index(drop=True)
    # Outcomes carry no "peer" flag: borrow it from the strategy's timed rows.
    peers = df.dropna(subset=["peer"]).groupby("strategy")["peer"].any()
    df["peer"] = df["strategy"].map(peers).eq(True)
    for column in ("P", "hessian_bytes"):
        df[column] = pd.to_numeric(df[column])
    return df


def load(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """Read benchmark and audit JSON files into one tidy DataFrame and a list of audits.

    The DataFrame has a row per strategy x case x machine, timed or not: the run (machine,
    torch_version, source, grid, command, commit, run_datetime), the case fields, the
    extra_info keys, pytest-benchmark's stats (min, max, mean, stddev, median, iqr, rounds;
    NaN for cells not timed), ``status`` and ``reason``. Where two files hold the same cell
    of one machine, the later file wins. Each audit dict gains a ``source`` key. Statuses of
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


def summaries(rows: pd.DataFrame, cases: set[str]) -> pd.DataFrame:
    """Per strategy that ran accurately on every case in ``cases``: time, spread, memory.

    ``time_s`` is the geometric mean of the min times, ``spread`` the largest stddev / min,
    ``peak_bytes`` the largest peak; dispatchers are left out (recommending one is circular).
    """
    ok = rows[(rows["status"] == OK) & ~rows["strategy"].isin(DISPATCHERS)]
    if ok.empty:
        return pd.DataFrame(columns=["time_s", "spread", "peak_bytes", "peer"])
    complete = ok.groupby("strategy")["case"].agg(lambda c: set(c) == cases)
    ok = ok[ok["strategy"].map(complete)]
    ok = ok.assign(rel_spread=ok["stddev"] / ok["min"])
    return ok.groupby("strategy").agg(
        time_s=("min", _geomean),
        spread=("rel_spread", "max"),
        peak_bytes=("peak_bytes", "max"),
        peer=("peer", "any"),
    )


def peak_ratios(rows: pd.DataFrame) -> pd.Series:
    """Per strategy, its largest peak memory over the Hessian's own size on its "ok" cells."""
    ok = rows[rows["status"] == OK]
    return (ok["peak_bytes"] / ok["hessian_bytes"]).groupby(ok["strategy"]).max()


def _recommendation(regime: dict[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    cases = set(rows["case"])
    summary = summaries(rows, cases)
    peer = summary["peer"].astype(bool)
    candidates = summary.loc[~peer].sort_values("time_s")
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
            spread = max(best["spread"], second["spread"])
            record["tie"] = bool(second["time_s"] / best["time_s"] - 1.0 <= spread)
        record["peers"] = {
            name: float(row["time_s"] / best["time_s"])
            for name, row in summary.loc[peer].iterrows()
        }
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

    See the module docstring for the rule. ``fastest_vs_torch_func`` is the baseline's time
    over the fastest's (a speedup); ``leanest_vs_torch_func`` is the baseline's peak memory
    over the leanest's. Both are null where the baseline did not run every case of the range.
    ``peers`` maps each peer strategy that ran every case to its time over the fastest's.
    """
    records = [
        _recommendation(regime, rows)
        for regime, rows in regimes(df)
        if rows["status"].isin(TIMED).any()
    ]
    return pd.DataFrame(records, columns=[*RECOMMENDATION_FIELDS, "peers", "cases"])


def recommendation_records(table: pd.DataFrame) -> list[dict]:
    """The table as ``recommendations.json`` records: null for missing, ints for sizes."""
    integral = {"P_min", "P_max", "leanest_peak_bytes"}
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


def accuracy_matrix(records: pd.DataFrame) -> pd.DataFrame:
    """Strategy x model matrix of audit outcomes as text ("ok", "wrong (rel err ..)", ...)."""
    if records.empty:
        return pd.DataFrame()
    text = records.assign(cell=records.apply(_cell_text, axis=1))
    return text.pivot_table(
        index="strategy", columns="model", values="cell", aggfunc="first"
    ).fillna("not run")


def wrong_kinds(audit: dict[str, Any]) -> dict[str, set[str]]:
    """For each audited strategy, the model_kind tags of models where it was wrong or raised."""
    out: dict[str, set[str]] = {}
    for r in audit["records"]:
        kinds = out.setdefault(r["strategy"], set())
        if r["status"] in FAILED:
            kinds.update(r["model_kind"])
    return out


def merged_wrong_kinds(audits: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """``wrong_kinds`` over several audits, for the strategies wrong or failing somewhere."""
    merged: dict[str, set[str]] = {}
    for audit in audits:
        for name, kinds in wrong_kinds(audit).items():
            merged.setdefault(name, set()).update(kinds)
    return {name: sorted(kinds) for name, kinds in sorted(merged.items()) if kinds}
