"""block_symmetric in memory-bounded chunks of rows, written into a preallocated Hessian.

For parameter tensor k the rows come from tangents in tensor k over the gradient w.r.t.
tensors k, k+1, ... only (see ``block_symmetric``); the blocks below the diagonal are
mirrored. Each chunk of rows is written straight into ``H`` rather than concatenated, and
the chunk size comes from ``_memory.problem_chunk``: peak about ``HEADROOM`` (1.5) x the
Hessian's bytes. The per-direction estimate is that of the full gradient, an upper bound for
the tail gradients used here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import vmap

from ._blocks import mirror_upper
from ._contract import prepare
from ._memory import problem_chunk, unit_chunks
from ._problem import LossFn
from .block_symmetric import tail_hvp

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "compute"]

NAME = "block_symmetric_chunked"
FAMILY = "forward-over-reverse"
MULTI_INPUT = True
DESCRIPTION = "block_symmetric with rows in chunks sized to free memory, written in place"


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> Tensor:
    """The dense Hessian, ``chunk_size`` rows at a time.

    Args:
        chunk_size: rows per chunk; default: the most that fit ``memory_budget``.
        memory_budget: bytes the computation may use, Hessian included; default: the
            memory available on the params' device now.

    Raises:
        ValueError: ``chunk_size`` or ``memory_budget`` is not a positive integer, or the
            budget is below the Hessian's own size.
    """
    problem = prepare(net, params, batch, loss_fn)
    P, offsets, sizes = problem.P, problem.offsets, problem.sizes
    chunk_size = problem_chunk(problem, P, chunk_size, memory_budget)
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)
    for k, (offset, size) in enumerate(zip(offsets, sizes)):
        batched = vmap(tail_hvp(problem, k))
        for start, stop, basis in unit_chunks(size, chunk_size, problem.dtype, problem.device):
            H[offset + start : offset + stop, offset:] = batched(basis)
    return mirror_upper(H, offsets, sizes)
