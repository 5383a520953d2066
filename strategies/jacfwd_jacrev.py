"""Forward-over-reverse through torch.func: jacfwd(jacrev(f)) with f of one flat vector."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.func import jacfwd, jacrev

from ._common import LossFn, jacrev_normalisation_hazard, prepare

NAME = "jacfwd_jacrev"
DESCRIPTION = "jacfwd(jacrev(f)) with f the loss of one flat parameter vector"


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
    return jacfwd(jacrev(problem.flat_loss))(problem.flat_primal())
