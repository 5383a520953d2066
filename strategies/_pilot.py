"""Measure mode's pilots: a strategy's time on the real problem from a slice of its work.

A strategy whose work is row by row (the loops, the vmapped products over a basis, the
block-wise and chunked ones) is written here as a ``Work``: what it does once per Hessian
(``setup``: allocating ``H`` and mirroring its blocks, the gradient with its graph, the
linearisation of ``vjp``) and its passes of rows (one per parameter tensor for the
block-wise strategies, one for the others), each a function computing the first ``k`` rows
of that pass the way the strategy computes them (the same helpers: ``vmap_jvp.hvp``,
``block_symmetric.tail_hvp``, the chunk size of ``_memory.problem_chunk``;
``tests/test_auto.py`` checks the rows against the strategy's Hessian). ``time_slices``
times the setup and, per pass, two slices (``slice_rows``: an eighth of its rows, at least
``MIN_SLICE``, and a quarter of that); ``extrapolate`` fits ``a + b k`` to them (``a``:
what a pass costs whatever its rows, e.g. a vmap's trace of the net; ``b``: one row) and
sums the setup and each pass at its full rows. A pass of at most ``WHOLE_PASS`` (64) rows
is timed whole; where every pass is that small (P = 49), the pilot is the whole Hessian.

Strategies whose work is one call of torch's own transform over the whole basis
(``torch_func``, ``functorch``, ``jacfwd_jacrev``, ``autograd_functional``) or is not row by
row (``kron``: its Kronecker directions are shared over positions and factorised; its
module exposes its workload, not a slice of its computation) have no ``Work`` here: their
pilot computes the whole Hessian.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from ._blocks import flat_or_zeros, mirror_upper
from ._hazards import DOUBLE_BACKWARD, refuse_hazard
from ._memory import problem_chunk
from ._problem import Problem

__all__ = [
    "SLICE_SHARE",
    "MIN_SLICE",
    "WHOLE_PASS",
    "slice_rows",
    "SLICED",
    "Work",
    "Pass",
    "work",
    "time_slices",
    "extrapolate",
]

#: the larger slice of a pass: this share of its rows, at least ``MIN_SLICE`` rows; the smaller
#: slice is a quarter of it; a pass of at most ``WHOLE_PASS`` rows is timed whole (its two
#: slices would cost about as much: a vmap's trace of the net is paid per call)
SLICE_SHARE = 1 / 8
MIN_SLICE = 16
WHOLE_PASS = 4 * MIN_SLICE


def slice_rows(rows: int) -> tuple[int, ...]:
    """The sizes of the slices timed of a pass of ``rows`` rows: two, or the whole pass."""
    if rows <= WHOLE_PASS:
        return (rows,)
    large = max(MIN_SLICE, math.ceil(rows * SLICE_SHARE))
    return (math.ceil(large / 4), large)


@dataclass
class Pass:
    """``rows`` rows computed together; ``run(state, k)`` computes the first ``k`` of them:
    ``H[row : row + k, column:]``."""

    label: str
    rows: int
    run: Callable[[Any, int], Tensor]
    row: int = 0
    column: int = 0


@dataclass
class Work:
    """A strategy's work on one problem: ``setup()`` once, then its passes of rows."""

    setup: Callable[[], Any]
    passes: list[Pass] = field(default_factory=list)


def _basis(n: int, k: int, problem: Problem) -> Tensor:
    """The first ``k`` rows of the ``n x n`` identity."""
    basis = torch.zeros(k, n, dtype=problem.dtype, device=problem.device)
    basis.fill_diagonal_(1)
    return basis


def _chunked(f: Callable[[Tensor], Tensor], basis: Tensor, chunk: int | None) -> Tensor:
    if chunk is None or chunk >= len(basis):
        return f(basis)
    return torch.cat([f(basis[i : i + chunk]) for i in range(0, len(basis), chunk)])


def _hessian(problem: Problem, allocate: Callable[..., Tensor], mirrored: bool) -> None:
    """What the strategy does to ``H`` besides its rows: allocate it, mirror its upper blocks."""
    H = allocate(problem.P, problem.P, dtype=problem.dtype, device=problem.device)
    if mirrored:
        mirror_upper(H, problem.offsets, problem.sizes)


def _graph(problem: Problem) -> tuple[list[Tensor], Tensor | tuple[Tensor, ...]]:
    """The loops' setup: the gradient with its graph (``full_autograd``, ``symmetric_half``)."""
    leaves = [p.clone().requires_grad_(True) for p in problem.primals]
    with torch.enable_grad():
        loss = problem.loss(dict(zip(problem.names, leaves)))
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    return leaves, grads


def _loop_rows(leaves: list[Tensor], g: Tensor, rows: range, tail: list[Tensor]) -> Tensor:
    out = []
    with torch.enable_grad():
        for i in rows:
            if not g[i].requires_grad:
                out.append(g.new_zeros(sum(t.numel() for t in tail)))
                continue
            row = torch.autograd.grad(g[i], tail, retain_graph=True, allow_unused=True)
            out.append(torch.cat([flat_or_zeros(r, p) for r, p in zip(row, tail)]))
    return torch.stack(out) if out else g.new_zeros(0, sum(t.numel() for t in tail))


def _block_pass(problem: Problem, j: int, run: Callable[[Any, int], Tensor]) -> Pass:
    """The rows of tensor ``j`` against the columns of tensors ``j, j + 1, ...``."""
    offset = problem.offsets[j]
    return Pass(problem.names[j], problem.sizes[j], run, row=offset, column=offset)


def _full_autograd(problem: Problem, memory_budget: int | None) -> Work:
    refuse_hazard(problem, DOUBLE_BACKWARD, "full_autograd")

    def setup() -> Any:
        _hessian(problem, torch.zeros, mirrored=False)
        leaves, grads = _graph(problem)
        return leaves, torch.cat([flat_or_zeros(gi, p) for gi, p in zip(grads, leaves)])

    def run(state: Any, k: int) -> Tensor:
        leaves, g = state
        return _loop_rows(leaves, g, range(k), leaves)

    return Work(setup, [Pass("rows", problem.P, run)])


def _symmetric_half(problem: Problem, memory_budget: int | None) -> Work:
    refuse_hazard(problem, DOUBLE_BACKWARD, "symmetric_half")

    def setup() -> Any:
        _hessian(problem, torch.zeros, mirrored=True)
        return _graph(problem)

    def rows_of(j: int) -> Callable[[Any, int], Tensor]:
        def run(state: Any, k: int) -> Tensor:
            leaves, grads = state
            g = flat_or_zeros(grads[j], leaves[j])
            return _loop_rows(leaves, g, range(k), leaves[j:])

        return run

    return Work(
        setup,
        [_block_pass(problem, j, rows_of(j)) for j in range(len(problem.names))],
    )


def _vmap_vjp(problem: Problem, memory_budget: int | None) -> Work:
    refuse_hazard(problem, DOUBLE_BACKWARD, "vmap_vjp")

    def setup() -> Any:
        return vjp(grad(problem.flat_loss), problem.flat_primal())[1]

    def run(vjp_fn: Any, k: int) -> Tensor:
        return vmap(vjp_fn)(_basis(problem.P, k, problem))[0]

    return Work(setup, [Pass("rows", problem.P, run)])


def _vmap_jvp(chunked: bool) -> Callable[[Problem, int | None], Work]:
    def build(problem: Problem, memory_budget: int | None) -> Work:
        from .vmap_jvp import hvp

        chunk = problem_chunk(problem, problem.P, None, memory_budget) if chunked else None

        def run(state: Any, k: int) -> Tensor:
            return _chunked(vmap(hvp(problem)), _basis(problem.P, k, problem), chunk)

        return Work(lambda: None, [Pass("rows", problem.P, run)])

    return build


def _block_symmetric(chunked: bool) -> Callable[[Problem, int | None], Work]:
    def build(problem: Problem, memory_budget: int | None) -> Work:
        from .block_symmetric import tail_hvp

        chunk = problem_chunk(problem, problem.P, None, memory_budget) if chunked else None

        def rows_of(j: int) -> Callable[[Any, int], Tensor]:
            def run(state: Any, k: int) -> Tensor:
                batched = vmap(tail_hvp(problem, j))
                return _chunked(batched, _basis(problem.sizes[j], k, problem), chunk)

            return run

        passes = [_block_pass(problem, j, rows_of(j)) for j in range(len(problem.names))]
        return Work(lambda: _hessian(problem, torch.empty, mirrored=True), passes)

    return build


#: strategy name -> its ``Work`` on a problem (given the memory budget its chunks fit)
SLICED: dict[str, Callable[[Problem, int | None], Work]] = {
    "full_autograd": _full_autograd,
    "symmetric_half": _symmetric_half,
    "vmap_vjp": _vmap_vjp,
    "vmap_jvp": _vmap_jvp(chunked=False),
    "vmap_jvp_chunked": _vmap_jvp(chunked=True),
    "block_symmetric": _block_symmetric(chunked=False),
    "block_symmetric_chunked": _block_symmetric(chunked=True),
}


def work(name: str, problem: Problem, memory_budget: int | None = None) -> Work | None:
    """``name``'s work on ``problem`` as slices, or None where its pilot is the whole Hessian:
    a strategy not in ``SLICED``, or one none of whose passes has more than ``WHOLE_PASS``
    rows (its slices would be all its rows; the whole Hessian, kept, is then worth more)."""
    build = SLICED.get(name)
    w = None if build is None else build(problem, memory_budget)
    if w is None or all(p.rows <= WHOLE_PASS for p in w.passes):
        return None
    return w


def _timed(f: Callable[[], Any], synchronize: Callable[[], None]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = f()
    synchronize()
    return time.perf_counter() - start, value


def time_slices(w: Work, problem: Problem, best: dict[str, float]) -> None:
    """One round of ``w``'s pilot: time its setup and each pass's slices, keeping in ``best``
    the least time of each timing over rounds (keys ``setup`` and ``<pass>/<k>``)."""
    synchronize = (
        (lambda: torch.cuda.synchronize(problem.device))
        if problem.device.type == "cuda"
        else (lambda: None)
    )

    def keep(key: str, seconds: float) -> None:
        best[key] = min(best.get(key, math.inf), seconds)

    seconds, state = _timed(w.setup, synchronize)
    keep("setup", seconds)
    for j, p in enumerate(w.passes):
        for k in slice_rows(p.rows):
            seconds, _ = _timed(functools.partial(p.run, state, k), synchronize)
            keep(f"{j}/{k}", seconds)


def extrapolate(w: Work, best: dict[str, float]) -> tuple[float, list[dict[str, Any]]]:
    """The whole Hessian's predicted time from the slices' least times, and per pass how."""
    total = best["setup"]
    record = [{"pass": "setup", "rows": 0, "timed_rows": 0, "seconds": best["setup"]}]
    for j, p in enumerate(w.passes):
        sizes = slice_rows(p.rows)
        if len(sizes) == 1:
            seconds = best[f"{j}/{p.rows}"]
            timed = p.rows
        else:
            (k1, k2) = sizes
            t1, t2 = best[f"{j}/{k1}"], best[f"{j}/{k2}"]
            per_row = max(t2 - t1, 0.0) / (k2 - k1)
            fixed = max(t1 - per_row * k1, 0.0)
            # noise can put the larger slice below the smaller: never below what was timed
            seconds = max(fixed + per_row * p.rows, t2)
            timed = k1 + k2
        total += seconds
        record.append({"pass": p.label, "rows": p.rows, "timed_rows": timed, "seconds": seconds})
    return total, record
