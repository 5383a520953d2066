"""What each cell runs in the worker first, and what is left to do in the pytest process."""

from __future__ import annotations

import pytest

import strategies
from bench import measure
from bench.problems.grid import Case
from bench.run import policy
from bench.run.session import History, Run
from bench.run.worker import Crashed, Reply, Request
from bench.vocabulary import CRASHED, ERROR, MIN_ROUNDS, OOM, SKIPPED, UNSUPPORTED
from strategies import Strategy

CASE = Case(3, 4, 1, 1, "tanh", "mse", 5, "float32", "cpu")


def _compute(net, params, batch, loss_fn=None):
    raise AssertionError("never called: the worker is a stand-in")


class StandIn:
    """A worker that records its requests and answers as the real one would."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def run(self, request: Request) -> Reply:
        self.requests.append(request)
        return Reply(
            first_call_s=0.5 if request.first_call else None,
            memory_s=0.3 if request.memory else None,
            peak_bytes=1234 if request.memory else None,
            events=99 if request.memory else None,
        )


@pytest.mark.parametrize(
    "flags, first_call, memory, first_call_here, warm_s",
    [
        ({}, False, True, False, 0.3),  # the memory pass stands in for a first call here
        ({"compiles": True}, True, True, True, 0.3),
        ({"peer": True}, True, False, True, None),
        ({"peer": True, "compiles": True}, True, False, True, None),
    ],
    ids=["plain", "compiles", "peer", "compiling peer"],
)
def test_every_cell_goes_through_the_worker_first(
    flags, first_call, memory, first_call_here, warm_s
):
    worker, history = StandIn(), History()
    strategy = Strategy("planted", "test only", _compute, **flags)
    isolated = policy.isolated_pass(worker, strategy, CASE, history)
    [request] = worker.requests
    assert (request.strategy, request.case, request.modules) == ("planted", CASE, (__name__,))
    assert (request.first_call, request.memory) == (first_call, memory)
    assert isolated.first_call_here is first_call_here and isolated.warm_s == warm_s
    assert (isolated.peak_bytes is None) is (not memory) and (isolated.note is None) is memory
    assert history.events == ([(CASE.P, 99)] if memory else [])


def test_a_skipped_memory_pass_makes_the_workers_first_call_stand_in():
    worker = StandIn()
    history = History(events=[(CASE.P // 4, measure.MAX_PROFILED_EVENTS)])
    isolated = policy.isolated_pass(worker, Strategy("loop", "", _compute), CASE, history)
    [request] = worker.requests
    assert request.first_call and not request.memory
    assert not isolated.first_call_here and isolated.warm_s == 0.5
    assert isolated.note.startswith("memory pass skipped") and isolated.peak_bytes is None


@pytest.mark.parametrize(
    "family, history, grad_events, skipped",
    [
        # the first case of its family: a loop's rows bounded by one gradient's events
        ("loops", [], measure.MAX_PROFILED_EVENTS // CASE.P, True),
        ("loops", [], measure.MAX_PROFILED_EVENTS // CASE.P // 8, False),
        ("loops", [], None, False),
        # a vectorised strategy's events do not grow with rows x a gradient's
        ("transforms", [], measure.MAX_PROFILED_EVENTS // CASE.P, False),
        # where the family has history, it is extrapolated, whatever a gradient records
        ("loops", [(CASE.P // 2, 10)], measure.MAX_PROFILED_EVENTS, False),
    ],
)
def test_a_loops_first_case_of_a_family_is_bounded_by_a_gradients_events(
    family, history, grad_events, skipped
):
    strategy = Strategy("planted", "test only", _compute, family=family)
    note = policy.memory_note(strategy, CASE, History(events=history), grad_events)
    assert (note is not None) is skipped
    if skipped:
        assert note.startswith("memory pass skipped")


@pytest.mark.parametrize(
    "first_call_s, warm_s, expected", [(0.2, 0.3, 0.2), (None, 0.5, 0.5), (0.7, None, 0.7)]
)
def test_rounds_come_from_the_fastest_call_without_a_compile(first_call_s, warm_s, expected):
    isolated = policy.Isolated(None, "why", warm_s, first_call_here=first_call_s is not None)
    assert policy.memory_pass(isolated, first_call_s).warm_s == expected


@pytest.mark.parametrize(
    "warm_s, first_call_s, here_s, calls, too_slow",
    [
        (2.0, None, [0.01], 1, False),  # the worker's estimate over the limit, a call here under
        (2.0, None, [2.0, 2.0], 2, True),  # confirmed by both calls here: too slow
        (2.0, None, [2.4, 0.9], 2, False),  # the first call here paid first-call costs
        (4.0, None, [0.01], 0, True),  # beyond CONFIRM_TOO_SLOW x the limit: no call
        (2.0, 1.8, [0.01], 0, True),  # a first call here already read it
        (0.1, None, [0.01], 0, False),  # not too slow: no call
    ],
)
def test_too_slow_to_repeat_is_confirmed_by_calls_here(
    monkeypatch, warm_s, first_call_s, here_s, calls, too_slow
):
    """The worker's memory pass carries the profiler's overhead, and a first call here its
    first-call costs: a cell the worker puts just over the limit makes up to
    ``CONFIRM_CALLS`` calls here, until one is under it, and the smallest reading decides."""
    made = []
    readings = iter(here_s)
    monkeypatch.setattr(
        policy, "first_call", lambda call, strategy=None: made.append(1) or next(readings)
    )
    isolated = policy.Isolated(None, "why", warm_s, first_call_here=first_call_s is not None)
    memory, rounds = policy.timing(isolated, first_call_s, lambda: None)
    assert len(made) == calls and rounds.too_slow is too_slow
    assert memory.warm_s == min(x for x in (warm_s, first_call_s, *here_s[:calls]) if x)
    if not too_slow:
        assert rounds.count >= MIN_ROUNDS


@pytest.mark.parametrize(
    "exc, status",
    [
        (Crashed("the worker was killed by SIGSEGV"), CRASHED),
        (KeyboardInterrupt(), SKIPPED),
        (MemoryError(), OOM),
        (RuntimeError("shapes do not match"), ERROR),
        # a refusal, as the audit counts it (vocabulary.REFUSALS), subclasses included
        (ValueError("the forward calls torch.autograd.grad itself"), UNSUPPORTED),
        (TypeError("params must be a dict"), UNSUPPORTED),
        (type("ContractError", (ValueError,), {})("no"), UNSUPPORTED),
    ],
)
def test_failures_are_recorded_by_kind(exc, status):
    outcome = policy.failure(exc)
    assert outcome.status == status
    if status == CRASHED:
        assert outcome.reason == "the worker was killed by SIGSEGV"


def test_a_planner_plans_on_its_first_call_here_with_its_wisdom_emptied():
    """auto's wisdom is in-process: its cell's first call here is timed, after forgetting."""
    import types

    events: list[str] = []
    module = types.ModuleType("planner")
    module.forget_wisdom = lambda: events.append("forget")
    strategy = Strategy("planted", "test only", _compute, module=module, family="dispatcher")
    assert policy.plans(strategy) and not policy.plans(strategies.get("full_autograd"))
    isolated = policy.isolated_pass(StandIn(), strategy, CASE, History())
    assert isolated.first_call_here
    assert policy.first_call(lambda: events.append("call"), strategy) >= 0
    assert events == ["forget", "call"]
    assert policy.plans(strategies.get("auto"))


def _planner(choice: str | Exception) -> Strategy:
    """A planted planner whose ``choose`` answers ``choice`` (or raises it)."""
    import types

    def choose(net, params, batch, loss_fn=None):
        if isinstance(choice, Exception):
            raise choice
        return choice

    module = types.ModuleType("planner")
    module.forget_wisdom, module.choose = (lambda: None), choose
    return Strategy("planted", "test only", _compute, module=module, family="dispatcher")


@pytest.mark.parametrize(
    "choice, skipped",
    [
        ("kron", False),  # its choice fits: run, whatever the planner's own history says
        ("vmap_vjp", True),  # its choice is predicted over memory
        ("never_ran", True),  # nothing to go on for its choice: its own history
        (ValueError("no strategy"), True),  # cannot say: its own history
    ],
)
def test_a_planner_is_predicted_by_the_history_of_the_strategy_it_would_run(choice, skipped):
    run = Run("smoke", [], ["cpu"], 60.0, 0.4, "", {}, worker=None)
    available = measure.available_bytes("cpu")
    big, small = (CASE.P // 2, int(0.3 * available)), (CASE.P // 2, 1000)
    for name, peak in [("planted", big), ("vmap_vjp", big), ("kron", small)]:
        run.history(name, CASE).seconds.append((CASE.P // 2, 0.01))
        run.history(name, CASE).peak_bytes.append(peak)
    outcome = policy.skip(run, CASE, _planner(choice))
    assert (outcome is not None and "predicted peak" in outcome.reason) is skipped
    assert policy.planned(strategies.get("kron"), run.case_data(CASE)) is None


@pytest.mark.parametrize(
    "warm_s, count, too_slow",
    [
        (0.001, policy.MAX_ROUNDS, False),  # fast calls fill MIN_CELL_SECONDS, capped
        (0.05, 10, False),
        (0.5, MIN_ROUNDS, False),
        (policy.MAX_CELL_SECONDS / MIN_ROUNDS, MIN_ROUNDS, False),  # just fits the cap
        (policy.MAX_CELL_SECONDS / MIN_ROUNDS * 1.01, 1, True),
        (30.0, 1, True),
    ],
)
def test_every_cell_gets_min_rounds_or_is_flagged_too_slow(warm_s, count, too_slow):
    timing = policy.rounds(warm_s)
    assert (timing.count, timing.too_slow) == (count, too_slow)
    assert timing.too_slow or timing.count >= MIN_ROUNDS
    assert timing.warmup == (1 if warm_s < 1.0 else 0)


@pytest.mark.parametrize("warm_s", [-1.0, float("nan"), float("inf")])
def test_rounds_refuse_a_time_that_is_no_time(warm_s):
    with pytest.raises(ValueError, match="warm_s"):
        policy.rounds(warm_s)
