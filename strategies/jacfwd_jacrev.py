"""Forward-over-reverse through torch.func: jacfwd(jacrev(f)) with f of one flat vector."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import jacfwd, jacrev

from ._contract import prepare
from ._hazards import JACREV_PATH, jacrev_path_supports, refuse_hazard
from ._memory import check_directions
from ._problem import LossFn

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "supports", "compute"]

NAME = "jacfwd_jacrev"
FAMILY = "transforms"
MULTI_INPUT = True
DESCRIPTION = "jacfwd(jacrev(f)) with f the loss of one flat parameter vector"


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
    return jacfwd(jacrev(problem.flat_loss))(problem.flat_primal())
