"""Forward-over-reverse through torch.func: jacfwd(jacrev(f)) with f of one flat vector."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import jacfwd, jacrev

from ._common import LossFn, jacrev_path_supports, prepare

NAME = "jacfwd_jacrev"
FAMILY = "transforms"
DESCRIPTION = "jacfwd(jacrev(f)) with f the loss of one flat parameter vector"


#: refuses nets through which torch.func's jacrev path returns a wrong Hessian
supports = jacrev_path_supports


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    return jacfwd(jacrev(problem.flat_loss))(problem.flat_primal())
