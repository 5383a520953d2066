"""Forward-over-reverse in memory-bounded chunks of directions, written into a preallocated Hessian.

``vmap(..., chunk_size=c)`` would bound the tangents but concatenate its chunks at the end,
holding the Hessian twice; here each chunk's rows go straight into ``H``. The chunk size comes
from ``_memory.problem_chunk``: peak about ``HEADROOM`` (1.5) x the Hessian's bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import vmap

from ._common import LossFn, prepare
from ._memory import problem_chunk, unit_chunks
from .vmap_jvp import hvp

NAME = "vmap_jvp_chunked"
FAMILY = "forward-over-reverse"
DESCRIPTION = "vmap of jvp(grad(f)) over chunks of the identity basis sized to free memory"


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
    P = problem.P
    chunk_size = problem_chunk(problem, P, chunk_size)
    batched = vmap(hvp(problem))
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)
    for start, stop, basis in unit_chunks(P, chunk_size, problem.dtype, problem.device):
        H[start:stop] = batched(basis)
    return H
