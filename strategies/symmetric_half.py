"""Double-backward rows that skip the blocks left of the diagonal, filled by symmetry.

The approach users try first, ``autograd.grad(g[i], flat_params[i:])``, returns None:
``flat_params`` is a concatenation, and a slice of it is a new tensor that the loss never
used, not a leaf of the graph. What works is to differentiate at the granularity of the
leaves themselves: for the rows of parameter tensor k, ask only for the gradient w.r.t.
tensors k, k+1, ...; autograd then prunes the part of the double-backward pass that only
leads to the earlier tensors, and the blocks below the diagonal are the transposes of
those above it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._blocks import flat_or_zeros, mirror_upper
from ._contract import prepare
from ._hazards import DOUBLE_BACKWARD, refuse_hazard
from ._problem import LossFn

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "compute"]

NAME = "symmetric_half"
FAMILY = "loops"
MULTI_INPUT = True
DESCRIPTION = (
    "double-backward rows of tensor k w.r.t. tensors k, k+1, ... only; lower blocks by symmetry"
)


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn, nested_autograd=True)
    refuse_hazard(problem, DOUBLE_BACKWARD, NAME)
    leaves = [p.clone().requires_grad_(True) for p in problem.primals]
    offsets, sizes = problem.offsets, problem.sizes
    H = torch.zeros(problem.P, problem.P, dtype=problem.dtype, device=problem.device)
    with torch.enable_grad():
        loss = problem.loss(dict(zip(problem.names, leaves)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        for k, (gk, leaf) in enumerate(zip(grads, leaves)):
            gk = flat_or_zeros(gk, leaf)
            tail = leaves[k:]
            for i in range(sizes[k]):
                if not gk[i].requires_grad:
                    continue
                row = torch.autograd.grad(gk[i], tail, retain_graph=True, allow_unused=True)
                H[offsets[k] + i, offsets[k] :] = torch.cat(
                    [flat_or_zeros(r, p) for r, p in zip(row, tail)]
                )
    return mirror_upper(H, offsets, sizes)
