"""One cell's problem: the case's data every strategy shares, and one Hessian call of it.

Below both the session (``bench.run.session``, which keeps the current case's data and its
baselines) and the worker (``bench.run.worker``, which computes the same call in a child
process), so that neither imports the other for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench import measure
from bench.problems.grid import Case
from bench.problems.models import chosen_params, make_problem
from bench.reference import ProbeReference
from strategies import Strategy

__all__ = ["CaseData", "hessian_call"]


@dataclass
class CaseData:
    """What one case computes once and every strategy shares."""

    case: Case
    net: torch.nn.Module
    batch: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Any
    reference: torch.Tensor | ProbeReference | None = None
    grad_s: float | None = None
    #: profiler events of one gradient (``measure.grad_events``)
    grad_events: int | None = None
    gemm_s: float | None = None

    @classmethod
    def of(cls, case: Case) -> CaseData:
        """The case's seeded net, batch and loss (``bench.problems.models.make_problem``), no baselines."""
        net, batch, loss_fn = make_problem(case)
        return cls(case, net, batch, loss_fn)


def hessian_call(strategy: Strategy, data: CaseData) -> Callable[[], torch.Tensor]:
    """One Hessian of the case by the strategy, between two waits for the device.

    The same call runs in the worker's isolated pass, the first call and the timed rounds
    (pytest-benchmark's timer is around it): on a GPU, where work is queued, the wait before
    keeps earlier work out of the time and the wait after puts all of the call's work in it.
    The process is warmed up on the device first (``bench.measure.warm_up``).
    """
    params = chosen_params(data.case, data.net)
    device = torch.device(data.case.device)
    measure.warm_up(device)  # the process's one-time costs stay out of every time

    def call() -> torch.Tensor:
        measure.sync(device)
        H = strategy.compute(data.net, params, data.batch, data.loss_fn)
        measure.sync(device)
        return H

    return call
