"""torch.func.hessian over the params dict, through torch.func.functional_call."""

from __future__ import annotations

from collections.abc import Mapping

import torch.func
from torch import Tensor, nn

from ._blocks import from_blocks
from ._contract import prepare
from ._hazards import JACREV_PATH, jacrev_path_supports, refuse_hazard
from ._memory import check_directions
from ._problem import LossFn, Problem

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "supports", "compute", "hessian"]

NAME = "torch_func"
FAMILY = "transforms"
MULTI_INPUT = True
DESCRIPTION = "torch.func.hessian of the loss as a function of the params dict"


#: refuses nets whose modules take torch.func's jacrev path to a wrong Hessian
supports = jacrev_path_supports


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    # the modules were checked by supports; functional calls (F.layer_norm ...) only show here
    refuse_hazard(problem, JACREV_PATH, NAME)
    check_directions(problem, problem.P, NAME)
    return hessian(problem)


def hessian(problem: Problem) -> Tensor:
    """The dense Hessian of a prepared problem; ``torch_func_compiled`` compiles the same."""
    point = problem.primal_dict()
    return from_blocks(torch.func.hessian(problem.loss)(point), point)
