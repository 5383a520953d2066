"""The worker that runs each cell first: answers, re-raises, and survives its own crashes."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bench import measure
from bench.problems.grid import Case
from bench.run import worker as worker_module
from bench.run.worker import ChildTraceback, Crashed, Request, Worker

CASE = Case(3, 4, 1, 1, "tanh", "mse", 5, "float32", "cpu")

#: strategies registered only in the worker (it imports this module): this registry stays clean
PLANTED = """
import os, signal, sys, time
import torch
import strategies

def aborts(net, params, batch, loss_fn=None):
    print("planted: about to abort", file=sys.stderr, flush=True)
    os.abort()

def killed(net, params, batch, loss_fn=None):
    os.kill(os.getpid(), signal.SIGKILL)

def segfaults(net, params, batch, loss_fn=None):
    import ctypes
    ctypes.string_at(0)

def hangs(net, params, batch, loss_fn=None):
    time.sleep(600)

def oom(net, params, batch, loss_fn=None):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

def threads(net, params, batch, loss_fn=None):
    raise RuntimeError(f"threads={torch.get_num_threads()}")

for planted in (aborts, killed, segfaults, hangs, oom, threads):
    strategies.register(f"planted_{planted.__name__}", planted, "test only")
"""


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A module of planted strategies on sys.path, which a spawned worker inherits."""
    folder = tmp_path_factory.mktemp("planted")
    (folder / "planted_strategies.py").write_text(textwrap.dedent(PLANTED))
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


@pytest.fixture(scope="module")
def worker(planted: Path) -> Iterator[Worker]:
    """One worker for the module's tests: restarted by the next request after each crash."""
    started = Worker(threads=1, timeout_s=60)
    yield started
    started.close()


def _planted(name: str, first_call: bool = True) -> Request:
    return Request(CASE, f"planted_{name}", ("planted_strategies",), first_call, memory=False)


def _registered(name: str, memory: bool) -> Request:
    return Request(CASE, name, (f"strategies.{name}",), first_call=not memory, memory=memory)


def test_answers_a_first_call_and_a_memory_pass(worker):
    reply = worker.run(_registered("full_autograd", memory=False))
    assert reply.first_call_s > 0 and reply.peak_bytes is None and reply.events is None
    reply = worker.run(_registered("full_autograd", memory=True))
    assert reply.first_call_s is None and reply.memory_s > 0
    assert reply.peak_bytes >= CASE.hessian_bytes and reply.events > 0


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_a_worker_holding_too_much_memory_is_replaced_by_the_next_pass(worker, monkeypatch):
    worker.run(_registered("full_autograd", memory=False))
    kept = worker.pid
    assert worker.rss_bytes() > 0
    worker.run(_registered("full_autograd", memory=False))
    assert worker.pid == kept  # a worker of a few hundred MB stays
    monkeypatch.setattr(worker_module, "RECYCLE_FRACTION", 0.0)
    monkeypatch.setattr(worker_module, "RECYCLE_MIN_BYTES", 0)
    reply = worker.run(_registered("full_autograd", memory=True))
    assert worker.pid is None  # stopped once it answered: the answer is kept
    assert reply.peak_bytes >= CASE.hessian_bytes
    assert worker.run(_registered("full_autograd", memory=False)).first_call_s > 0


@pytest.mark.parametrize(
    "name, signal_name",
    [("aborts", "SIGABRT"), ("killed", "SIGKILL"), ("segfaults", "SIGSEGV")],
)
def test_a_crash_is_crashed_with_its_signal_and_the_worker_comes_back(worker, name, signal_name):
    with pytest.raises(
        Crashed, match=f"killed by {signal_name}.* in the isolated pass of planted_"
    ):
        worker.run(_planted(name))
    assert worker.run(_registered("full_autograd", memory=False)).first_call_s > 0


def test_a_crash_keeps_the_last_lines_of_the_workers_stderr(worker):
    with pytest.raises(Crashed) as crash:
        worker.run(_planted("aborts"))
    lines = str(crash.value).splitlines()
    assert "planted: about to abort" in lines
    assert "Fatal Python error: Aborted" in lines
    assert any(line.strip().startswith("File") and "in aborts" in line for line in lines)


def test_a_hung_worker_is_killed_at_the_timeout(planted):
    hung = Worker(threads=1, timeout_s=5)  # generous: a shared machine is slow to warm up
    try:
        hung.run(_registered("full_autograd", memory=False))  # started: the import is not timed
        with pytest.raises(Crashed, match="timed out: no answer in the isolated pass.*within 5 s"):
            hung.run(_planted("hangs"))
        assert hung.run(_registered("full_autograd", memory=False)).first_call_s > 0
    finally:
        hung.close()


def test_an_exception_comes_back_as_itself_with_the_workers_traceback(worker):
    with pytest.raises(torch.cuda.OutOfMemoryError) as raised:
        worker.run(_planted("oom"))
    assert measure.is_oom(raised.value)
    assert isinstance(raised.value.__cause__, ChildTraceback)
    assert "in oom" in str(raised.value.__cause__)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_worker_uses_the_sessions_threads(planted, threads):
    counted = Worker(threads=threads, timeout_s=60)
    try:
        with pytest.raises(RuntimeError, match=f"^threads={threads}$"):
            counted.run(_planted("threads"))
    finally:
        counted.close()


def test_an_unknown_strategy_is_an_error_naming_it(worker):
    with pytest.raises(LookupError, match="'nowhere' is not registered in the worker"):
        worker.run(Request(CASE, "nowhere", ("strategies",), True, False))
