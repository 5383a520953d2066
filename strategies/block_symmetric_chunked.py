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

from ._common import LossFn, mirror_upper, prepare
from ._memory import problem_chunk, unit_chunks
from .block_symmetric import tail_hvp

NAME = "block_symmetric_chunked"
FAMILY = "forward-over-reverse"
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
    chunk_size = problem_chunk(problem, P, chunk_size)
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)
    for k, (offset, size) in enumerate(zip(offsets, sizes)):
        batched = vmap(tail_hvp(problem, k))
        for start, stop, basis in unit_chunks(size, chunk_size, problem.dtype, problem.device):
            H[offset + start : offset + stop, offset:] = batched(basis)
    return mirror_upper(H, offsets, sizes)
