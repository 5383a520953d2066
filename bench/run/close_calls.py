"""Close calls settled at the end of a run: the top contenders of a case timed interleaved.

Each cell is timed on its own, minutes apart from the others; on a shared machine the load
drifts in between, and two strategies within 1.1x of each other can swap places from one
run to the next. After the grid's cells, for each case whose two fastest contenders are
tied by ``bench.analysis.rule.versus``, the top :data:`TOP` are timed again in turn, round
after round (``bench.interleave.interleaved_rounds``), each result first checked against the
case's float64 reference as the benchmark checks a cell. ``bench.analysis.rule.compared_rounds``
then compares two cells by these rounds where both have them (docs/DESIGN.md, "Close calls").

``bench.analysis.rule`` is imported inside the functions that use it (:func:`contenders`,
:func:`verdict`), the run's one deferred import of the analysis: it imports pandas, which nothing else
the plugin loads at start-up needs. Measured with ``python -X importtime``, pandas would add
0.15-0.3 s to the plugin's 1.6-2.4 s (torch the rest), for every ``pytest bench``,
``--help`` and ``--collect-only`` included; a run that settles close calls or prints its
summary pays it at its end.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

import strategies
from bench.interleave import interleaved_rounds
from bench.problems.grid import Case
from bench.run import policy
from bench.run.cell import hessian_call
from bench.run.session import Run, Timed

__all__ = ["TOP", "CASE_SECONDS", "TOTAL_SECONDS", "contenders", "verdict", "close", "settle"]

#: how many of a close case's contenders are timed interleaved
TOP = 3
#: the caps: a case's interleaved rounds are estimated from its cells' medians and skipped
#: above CASE_SECONDS, and no case starts once the run's interleaving has taken
#: TOTAL_SECONDS. The close calls are the small and middle cases (the top three of a large
#: case are too slow to repeat, or clearly apart): on the default grid about 11 s in all
#: (5 of 15 cases), and the caps keep a grid of many close cases from adding more than a
#: minute to a run of about 25.
CASE_SECONDS = 10.0
TOTAL_SECONDS = 60.0


def contenders(run: Run, case_id: str) -> tuple[dict[str, Timed], list[str]]:
    """The case's accurate cells (no peer, no dispatcher), and those repeated (not too slow
    to repeat), least median first: the report's rule (``rule.ranked``)."""
    from bench.analysis import rule

    accurate = {
        s: t
        for (c, s), t in run.timed.items()
        if c == case_id and t.accurate and not t.peer and s not in rule.DISPATCHERS
    }
    ranked = [s for s, t in accurate.items() if not t.too_slow]
    return accurate, sorted(ranked, key=lambda s: accurate[s].median)


def verdict(run: Run, case_id: str, a: str, b: str) -> int:
    """``rule.versus`` of two of the case's timed cells, ``a`` against ``b`` (1: ``a`` is
    faster, -1: slower, 0: tied), over the rounds ``rule.compared_rounds`` chooses for them:
    their interleaved rounds where the case's close call was settled, else each one's own
    (its min alone where it kept none). The close calls and the end-of-run summary
    (``bench.run.finish``) compare by it."""
    from bench.analysis import rule

    interleaved = run.interleaved.get(case_id, {}).get("rounds_s", {})
    cells = [
        {"rounds_s": t.rounds, "min": t.seconds, "interleaved_s": interleaved.get(s)}
        for s, t in ((s, run.timed[(case_id, s)]) for s in (a, b))
    ]
    return rule.versus(*rule.compared_rounds(*cells))


def close(run: Run, case_id: str) -> list[str]:
    """The case's top :data:`TOP` contenders where its two fastest are tied by
    :func:`verdict` (within 1.1x, or not significantly apart), else none."""
    _, order = contenders(run, case_id)
    if len(order) < 2:
        return []
    if verdict(run, case_id, order[0], order[1]):
        return []
    return order[:TOP]


def _estimate(run: Run, case_id: str, names: list[str]) -> tuple[int, float]:
    """The rounds of each strategy (``policy.rounds`` of the slowest: at least
    ``MIN_ROUNDS``) and the seconds they would take, one checked call each included."""
    medians = [run.timed[(case_id, s)].median for s in names]
    count = policy.rounds(max(medians)).count
    return count, (count + 1) * sum(medians)


def settle(
    run: Run,
    clock: Callable[[], float] = time.perf_counter,
    case_seconds: float | None = None,
    total_seconds: float | None = None,
) -> Iterator[str]:
    """Time the close cases' contenders interleaved; ``run.interleaved[case]`` gets, per
    case, ``{"rounds_s": {strategy: [seconds, ...]}}`` or ``{"skipped": reason}``.

    A generator: it yields each case id once its entry is written, so that the caller keeps
    ``<json>.partial`` up to date. An interrupt leaves the case's entry "skipped" and raises.
    """
    case_seconds = CASE_SECONDS if case_seconds is None else case_seconds
    total_seconds = TOTAL_SECONDS if total_seconds is None else total_seconds
    start = clock()
    for case_id, case in run.cases.items():
        names = close(run, case_id)
        if not names:
            continue
        count, estimate = _estimate(run, case_id, names)
        spent = clock() - start
        if estimate > case_seconds:
            reason = f"estimated {estimate:.3g} s, over the {case_seconds:g} s per case"
            run.interleaved[case_id] = {"strategies": names, "skipped": reason}
        elif spent + estimate > total_seconds:
            reason = (
                f"estimated {estimate:.3g} s after {spent:.3g} s, over the "
                f"{total_seconds:g} s of the whole run"
            )
            run.interleaved[case_id] = {"strategies": names, "skipped": reason}
        else:
            run.interleaved[case_id] = {"strategies": names, "skipped": "interrupted"}
            try:
                run.interleaved[case_id] = _timed(run, case, names, count)
            except Exception as exc:  # e.g. out of memory: the cells' own times stand
                reason = f"{type(exc).__name__}: {exc}"
                run.interleaved[case_id] = {"strategies": names, "skipped": reason}
        yield case_id


def _timed(run: Run, case: Case, names: list[str], count: int) -> dict:
    """The case's interleaved rounds of ``names``, each result checked first; a strategy
    whose check fails leaves the case "skipped", with the reason."""
    data = run.baselines(run.case_data(case))
    calls = {name: hessian_call(strategies.get(name), data) for name in names}
    for name, call in calls.items():
        checked = policy.accuracy(call(), data.reference, case.dtype)
        if not checked.accurate:
            return {"strategies": names, "skipped": checked.complaint(name, case.id)}
    seconds = interleaved_rounds(calls, count, torch.device(case.device))
    return {"strategies": names, "rounds_s": seconds}
