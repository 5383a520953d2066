"""torch.func.hessian over the params dict, through torch.func.functional_call."""

from __future__ import annotations

from collections.abc import Mapping

import torch.func
from torch import Tensor, nn

from ._common import LossFn, from_blocks, jacrev_path_supports, prepare

NAME = "torch_func"
FAMILY = "transforms"
DESCRIPTION = "torch.func.hessian of the loss as a function of the params dict"


#: refuses nets through which torch.func's jacrev path returns a wrong Hessian
supports = jacrev_path_supports


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    point = problem.primal_dict()
    return from_blocks(torch.func.hessian(problem.loss)(point), point)
