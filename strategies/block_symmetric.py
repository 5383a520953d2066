"""Forward-over-reverse by blocks: tensor k's rows w.r.t. tensors k, k+1, ...; the rest by symmetry.

For parameter tensor k the tangents live in tensor k only and the gradient is taken w.r.t.
tensors k, k+1, ... only, with the earlier tensors held as constants: the forward tangent
starts at tensor k and the backward pass stops there, so both skip the layers before it.
The blocks below the diagonal are the transposes of those above.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ._blocks import flatten, mirror_upper
from ._contract import prepare
from ._problem import LossFn, Problem

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "compute", "upper_rows", "tail_hvp"]

NAME = "block_symmetric"
FAMILY = "forward-over-reverse"
MULTI_INPUT = True
DESCRIPTION = "vmap of jvp with tangents in tensor k over grad w.r.t. tensors k.. only; mirrored"


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    problem = prepare(net, params, batch, loss_fn)
    H = torch.empty(problem.P, problem.P, dtype=problem.dtype, device=problem.device)
    for k in range(len(problem.names)):
        rows = slice(problem.offsets[k], problem.offsets[k] + problem.sizes[k])
        H[rows, problem.offsets[k] :] = upper_rows(problem, k, chunk_size)
    return mirror_upper(H, problem.offsets, problem.sizes)


def upper_rows(problem: Problem, k: int, chunk_size: int | None = None) -> Tensor:
    """Rows of tensor k, columns of tensors k, k+1, ...: a ``sizes[k] x sum(sizes[k:])`` matrix."""
    n = problem.sizes[k]
    basis = torch.eye(n, dtype=problem.dtype, device=problem.device)
    return vmap(tail_hvp(problem, k), chunk_size=chunk_size)(basis)


def tail_hvp(problem: Problem, k: int) -> Callable[[Tensor], Tensor]:
    """``v -> (H v)[offsets[k]:]`` for a flat ``v`` that lives in tensor k only."""
    names, primals = problem.names, problem.primals
    head = dict(zip(names[:k], primals[:k]))
    rest = dict(zip(names[k + 1 :], primals[k + 1 :]))
    pk = primals[k]

    def grad_tail(x: Tensor) -> Tensor:
        def loss_tail(tail: dict[str, Tensor]) -> Tensor:
            return problem.loss({**head, **tail})

        g = grad(loss_tail)({names[k]: x, **rest})
        return flatten([g[n] for n in names[k:]])

    def hvp(v: Tensor) -> Tensor:
        return jvp(grad_tail, (pk,), (v.view(pk.shape),))[1]

    return hvp
