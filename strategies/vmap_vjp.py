"""Reverse-over-reverse: vmap of the vjp of grad(f) over the identity basis."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import grad, vjp, vmap

from ._contract import prepare
from ._hazards import DOUBLE_BACKWARD, refuse_hazard
from ._memory import check_directions
from ._problem import LossFn

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "compute"]

NAME = "vmap_vjp"
FAMILY = "transforms"
MULTI_INPUT = True
DESCRIPTION = "reverse-over-reverse: vmap of vjp(grad(f)) over the identity basis"


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    refuse_hazard(problem, DOUBLE_BACKWARD, NAME)
    check_directions(problem, problem.P, NAME)
    _, vjp_fn = vjp(grad(problem.flat_loss), problem.flat_primal())
    basis = torch.eye(problem.P, dtype=problem.dtype, device=problem.device)
    # Row i is e_i^T H; H is symmetric, so the rows are the Hessian as it stands.
    (H,) = vmap(vjp_fn)(basis)
    return H
