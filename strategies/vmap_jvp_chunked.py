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

from ._contract import prepare
from ._memory import problem_chunk, unit_chunks
from ._problem import LossFn
from .vmap_jvp import hvp

__all__ = ["NAME", "FAMILY", "MULTI_INPUT", "DESCRIPTION", "compute"]

NAME = "vmap_jvp_chunked"
FAMILY = "forward-over-reverse"
MULTI_INPUT = True
DESCRIPTION = "vmap of jvp(grad(f)) over chunks of the identity basis sized to free memory"


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
    P = problem.P
    chunk_size = problem_chunk(problem, P, chunk_size, memory_budget)
    batched = vmap(hvp(problem))
    H = torch.empty(P, P, dtype=problem.dtype, device=problem.device)
    for start, stop, basis in unit_chunks(P, chunk_size, problem.dtype, problem.device):
        H[start:stop] = batched(basis)
    return H
