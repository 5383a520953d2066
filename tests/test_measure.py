"""Measurement helpers of the benchmark: peak memory, OOM detection, errors, predictions, reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import strategies
from bench import measure
from bench.problems.grid import Case
from bench.problems.models import make_problem
from bench.reference import batched_loop_hessian, loop_hessian
from bench.run.cell import CaseData, hessian_call
from bench.run.worker import Request, Worker

MiB = 2**20


def _devices() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
    return ["cpu", pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", _devices())
def test_peak_bytes_of_a_kept_tensor_is_its_size(device):
    size = 4 * MiB

    def allocate() -> torch.Tensor:
        return torch.ones(size // 4, dtype=torch.float32, device=device)

    result, peak = measure.peak_bytes(allocate, device)
    assert result.numel() * 4 == size
    assert size <= peak <= size + 64 * 1024


@pytest.mark.parametrize("device", _devices())
def test_peak_bytes_counts_a_freed_temporary(device):
    def allocate() -> torch.Tensor:
        temporary = torch.ones(4 * MiB // 4, device=device)
        kept = torch.ones(MiB // 4, device=device)
        del temporary
        return kept

    _, peak = measure.peak_bytes(allocate, device)
    assert 5 * MiB <= peak <= 5 * MiB + 64 * 1024


@pytest.mark.parametrize("device", _devices())
def test_peak_bytes_ignores_what_existed_before(device):
    existing = torch.ones(8 * MiB // 4, device=device)
    _, peak = measure.peak_bytes(lambda: existing.sum(), device)
    assert peak < 64 * 1024


@pytest.mark.parametrize(
    "exc, expected",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), True),
        (MemoryError(), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: out of memory"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_oom(exc, expected):
    assert measure.is_oom(exc) is expected


def test_errors_are_relative_to_the_largest_reference_entry():
    reference = torch.tensor([[4.0, 1.0], [1.0, -8.0]], dtype=torch.float64)
    H = reference.float().clone()
    H[0, 1] += 0.5
    max_abs, max_rel = measure.errors(H, reference, rows=1)
    assert max_abs == pytest.approx(0.5)
    assert max_rel == pytest.approx(0.5 / 8)
    with pytest.raises(ValueError, match="shape"):
        measure.errors(H[:1], reference)


def test_tolerances_separate_rounding_from_a_wrong_entry():
    assert measure.TOLERANCES[torch.float64] < measure.TOLERANCES[torch.float32] < 1e-3


def test_predict_seconds_extrapolates_log_log():
    cubic = [(100, 1e-3), (200, 8e-3)]
    assert measure.predict_seconds(cubic, 400) == pytest.approx(64e-3)
    assert measure.predict_seconds([(100, 1.0)], 300) == pytest.approx(9.0)
    assert measure.predict_seconds([], 300) is None
    assert measure.predict_seconds([(500, 1.0)], 300) is None


def test_predict_bytes_extrapolates_log_log():
    grows = [(100, 1000 * 100**1.5), (200, 1000 * 200**1.5)]
    assert measure.predict_bytes(grows, 800) == pytest.approx(1000 * 800**1.5, abs=1)
    # one point: grows like the Hessian; never slower than linearly
    assert measure.predict_bytes([(100, 4000)], 400) == 4000 * 16
    assert measure.predict_bytes([(100, 4000), (200, 4000)], 400) == 8000
    assert measure.predict_bytes([], 400) is None
    assert measure.predict_bytes([(500, 10)], 400) is None


def test_available_bytes_is_positive():
    assert measure.available_bytes("cpu") > 0


def test_min_seconds_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        measure.min_seconds(lambda: None, "cpu", repeats=0)


@pytest.mark.parametrize(
    "case",
    [
        Case(3, 4, 2, 3, "gelu", "ce", 6, "float32", "cpu"),
        Case(3, 4, 1, 2, "tanh", "mse", 5, "float64", "cpu"),
    ],
    ids=lambda c: c.id,
)
def test_batched_reference_equals_the_loop(case):
    net, batch, loss_fn = make_problem(case)
    names = [n for n, _ in net.named_parameters()]
    loop = loop_hessian(net, names, batch, loss_fn)
    batched = batched_loop_hessian(net, names, batch, loss_fn, chunk=5)
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=1e-12)


def test_batched_reference_rejects_a_bad_chunk():
    net, batch, _ = make_problem(Case(3, 4, 1, 1, "tanh", "mse", 5, "float32", "cpu"))
    with pytest.raises(ValueError, match="chunk"):
        batched_loop_hessian(net, ["0.weight"], batch, F.mse_loss, chunk=0)


@pytest.fixture(scope="module")
def worker():
    started = Worker(threads=torch.get_num_threads(), timeout_s=120)
    yield started
    started.close()


@pytest.mark.parametrize("strategy", ["full_autograd", "vmap_jvp", "kron"])
def test_the_workers_memory_pass_measures_what_this_process_measures(worker, strategy):
    """The benchmark's memory pass runs in the worker, as the first call there: its peak is
    the peak of a warm call here (baseline excluded in both)."""
    case = Case(3, 6, 2, 1, "tanh", "mse", 7, "float32", "cpu")
    chosen = strategies.get(strategy)
    data = CaseData.of(case)
    call = hessian_call(chosen, data)
    call()
    _, here = measure.peak_bytes(call, case.device)
    there = worker.run(Request.of(case, chosen, first_call=False, memory=True)).peak_bytes
    assert there == here
    assert there >= case.hessian_bytes


def test_probe_reference_measures_like_the_dense_one_and_catches_a_wrong_entry():
    from bench.problems.grid import Case
    from bench.problems.models import make_problem
    from bench.reference import batched_loop_hessian, probe_reference

    net, batch, loss_fn = make_problem(Case(8, 6, 2, 1, "tanh", "mse", 16, "float64", "cpu"))
    names = [n for n, _ in net.named_parameters()]
    dense = batched_loop_hessian(net, names, batch, loss_fn)
    probe = probe_reference(net, names, batch, loss_fn)
    assert probe.vectors.shape == (dense.shape[0], 4)
    torch.testing.assert_close(probe.products, dense @ probe.vectors, rtol=1e-10, atol=1e-12)
    assert measure.errors(dense, probe)[1] < 1e-12
    wrong = dense.clone()
    wrong[3, 5] += 1e-3 * dense.abs().max()
    assert measure.errors(wrong, probe)[1] > 1e-5
    with pytest.raises(ValueError, match="the reference P"):
        measure.errors(dense[:-1, :-1], probe)
