"""block_symmetric in memory-bounded chunks of rows, written into a preallocated Hessian.

For parameter tensor k the rows come from tangents in tensor k over the gradient w.r.t.
tensors k, k+1, ... only (see ``block_symmetric``); the blocks below the diagonal are
mirrored. Each chunk of rows is written straight into ``H`` rather than concatenated, and
the chunk size comes from ``_memory.problem_chunk``: peak about ``HEADROOM`` (1.5) x the
Hessian's bytes. The per-direction estimate is that of the full gradient, an upper bound for
the tail gradients used here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from ._common import LossFn, Problem, flatten, mirror_upper, prepare
from ._memory import problem_chunk

NAME = "block_symmetric_chunked"
DESCRIPTION = "block_symmetric with rows in chunks sized to free memory, written in place"


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The dense Hessian, ``chunk_size`` rows at a time (default: chosen from free memory).

    Raises:
        ValueError: ``chunk_size`` is given and not a positive integer.
    """
    problem = prepare(net, params, batch, loss_fn)
    P, offsets, sizes = problem.P, problem.offsets, problem.sizes
    if chunk_size is None:
        chunk_size = problem_chunk(problem, P)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)
    for k, (offset, size) in enumerate(zip(offsets, sizes)):
        batched = vmap(tail_hvp(problem, k))
        for start in range(0, size, chunk_size):
            stop = min(start + chunk_size, size)
            basis = torch.zeros(stop - start, size, dtype=problem.dtype, device=problem.device)
            basis[:, start:stop].fill_diagonal_(1)
            H[offset + start : offset + stop, offset:] = batched(basis)
    return mirror_upper(H, offsets, sizes)


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
