"""Turns benchmark and audit JSON into a tidy table, figures, recommendations and one HTML page.

Usage::

    python -m bench.report results/*.json [--plots-dir plots] [--html PATH] [--title TEXT]

Each pytest-benchmark JSON gets a tidy CSV next to it (a row per strategy x case x machine,
timed or not); each audit JSON gets its accuracy matrix as CSV next to it; the recommendation
table goes to ``recommendations.json`` in the plots directory; PNG figures and the
self-contained HTML report go to the plots directory.

``recommendations.json`` is a list of {machine, device, dtype, P_min, P_max, fastest,
fastest_s, fastest_vs_torch_func, tie, runner_up, leanest, leanest_peak_bytes,
leanest_vs_torch_func}; ``fastest`` and ``leanest`` are null where no strategy qualified.

Recommendation rule, per machine, device, dtype and size range of P:

- Size ranges have edges at 1 and 3 times powers of ten (..., 1,000, 3,000, 10,000, ...):
  a row covers ``P_min <= P < P_max``. Only ranges holding a case appear.
- A strategy is a candidate only if it ran accurately (status "ok") on every case of the
  range and is not a peer: inaccurate, out-of-memory, skipped or failing cells rule it out.
- Its time is the geometric mean over the range's cases of its min time; its memory is the
  largest ``peak_bytes`` over those cases.
- Ranges where nothing at all was timed (e.g. CUDA cases on a machine without CUDA) are
  left out; their cells are listed under "Cells not timed".
- The fastest is a tie with the runner-up unless ``runner_up_s / fastest_s - 1`` exceeds the
  spread of rounds, the largest ``stddev / min`` of the two strategies over the range's cases.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bench import plots
from bench.audit import merged_wrong_kinds

__all__ = [
    "InputFileError",
    "load",
    "audit_frame",
    "accuracy_matrix",
    "size_range",
    "recommend",
    "growth_exponents",
    "not_timed",
    "render_html",
    "main",
]

AUDIT_KIND = "hessbench-audit"
BASELINE = "torch_func"
CASE_FIELDS = (
    "case",
    "input",
    "width",
    "depth",
    "output",
    "activation",
    "loss",
    "batch",
    "dtype",
    "device",
)
STAT_FIELDS = ("min", "max", "mean", "stddev", "median", "iqr", "rounds")
TIMED_STATUSES = ("ok", "inaccurate")
RECOMMENDATION_FIELDS = (
    "machine",
    "device",
    "dtype",
    "P_min",
    "P_max",
    "fastest",
    "fastest_s",
    "fastest_vs_torch_func",
    "tie",
    "runner_up",
    "leanest",
    "leanest_peak_bytes",
    "leanest_vs_torch_func",
)


class InputFileError(ValueError):
    """An input file is neither a pytest-benchmark JSON nor an audit JSON."""


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{path}: cannot read as JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("kind") == AUDIT_KIND:
        return data
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        if isinstance(data.get("machine_info"), dict):
            return data
    raise InputFileError(
        f"{path}: not a pytest-benchmark JSON (needs 'benchmarks' and 'machine_info') "
        f'nor an audit JSON (needs "kind": "{AUDIT_KIND}")'
    )


def _machine_label(info: dict) -> str:
    if info.get("machine_label"):
        return str(info["machine_label"])
    cpu = info.get("cpu") or {}
    return f"{info.get('node', '?')} / {cpu.get('brand_raw', info.get('processor', '?'))}"


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
        # A timed row is "ok" only if it was also accurate; anything else must not be trusted.
        if extra.get("status", "ok") == "ok" and extra.get("accurate") is False:
            extra["status"] = "inaccurate"
        extra.setdefault("status", "ok")
        stats = bench.get("stats") or {}
        rows.append({**run, **extra, **{k: stats.get(k) for k in STAT_FIELDS}})
    for outcome in meta.get("outcomes") or []:
        rows.append({**run, **outcome})
    frame = pd.DataFrame(rows)
    for column in ("reason", "peer", "first_call_s", "peak_bytes", "grad_s", "gemm_s"):
        if column not in frame:
            frame[column] = None
    if "min" not in frame:
        for column in STAT_FIELDS:
            frame[column] = np.nan
    return frame


def load(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[dict]]:
    """Read benchmark and audit JSON files into one tidy DataFrame and a list of audits.

    The DataFrame has a row per strategy x case x machine, timed or not: the run (machine,
    torch_version, source, grid, command, commit, run_datetime), the case fields, the
    extra_info keys, pytest-benchmark's stats (min, max, mean, stddev, median, iqr, rounds;
    NaN for cells not timed), ``status`` and ``reason``. Where two files hold the same cell
    of one machine, the later file wins. Each audit dict gains a ``source`` key.

    Raises:
        InputFileError: a file is not JSON of either kind; the message names it.
    """
    frames, audits = [], []
    for path in map(Path, paths):
        data = _read(path)
        if data.get("kind") == AUDIT_KIND:
            audits.append({**data, "source": str(path)})
        else:
            frames.append(_benchmark_rows(path, data))
    if not frames:
        empty = ["machine", "source", "strategy", "case", "status", "P", "peer"]
        return pd.DataFrame(columns=empty), audits
    df = pd.concat([f for f in frames if not f.empty] or frames, ignore_index=True)
    df = df.drop_duplicates(["machine", "strategy", "case"], keep="last").reset_index(drop=True)
    # Outcomes carry no "peer" flag: borrow it from the strategy's timed rows.
    peers = df.dropna(subset=["peer"]).groupby("strategy")["peer"].any()
    df["peer"] = df["strategy"].map(peers).fillna(False).astype(bool)
    for column in ("P", "hessian_bytes"):
        df[column] = pd.to_numeric(df[column])
    return df, audits


#: strategies that only choose and run another one (``auto``): timed, never recommended
DISPATCHERS = frozenset({"auto"})


def size_range(P: int) -> tuple[int, int]:
    """The size range ``(P_min, P_max)`` holding ``P``: edges at 1 and 3 times powers of ten."""
    if P < 1:
        raise ValueError(f"P must be positive, got {P}")
    decade = 10 ** int(math.floor(math.log10(P)))
    if P < 3 * decade:
        return decade, 3 * decade
    return 3 * decade, 10 * decade


def _geomean(values: pd.Series) -> float:
    return float(np.exp(np.log(values.astype(float)).mean()))


def summaries(rows: pd.DataFrame, cases: set[str]) -> pd.DataFrame:
    """Per strategy that ran accurately on every case in ``cases``: time, spread, memory."""
    ok = rows[rows["status"] == "ok"]
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


def recommend(df: pd.DataFrame) -> pd.DataFrame:
    """The recommendation table: a row per machine, device, dtype and size range of P.

    See the module docstring for the rule. ``fastest_vs_torch_func`` is torch_func's time
    over the fastest's (a speedup); ``leanest_vs_torch_func`` is torch_func's peak memory
    over the leanest's. Both are null where torch_func did not run every case of the range.
    ``peers`` maps each peer strategy that ran every case to its time over the fastest's.
    """
    records = []
    if df.empty:
        return pd.DataFrame(columns=[*RECOMMENDATION_FIELDS, "peers", "cases"])
    df = df.assign(P_min=df["P"].map(lambda p: size_range(int(p))[0]))
    for (machine, device, dtype, p_min), rows in df.groupby(
        ["machine", "device", "dtype", "P_min"], sort=True
    ):
        if not rows["status"].isin(TIMED_STATUSES).any():
            continue
        cases = set(rows["case"])
        summary = summaries(rows, cases)
        # a dispatcher runs another strategy: recommending it would be circular
        summary = summary.loc[~summary.index.isin(DISPATCHERS)]
        peer = summary["peer"].astype(bool)
        candidates = summary.loc[~peer].sort_values("time_s")
        lean = summary.loc[~peer].sort_values("peak_bytes")
        base = summary.loc[BASELINE] if BASELINE in summary.index else None
        record = {
            "machine": machine,
            "device": device,
            "dtype": dtype,
            "P_min": int(p_min),
            "P_max": int(size_range(int(p_min))[1]),
            "fastest": None,
            "fastest_s": None,
            "fastest_vs_torch_func": None,
            "tie": False,
            "runner_up": None,
            "leanest": None,
            "leanest_peak_bytes": None,
            "leanest_vs_torch_func": None,
            "peers": {},
            "cases": len(cases),
        }
        if not candidates.empty:
            best = candidates.iloc[0]
            record["fastest"] = candidates.index[0]
            record["fastest_s"] = float(best["time_s"])
            if base is not None:
                record["fastest_vs_torch_func"] = float(base["time_s"] / best["time_s"])
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
                record["leanest_vs_torch_func"] = float(
                    base["peak_bytes"] / lean["peak_bytes"].iloc[0]
                )
        records.append(record)
    return pd.DataFrame(records, columns=[*RECOMMENDATION_FIELDS, "peers", "cases"])


def _plain_records(table: pd.DataFrame) -> list[dict]:
    """The contract's fields as JSON values: null for missing, ints for sizes and bytes."""
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

    In P: over cases that differ only in the net's size (same input, output, activation,
    loss, batch). In batch: over cases that differ only in batch. Each fit needs at least two
    distinct values; a strategy's exponent is the mean over its fits, with the fit count.
    """
    ok = df[df["status"] == "ok"]
    keys = ["machine", "device", "dtype", "strategy"]
    sweeps = {
        "P": ["input", "output", "activation", "loss", "batch"],
        "batch": ["input", "output", "activation", "loss", "width", "depth"],
    }
    parts = []
    for variable, fixed in sweeps.items():
        fits = [
            {**dict(zip(keys + fixed, key)), "exponent": _slope(g[variable], g["min"])}
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
    rows = df[df["status"] != "ok"].copy()
    inaccurate = rows["status"] == "inaccurate"
    rows.loc[inaccurate, "reason"] = [
        f"max_rel_err {err:.2g} > tolerance {tol:.2g}"
        for err, tol in zip(rows.loc[inaccurate, "max_rel_err"], rows.loc[inaccurate, "tolerance"])
    ]
    columns = ["machine", "device", "case", "P", "strategy", "status", "reason"]
    return rows[columns].sort_values(["machine", "device", "P", "case", "strategy"])


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
    if status == "wrong" and pd.notna(record.get("max_rel_err")):
        return f"wrong (rel err {record['max_rel_err']:.2g})"
    if status == "error" and record.get("exception"):
        return f"error ({record['exception']})"
    return str(status)


def accuracy_matrix(records: pd.DataFrame) -> pd.DataFrame:
    """Strategy x model matrix of audit outcomes as text ("pass", "wrong (rel err ..)", ...)."""
    if records.empty:
        return pd.DataFrame()
    text = records.assign(cell=records.apply(_cell_text, axis=1))
    return text.pivot_table(
        index="strategy", columns="model", values="cell", aggfunc="first"
    ).fillna("not run")


def _img(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _table(frame: pd.DataFrame, table_id: str) -> str:
    if frame.empty:
        return "<p>(none)</p>"
    return frame.to_html(index=False, na_rep="—", table_id=table_id, float_format="{:.4g}".format)


def _ratio(value: float | None) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:.2f}×"


def _bytes(value: float | None) -> str:
    if value is None or pd.isna(value):
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def _recommendation_view(table: pd.DataFrame, wrong: dict[str, list[str]]) -> pd.DataFrame:
    def name(strategy: str | None) -> str:
        if strategy is None or pd.isna(strategy):
            return "none ran every case"
        if strategy in wrong:
            return f"{strategy} (audit: wrong or failing on {', '.join(wrong[strategy])})"
        return strategy

    return pd.DataFrame(
        {
            "machine": table["machine"],
            "device": table["device"],
            "dtype": table["dtype"],
            "P range": [f"{lo:,} ≤ P < {hi:,}" for lo, hi in zip(table["P_min"], table["P_max"])],
            "cases": table["cases"],
            "fastest": [
                f"tie: {name(f)} ≈ {name(r)}" if tie else name(f)
                for f, r, tie in zip(table["fastest"], table["runner_up"], table["tie"])
            ],
            "fastest time (s, geo-mean of min)": table["fastest_s"],
            "speedup vs torch_func": table["fastest_vs_torch_func"].map(_ratio),
            "runner-up": table["runner_up"].map(name),
            "peers (time / fastest)": table["peers"].map(
                lambda p: ", ".join(f"{k}: {_ratio(v)}" for k, v in p.items()) or "—"
            ),
            "leanest": table["leanest"].map(name),
            "leanest peak": table["leanest_peak_bytes"].map(_bytes),
            "memory vs torch_func (× less)": table["leanest_vs_torch_func"].map(_ratio),
        }
    )


def _runs(df: pd.DataFrame, audits: list[dict]) -> pd.DataFrame:
    runs = (
        df[["source", "machine", "torch_version", "grid", "command", "commit", "run_datetime"]]
        .drop_duplicates("source")
        .copy()
        if not df.empty
        else pd.DataFrame()
    )
    extra = [
        {
            "source": a["source"],
            "machine": a.get("machine_label"),
            "torch_version": a.get("torch_version"),
            "grid": "audit",
            "command": a.get("command"),
        }
        for a in audits
    ]
    return pd.concat([runs, pd.DataFrame(extra)], ignore_index=True)


_CSS = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1600px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f0f0f0; }
figure { margin: 1em 0; } img { max-width: 100%; }
td.pass { background: #c8efc8; } td.wrong { background: #f7b0b0; }
td.error { background: #f7d9a8; } td.unsupported { background: #e0e0e0; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


def _matrix_html(matrix: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(m))}</th>" for m in matrix.columns)
    body = []
    for strategy, row in matrix.iterrows():
        cells = "".join(
            f"<td class='{html.escape(str(v).split(' ')[0])}'>{html.escape(str(v))}</td>"
            for v in row
        )
        body.append(f"<tr><th>{html.escape(str(strategy))}</th>{cells}</tr>")
    return (
        f"<table id='accuracy-matrix'><tr><th>strategy \\ model</th>{head}</tr>"
        f"{''.join(body)}</table>"
    )


def _bugs_html(audits: list[dict]) -> str:
    parts = []
    for audit in audits:
        for bug in audit.get("known_bugs") or []:
            still = "still reproduces" if bug.get("reproduces") else "no longer reproduces"
            parts.append(
                f"<h3>{html.escape(str(bug.get('title')))}</h3><p>upstream: "
                f"{html.escape(str(bug.get('upstream')))}; strategies: "
                f"{html.escape(', '.join(bug.get('strategies') or []))}; models: "
                f"{html.escape(', '.join(bug.get('models') or []))}; <b>{still}</b> with torch "
                f"{html.escape(str(audit.get('torch_version')))}</p>"
                f"<pre>{html.escape(str(bug.get('reproduction')))}</pre>"
            )
    return "".join(parts) or "<p>(none)</p>"


def render_html(
    title: str,
    df: pd.DataFrame,
    audits: list[dict],
    figures: dict[str, bytes],
    recommendations: pd.DataFrame,
) -> str:
    """The self-contained report: figures as data: URIs, tables, runs and audit sections."""
    records = audit_frame(audits)
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Runs</h2>",
        _table(_runs(df, audits), "runs"),
        "<h2>Recommendation</h2>",
        "<p>Per machine, device, dtype and range of P: the fastest strategy that ran "
        "accurately on every case of the range (peers excluded), and the leanest in peak "
        "memory. A tie means the runner-up is within the spread of rounds (stddev / min). "
        "Size ranges have edges at 1 and 3 times powers of ten.</p>",
        _table(
            _recommendation_view(recommendations, merged_wrong_kinds(audits)), "recommendations"
        ),
    ]
    sections += [_img(name, png) for name, png in figures.items()]
    if not df.empty:
        first = df[df["first_call_s"].notna() & (df["status"] == "ok")]
        first = first.assign(first_call_over_steady=first["first_call_s"] / first["min"])
        sections += [
            "<h2>Cells not timed</h2>",
            _table(not_timed(df), "not-timed"),
            "<h2>Growth exponents (log-log fit of min time)</h2>",
            _table(growth_exponents(df), "growth"),
            "<h2>First call (compile) vs steady state</h2>",
            _table(
                first[
                    [
                        "machine",
                        "device",
                        "case",
                        "strategy",
                        "first_call_s",
                        "min",
                        "first_call_over_steady",
                    ]
                ],
                "first-call",
            ),
        ]
    if audits:
        sections += [
            "<h2>Accuracy audit (strategy × model)</h2>",
            _matrix_html(accuracy_matrix(records)),
            "<h2>Known upstream bugs</h2>",
            _bugs_html(audits),
        ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )


def _figures(df: pd.DataFrame, plots_dir: Path) -> dict[str, bytes]:
    if df.empty:
        return {}
    colours = plots.strategy_colours(df["strategy"])
    figures = {
        "time_vs_P": (
            "Time per Hessian vs P, with P gradients and the GEMM as references",
            plots.time_vs_p(df, colours),
        ),
        "memory_vs_P": (
            "Peak memory vs P, with the Hessian's own size as reference",
            plots.memory_vs_p(df, colours),
        ),
        "cost_ratios": ("cost_vs_grad and vs_gemm per strategy", plots.cost_ratios(df, colours)),
    }
    if (df["strategy"] == BASELINE).any():
        figures["speedup"] = (
            f"Speedup over {BASELINE} per case",
            plots.speedup(df, colours, BASELINE),
        )
    headline = df[df["device"] == "cpu"] if (df["device"] == "cpu").any() else df
    plots.save(plots.time_vs_p(headline, colours), plots_dir / "headline.png")
    return {
        caption: plots.save(fig, plots_dir / f"{name}.png")
        for name, (caption, fig) in figures.items()
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="benchmark and audit JSON files")
    parser.add_argument("--plots-dir", type=Path, default=Path("plots"))
    parser.add_argument("--html", type=Path, default=None, help="default: PLOTS_DIR/report.html")
    parser.add_argument("--title", default="hessbench report")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the report; returns 0, or 2 where an input file is not of a known kind."""
    args = _parser().parse_args(argv)
    try:
        df, audits = load(args.files)
    except InputFileError as exc:
        print(f"bench.report: error: {exc}", file=sys.stderr)
        return 2
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    html_path = args.html or args.plots_dir / "report.html"
    for source, rows in df.groupby("source"):
        rows.drop(columns="source").to_csv(Path(source).with_suffix(".csv"), index=False)
    records = audit_frame(audits)
    for source, rows in records.groupby("source"):
        accuracy_matrix(rows).to_csv(Path(source).with_name(Path(source).stem + "_matrix.csv"))
    recommendations = recommend(df)
    benchmark_files = [p for p in args.files if str(p) in set(df.get("source", []))]
    if benchmark_files:
        # beside the figures, not the inputs: `results/*.json` must stay inputs only
        out = args.plots_dir / "recommendations.json"
        out.write_text(json.dumps(_plain_records(recommendations), indent=1))
    figures = _figures(df, args.plots_dir)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(args.title, df, audits, figures, recommendations))
    print(f"bench.report: wrote {html_path} ({len(df)} cells; {shlex.join(map(str, args.files))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
