"""``auto``: a planner that finds the fastest exact strategy for the net in hand, and remembers it.

As FFTW plans a transform:

- **Estimate** (the default, ``plan(...)``): every registered strategy that supports the net
  and loss, was not found wrong on its kind of model by the audit, and whose predicted peak
  fits the memory budget, ranked by its predicted time on this net (``strategies._plan``:
  the committed measurements scaled by this net's structure and its own gradient time).
  The same measurements make the report's recommendation, by the same rule.
- **Measure** (``plan(..., measure=True)``): the plausible candidates (predicted within
  ``MEASURE_FACTOR`` of the best, at most ``MAX_PILOTS``) each run a pilot on the real
  problem, interleaved: a slice of their work (a few rows of each pass, timed and
  extrapolated: ``strategies._pilot``) where they work row by row, else the whole Hessian.
  Every candidate whose pilot is within ``CLOSE_CALL`` of the fastest pilot's computes the
  whole Hessian; the fastest whole run wins, verified first (the next where it fails).
  ``Plan.rows()`` is the table of predicted, piloted and measured time, peak, exactness and
  how each pilot was timed: a benchmark of the user's own net in one call.
- **Wisdom**: the strategy that computed a verified Hessian is remembered under the
  problem's structure (``_plan.structure_key``: module types and settings, forward code,
  parameter names and shapes, batch shapes, dtype, device, loss), so later calls of the same
  structure (a Newton or Laplace loop) go straight to it; a measured winner replaces an
  estimated one. ``save_wisdom`` and ``load_wisdom`` carry it across processes. Wisdom only
  orders the candidates: every Hessian is still verified, so stale wisdom can cost time,
  never exactness.

``compute`` runs the candidates in order: any failure of one (a refusal, a MemoryError,
torch's RuntimeError for what it cannot differentiate a given way) passes the problem to the
next, the reverse-mode loops last; every Hessian is checked by ``verify`` before it is
returned, and one that fails is passed over with a warning. Strategies that compile are not
candidates: their first call costs seconds of compilation, which one call cannot amortise.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import _pilot, _plan
from ._contract import (
    NESTED_AUTOGRAD,
    check_inputs_once,
    once_per_scope,
    prepare,
    sharing_problems,
)
from ._kinds import kinds_of, kinds_on_path, kinds_signature
from ._memory import available_bytes, check_positive
from ._problem import LossFn, Problem
from ._verify import verify

__all__ = [
    "NAME",
    "FAMILY",
    "DESCRIPTION",
    "LAST_RESORT",
    "MEASURE_FACTOR",
    "MAX_PILOTS",
    "CLOSE_CALL",
    "Candidate",
    "Plan",
    "plan",
    "candidates",
    "choose",
    "compute",
    "save_wisdom",
    "load_wisdom",
    "forget_wisdom",
    "wisdom",
]

NAME = "auto"
FAMILY = "dispatcher"
MULTI_INPUT = True
DESCRIPTION = (
    "a planner: the strategy predicted fastest for this net's structure (or measured, on "
    "request), remembered per structure, verified"
)

#: exact on any net torch can differentiate twice in reverse mode: tried last, always
LAST_RESORT = ("symmetric_half", "full_autograd")
#: measure mode times the candidates predicted within this factor of the fastest
MEASURE_FACTOR = 4.0
#: and at most this many of them
MAX_PILOTS = 4
#: measure mode: a candidate whose pilot is within this factor of the fastest pilot's also
#: computes the whole Hessian, and the whole times decide
CLOSE_CALL = 1.3
#: measure mode repeats candidates faster than this (seconds) and keeps their least time
_REPEAT_BELOW_S = 0.25
_REPEATS = 3

#: structure key -> {"strategy": name, "how": "estimate" | "measure"}
_WISDOM: dict[str, dict[str, str]] = {}
_WISDOM_VERSION = 1


def wisdom() -> dict[str, dict[str, str]]:
    """A copy of what the planner has learned in this process (see ``save_wisdom``)."""
    return {k: dict(v) for k, v in _WISDOM.items()}


def forget_wisdom() -> None:
    """Forget everything learned (the next call of each structure plans again)."""
    _WISDOM.clear()


def save_wisdom(path: str | Path) -> int:
    """Write the planner's wisdom to ``path`` (JSON); returns the number of entries."""
    payload = {"hessbench_wisdom": _WISDOM_VERSION, "torch": torch.__version__, "entries": _WISDOM}
    Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return len(_WISDOM)


def load_wisdom(path: str | Path) -> int:
    """Add the wisdom saved in ``path`` to this process's; returns the number of entries read.

    Raises:
        ValueError: the file is not wisdom written by ``save_wisdom``.
    """
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read wisdom from {path}: {error}") from error
    entries = payload.get("entries") if isinstance(payload, dict) else None
    if (
        payload.get("hessbench_wisdom") != _WISDOM_VERSION
        or not isinstance(entries, dict)
        or any(
            not isinstance(v, dict) or not isinstance(v.get("strategy"), str)
            for v in entries.values()
        )
    ):
        raise ValueError(f"{path} is not hessbench wisdom (written by auto.save_wisdom)")
    _WISDOM.update(
        {
            k: {"strategy": v["strategy"], "how": str(v.get("how", "estimate"))}
            for k, v in entries.items()
        }
    )
    return len(entries)


def _learn(key: str, name: str, how: str) -> None:
    known = _WISDOM.get(key)
    if known is None or how == "measure" or known["how"] != "measure":
        _WISDOM[key] = {"strategy": name, "how": how}


@dataclass
class Candidate:
    """One strategy the planner would try, with what it predicts and, in measure mode, found."""

    name: str
    predicted_s: float
    predicted_peak_bytes: int
    basis: str
    #: measure mode: the whole Hessian's time, extrapolated from the pilot's slices (or its
    #: whole time, where the pilot computes the whole Hessian)
    pilot_s: float | None = None
    #: measure mode: how the pilot timed it, per pass: rows, rows timed, seconds (the setup
    #: first; one pass "whole" where it computed the whole Hessian)
    pilot: list[dict[str, Any]] | None = None
    #: measure mode: the time of a whole Hessian it computed (its pilot's where that is the
    #: whole Hessian; a close call's, within ``CLOSE_CALL`` of the fastest pilot; the winner's)
    measured_s: float | None = None
    exact: bool | None = None
    note: str = ""
    #: measured on every case of the nearest size range (``_plan.Estimate.in_range``)
    in_range: bool = False


@dataclass
class Plan:
    """What ``auto`` would run for one problem, in order, and why.

    Attributes:
        key: the problem's structure key (``_plan.structure_key``).
        candidates: the strategies ``compute`` tries, in order (the last resort included).
        passed_over: each other strategy, with why.
        how: "wisdom" (a strategy remembered for this structure leads), "estimate" or
            "measure".
    """

    key: str
    candidates: list[Candidate]
    passed_over: list[str]
    how: str
    _hessian: Tensor | None = field(default=None, repr=False)

    @property
    def choice(self) -> str:
        """The strategy tried first."""
        if not self.candidates:
            raise ValueError(
                "no strategy is exact for this net within the budget: "
                + "; ".join(self.passed_over)
            )
        return self.candidates[0].name

    def rows(self) -> list[dict[str, Any]]:
        """The candidates as records: name, predicted and measured seconds, predicted peak,
        exactness and the basis of the prediction."""
        return [
            {
                "strategy": c.name,
                "predicted_s": c.predicted_s,
                "predicted_peak_bytes": c.predicted_peak_bytes,
                "pilot_s": c.pilot_s,
                "measured_s": c.measured_s,
                "exact": c.exact,
                "pilot": c.pilot,
                "basis": c.basis,
                "note": c.note,
            }
            for c in self.candidates
        ]

    def __str__(self) -> str:
        lines = [f"auto runs {self.choice!r} ({self.how}); candidates in order:"]
        for c in self.candidates:
            measured = "" if c.pilot_s is None else f", pilot {c.pilot_s:.3g} s"
            measured += "" if c.measured_s is None else f", measured {c.measured_s:.3g} s"
            exact = "" if c.exact is None else (", exact" if c.exact else ", NOT exact")
            note = f" [{c.note}]" if c.note else ""
            lines.append(
                f"  {c.name}: predicted {c.predicted_s:.3g} s, peak "
                f"{c.predicted_peak_bytes / 2**20:,.1f} MiB{measured}{exact} "
                f"({c.basis}){note}"
            )
        lines += [f"  passed over: {reason}" for reason in self.passed_over]
        return "\n".join(lines)


def _estimates(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Any],
    loss_fn: LossFn | None,
    budget: int,
) -> tuple[list[Candidate], list[str]]:
    """Every eligible strategy with its estimate, fastest first; and the others with why."""
    import strategies  # the registry imports this module

    from .kron import NAME as KRON

    problem = prepare(net, params, batch, loss_fn, nested_autograd=True)
    probes = _plan.probe(problem)
    table = _plan.load_table()
    kinds = kinds_of(net)  # every module's, for the audit's findings
    signature = kinds_signature(kinds_on_path(problem))  # the costs: the derivatives' path
    ranked, passed_over = [], []

    def admit(c: Candidate | str) -> None:
        if isinstance(c, str):  # why it is passed over
            passed_over.append(c)
        elif c.predicted_peak_bytes > budget:
            passed_over.append(
                f"{c.name}: predicted peak {c.predicted_peak_bytes:.3g} B over budget "
                f"{budget:.3g} B"
            )
        else:
            ranked.append(c)

    kron = None
    for name in strategies.names():
        strategy = strategies.get(name)
        if name == NAME or strategy.peer or strategy.compiles:
            continue
        if not strategy.multi_input and not isinstance(batch[0], Tensor):
            passed_over.append(f"{name}: takes the inputs as one tensor")
            continue
        wrong_on = kinds & set(table["wrong_on"].get(name, ()))
        if wrong_on:
            passed_over.append(f"{name}: found wrong on {', '.join(sorted(wrong_on))}")
            continue
        ok, reason = strategy.supports(net, loss_fn)
        if not ok:
            passed_over.append(f"{name}: {reason}")
            continue
        if name == KRON:
            kron = strategy  # estimated last: its workload only where it can come first
            continue
        admit(_candidate(_plan.estimate(problem, name, strategy.family, probes, None, signature)))
    last = {name: i for i, name in enumerate(LAST_RESORT)}

    def place(c: Candidate) -> tuple[int, float]:
        # runnable by prediction, fastest first: those measured exact on every case of this
        # size range (the report's candidates), then those measured only elsewhere; then the
        # last resort, which runs wherever torch can differentiate twice; then those the
        # probes say cannot run here
        if c.name in last:
            return (2, last[c.name])
        if not math.isfinite(c.predicted_s):
            return (3, 0.0)
        return (0 if c.in_range else 1, c.predicted_s)

    if kron is not None:
        admit(_kron_candidate(problem, kron, probes, signature, ranked, place))
    ranked.sort(key=place)
    return ranked, passed_over


def _kron_candidate(
    problem: Problem,
    kron: Any,
    probes: _plan.Probes,
    kinds: str,
    others: list[Candidate],
    place: Callable[[Candidate], tuple[int, float]],
) -> Candidate | str:
    """``kron``'s estimate, or why it is passed over. Where it was ranked on the nets of this
    signature, its measured cost per row (``_plan.kinds_measured``). Else its workload (which sites take
    Kronecker directions: a forward under the site mode and the layout probes, 4 ms of a
    first call's 16 ms at P = 49) is examined only where ``kron`` could come first: below
    it every row costs at least the cheaper of a Kronecker direction and a Hessian-vector
    row, and where that bound does not beat the best other candidate, the bound stands."""
    from .kron import workload

    if (
        probes.forward_mode
        and probes.transforms
        and _plan.kinds_measured(problem, kron.name, kinds)
    ):
        # ranked on nets of this signature: its measured cost per row, as the others'
        return _candidate(_plan.estimate(problem, kron.name, kron.family, probes, None, kinds))
    P = problem.P
    bounds = [
        _plan.estimate(problem, kron.name, kron.family, probes, rows, kinds)
        for rows in (([(P, 1)], 0), ([], P))
    ]
    lower = _candidate(min(bounds, key=lambda e: e.time_s))
    best = min(others, key=place, default=None)
    if best is not None and place(lower) > place(best):
        return replace(
            lower,
            basis=f"at least {lower.predicted_s:.3g} s, every row at the cheaper of a Kronecker "
            f"direction and a Hessian-vector row; its workload not examined, as {best.name} "
            "comes first",
        )
    try:
        rows = workload(problem)
    except Exception as error:  # its own compute would fail the same way
        return f"{kron.name}: {type(error).__name__}: {error}"
    return _candidate(_plan.estimate(problem, kron.name, kron.family, probes, rows, kinds))


def _candidate(guess: _plan.Estimate) -> Candidate:
    return Candidate(
        guess.name, guess.time_s, guess.peak_bytes, guess.basis, in_range=guess.in_range
    )


def _pilot_round(
    c: Candidate,
    work: _pilot.Work | None,
    best: dict[str, float],
    problem: Any,
    run_whole: Any,
) -> Tensor | None:
    """One round of ``c``'s pilot: its slices timed (``_pilot.time_slices``), or, without a
    ``Work``, the whole Hessian timed and returned."""
    if work is not None:
        _pilot.time_slices(work, problem, best)
        return None
    start = time.perf_counter()
    H = run_whole(c.name)
    if H.device.type == "cuda":
        torch.cuda.synchronize(H.device)
    best["whole"] = min(best.get("whole", math.inf), time.perf_counter() - start)
    return H


def _time_candidates(
    pilots: list[Candidate],
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Any],
    loss_fn: LossFn | None,
    memory_budget: int | None,
) -> tuple[str | None, Tensor | None]:
    """Measure mode: each pilot's time on this problem, in interleaved rounds, from a slice of
    its work where it works row by row (``strategies._pilot``), else from the whole Hessian;
    then those within ``CLOSE_CALL`` of the fastest pilot compute the whole Hessian, and the
    fastest whole run is verified, the next where it fails or is not exact. Returns the
    winner and its Hessian."""
    import strategies

    def run_whole(name: str) -> Tensor:
        strategy = strategies.get(name)
        options = {}
        if memory_budget is not None and "memory_budget" in (strategy.options or ()):
            options["memory_budget"] = memory_budget
        return strategy.compute(net, params, batch, loss_fn, **options)

    works: dict[str, _pilot.Work | None] = {}
    best: dict[str, dict[str, float]] = {c.name: {} for c in pilots}
    live = []
    problem = prepare(net, params, batch, loss_fn, nested_autograd=True)
    for c in pilots:
        try:
            # the same problem; it refuses a forward that differentiates itself as c would
            prepare(net, params, batch, loss_fn, nested_autograd=c.name in NESTED_AUTOGRAD)
            works[c.name] = _pilot.work(c.name, problem, memory_budget)
        except Exception as error:  # its own compute would refuse the same way
            c.exact, c.note = False, f"{type(error).__name__}: {error}"
            continue
        live.append(c)
    rounds = _REPEATS if all(c.predicted_s < _REPEAT_BELOW_S for c in live) else 1
    held: tuple[float, str, Tensor] | None = None  # the fastest whole pilot's Hessian
    for _ in range(rounds):
        for c in list(live):
            try:
                H = _pilot_round(c, works[c.name], best[c.name], problem, run_whole)
            except Exception as error:
                c.exact, c.note = False, f"{type(error).__name__}: {error}"
                live.remove(c)
                if held is not None and held[1] == c.name:
                    held = None
                continue
            if H is not None:
                seconds = best[c.name]["whole"]
                if held is None or seconds < held[0] or held[1] == c.name:
                    held = (seconds, c.name, H)
                del H
    for c in live:
        work = works[c.name]
        if work is None:
            c.pilot_s = c.measured_s = best[c.name]["whole"]
            c.pilot = [{"pass": "whole", "rows": problem.P, "timed_rows": problem.P,
                        "seconds": c.pilot_s}]  # fmt: skip
        else:
            c.pilot_s, c.pilot = _pilot.extrapolate(work, best[c.name])

    def whole_run(c: Candidate) -> Tensor | None:
        """``c``'s whole Hessian, run as often as the whole pilots were, its least time kept
        (a whole pilot is then weighed against it like for like)."""
        whole: dict[str, float] = {}
        try:
            for _ in range(rounds):
                H = _pilot_round(c, None, whole, problem, run_whole)
        except Exception as error:
            c.exact, c.note = False, f"{type(error).__name__}: {error}"
            return None
        c.measured_s = whole["whole"]
        return H

    # close calls: every candidate whose pilot is within CLOSE_CALL of the fastest pilot's
    # computes the whole Hessian, as sliced estimates err by tens of per cent
    ranked = sorted(live, key=lambda c: c.pilot_s)
    lead = ranked[0].pilot_s if ranked else math.inf
    for c in ranked:
        if c.measured_s is None and c.pilot_s <= CLOSE_CALL * lead:
            H = whole_run(c)
            if H is not None and (held is None or c.measured_s < held[0]):
                held = (c.measured_s, c.name, H)
            del H
    # the fastest whole run first, then the others by their whole or else pilot time; each
    # verified before it wins
    for c in sorted(ranked, key=lambda c: (c.measured_s is None, c.measured_s or c.pilot_s)):
        if c.exact is False:
            continue
        if held is not None and held[1] == c.name:
            H = held[2]
            held = None
        else:
            H = whole_run(c)
            if H is None:
                continue
        c.exact, detail = verify(H, net, params, batch, loss_fn)
        if c.exact:
            return c.name, H
        c.note = f"failed verification ({detail})"
        del H
    return None, None


# ``plan`` and ``compute`` each run in one ``sharing_problems`` scope, as a decorator (a
# fresh scope per call; one called within another's shares it): the inputs are checked, and
# the problem prepared, once per call, however many candidates, pilots and checks see them
@sharing_problems()
def plan(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Any],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
    measure: bool = False,
) -> Plan:
    """What ``auto`` would run for this problem, in order, and why (see the module docstring).

    Args:
        memory_budget: bytes the computation may use at its peak; default: the memory
            available on the params' device now.
        measure: time the plausible candidates on this problem (a slice of each one's work,
            extrapolated, or its whole Hessian; the module docstring) and remember the
            fastest exact one; ``Plan.rows()`` then holds the measurements.

    Raises:
        TypeError, ValueError: bad input (``strategies.check_inputs``).
    """
    check_inputs_once(net, params, batch, loss_fn)
    check_positive(memory_budget=memory_budget)
    if not isinstance(measure, bool):
        raise TypeError(f"measure must be True or False, got {measure!r}")
    first = next(iter(params.values()))
    budget = available_bytes(first.device) if memory_budget is None else memory_budget
    key = once_per_scope("structure", _plan.structure_key, net, params, batch, loss_fn)
    ranked, passed_over = _estimates(net, params, batch, loss_fn, budget)
    result = Plan(key, ranked, passed_over, "estimate")
    if measure:
        finite = [c for c in ranked if math.isfinite(c.predicted_s)]
        fastest = min((c.predicted_s for c in finite), default=math.inf)
        pilots = [c for c in finite if c.predicted_s <= MEASURE_FACTOR * fastest][:MAX_PILOTS]
        winner, H = _time_candidates(pilots, net, params, batch, loss_fn, memory_budget)
        if winner is not None:
            _learn(key, winner, "measure")
            result.candidates.sort(key=lambda c: c.name != winner)
            result.how, result._hessian = "measure", H
        return result
    known = _WISDOM.get(key)
    if known is not None and any(c.name == known["strategy"] for c in ranked):
        result.candidates.sort(key=lambda c: c.name != known["strategy"])
        result.how = "wisdom"
    return result


def candidates(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Any],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
) -> tuple[list[str], list[str]]:
    """The strategies ``auto`` tries, in order; and why each other one was passed over."""
    result = plan(net, params, batch, loss_fn, memory_budget)
    return [c.name for c in result.candidates], result.passed_over


def choose(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Any],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
) -> str:
    """The name of the strategy ``auto`` tries first for this problem; ``plan`` says why.

    Raises:
        ValueError: no registered strategy is exact for this net within the budget.
    """
    return plan(net, params, batch, loss_fn, memory_budget).choice


@sharing_problems()
def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Any],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
    measure: bool = False,
) -> Tensor:
    """The Hessian from the first candidate that computes it and passes ``verify``.

    Args:
        memory_budget: bytes the computation may use at its peak (see ``plan``).
        measure: plan by measuring (see ``plan``); otherwise wisdom, else the estimate.

    Raises:
        ValueError: every candidate refused, failed or failed verification (the message says
            why for each), or torch cannot compute the product ``verify`` checks with.
    """
    import strategies

    # a bad input is the caller's, not a strategy's; a forward that differentiates itself
    # is not: the reverse-mode loops compute it
    prepare(net, params, batch, loss_fn, nested_autograd=True)
    check_positive(memory_budget=memory_budget)
    key = once_per_scope("structure", _plan.structure_key, net, params, batch, loss_fn)
    result: Plan | None = None
    if measure:
        result = plan(net, params, batch, loss_fn, memory_budget, measure=True)
        if result._hessian is not None:
            return result._hessian
    known = None if measure else _WISDOM.get(key)
    # with wisdom, its strategy alone: no estimate, no probes
    order = [known["strategy"]] if known else None
    passed_over: list[str] = []
    tried: set[str] = set()
    while True:
        if order is None:
            result = result or plan(net, params, batch, loss_fn, memory_budget)
            order = [c.name for c in result.candidates if c.name not in tried]
            passed_over += result.passed_over
        for name in order:
            tried.add(name)
            strategy = strategies.get(name)
            options = {}
            if memory_budget is not None and "memory_budget" in (strategy.options or ()):
                options["memory_budget"] = memory_budget
            try:
                H = strategy.compute(net, params, batch, loss_fn, **options)
            except Exception as error:  # any failure passes the problem on (module docstring)
                passed_over.append(f"{name}: {type(error).__name__}: {error}")
                continue
            try:
                ok, detail = verify(H, net, params, batch, loss_fn)
            except ValueError as error:
                raise ValueError(
                    f"auto cannot verify the Hessian strategy {name!r} computed ({error}); "
                    f"strategies.compute({name!r}, ...) returns it unverified"
                ) from error
            if ok:
                _learn(key, name, "estimate")
                return H
            del H
            warnings.warn(
                f"auto: strategy {name!r} returned a Hessian that fails verification "
                f"({detail}); trying the next strategy",
                RuntimeWarning,
                stacklevel=2,
            )
            passed_over.append(f"{name}: failed verification ({detail})")
        if result is not None:
            break
        order = None  # wisdom's strategy failed: plan afresh, without it
    raise ValueError(
        "no strategy computed an exact Hessian for this problem: " + "; ".join(passed_over)
    )
