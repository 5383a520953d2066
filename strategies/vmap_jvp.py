"""Forward-over-reverse: vmap of jvp(grad(f)) over the identity basis."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ._contract import prepare
from ._memory import check_directions
from ._problem import LossFn, Problem

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "compute", "hessian", "hvp"]

NAME = "vmap_jvp"
FAMILY = "forward-over-reverse"
MULTI_INPUT = True
DESCRIPTION = "forward-over-reverse: vmap of jvp(grad(f)) over the identity basis"


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    check_directions(problem, problem.P, NAME)
    return hessian(problem)


def hessian(problem: Problem) -> Tensor:
    """The dense Hessian of a prepared problem; ``vmap_jvp_compiled`` compiles the same."""
    basis = torch.eye(problem.P, dtype=problem.dtype, device=problem.device)
    return vmap(hvp(problem))(basis)


def hvp(problem: Problem) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` by forward-over-reverse at the problem's point."""
    point = problem.flat_primal()

    def product(v: Tensor) -> Tensor:
        return jvp(grad(problem.flat_loss), (point,), (v,))[1]

    return product
