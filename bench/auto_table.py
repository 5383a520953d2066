"""Builds ``strategies/auto_table.json``, what the ``auto`` strategy chooses from, out of
committed benchmark and audit JSON.

Usage::

    python -m bench.auto_table results/<run>.json results/audit-<machine>.json \
        [--out strategies/auto_table.json]

Per machine, device, dtype and size range of P (the report's ranges), the ranking holds the
non-peer strategies that ran accurately on every case of the range they support, fastest
first (the report's rule, ``bench.analysis.rule.ranking``), ``cost_vs_grad`` their cost in
gradients per Hessian row in the same order (``rule.summaries``: what ``auto``'s estimate
scales to another net),
``kinds`` the same ranking and costs over the cases of each kinds signature of the range
(``rule.kinds_rankings``: "layernorm", "conv", "attention+layernorm"), and
``peak_ratio`` the largest peak memory over the Hessian's own size of every strategy
measured accurately on the range's plain nets (``rule.plain``), ranked or not: a convnet's
activations, which the unchunked vmaps hold per direction, are not the MLPs' (those
strategies check their directions against the free memory themselves,
``strategies._memory.check_directions``). ``wrong_on`` lists, per strategy, the
model kinds on which the audit found it wrong or failing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.analysis import audit_tables, rule, tidy

__all__ = ["DEFAULT_OUT", "build", "main"]

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "strategies" / "auto_table.json"


def build(df: pd.DataFrame, audits: list[dict], sources: Sequence[str], command: str) -> dict:
    """The table as a JSON-ready dict (see the module docstring)."""
    table: list[dict[str, Any]] = []
    for regime, rows in rule.regimes(df):
        summary = rule.ranking(rows)
        if summary.empty:
            continue
        ratio = rule.peak_ratios(rule.plain(rows))
        table.append(
            {
                **regime,
                "ranking": list(summary.index),
                "time_s": {k: float(v) for k, v in summary["time_s"].items()},
                "cost_vs_grad": {
                    k: float(v) for k, v in summary["cost_vs_grad"].items() if pd.notna(v)
                },
                # every strategy whose peak was measured here, candidate or not: a
                # strategy too slow on one case of the range still predicts its memory
                # from here rather than from a range of far smaller nets; unmeasured
                # peaks (memory pass skipped, peers) are left out
                # per kinds signature of the range's nets, the ranking and costs over its
                # cases alone (rule.kinds_rankings): what the planner ranks a net of that
                # signature by
                "kinds": {
                    signature: {
                        "ranking": list(order.index),
                        "cost_vs_grad": {
                            k: float(v) for k, v in order["cost_vs_grad"].items() if pd.notna(v)
                        },
                    }
                    for signature, order in rule.kinds_rankings(rows).items()
                },
                "peak_ratio": {
                    k: round(float(v), 4)
                    for k, v in ratio.items()
                    if pd.notna(v) and k not in rule.DISPATCHERS
                },
            }
        )
    return {
        "command": command,
        "sources": list(sources),
        "regimes": table,
        "wrong_on": audit_tables.merged_wrong_kinds(audits),
    }


def main(argv: list[str] | None = None) -> int:
    """Write the table; returns 0, or 2 where an input file is not of a known kind."""
    parser = argparse.ArgumentParser(prog="python -m bench.auto_table", description=__doc__)
    parser.add_argument("files", nargs="+", help="benchmark and audit JSON files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    try:
        df, audits = tidy.load(args.files)
    except tidy.InputFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "bench.auto_table", *argv])
    table = build(df, audits, args.files, command)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}: {len(table['regimes'])} regimes, {len(table['wrong_on'])} audited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
