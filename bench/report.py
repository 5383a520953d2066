"""The HTML report and the command that builds every output of a report from JSON files.

Usage::

    python -m bench.report results/*.json [--plots-dir plots] [--html PATH] [--title TEXT]

Each pytest-benchmark JSON gets a tidy CSV next to it (a row per strategy x case x machine,
timed or not); each audit JSON gets its accuracy matrix as CSV next to it; the recommendation
table goes to ``recommendations.json`` in the plots directory; PNG figures and the
self-contained HTML report go to the plots directory.

The analysis (loading, statuses, the recommendation rule) is ``bench.results``; the figures
are ``bench.plots``. ``recommendations.json`` is a list of ``results.RECOMMENDATION_FIELDS``
records; ``fastest`` and ``leanest`` are null where no strategy qualified (docs/DESIGN.md,
"recommendations.json").
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import shlex
import sys
from pathlib import Path

import pandas as pd

from bench import cli, plots, results
from bench.vocabulary import BASELINE, ERROR, OK, UNSUPPORTED, WRONG

__all__ = ["render_html", "main"]


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
            f"speedup vs {BASELINE}": table[f"fastest_vs_{BASELINE}"].map(_ratio),
            "runner-up": table["runner_up"].map(name),
            "peers (time / fastest)": table["peers"].map(
                lambda p: ", ".join(f"{k}: {_ratio(v)}" for k, v in p.items()) or "—"
            ),
            "leanest": table["leanest"].map(name),
            "leanest peak": table["leanest_peak_bytes"].map(_bytes),
            f"memory vs {BASELINE} (× less)": table[f"leanest_vs_{BASELINE}"].map(_ratio),
        }
    )


#: background of an accuracy-matrix cell, by audit status (the cell's class)
_STATUS_COLOURS = {OK: "#c8efc8", WRONG: "#f7b0b0", ERROR: "#f7d9a8", UNSUPPORTED: "#e0e0e0"}
_CSS = """
body { font-family: sans-serif; margin: 1.5em; max-width: 1600px; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; }
th { background: #f0f0f0; }
figure { margin: 1em 0; } img { max-width: 100%; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
""" + "".join(
    f"td.{status} {{ background: {colour}; }}\n" for status, colour in _STATUS_COLOURS.items()
)


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
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Runs</h2>",
        _table(results.runs(df, audits), "runs"),
        "<h2>Recommendation</h2>",
        "<p>Per machine, device, dtype and range of P: the fastest strategy that ran "
        "accurately on every case of the range (peers excluded), and the leanest in peak "
        "memory. A tie means the runner-up is within the spread of rounds (stddev / min). "
        "Size ranges have edges at 1 and 3 times powers of ten.</p>",
        _table(
            _recommendation_view(recommendations, results.merged_wrong_kinds(audits)),
            "recommendations",
        ),
    ]
    sections += [_img(name, png) for name, png in figures.items()]
    if not df.empty:
        sections += [
            "<h2>Cells not timed</h2>",
            _table(results.not_timed(df), "not-timed"),
            "<h2>Growth exponents (log-log fit of min time)</h2>",
            _table(results.growth_exponents(df), "growth"),
            "<h2>First call (compile) vs steady state</h2>",
            _table(results.first_calls(df), "first-call"),
        ]
    if audits:
        sections += [
            "<h2>Accuracy audit (strategy × model)</h2>",
            _matrix_html(results.accuracy_matrix(results.audit_frame(audits))),
            "<h2>Known upstream bugs</h2>",
            _bugs_html(audits),
        ]
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        + "\n".join(sections)
        + "</body></html>"
    )


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="benchmark and audit JSON files")
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
        results.InputFileError: two inputs would write one CSV, or a CSV would be an input.
    """
    paths = {source: Path(source).with_suffix(".csv") for source in runs}
    for source in (Path(a["source"]) for a in audits):
        paths[str(source)] = source.with_name(f"{source.stem}_matrix.csv")
    taken = {Path(source): source for source in paths}
    for source, path in paths.items():
        if path in taken and taken[path] != source:
            raise results.InputFileError(f"{taken[path]} and {source} would both be {path}")
        taken[path] = source
    return paths


def _write_csvs(runs: dict[str, pd.DataFrame], audits: list[dict]) -> None:
    """Each input's own CSV, with all of its cells; a file already holding it is not rewritten.

    One CSV per input, never the merged frame: two runs of one machine share cells, and the
    merged frame keeps only the later run's.
    """
    paths = _csv_paths(runs, audits)
    for source, frame in runs.items():
        _write_if_changed(paths[source], frame.drop(columns="source").to_csv(index=False))
    for source, rows in results.audit_frame(audits).groupby("source"):
        _write_if_changed(paths[source], results.accuracy_matrix(rows).to_csv())


def main(argv: list[str] | None = None) -> int:
    """Build the report; returns 0, or 2 (one line on stderr) for a bad argument or input."""
    parser = _parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        runs, audits = results.load_runs(args.files)
        df = results.merge(runs.values())
        _write_csvs(runs, audits)
        recommendations = results.recommend(df)
        args.plots_dir.mkdir(parents=True, exist_ok=True)
        if runs:
            # beside the figures, not the inputs: `results/*.json` must stay inputs only
            out = args.plots_dir / "recommendations.json"
            out.write_text(json.dumps(results.recommendation_records(recommendations), indent=1))
        figures = plots.write_figures(df, args.plots_dir)
        html_path = args.html or args.plots_dir / "report.html"
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(render_html(args.title, df, audits, figures, recommendations))
    except results.InputFileError as exc:
        return cli.fail(prog, str(exc))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        return cli.fail(prog, f"cannot write{where}: {exc.strerror or exc}")
    print(f"bench.report: wrote {html_path} ({len(df)} cells; {shlex.join(map(str, args.files))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
