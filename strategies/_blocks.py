"""Flat vectors and blocks: flatten/unflatten, the Hessian's parameter blocks, the mirrored half.

Pure tensor helpers, no knowledge of nets or losses. ``to_blocks``/``from_blocks`` are public
as ``strategies.to_blocks``/``strategies.from_blocks``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "flatten",
    "unflatten",
    "flat_or_zeros",
    "to_blocks",
    "from_blocks",
    "mirror_upper",
]


def flatten(tensors: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """Concatenate tensors into one vector, each flattened row-major."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, shapes: tuple[torch.Size, ...]) -> tuple[Tensor, ...]:
    """Split a vector (or the last dimension of a batch of them) back into shaped tensors."""
    sizes = [s.numel() for s in shapes]
    parts = torch.split(flat, sizes, dim=-1)
    return tuple(p.reshape(*flat.shape[:-1], *s) for p, s in zip(parts, shapes))


def flat_or_zeros(grad: Tensor | None, like: Tensor) -> Tensor:
    """``grad`` as a vector; None (``allow_unused``: the output does not depend on ``like``) is 0."""
    if grad is None:
        return torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    return grad.reshape(-1)


def to_blocks(H: Tensor, params: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a dense ``P x P`` Hessian into blocks shaped like torch.func.hessian's output.

    ``blocks[a][b]`` has shape ``params[a].shape + params[b].shape``.
    """
    names = list(params)
    sizes = [params[n].numel() for n in names]
    if H.shape != (sum(sizes), sum(sizes)):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(sum(sizes), sum(sizes))}")
    rows = torch.split(H, sizes, dim=0)
    blocks: dict[str, dict[str, Tensor]] = {}
    for a, row in zip(names, rows):
        cols = torch.split(row, sizes, dim=1)
        blocks[a] = {b: c.reshape(*params[a].shape, *params[b].shape) for b, c in zip(names, cols)}
    return blocks


def from_blocks(blocks: Mapping[str, Mapping[str, Tensor]], params: Mapping[str, Tensor]) -> Tensor:
    """Assemble blocks shaped like torch.func.hessian's output into a dense ``P x P`` matrix."""
    names = list(params)
    sizes = [params[n].numel() for n in names]
    return torch.cat(
        [
            torch.cat([blocks[a][b].reshape(na, nb) for b, nb in zip(names, sizes)], dim=1)
            for a, na in zip(names, sizes)
        ],
        dim=0,
    )


def mirror_upper(H: Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Tensor:
    """Fill the blocks below the block diagonal from those above it, in place."""
    for k in range(len(sizes)):
        rk = slice(offsets[k], offsets[k] + sizes[k])
        for m in range(k + 1, len(sizes)):
            rm = slice(offsets[m], offsets[m] + sizes[m])
            H[rm, rk] = H[rk, rm].T
    return H
