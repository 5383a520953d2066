"""The benchmark: time, peak memory and accuracy of every strategy on every case of the grid."""

from __future__ import annotations

import time

import pytest
import torch

import strategies
from bench import measure

#: rounds are chosen so that the timed rounds of one cell take about this long
TARGET_SECONDS = 2.0
MAX_ROUNDS = 10


def _rounds(seconds: float) -> tuple[int, int]:
    """(rounds, warmup_rounds) for a call of about ``seconds``.

    The first call of a cell (separately timed, and its result discarded) already warms up;
    calls under a second get one more warm-up round inside pedantic as well.
    """
    rounds = int(min(MAX_ROUNDS, max(1, TARGET_SECONDS // max(seconds, 1e-9))))
    return rounds, 1 if seconds < 1.0 else 0


def test_hessian(benchmark, hessbench, case: str, strategy: str) -> None:
    grid_case = hessbench.cases[case]
    chosen = strategies.get(strategy)
    if grid_case.device == "cuda" and not torch.cuda.is_available():
        hessbench.record(grid_case, strategy, "skipped", "CUDA is not available on this machine")
        pytest.skip("CUDA is not available on this machine")
    data = hessbench.case_data(grid_case)
    ok, reason = chosen.supports(data.net, data.loss_fn)
    if not ok:
        hessbench.record(grid_case, strategy, "unsupported", reason)
        pytest.skip(f"unsupported: {reason}")

    key = (strategy, grid_case.family)
    predicted_s = measure.predict_seconds(hessbench.seconds_history.get(key, []), grid_case.P)
    if predicted_s is not None and predicted_s > hessbench.time_budget:
        reason = (
            f"predicted {predicted_s:.1f} s per call (log-log in P from smaller cases) "
            f"> --time-budget {hessbench.time_budget:g} s"
        )
        hessbench.record(grid_case, strategy, "over_budget", reason)
        pytest.skip(f"over_budget: {reason}")
    predicted_b = measure.predict_bytes(hessbench.bytes_history.get(key, []), grid_case.P)
    available = measure.available_bytes(grid_case.device)
    allowed = hessbench.memory_fraction * available
    if predicted_b is not None and predicted_b > allowed:
        reason = (
            f"predicted peak {predicted_b / 2**30:.2f} GiB > {hessbench.memory_fraction:g} x "
            f"available {available / 2**30:.2f} GiB (--memory-fraction)"
        )
        hessbench.record(grid_case, strategy, "over_memory", reason)
        pytest.skip(f"over_memory: {reason}")

    hessbench.baselines(data)
    params = dict(data.net.named_parameters())
    device = torch.device(grid_case.device)

    def call() -> torch.Tensor:
        H = chosen.compute(data.net, params, data.batch, data.loss_fn)
        measure.sync(device)
        return H

    benchmark.group = case
    try:
        start = time.perf_counter()
        call()
        first_call_s = time.perf_counter() - start
        # The profiler's records of a call with millions of small ops outgrow host memory:
        # extrapolate their number (log-log in P, like time) and skip such a memory pass.
        events_expected = measure.extrapolate(hessbench.events_history.get(key, []), grid_case.P)
        peak = peak_note = None
        warm_s = first_call_s
        if chosen.peer:
            # another framework's allocations never pass through torch's allocator or profiler
            peak_note = "not measured: the peer allocates outside torch's allocator"
        elif device.type == "cuda" or (events_expected or 0) <= measure.MAX_PROFILED_EVENTS:
            start = time.perf_counter()
            _, peak, events = measure.peak_and_events(call, device)
            # Both calls overestimate a warm call (first-call costs; profiler overhead).
            warm_s = min(first_call_s, time.perf_counter() - start)
            hessbench.events_history.setdefault(key, []).append((grid_case.P, events))
        else:
            peak_note = (
                f"memory pass skipped: about {events_expected:.3g} profiler events predicted "
                f"> {measure.MAX_PROFILED_EVENTS:.3g}"
            )
        rounds, warmup = _rounds(warm_s)
        H = benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    except KeyboardInterrupt:
        hessbench.record(grid_case, strategy, "skipped", "interrupted (KeyboardInterrupt)")
        raise
    except Exception as exc:
        status = "oom" if measure.is_oom(exc) else "error"
        hessbench.record(grid_case, strategy, status, f"{type(exc).__name__}: {exc}")
        if status == "oom":
            pytest.skip(f"oom: {type(exc).__name__}: {exc}")
        raise

    max_abs, max_rel = measure.errors(H, data.reference)
    del H
    tolerance = measure.TOLERANCES[getattr(torch, grid_case.dtype)]
    accurate = max_rel <= tolerance
    seconds = benchmark.stats.stats.min
    benchmark.extra_info.update(
        **grid_case.fields(),
        strategy=strategy,
        status="ok" if accurate else "inaccurate",
        P=grid_case.P,
        hessian_bytes=grid_case.hessian_bytes,
        peak_bytes=peak,
        peak_note=peak_note,
        max_abs_err=max_abs,
        max_rel_err=max_rel,
        accurate=accurate,
        tolerance=tolerance,
        grad_s=data.grad_s,
        gemm_s=data.gemm_s,
        cost_vs_grad=seconds / (grid_case.P * data.grad_s),
        vs_gemm=seconds / data.gemm_s,
        first_call_s=first_call_s if chosen.compiles else None,
        peer=chosen.peer,
        threads=torch.get_num_threads(),
    )
    hessbench.timed[(case, strategy)] = (seconds, peak, accurate, chosen.peer)
    hessbench.seconds_history.setdefault(key, []).append((grid_case.P, seconds))
    if peak is not None:
        hessbench.bytes_history.setdefault(key, []).append((grid_case.P, peak))
    assert accurate, (
        f"{strategy} on {case}: max_rel_err {max_rel:.3g} > tolerance {tolerance:g} "
        f"(max_abs_err {max_abs:.3g}) against the float64 reference"
    )
