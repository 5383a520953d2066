"""Words the benchmark, the audit and the analysis share: statuses, audit kind, the baseline.

A cell is one strategy on one benchmark case or one audit model. Its status is one of the
words below, whoever wrote it; files written before the two vocabularies became one are
read through :func:`canonical_status`. See docs/DESIGN.md, "Statuses".
"""

from __future__ import annotations

__all__ = [
    "OK",
    "WRONG",
    "ERROR",
    "OOM",
    "UNSUPPORTED",
    "REFUSALS",
    "SKIPPED",
    "OVER_BUDGET",
    "OVER_MEMORY",
    "CRASHED",
    "STATUSES",
    "TIMED",
    "OLD_STATUSES",
    "canonical_status",
    "AUDIT_KIND",
    "BASELINE",
    "MIN_ROUNDS",
    "TOO_SLOW",
]

#: computed, and within tolerance of the float64 reference (a benchmark cell is also timed)
OK = "ok"
#: computed, but not the Hessian: beyond tolerance, asymmetric, wrong shape or dtype,
#: non-finite entries, or the net changed by the call (a benchmark cell is still timed)
WRONG = "wrong"
#: raised an exception other than running out of memory
ERROR = "error"
#: ran out of device or host memory (benchmark)
OOM = "oom"
#: the strategy's ``supports(net, loss_fn)`` refused the net or loss; in the benchmark also a
#: refusal at run time (one of :data:`REFUSALS`, raised where only running the net shows why)
UNSUPPORTED = "unsupported"
#: not run: the device is absent here, or the run was interrupted (benchmark)
SKIPPED = "skipped"
#: predicted slower than ``--time-budget`` per call from smaller cases (benchmark)
OVER_BUDGET = "over_budget"
#: predicted peak memory above ``--memory-fraction`` of the available memory (benchmark)
OVER_MEMORY = "over_memory"
#: the process computing it died (a signal: SIGSEGV, SIGABRT, SIGKILL from the out-of-memory
#: killer) or hung past ``--cell-timeout`` (benchmark: in the worker's isolated pass)
CRASHED = "crashed"

STATUSES = (OK, WRONG, ERROR, OOM, UNSUPPORTED, SKIPPED, OVER_BUDGET, OVER_MEMORY, CRASHED)
#: exceptions by which a strategy refuses a problem it does not handle (the strategy
#: contract: bad input raises ValueError or TypeError naming the problem), not a failure
REFUSALS = frozenset({"ValueError", "TypeError"})
#: benchmark cells that were timed (pytest-benchmark statistics exist); only OK is trusted
TIMED = (OK, WRONG)

#: words of files written before the benchmark and the audit shared one vocabulary
OLD_STATUSES = {"pass": OK, "inaccurate": WRONG}


def canonical_status(status: str) -> str:
    """The status in this vocabulary: old words mapped, current ones unchanged.

    Raises:
        ValueError: ``status`` is no status, old or current.
    """
    status = OLD_STATUSES.get(status, status)
    if status not in STATUSES:
        raise ValueError(f"unknown cell status {status!r}; valid statuses: {list(STATUSES)}")
    return status


#: the ``kind`` of an audit JSON, by which readers tell it from a benchmark JSON
AUDIT_KIND = "hessbench-audit"

#: the strategy every other is compared with: ``torch.func.hessian``, what users reach for first
BASELINE = "torch_func"

#: the fewest rounds a timed cell has, unless it is too slow to repeat (docs/DESIGN.md,
#: "The benchmark's per-cell policy"): a rank test over five rounds against five can say
#: "faster" at the 1% level, over fewer it rarely can
MIN_ROUNDS = 5
#: the ``extra_info`` key of a timed cell whose ``MIN_ROUNDS`` rounds would exceed the cell's
#: time cap: it ran one round, and is left out of every ranking
TOO_SLOW = "too_slow"
