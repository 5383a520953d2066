"""The end of a benchmark run: the fastest accurate strategy per case in the terminal, and the
audit and the report on the JSON just written."""

from __future__ import annotations

import os
import traceback

import pytest

from bench.run import close_calls
from bench.run.session import Run
from bench.vocabulary import BASELINE

__all__ = ["summary_lines", "run_audit", "audit_and_report"]


def summary_lines(run: Run) -> list[str]:
    """Per case, the fastest by the report's rule: accurate, repeated (not too slow to
    repeat), no peer, no dispatcher; the least median; faster than the runner-up only by
    ``close_calls.verdict`` (``rule.versus`` over their interleaved rounds where the case's
    close call was settled: ``rule.compared_rounds``), else tied with it."""
    lines = []
    for case_id in run.cases:
        rows = {s: timed for (c, s), timed in run.timed.items() if c == case_id}
        accurate, order = close_calls.contenders(run, case_id)
        if not order:
            if accurate:
                lines.append(
                    f"{case_id}: no accurate strategy repeated ({len(accurate)} too slow to "
                    "repeat, left out of every ranking)"
                )
            elif rows:
                lines.append(f"{case_id}: no accurate strategy timed")
            continue

        best = order[0]
        seconds, peak = accurate[best].median, accurate[best].peak_bytes
        speedup = (
            f"{rows[BASELINE].median / seconds:.2f}x vs {BASELINE}"
            if BASELINE in rows
            else f"{BASELINE} not timed"
        )
        memory = "peak not measured" if peak is None else f"peak {peak / 2**20:.3g} MiB"
        verdict = ""
        if len(order) > 1:
            faster = close_calls.verdict(run, case_id, order[0], order[1])
            verdict = f", {'faster than' if faster == 1 else 'tied with'} {order[1]}"
        lines.append(f"{case_id}: {best} {seconds:.4g} s median{verdict}, {memory}, {speedup}")
    return lines


def run_audit(benchmark_json: str) -> str:
    """Run the audit beside the timings; its JSON goes next to the benchmark's, named after it."""
    from bench import audit

    root, _ = os.path.splitext(benchmark_json)
    audit_json = f"{root}-audit.json"
    if audit.main(["--json", audit_json]) != 0:
        raise RuntimeError("the audit's two references disagree: its matrix cannot be trusted")
    return audit_json


def audit_and_report(config: pytest.Config, path: str) -> int:
    """The audit (``--audit``) and the report (unless ``--no-report``) on the JSON just
    written; the report's exit status, 1 where either raised (the JSON is intact)."""
    inputs = [str(path)]
    try:
        if config.getoption("--audit"):
            inputs.append(run_audit(str(path)))
        status = 0
        if not config.getoption("--no-report"):
            from bench import report

            report_dir = config.getoption("--report-dir")
            html_path = os.path.join(report_dir, "report.html")
            status = report.main([*inputs, "--plots-dir", report_dir, "--html", html_path])
    except Exception:
        print(f"\nhessbench: the audit or report failed on {path} (the JSON is intact):")
        traceback.print_exc()
        status = 1
    return status
