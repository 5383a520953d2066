"""Measurement helpers: timing, peak memory, accuracy, baselines, budgets, the machine's label."""

from __future__ import annotations

import math
import os
import platform
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from bench.reference import ProbeReference
from strategies import available_bytes, mse_loss

__all__ = [
    "TOLERANCES",
    "sync",
    "warm_up",
    "min_seconds",
    "peak_bytes",
    "peak_and_events",
    "MAX_PROFILED_EVENTS",
    "is_oom",
    "errors",
    "grad_seconds",
    "grad_events",
    "gemm_seconds",
    "predict_seconds",
    "extrapolate",
    "predict_bytes",
    "available_bytes",
    "cpu_model",
    "machine_label",
]

#: max_rel_err a correct strategy stays under, per dtype: float32 rounding over a few thousand
#: terms reaches ~1e-6 relative to the largest entry; a wrong block is off by O(1).
TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-9}


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a timer around a call sees all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_WARM: set[torch.device] = set()


def warm_up(device: torch.device | str) -> None:
    """Pay this process's one-time costs on ``device`` before anything is timed there.

    The first ``torch.func`` transform of a process sets torch.func up (about 1.5 s on the
    2-core machine, against milliseconds for the next), and the first call on a GPU creates
    its context. Left in the first cell of a run (in the worker and here alike), they made a
    millisecond strategy look too slow to repeat and timed its one round at a second. Runs
    once per process and device.
    """
    device = torch.device(device)
    if device in _WARM:
        return
    x = torch.ones(2, device=device)
    torch.func.hessian(lambda v: (v**3).sum())(x)
    sync(device)
    _WARM.add(device)


def min_seconds(fn: Callable[[], Any], device: torch.device | str, repeats: int = 5) -> float:
    """The minimum wall time of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


#: most profiler events a CPU memory pass may record: each costs the profiler about 2 KB of
#: host memory, and a row-by-row loop at P ~ 13,000 records millions of them (enough to be
#: killed for memory); above this the pass is skipped and peak_bytes recorded as null
MAX_PROFILED_EVENTS = 1_500_000


def peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int]:
    """Call ``fn`` once; return its result and the allocator's peak above what was allocated before.

    CUDA: the caching allocator's own counters (``reset_peak_memory_stats`` and
    ``max_memory_allocated``). CPU: the allocation and free records of ``torch.profiler``
    with ``profile_memory=True``, summed in time order; the peak of that running sum is the
    most the call held at once beyond what existed before it (its result included).
    """
    result, peak, _ = peak_and_events(fn, device)
    return result, peak


def peak_and_events(fn: Callable[[], Any], device: torch.device | str) -> tuple[Any, int, int]:
    """``peak_bytes`` and the number of profiler events it recorded (0 on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        sync(device)
        return result, max(0, torch.cuda.max_memory_allocated(device) - before), 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.profiler.kineto_results.events()
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in records:
        held += nbytes
        peak = max(peak, held)
    return result, peak, len(events)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says the device or the host ran out of memory."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def errors(H: Tensor, reference: Tensor | ProbeReference, rows: int = 1024) -> tuple[float, float]:
    """``(max_abs_err, max_rel_err)`` of ``H`` against a float64 reference.

    ``max_rel_err`` is the max absolute error over the max absolute entry of the reference.
    Compared ``rows`` rows at a time so that a float64 copy of a large ``H`` is never made.
    Against a ``ProbeReference`` both are those of ``H @ vectors`` against its products.
    """
    if isinstance(reference, ProbeReference):
        vectors, expected = reference.vectors, reference.products
        if H.shape != (vectors.shape[0],) * 2:
            raise ValueError(f"H has shape {tuple(H.shape)}, the reference P = {vectors.shape[0]}")
        products = torch.cat(
            [
                H[start : start + rows].to(device=vectors.device, dtype=torch.float64) @ vectors
                for start in range(0, H.shape[0], rows)
            ]
        )
        H, reference, rows = products, expected, products.shape[0]
    if H.shape != reference.shape:
        raise ValueError(f"H has shape {tuple(H.shape)}, the reference {tuple(reference.shape)}")
    max_abs = 0.0
    for start in range(0, H.shape[0], rows):
        block = H[start : start + rows].to(device=reference.device, dtype=torch.float64)
        max_abs = max(max_abs, (block - reference[start : start + rows]).abs().max().item())
    scale = reference.abs().max().item()
    return max_abs, (max_abs / scale if scale > 0 else max_abs)


def _gradient(
    net: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    params: Sequence[Tensor] | None,
) -> Callable[[], tuple[Tensor, ...]]:
    """One gradient of the loss w.r.t. ``params`` (default: all of ``net``'s parameters that
    require grad), as a call."""
    inputs, targets = batch
    loss_fn = mse_loss if loss_fn is None else loss_fn
    if params is None:
        params = [p for p in net.parameters() if p.requires_grad]

    def gradient() -> tuple[Tensor, ...]:
        with torch.enable_grad():
            # allow_unused: a parameter the loss does not use (a PINN's output bias) has none
            return torch.autograd.grad(loss_fn(net(inputs), targets), params, allow_unused=True)

    return gradient


def grad_seconds(
    net: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    repeats: int = 5,
    params: Sequence[Tensor] | None = None,
) -> float:
    """Minimum time of one gradient of the loss w.r.t. ``params`` (default: all of ``net``'s
    parameters that require grad)."""
    gradient = _gradient(net, batch, loss_fn, params)
    return min_seconds(gradient, batch[0].device, repeats)


def grad_events(
    net: nn.Module,
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    params: Sequence[Tensor] | None = None,
) -> int:
    """The profiler events of one gradient of the loss (``peak_and_events``; 0 on CUDA): what
    one Hessian row of a reverse-mode loop records, give or take a small factor."""
    gradient = _gradient(net, batch, loss_fn, params)
    gradient()  # first-call allocations and lazy initialisation stay out of the count
    return peak_and_events(gradient, batch[0].device)[2]


def gemm_seconds(
    P: int, B: int, dtype: torch.dtype, device: torch.device | str, repeats: int = 5
) -> float:
    """Minimum time of a ``(P x B) @ (B x P)`` product: about the least work of a rank-B Hessian.

    The product allocates its result, as ``left @ right`` does: every strategy returns a new
    ``P x P`` matrix, so the floor includes getting and first touching that memory (on CPU
    about as long again as the arithmetic at these sizes). This is how docs/DESIGN.md's matmul
    column was measured (0.05 s at P = 4,801); writing into a preallocated ``out`` takes less
    than half of that and would be a floor no strategy returning a fresh matrix can reach.
    """
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(P, B, generator=generator, dtype=dtype).to(device)
    right = torch.randn(B, P, generator=generator, dtype=dtype).to(device)
    return min_seconds(lambda: left @ right, device, repeats)


def extrapolate(history: list[tuple[int, float]], P: int) -> float | None:
    """A quantity at ``P``, extrapolated log-log from its values at smaller P.

    ``history`` holds ``(P, value)`` measured for the same strategy in the same case family.
    The line through the two largest smaller P's gives the exponent (at least 1, as no
    strategy beats reading its inputs); with one point the exponent is taken as 2 (a Hessian
    has P^2 entries). None without any smaller point.
    """
    smaller = sorted((p, v) for p, v in history if p < P and v > 0)
    if not smaller:
        return None
    p1, v1 = smaller[-1]
    exponent = 2.0
    if len(smaller) >= 2:
        p0, v0 = smaller[-2]
        if p0 != p1:
            exponent = max(1.0, math.log(v1 / v0) / math.log(p1 / p0))
    return v1 * (P / p1) ** exponent


def predict_seconds(history: list[tuple[int, float]], P: int) -> float | None:
    """A strategy's time per call at ``P`` (``extrapolate`` of its ``(P, seconds)``)."""
    return extrapolate(history, P)


def predict_bytes(history: list[tuple[int, int]], P: int) -> int | None:
    """A strategy's peak memory at ``P`` (``extrapolate`` of its ``(P, peak_bytes)``).

    Fixed per-direction costs make the peak grow slower than P^2 for most strategies, so a
    constant peak/Hessian factor would overestimate and skip strategies that fit.
    """
    predicted = extrapolate(history, P)
    return None if predicted is None else int(predicted)


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label() -> str:
    """How runs name this machine: ``host / GPU`` with CUDA, else ``host / CPU / N cores``.

    The report keeps machines apart by this label, so a benchmark and an audit made on one
    machine carry the same one.
    """
    host = socket.gethostname()
    if torch.cuda.is_available():
        return f"{host} / {torch.cuda.get_device_name(0)}"
    return f"{host} / {cpu_model()} / {os.cpu_count()} cores"
