"""``auto``: the strategy the committed reference results recommend for this net, size and device.

The choice comes from ``auto_table.json`` beside this file, made from the committed
benchmark and audit JSON by ``python -m bench.auto_table`` (never edited by hand). For each
measured regime (device, dtype, range of P) the table ranks the strategies that were
accurate on every case of the regime, fastest first, with each one's peak memory as a
multiple of the Hessian's size; and it lists, per strategy, the kinds of model (layernorm,
batchnorm-train, ...) on which the correctness audit found it wrong or failing.

``choose`` walks that ranking and takes the first strategy that supports the net and loss,
was not found wrong on any kind of model the net is, and whose predicted peak memory fits
the budget; the generic exact strategies follow the ranking as a fallback, so a net that the
specialised strategies refuse still gets an exact Hessian.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ._common import LossFn, check_inputs
from ._kinds import kinds_of
from ._memory import available_bytes

NAME = "auto"
FAMILY = "dispatcher"
DESCRIPTION = "the strategy the committed reference results recommend for this net, size and device"

TABLE_PATH = Path(__file__).with_name("auto_table.json")
#: exact strategies for any net, tried in this order after the measured ranking
GENERIC_FALLBACK = ("block_symmetric", "block_symmetric_chunked", "vmap_jvp", "full_autograd")
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


def choose(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
) -> str:
    """The name of the strategy ``auto`` runs for this problem.

    Args:
        memory_budget: bytes the computation may use at its peak; default: the memory
            available on the params' device now.

    Raises:
        ValueError: no registered strategy is exact for this net within the budget.
    """
    import strategies  # the registry imports this module

    loss_fn = check_inputs(net, params, batch, loss_fn)
    first = next(iter(params.values()))
    P = sum(p.numel() for p in params.values())
    hessian_bytes = P * P * first.element_size()
    budget = available_bytes(first.device) if memory_budget is None else memory_budget
    table = load_table()
    regime = _regime(table, first.device.type, str(first.dtype).removeprefix("torch."), P)
    ranking = list(regime["ranking"]) if regime else []
    peak_ratio = regime["peak_ratio"] if regime else {}
    kinds = kinds_of(net)
    refused = []
    for name in dict.fromkeys([*ranking, *GENERIC_FALLBACK]):
        if name == NAME or name not in strategies.names():
            continue
        strategy = strategies.get(name)
        if strategy.peer:
            continue
        wrong_on = kinds & set(table["wrong_on"].get(name, ()))
        if wrong_on:
            refused.append(f"{name}: found wrong on {', '.join(sorted(wrong_on))}")
            continue
        ok, reason = strategy.supports(net, loss_fn)
        if not ok:
            refused.append(f"{name}: {reason}")
            continue
        predicted = peak_ratio.get(name, UNMEASURED_PEAK_RATIO) * hessian_bytes
        if predicted > budget:
            refused.append(f"{name}: predicted peak {predicted:.3g} B over budget {budget:.3g} B")
            continue
        return name
    raise ValueError(
        f"no strategy is exact for this net within {budget} bytes: " + "; ".join(refused)
    )


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    import strategies

    name = choose(net, params, batch, loss_fn, memory_budget)
    return strategies.get(name).compute(net, params, batch, loss_fn)
