"""torch.func.hessian over the params dict, through torch.func.functional_call."""

from __future__ import annotations

from collections.abc import Mapping

import torch.func
from torch import Tensor, nn

from ._common import LossFn, from_blocks, jacrev_normalisation_hazard, prepare

NAME = "torch_func"
DESCRIPTION = "torch.func.hessian of the loss as a function of the params dict"


def supports(net: nn.Module, loss_fn: LossFn | None = None) -> tuple[bool, str]:
    reason = jacrev_normalisation_hazard(net)
    return (False, f"wrong Hessian upstream: {reason}") if reason else (True, "")


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    point = problem.primal_dict()
    return from_blocks(torch.func.hessian(problem.loss)(point), point)
