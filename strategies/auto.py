"""``auto``: the strategy the committed reference results recommend for this net, size and device.

The choice comes from ``auto_table.json`` beside this file, made from the committed
benchmark and audit JSON by ``python -m bench.auto_table`` (never edited by hand). For each
measured regime (device, dtype, range of P) the table ranks the strategies that were
accurate on every case of the regime, fastest first, with each one's peak memory as a
multiple of the Hessian's size; and it lists, per strategy, the kinds of model (layernorm,
batchnorm-train, ...) on which the correctness audit found it wrong or failing.

``candidates`` walks the strategies named in ``PREFERRED`` (where registered), then that
ranking, then the generic exact strategies, and keeps those that support the net and loss,
were not found wrong on any kind of model the net is, and whose predicted peak memory fits
the budget. ``compute`` runs them in that order: a strategy that refuses the problem at run
time (a derivative torch lacks, a normalisation op it differentiates wrongly) or runs out of
memory passes the problem on to the next, and every Hessian is checked by ``verify`` (one
independent Hessian-vector product) before it is returned; one that fails the check is
passed over with a warning. ``choose`` names the first candidate.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._common import LossFn, check_inputs, prepare
from ._kinds import kinds_of
from ._memory import available_bytes, check_positive
from ._verify import verify

NAME = "auto"
FAMILY = "dispatcher"
MULTI_INPUT = True
DESCRIPTION = "the strategy the committed reference results recommend for this net, size and device"

TABLE_PATH = Path(__file__).with_name("auto_table.json")
#: tried before the measured ranking wherever registered: strategies newer than the table;
#: with no measured peak, one is assumed to need no more than the Hessian itself
PREFERRED = ("kron",)
#: exact strategies for any net, tried in this order after the measured ranking
GENERIC_FALLBACK = (
    "block_symmetric",
    "block_symmetric_chunked",
    "vmap_jvp",
    "symmetric_half",
    "full_autograd",
)
#: peak memory assumed for a strategy the table has no measurement of, in Hessian sizes
UNMEASURED_PEAK_RATIO = 3.0


@functools.cache
def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    """The committed table (see the module docstring)."""
    with open(path) as f:
        return json.load(f)


def _regime(table: dict[str, Any], device: str, dtype: str, P: int) -> dict[str, Any] | None:
    """The measured regime nearest to (device, dtype, P): same device first, then same dtype,
    then the range of P containing P, or else the nearest range on a log scale."""
    regimes = [r for r in table["regimes"] if r["device"] == device]
    if not regimes:
        return None
    same_dtype = [r for r in regimes if r["dtype"] == dtype]
    regimes = same_dtype or regimes

    def distance(r: dict[str, Any]) -> float:
        if r["P_min"] <= P < r["P_max"]:
            return 0.0
        edge = r["P_min"] if P < r["P_min"] else r["P_max"]
        return abs(math.log(P) - math.log(edge))

    return min(regimes, key=distance)


def candidates(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
) -> tuple[list[str], list[str]]:
    """The strategies ``auto`` tries, in order; and why each other one was passed over.

    Args:
        memory_budget: bytes the computation may use at its peak; default: the memory
            available on the params' device now.
    """
    import strategies  # the registry imports this module

    loss_fn = check_inputs(net, params, batch, loss_fn)
    check_positive(memory_budget=memory_budget)
    first = next(iter(params.values()))
    P = sum(p.numel() for p in params.values())
    hessian_bytes = P * P * first.element_size()
    budget = available_bytes(first.device) if memory_budget is None else memory_budget
    table = load_table()
    regime = _regime(table, first.device.type, str(first.dtype).removeprefix("torch."), P)
    ranking = list(regime["ranking"]) if regime else []
    peak_ratio = regime["peak_ratio"] if regime else {}
    kinds = kinds_of(net)
    chosen, passed_over = [], []
    for name in dict.fromkeys([*PREFERRED, *ranking, *GENERIC_FALLBACK]):
        if name == NAME or name not in strategies.names():
            continue
        strategy = strategies.get(name)
        if strategy.peer:
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
        unmeasured = 1.0 if name in PREFERRED else UNMEASURED_PEAK_RATIO
        predicted = peak_ratio.get(name, unmeasured) * hessian_bytes
        if predicted > budget:
            passed_over.append(
                f"{name}: predicted peak {predicted:.3g} B over budget {budget:.3g} B"
            )
            continue
        chosen.append(name)
    return chosen, passed_over


def choose(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
) -> str:
    """The name of the strategy ``auto`` tries first for this problem (see ``candidates``).

    Raises:
        ValueError: no registered strategy is exact for this net within the budget.
    """
    chosen, passed_over = candidates(net, params, batch, loss_fn, memory_budget)
    if not chosen:
        raise ValueError(
            "no strategy is exact for this net within the budget: " + "; ".join(passed_over)
        )
    return chosen[0]


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """The Hessian from the first candidate that computes it and passes ``verify``.

    Raises:
        ValueError: every candidate refused, ran out of memory or failed verification
            (the message says why for each), or torch cannot compute the product that
            ``verify`` checks with.
    """
    import strategies

    prepare(net, params, batch, loss_fn)  # a bad input is the caller's, not a strategy's
    chosen, passed_over = candidates(net, params, batch, loss_fn, memory_budget)
    for name in chosen:
        strategy = strategies.get(name)
        options = {}
        if memory_budget is not None and "memory_budget" in (strategy.options or ()):
            options["memory_budget"] = memory_budget
        try:
            H = strategy.compute(net, params, batch, loss_fn, **options)
        except (ValueError, MemoryError, torch.OutOfMemoryError) as error:
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
            return H
        del H
        warnings.warn(
            f"auto: strategy {name!r} returned a Hessian that fails verification ({detail}); "
            "trying the next strategy",
            RuntimeWarning,
            stacklevel=2,
        )
        passed_over.append(f"{name}: failed verification ({detail})")
    raise ValueError(
        "no strategy computed an exact Hessian for this problem: " + "; ".join(passed_over)
    )
