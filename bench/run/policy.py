"""The per-cell policy: skip rules, isolated pass, first call, memory, rounds, failures, the row.

A cell is one strategy on one case. ``bench/test_hessian.py`` applies these rules in order;
docs/DESIGN.md, "The benchmark's per-cell policy", says why each is what it is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench import measure
from bench.problems.grid import Case
from bench.problems.models import chosen_params
from bench.reference import ProbeReference
from bench.run.cell import CaseData
from bench.run.session import History, Run
from bench.run.worker import Crashed, Request, Worker
from bench.vocabulary import (
    CRASHED,
    ERROR,
    MIN_ROUNDS,
    OK,
    OOM,
    OVER_BUDGET,
    OVER_MEMORY,
    REFUSALS,
    SKIPPED,
    TOO_SLOW,
    UNSUPPORTED,
    WRONG,
)
from strategies import Strategy

__all__ = [
    "MIN_CELL_SECONDS",
    "MAX_CELL_SECONDS",
    "MAX_ROUNDS",
    "Rounds",
    "Outcome",
    "MemoryPass",
    "Accuracy",
    "skip",
    "over_limits",
    "record",
    "memory_note",
    "Isolated",
    "isolated_pass",
    "plans",
    "first_call",
    "memory_pass",
    "rounds",
    "CONFIRM_TOO_SLOW",
    "CONFIRM_CALLS",
    "LOOP_EVENTS_PER_ROW",
    "timing",
    "failure",
    "reference_kind",
    "accuracy",
    "timed_row",
]

#: the timed rounds of one cell take at least this long (more rounds for fast calls)...
MIN_CELL_SECONDS = 0.5
#: ...and a cell whose ``MIN_ROUNDS`` rounds would take longer than this is too slow to
#: repeat: one round, flagged ``too_slow``, left out of every ranking. With these two the
#: default grid takes about 24 minutes on the 2-core reference machine (docs/DESIGN.md)
MAX_CELL_SECONDS = 7.5
MAX_ROUNDS = 50
#: a cell found too slow to repeat from the worker's estimate (its memory pass carries the
#: profiler's overhead) makes one call here to confirm it where the estimate is within this
#: factor of the limit: ``kron`` estimated over 1.5 s took 1.24 s at P = 13,633
CONFIRM_TOO_SLOW = 2.0
#: ...by at most this many calls, until one is under the limit: the first pays the
#: strategy's first-call costs on the case in this process (``kron`` on the structured
#: grid's transformer at P = 4,660: 2.4 s in a fresh process, then 0.86 s a call; with one
#: confirming call it ran one round, 0.93 s, and left the rankings)
CONFIRM_CALLS = 2


@dataclass(frozen=True)
class Outcome:
    """A cell that was not timed: its status and why."""

    status: str
    reason: str

    @property
    def message(self) -> str:
        """What pytest shows for the cell."""
        return f"{self.status}: {self.reason}"


@dataclass(frozen=True)
class MemoryPass:
    """The result of the memory pass, or why it did not run."""

    peak_bytes: int | None
    #: why ``peak_bytes`` is None (null where it was measured)
    note: str | None
    #: the best estimate of one warm call so far, for choosing the rounds
    warm_s: float


@dataclass(frozen=True)
class Accuracy:
    """The Hessian against the case's float64 reference."""

    max_abs_err: float
    max_rel_err: float
    tolerance: float

    @property
    def accurate(self) -> bool:
        return self.max_rel_err <= self.tolerance

    def complaint(self, strategy: str, case: str) -> str:
        """The failure message of an inaccurate cell."""
        return (
            f"{strategy} on {case}: max_rel_err {self.max_rel_err:.3g} > tolerance "
            f"{self.tolerance:g} (max_abs_err {self.max_abs_err:.3g}) against the float64 reference"
        )


def over_limits(history: History, case: Case, budget_s: float, fraction: float) -> Outcome | None:
    """Skip a cell predicted, from the smaller cases of its family, to take too long or too much.

    Time and peak memory are extrapolated log-log in P (``measure.predict_seconds`` and
    ``predict_bytes``). Over ``budget_s`` per call is "over_budget"; a peak over ``fraction``
    of the available memory is "over_memory": the host kills the whole run where a
    prediction falls short, losing every cell, hence a share well under 1 by default.
    """
    seconds = measure.predict_seconds(history.seconds, case.P)
    if seconds is not None and seconds > budget_s:
        reason = f"predicted {seconds:.1f} s per call (log-log in P from smaller cases)"
        return Outcome(OVER_BUDGET, f"{reason} > --time-budget {budget_s:g} s")
    peak = measure.predict_bytes(history.peak_bytes, case.P)
    available = measure.available_bytes(case.device)
    if peak is not None and peak > fraction * available:
        reason = f"predicted peak {peak / 2**30:.2f} GiB > {fraction:g} x available"
        return Outcome(OVER_MEMORY, f"{reason} {available / 2**30:.2f} GiB (--memory-fraction)")
    return None


def skip(run: Run, case: Case, strategy: Strategy) -> Outcome | None:
    """The first skip rule that applies to the cell, else None: it is to be run.

    In order: the case's device is absent here; the strategy's ``supports()`` refuses the
    net or loss; its predicted time exceeds ``--time-budget``; its predicted peak memory
    exceeds ``--memory-fraction`` of the available memory.
    """
    if case.device == "cuda" and not torch.cuda.is_available():
        return Outcome(SKIPPED, "CUDA is not available on this machine")
    data = run.case_data(case)
    supported, reason = strategy.supports(data.net, data.loss_fn)
    if not supported:
        return Outcome(UNSUPPORTED, reason)
    history = run.history(planned(strategy, data) or strategy.name, case)
    if not history.seconds:  # the strategy it would run has no smaller case of the family
        history = run.history(strategy.name, case)
    return over_limits(history, case, run.time_budget, run.memory_fraction)


def planned(strategy: Strategy, data: CaseData) -> str | None:
    """The strategy a planner (``plans``) would run on the case, by its ``choose``; None for
    any other strategy, or where the planner cannot say.

    A planner runs different strategies on a family's cases, so its own history predicts the
    next case badly: ``auto`` ran ``block_symmetric`` on the convnet at P = 7,720 (0.84 GiB),
    and its history skipped it as over memory at 21,060 (6.1 GiB predicted), where it runs
    ``kron`` (2.2 GiB measured). The history of the strategy it would run predicts it
    instead; its check, a few float64 Hessian-vector products, is not in that history: a
    tenth to a third more time, little memory.
    """
    choose = getattr(strategy.module, "choose", None)
    if not plans(strategy) or not callable(choose):
        return None
    try:
        return choose(data.net, chosen_params(data.case, data.net), data.batch, data.loss_fn)
    except Exception:  # the cell's own call says why
        return None


def _cell_fields(case: Case, strategy: str, status: str) -> dict[str, Any]:
    """The fields every row has, timed or not."""
    return {
        **case.fields(),
        "strategy": strategy,
        "status": status,
        "P": case.P,
        "hessian_bytes": case.hessian_bytes,
    }


def record(run: Run, case: Case, strategy: str, outcome: Outcome) -> None:
    """Record a cell that was not timed, for the JSON's ``hessbench.outcomes``."""
    run.outcomes.append({**_cell_fields(case, strategy, outcome.status), "reason": outcome.reason})


#: a reverse-mode loop records at most this many times one gradient's profiler events per
#: Hessian row (``full_autograd`` 3.1x, ``symmetric_half`` 1.1x on the default grid's
#: transformer, P = 1,444: 3.2 million events and 6.3 GB for the first)
LOOP_EVENTS_PER_ROW = 4


def memory_note(
    strategy: Strategy, case: Case, history: History, grad_events: int | None = None
) -> str | None:
    """Why the cell's memory pass does not run (None: it runs).

    Not for a peer: another framework's allocations never pass through torch's allocator or
    profiler. Not on CPU where the profiler's records are predicted to outgrow host memory
    (a call with millions of small ops): their number is extrapolated log-log in P, like
    time; on the first case of its family a reverse-mode loop has nothing to extrapolate
    from, and its rows are bounded by ``LOOP_EVENTS_PER_ROW`` x P x ``grad_events`` (one
    gradient's events, ``measure.grad_events``).
    """
    if strategy.peer:
        return "not measured: the peer allocates outside torch's allocator"
    events_expected = measure.extrapolate(history.events, case.P)
    if events_expected is None and strategy.family == "loops" and grad_events:
        events_expected = LOOP_EVENTS_PER_ROW * case.P * grad_events
    if case.device == "cuda" or (events_expected or 0) <= measure.MAX_PROFILED_EVENTS:
        return None
    return (
        f"memory pass skipped: about {events_expected:.3g} profiler events predicted "
        f"> {measure.MAX_PROFILED_EVENTS:.3g}"
    )


@dataclass(frozen=True)
class Isolated:
    """What the cell's isolated pass in the worker measured, and what is left to do here."""

    peak_bytes: int | None
    #: why ``peak_bytes`` is None (null where it was measured)
    note: str | None
    #: seconds of a worker call that estimates a warm call (none where it compiled)
    warm_s: float | None
    #: whether the cell still makes its own first call in this process
    first_call_here: bool


def plans(strategy: Strategy) -> bool:
    """Whether the strategy plans on its first call of a problem structure and remembers what
    it found, in this process (``auto``: its module's ``forget_wisdom`` empties that memory)."""
    return callable(getattr(strategy.module, "forget_wisdom", None))


def isolated_pass(
    worker: Worker,
    strategy: Strategy,
    case: Case,
    history: History,
    grad_events: int | None = None,
) -> Isolated:
    """Run the cell first in the worker, so that a crash there ends only this cell.

    The worker runs the memory pass where there is one (a first call's peak equals a warm
    call's, so none is added), else a first call. A strategy that compiles (or a peer, which
    compiles too) makes its first call in the worker before the memory pass, and again here,
    where its compile time is measured. A strategy that plans (``plans``) makes its first
    call here too, its wisdom emptied first (``first_call``), so that the first call of each
    case plans and later rounds go straight to the plan. A plain strategy makes no first call here: the
    worker's memory pass or first call stands in for it (and sets the number of rounds; a
    call under a second gets a warm-up round here), which saves one call per cell.
    Appends the memory pass's profiler events to ``history.events``.

    Raises:
        worker.Crashed: the worker died or hung (``failure`` records it as crashed).
        Exception: what the strategy raised in the worker.
    """
    note = memory_note(strategy, case, history, grad_events)
    compiles = strategy.compiles or strategy.peer
    if case.device == "cuda":
        torch.cuda.empty_cache()  # this process's cached blocks would starve the worker
    request = Request.of(
        case, strategy, first_call=compiles or note is not None, memory=note is None
    )
    reply = worker.run(request)
    if reply.events is not None:
        history.events.append((case.P, reply.events))
    warm_s = reply.memory_s if note is None else None if compiles else reply.first_call_s
    return Isolated(reply.peak_bytes, note, warm_s, first_call_here=compiles or plans(strategy))


def first_call(call: Callable[[], torch.Tensor], strategy: Strategy | None = None) -> float:
    """Seconds of the cell's first call here (compiles, plans, warms caches); its result is
    discarded. A strategy that plans forgets its wisdom first, so that this call plans."""
    if strategy is not None and plans(strategy):
        strategy.module.forget_wisdom()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def memory_pass(isolated: Isolated, first_call_s: float | None) -> MemoryPass:
    """The cell's memory pass (from the worker) with the best estimate of one warm call.

    Both the first call and the memory pass overestimate a warm call (first-call costs;
    profiler overhead): the smaller is taken.
    """
    estimates = [s for s in (first_call_s, isolated.warm_s) if s is not None]
    return MemoryPass(isolated.peak_bytes, isolated.note, min(estimates))


@dataclass(frozen=True)
class Rounds:
    """How a cell is timed: ``count`` rounds after ``warmup`` warm-up rounds."""

    count: int
    warmup: int
    #: ``MIN_ROUNDS`` rounds would exceed ``MAX_CELL_SECONDS``: one round, out of the rankings
    too_slow: bool


def rounds(warm_s: float) -> Rounds:
    """The rounds of a cell whose call takes about ``warm_s`` seconds.

    At least ``MIN_ROUNDS``, as many more as fill ``MIN_CELL_SECONDS``, at most
    ``MAX_ROUNDS``; a cell whose ``MIN_ROUNDS`` rounds would take longer than
    ``MAX_CELL_SECONDS`` is too slow to repeat and gets one round. The first call
    (separately timed, its result discarded) already warms up; calls under a second get one
    more warm-up round inside pedantic as well.

    Raises:
        ValueError: ``warm_s`` is negative or not finite.
    """
    if not 0 <= warm_s < float("inf"):
        raise ValueError(f"warm_s must be a finite number of seconds >= 0, got {warm_s!r}")
    warmup = 1 if warm_s < 1.0 else 0
    if MIN_ROUNDS * warm_s > MAX_CELL_SECONDS:
        return Rounds(1, warmup, too_slow=True)
    count = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(MIN_CELL_SECONDS / max(warm_s, 1e-9))))
    return Rounds(count, warmup, too_slow=False)


def timing(
    isolated: Isolated,
    first_call_s: float | None,
    call: Callable[[], torch.Tensor],
    strategy: Strategy | None = None,
) -> tuple[MemoryPass, Rounds]:
    """The cell's memory pass and rounds (``memory_pass``, ``rounds``), too slow to repeat only
    where calls here say so too.

    Where no first call was made here and the worker's estimate makes the cell too slow to
    repeat, but by less than ``CONFIRM_TOO_SLOW`` times the limit, calls here (discarded,
    like a first call; up to ``CONFIRM_CALLS``, until one is under the limit) give the
    estimate further readings, and the smallest decides.
    """
    memory = memory_pass(isolated, first_call_s)
    chosen = rounds(memory.warm_s)
    near = not rounds(memory.warm_s / CONFIRM_TOO_SLOW).too_slow  # within the factor
    if chosen.too_slow and first_call_s is None and near:
        here = math.inf
        for _ in range(CONFIRM_CALLS):
            here = min(here, first_call(call, strategy))
            memory = memory_pass(isolated, here)
            chosen = rounds(memory.warm_s)
            if not chosen.too_slow:
                break
    return memory, chosen


def failure(exc: BaseException) -> Outcome:
    """What a cell whose measurement raised is recorded as: skipped, crashed, oom,
    unsupported or error.

    An interrupt (Ctrl-C) is "skipped"; the worker dying or hanging in the isolated pass is
    "crashed" (its reason says how, with the worker's last stderr lines); running out of
    memory is "oom" (the run goes on); a refusal (``vocabulary.REFUSALS``: the strategy's
    ValueError or TypeError naming what it cannot handle, found only by running the net, as a
    PINN's ``autograd.grad`` in the forward) is "unsupported", as the audit counts it; any
    other exception is "error".
    """
    if isinstance(exc, KeyboardInterrupt):
        return Outcome(SKIPPED, "interrupted (KeyboardInterrupt)")
    if isinstance(exc, Crashed):
        return Outcome(CRASHED, str(exc))
    if measure.is_oom(exc):
        return Outcome(OOM, f"{type(exc).__name__}: {exc}")
    if any(kind.__name__ in REFUSALS for kind in type(exc).__mro__):
        return Outcome(UNSUPPORTED, f"refused at run time: {type(exc).__name__}: {exc}")
    return Outcome(ERROR, f"{type(exc).__name__}: {exc}")


def reference_kind(reference: torch.Tensor | ProbeReference) -> str:
    """What a cell's errors were measured against, in words (the JSON's ``reference``)."""
    if isinstance(reference, ProbeReference):
        return reference.kind
    return "dense float64 Hessian"


def accuracy(H: torch.Tensor, reference: torch.Tensor | ProbeReference, dtype: str) -> Accuracy:
    """The errors of ``H`` against the float64 reference, with the tolerance of ``dtype``."""
    max_abs, max_rel = measure.errors(H, reference)
    return Accuracy(max_abs, max_rel, measure.TOLERANCES[getattr(torch, dtype)])


def timed_row(
    case: Case,
    strategy: Strategy,
    data: CaseData,
    checked: Accuracy,
    memory: MemoryPass,
    first_call_s: float | None,
    seconds: float,
    too_slow: bool = False,
) -> dict[str, Any]:
    """The ``extra_info`` of a timed cell (docs/DESIGN.md, "Benchmark JSON")."""
    return {
        **_cell_fields(case, strategy.name, OK if checked.accurate else WRONG),
        "peak_bytes": memory.peak_bytes,
        "peak_note": memory.note,
        "max_abs_err": checked.max_abs_err,
        "max_rel_err": checked.max_rel_err,
        "accurate": checked.accurate,
        "tolerance": checked.tolerance,
        "reference": reference_kind(data.reference),
        "grad_s": data.grad_s,
        "gemm_s": data.gemm_s,
        "cost_vs_grad": seconds / (case.P * data.grad_s),
        "vs_gemm": seconds / data.gemm_s,
        "first_call_s": first_call_s if strategy.compiles or plans(strategy) else None,
        "peer": strategy.peer,
        "threads": torch.get_num_threads(),
        TOO_SLOW: too_slow,
    }
