"""torch.autograd.functional.hessian, vectorized, with a forward-mode outer Jacobian."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._common import LossFn, prepare

NAME = "autograd_functional"
FAMILY = "forward-over-reverse"
DESCRIPTION = (
    "torch.autograd.functional.hessian(vectorize=True, outer_jacobian_strategy='forward-mode')"
)


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    return torch.autograd.functional.hessian(
        problem.flat_loss,
        problem.flat_primal(),
        vectorize=True,
        outer_jacobian_strategy="forward-mode",
    )
