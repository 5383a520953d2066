"""The legacy functorch.hessian API, as shipped inside torch (``import functorch``)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import functorch
from torch import Tensor, nn

from ._blocks import from_blocks
from ._contract import prepare
from ._hazards import JACREV_PATH, jacrev_path_supports, refuse_hazard
from ._memory import check_directions
from ._problem import LossFn

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "supports", "compute"]

NAME = "functorch"
FAMILY = "transforms"
MULTI_INPUT = True
DESCRIPTION = "functorch.hessian (the legacy API shipped inside torch) over the params dict"


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
    point = problem.primal_dict()
    with warnings.catch_warnings():
        # Measuring the legacy API is the point; its deprecation notice is not news here.
        warnings.filterwarnings("ignore", message=".*functorch.hessian", category=FutureWarning)
        blocks = functorch.hessian(problem.loss)(point)
    return from_blocks(blocks, point)
