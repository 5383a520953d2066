"""Memory: free memory, the registry's check that a Hessian fits, and the chunked strategies' budgets."""

from __future__ import annotations

import contextlib
import contextvars
import numbers
import os
import resource
import sys
import weakref
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from ._problem import Problem, autograd_enabled

__all__ = [
    "POSITIVE_INTEGER_OPTIONS",
    "HEADROOM",
    "MIN_EXTRA_BYTES",
    "available_bytes",
    "check_fits",
    "check_positive",
    "reading_for_next_check",
    "direction_bytes",
    "check_directions",
    "DIRECTIONS_MARGIN",
    "choose_chunk",
    "problem_chunk",
    "unit_chunks",
]

#: options that mean the same to every strategy that takes them: checked by the registry
POSITIVE_INTEGER_OPTIONS = ("chunk_size", "memory_budget")
#: peak memory aimed at, as a multiple of the Hessian's own bytes
HEADROOM = 1.5
#: working memory always allowed beyond the Hessian, so that tiny Hessians are not computed
#: one direction at a time (it matters only where 0.5 x the Hessian is smaller than this)
MIN_EXTRA_BYTES = 16 * 2**20
#: share of the free memory the chunks may use; the rest is left to everything else
_FREE_SHARE = 0.8


def available_bytes(device: torch.device) -> int:
    """Memory that can still be allocated on ``device``.

    CUDA: free device memory plus what the caching allocator holds but does not use.
    CPU: the least of ``MemAvailable`` from ``/proc/meminfo`` (free physical pages where that
    file does not exist), what the container's cgroup still allows (``memory.max`` less
    ``memory.current``; cgroup v1's ``limit_in_bytes`` less ``usage_in_bytes``), and what the
    process's address-space limit (``RLIMIT_AS``, ``ulimit -v``) leaves above its current
    size: an allocation beyond any of them fails, whatever the others say.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    return min(_host_available(), _cgroup_available(), _address_space_available())


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_int(path: str) -> int | None:
    """The integer in a one-line file, or None where it is absent, unreadable or "max"."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


#: (limit, usage) files of the cgroup v2 and v1 memory controllers
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)
#: cgroup v1 writes "no limit" as a page-rounded 2^63 - 1
_NO_CGROUP_LIMIT = 1 << 60


def _cgroup_available() -> int:
    """What the container's memory limit still allows, or a huge number where none is set."""
    for limit_file, usage_file in _CGROUP_FILES:
        limit = _read_int(limit_file)
        if limit is None or limit >= _NO_CGROUP_LIMIT:
            continue
        usage = _read_int(usage_file) or 0
        return max(limit - usage, 0)
    return sys.maxsize


def _address_space_available() -> int:
    """What ``RLIMIT_AS`` leaves above the process's current virtual size, or a huge number."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    size = 0
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    size = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return max(soft - size, 0)


#: a reading of the free memory for the next check: [device, bytes], bytes None once used
_READING: contextvars.ContextVar[list | None] = contextvars.ContextVar("_READING", default=None)


@contextlib.contextmanager
def reading_for_next_check(device: torch.device, available: int | None = None) -> Iterator[int]:
    """Read the free memory of ``device`` once (or take ``available``, a reading just taken);
    within, the next check on that device (``check_fits``, ``check_directions``) uses this
    reading rather than its own, with nothing allocated between them: a dispatcher's check
    and that of the strategy it runs first; the registry's check of a strategy and the
    strategy's own of its directions. Every later check reads afresh."""
    device = torch.device(device)
    reading = [device, available_bytes(device) if available is None else available]
    token = _READING.set(reading)
    try:
        yield reading[1]
    finally:
        _READING.reset(token)


def _available(device: torch.device) -> int:
    reading = _READING.get()
    if reading is not None and reading[1] is not None and reading[0] == device:
        available, reading[1] = reading[1], None
        return available
    return available_bytes(device)


def check_fits(
    params: Mapping[str, Tensor],
    peak_ratio: float = 1.0,
    strategy: str = "",
    available: int | None = None,
) -> int:
    """Raise MemoryError where a strategy's predicted peak does not fit in the params' device;
    else return the bytes it compared against (for ``reading_for_next_check``).

    The peak is predicted as ``peak_ratio`` times the dense Hessian's own size (at least the
    Hessian itself), against ``available`` bytes (default: read now, or the reading of
    ``reading_for_next_check`` where one is pending). Called by the registry before any
    strategy allocates anything, so that an impossible request is answered at once rather
    than by the allocator half way, or by the host killing the process.
    """
    first = next(iter(params.values()))
    P = sum(t.numel() for t in params.values())
    hessian = P * P * first.element_size()
    needed = int(max(peak_ratio, 1.0) * hessian)
    if available is None:
        available = _available(first.device)
    if needed > available:
        what = (
            f"strategy {strategy!r} is predicted to peak at {needed / 2**30:,.1f} GiB "
            f"({max(peak_ratio, 1.0):.2g}x the {P:,} x {P:,} Hessian)"
            if needed > hessian
            else f"the {P:,} x {P:,} Hessian alone needs {needed / 2**30:,.1f} GiB"
        )
        raise MemoryError(
            f"{what}, but {available / 2**30:,.1f} GiB are available on {first.device}: "
            "choose fewer params (any subset of net.named_parameters()), a leaner strategy "
            "(auto picks one that fits) or a device with more memory"
        )
    return available


def direction_bytes(problem: Problem) -> int:
    """An upper estimate of the memory one more direction adds to a vmapped Hessian-vector product.

    Under ``vmap(jvp(grad(f)))`` only tangents carry the batch of directions; the primal
    forward and backward are computed once. Per direction the tangents are those of every
    tensor the backward pass keeps (counted here as the bytes autograd saves in one forward
    of the loss that depend on the chosen params: the activations of the whole batch from
    the first chosen layer on, and weights used by matmuls), twice: once
    for the forward tangents and once for the backward's own intermediates, which have the
    same shapes. On top come three parameter-sized vectors: the basis row, the tangent of the
    gradient (the Hessian row) and the per-tensor pieces it is concatenated from.

    Kept for the last few problems of the same shapes (``_DIRECTION_BYTES``): counting
    them is one forward, 0.23 ms of a direct ``vmap_vjp`` call's 3.1 ms at P = 49.
    """
    key = _direction_key(problem)
    known = _DIRECTION_BYTES.get(key)
    if known is not None and known[0]() is problem.module:
        return known[1]
    try:
        saved = _saved_bytes(problem, keep=False)
    except (TypeError, RuntimeError):
        # the forward differentiates itself (``autograd.grad`` in it) and needs what it saved
        saved = _saved_bytes(problem, keep=True)
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    value = 2 * saved + 3 * problem.P * itemsize
    if len(_DIRECTION_BYTES) >= _DIRECTION_BYTES_KEPT:
        _DIRECTION_BYTES.pop(next(iter(_DIRECTION_BYTES)))
    _DIRECTION_BYTES[key] = (weakref.ref(problem.module), value)
    return value


def _saved_bytes(problem: Problem, keep: bool) -> int:
    """The bytes autograd saves in one forward of the loss that the chosen params reach.
    Unless ``keep``, nothing saved is kept: the graph is never differentiated, and holding
    the activations made a first call's peak exceed a warm call's (the count is cached)."""
    leaves = [p.clone().requires_grad_(True) for p in problem.primals]
    saved = 0

    def pack(t: Tensor) -> Tensor | None:
        nonlocal saved
        if t.requires_grad:  # what no chosen param reaches carries no tangent
            saved += t.numel() * t.element_size()
        return t if keep else None

    with autograd_enabled(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        problem.loss(dict(zip(problem.names, leaves)))
    return saved


#: ``direction_bytes`` by what the activations' sizes depend on (``_direction_key``), with
#: a weak reference to the module (an id can be reused once the module is gone)
_DIRECTION_BYTES: dict[tuple, tuple[weakref.ref, int]] = {}
_DIRECTION_BYTES_KEPT = 16


def _direction_key(problem: Problem) -> tuple:
    """The module (by id), the chosen params' names and shapes, their dtype and device, the
    shapes and dtypes of the inputs and targets, the loss, and the ops the forward called."""
    inputs = tuple(
        (tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t)
        for t in tree_flatten(problem.inputs)[0]
    )
    return (
        id(problem.module),
        problem.names,
        tuple(problem.shapes),
        problem.dtype,
        problem.device,
        inputs,
        tuple(problem.targets.shape) if isinstance(problem.targets, Tensor) else None,
        id(problem.loss_fn),
        problem.ops,
    )


#: allowance over ``directions x direction_bytes`` for the unchunked vmapped strategies, on
#: top of a fixed slack: on the default and structured grids' nets (P = 49 to 13,633 where
#: they were measured, the reference runs of 8c0337e and ac5e301) their peaks were at most
#: 0.93 x the Hessian, 1.1 x P directions and 64 MiB (``vmap_jvp``, the LayerNorm MLP at
#: P = 5,057); 1.5 x refused ``vmap_vjp`` on the LayerNorm MLP at P = 13,633 (21.1 GiB
#: predicted, 19.0 available, 9.3 GiB measured before). ``autograd_functional`` (its legacy
#: vectorized Jacobians) passes its own: 1.84 x that sum with 1.1
DIRECTIONS_MARGIN = 1.1
_DIRECTIONS_SLACK = 64 * 2**20


def check_directions(
    problem: Problem, directions: int, strategy: str, margin: float = DIRECTIONS_MARGIN
) -> None:
    """Raise MemoryError where ``directions`` vmapped at once would not fit beside the Hessian.

    Each direction holds tangents of the activations autograd saves (``direction_bytes``),
    which do not scale with the Hessian: a CNN of P = 7,720 on 32 images of 28 x 28 holds
    megabytes of them per direction, and ``vmap_vjp`` there was killed by the host rather
    than refused by the registry's check, whose peaks were measured on MLPs. Called by the
    strategies that vmap over every row (or every row of a tensor) at once, before they
    allocate anything. Where torch.func runs inside the forward (a PINN's ``vmap(hessian)``
    in the inputs), the activations cannot be counted, and the check is the registry's.
    """
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    hessian = problem.P * problem.P * itemsize
    try:
        per_direction = direction_bytes(problem)
    except RuntimeError:  # torch.func in the forward refuses saved tensor hooks
        return
    needed = int(hessian + margin * directions * per_direction + _DIRECTIONS_SLACK)
    available = _available(problem.device)
    if needed > available:
        raise MemoryError(
            f"strategy {strategy!r} is predicted to peak at {needed / 2**30:,.1f} GiB (the "
            f"{problem.P:,} x {problem.P:,} Hessian and {directions:,} directions at once, "
            f"each with the tangents of the net's activations), but "
            f"{available / 2**30:,.1f} GiB are available on {problem.device}: choose fewer "
            "params, a chunked strategy (block_symmetric_chunked, vmap_jvp_chunked, kron; "
            "auto picks one that fits) or a device with more memory"
        )


def choose_chunk(
    directions: int,
    per_direction: int,
    hessian_bytes: int,
    available: int,
    min_extra: int = MIN_EXTRA_BYTES,
) -> int:
    """How many directions to push through at once, between 1 and ``directions``.

    The chunks may use ``(HEADROOM - 1) x hessian_bytes`` beyond the preallocated Hessian
    (at least ``min_extra``), and never more than ``_FREE_SHARE`` of what is left of
    ``available`` once the Hessian itself is allocated.

    Raises:
        ValueError: a count or byte size is not positive.
    """
    for name, value in (
        ("directions", directions),
        ("per_direction", per_direction),
        ("hessian_bytes", hessian_bytes),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    extra = max((HEADROOM - 1) * hessian_bytes, min_extra)
    extra = min(extra, _FREE_SHARE * max(available - hessian_bytes, 0))
    return int(max(1, min(directions, extra // per_direction)))


def check_positive(**options: int | None) -> None:
    """Raise ValueError naming each option given (not None) that is not a positive integer.

    Any integer type passes (``numpy.int64`` too); ``bool``, floats and strings do not.
    ``Strategy.compute`` applies it to ``POSITIVE_INTEGER_OPTIONS`` of every strategy that
    declares them.
    """
    for name, value in options.items():
        if value is None:
            continue
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def problem_chunk(
    problem: Problem,
    directions: int,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    min_extra: int = MIN_EXTRA_BYTES,
) -> int:
    """``choose_chunk`` for ``problem``'s Hessian on its device, ``directions`` rows to compute;
    or ``chunk_size`` itself where the caller gives one.

    Args:
        memory_budget: bytes the computation may use, Hessian included, in place of the
            memory available on the device now.
        min_extra: working memory allowed beyond the Hessian however small it is (within
            the free memory), as ``choose_chunk``.

    Raises:
        ValueError: ``chunk_size`` or ``memory_budget`` is given and not a positive integer,
            or ``memory_budget`` is below the Hessian's own size.
    """
    check_positive(chunk_size=chunk_size, memory_budget=memory_budget)
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    hessian_bytes = problem.P * problem.P * itemsize
    if memory_budget is not None and memory_budget < hessian_bytes:
        raise ValueError(
            f"memory_budget {memory_budget:,} B is below the Hessian's own {hessian_bytes:,} B"
        )
    if chunk_size is not None:
        return chunk_size
    available = available_bytes(problem.device) if memory_budget is None else memory_budget
    return choose_chunk(directions, direction_bytes(problem), hessian_bytes, available, min_extra)


def unit_chunks(
    n: int, chunk_size: int, dtype: torch.dtype, device: torch.device
) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, basis)`` over the rows of the ``n x n`` identity, ``chunk_size`` at a time."""
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        basis = torch.zeros(stop - start, n, dtype=dtype, device=device)
        basis[:, start:stop].fill_diagonal_(1)
        yield start, stop, basis
