"""The loop most users write first: one double-backward ``autograd.grad`` per gradient entry."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._blocks import flat_or_zeros
from ._contract import prepare
from ._hazards import DOUBLE_BACKWARD, refuse_hazard
from ._problem import LossFn

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "compute"]

NAME = "full_autograd"
FAMILY = "loops"
MULTI_INPUT = True
DESCRIPTION = "autograd.grad with create_graph=True, then one autograd.grad per gradient entry"


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn, nested_autograd=True)
    refuse_hazard(problem, DOUBLE_BACKWARD, NAME)
    leaves = [p.clone().requires_grad_(True) for p in problem.primals]
    with torch.enable_grad():
        loss = problem.loss(dict(zip(problem.names, leaves)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        g = torch.cat([flat_or_zeros(gi, p) for gi, p in zip(grads, leaves)])
        H = torch.zeros(problem.P, problem.P, dtype=problem.dtype, device=problem.device)
        for i in range(problem.P):
            if not g[i].requires_grad:  # the loss is linear (or constant) in this entry
                continue
            row = torch.autograd.grad(g[i], leaves, retain_graph=True, allow_unused=True)
            H[i] = torch.cat([flat_or_zeros(r, p) for r, p in zip(row, leaves)])
    return H
