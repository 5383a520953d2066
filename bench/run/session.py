"""State of one benchmark session: its options, the current case's data, and what was measured."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from bench import measure
from bench.problems.grid import Case
from bench.problems.models import chosen_params
from bench.reference import batched_loop_hessian, probe_reference
from bench.run.cell import CaseData
from bench.run.worker import Worker

__all__ = ["DENSE_REFERENCE_MAX_P", "History", "Timed", "Run"]


#: the largest P whose benchmark reference is the dense float64 Hessian (1.7 GiB at 15,000)
DENSE_REFERENCE_MAX_P = 15_000


@dataclass
class History:
    """What one strategy measured on the smaller cases of one case family, in order of P.

    The basis of the predictions that skip a cell before it runs (``bench.run.policy``).
    """

    #: (P, min seconds) of timed cells
    seconds: list[tuple[int, float]] = field(default_factory=list)
    #: (P, peak bytes) of cells whose memory pass ran
    peak_bytes: list[tuple[int, int]] = field(default_factory=list)
    #: (P, profiler events recorded by the memory pass)
    events: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Timed:
    """What the session keeps of a timed cell, for its summary at the end."""

    seconds: float
    peak_bytes: int | None
    accurate: bool
    peer: bool
    #: every timed round's seconds
    rounds: tuple[float, ...] = ()
    #: too slow to repeat (one round): left out of every ranking
    too_slow: bool = False

    @property
    def median(self) -> float:
        """The median round (the min alone where no rounds were kept)."""
        return statistics.median(self.rounds or (self.seconds,))


@dataclass
class Run:
    """State of one benchmark session: options, the current case's data, outcomes, history."""

    grid: str
    strategy_names: list[str]
    devices: list[str]
    time_budget: float
    memory_fraction: float
    command: str
    cases: dict[str, Case]
    #: the child process that runs each cell's isolated pass (``bench.run.worker``)
    worker: Worker
    #: rows of the cells that were not timed: the JSON's ``hessbench.outcomes``
    outcomes: list[dict] = field(default_factory=list)
    #: (case id, strategy) -> the timed cell
    timed: dict[tuple[str, str], Timed] = field(default_factory=dict)
    #: case id -> its close call timed interleaved at the end (``bench.run.close_calls``):
    #: the JSON's ``hessbench.interleaved``
    interleaved: dict[str, dict] = field(default_factory=dict)
    #: (strategy, case family) -> its history
    histories: dict[tuple[str, tuple], History] = field(default_factory=dict)
    _current: CaseData | None = None

    def case_data(self, case: Case) -> CaseData:
        """The case's model and batch; only the latest case is kept (its reference is P^2 x 8 B)."""
        if self._current is None or self._current.case != case:
            self._current = None
            self._current = CaseData.of(case)
        return self._current

    def baselines(self, data: CaseData) -> CaseData:
        """Fill the float64 reference, grad_s, grad_events and gemm_s of the case, once."""
        if data.reference is None:
            case = data.case
            chosen = chosen_params(case, data.net)
            names = list(chosen)
            # a dense float64 reference up to DENSE_REFERENCE_MAX_P; above, H_ref along a few
            # random vectors (the dense one would need P^2 x 8 bytes beside the strategy's H)
            if case.P <= DENSE_REFERENCE_MAX_P:
                reference = batched_loop_hessian(data.net, names, data.batch, data.loss_fn)
            else:
                reference = probe_reference(data.net, names, data.batch, data.loss_fn)
            data.grad_s = measure.grad_seconds(
                data.net, data.batch, data.loss_fn, params=list(chosen.values())
            )
            data.grad_events = measure.grad_events(
                data.net, data.batch, data.loss_fn, params=list(chosen.values())
            )
            data.gemm_s = measure.gemm_seconds(
                case.P, case.batch, getattr(torch, case.dtype), case.device
            )
            # set last: a baseline that raised is computed again by the next cell, never
            # left half-filled
            data.reference = reference
        return data

    def history(self, strategy: str, case: Case) -> History:
        """The strategy's history in the case's family (empty before its first cell there)."""
        return self.histories.setdefault((strategy, case.family), History())

    def keep_timed(self, case: Case, strategy: str, timed: Timed) -> None:
        """Keep a timed cell for the summary, and its time and peak for later predictions."""
        self.timed[(case.id, strategy)] = timed
        history = self.history(strategy, case)
        history.seconds.append((case.P, timed.seconds))
        if timed.peak_bytes is not None:
            history.peak_bytes.append((case.P, timed.peak_bytes))
