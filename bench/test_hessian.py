"""The benchmark: time, peak memory and accuracy of every strategy on every case of the grid."""

from __future__ import annotations

import pytest

import strategies
from bench.run import policy
from bench.run.cell import hessian_call
from bench.run.session import Run, Timed
from bench.vocabulary import OOM, UNSUPPORTED

__all__ = ["test_hessian"]


def test_hessian(benchmark, hessbench: Run, case: str, strategy: str) -> None:
    """One cell, by ``bench.run.policy``: skip, or isolated pass, first call, timed rounds, check."""
    grid_case, chosen = hessbench.cases[case], strategies.get(strategy)
    skipped = policy.skip(hessbench, grid_case, chosen)
    if skipped is not None:
        policy.record(hessbench, grid_case, strategy, skipped)
        pytest.skip(skipped.message)

    hessbench.worker.start()  # it imports while the case's baselines are computed here
    data = hessbench.baselines(hessbench.case_data(grid_case))
    call = hessian_call(chosen, data)
    benchmark.group = case
    history = hessbench.history(strategy, grid_case)
    written = False
    try:
        try:
            isolated = policy.isolated_pass(
                hessbench.worker, chosen, grid_case, history, data.grad_events
            )
            first_call_s = policy.first_call(call, chosen) if isolated.first_call_here else None
            memory, timing = policy.timing(isolated, first_call_s, call, chosen)
            H = benchmark.pedantic(
                call, rounds=timing.count, warmup_rounds=timing.warmup, iterations=1
            )
        except (KeyboardInterrupt, Exception) as exc:
            failed = policy.failure(exc)
            policy.record(hessbench, grid_case, strategy, failed)
            if failed.status in (OOM, UNSUPPORTED):  # recorded; not a failure of the run
                pytest.skip(failed.message)
            raise

        checked = policy.accuracy(H, data.reference, grid_case.dtype)
        del H  # P^2 entries: gone before the next cell allocates its own
        seconds = benchmark.stats.stats.min
        benchmark.extra_info.update(
            policy.timed_row(
                grid_case, chosen, data, checked, memory, first_call_s, seconds, timing.too_slow
            )
        )
        written = True
    finally:
        if not written:
            # pytest-benchmark leaves out a fixture stopped by an Exception, but keeps one
            # stopped by Ctrl-C (a deadline's SIGINT), with no row of ours and, in its first
            # round, no time (its JSON then fails): the cell is its outcome alone
            benchmark.has_error = True
    rounds = tuple(benchmark.stats.stats.data)
    timed = Timed(
        seconds, memory.peak_bytes, checked.accurate, chosen.peer, rounds, timing.too_slow
    )
    hessbench.keep_timed(grid_case, strategy, timed)
    assert checked.accurate, checked.complaint(strategy, case)
