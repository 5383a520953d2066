"""torch.autograd.functional.hessian, vectorized, with a forward-mode outer Jacobian."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._contract import prepare
from ._hazards import LEGACY_VMAP_FORWARD, refuse_hazard
from ._memory import check_directions
from ._problem import LossFn

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "supports", "compute"]

NAME = "autograd_functional"
FAMILY = "forward-over-reverse"
MULTI_INPUT = True
DESCRIPTION = (
    "torch.autograd.functional.hessian(vectorize=True, outer_jacobian_strategy='forward-mode')"
)


def supports(net: nn.Module, loss_fn: LossFn | None = None) -> tuple[bool, str]:
    """No GroupNorm: through it torch 2.13's vectorized forward-mode Jacobian raises
    "Trying to set a forward gradient that has a different size" (affine or not)."""
    for name, m in net.named_modules():
        if isinstance(m, nn.GroupNorm):
            return False, f"module {name!r} is a GroupNorm: {LEGACY_VMAP_FORWARD} fails through it"
    return True, ""


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    # supports checked the modules; a functional F.group_norm only shows here
    refuse_hazard(problem, LEGACY_VMAP_FORWARD, NAME)
    # its legacy vectorized Jacobians peaked at 1.84 x what the others' margin allows
    check_directions(problem, problem.P, NAME, margin=2.5)
    return torch.autograd.functional.hessian(
        problem.flat_loss,
        problem.flat_primal(),
        vectorize=True,
        outer_jacobian_strategy="forward-mode",
    )
