"""The child process that runs each benchmark cell first, so that a crash ends only its cell.

A strategy that segfaults, aborts or is killed by the out-of-memory killer takes its process
with it. Every cell therefore runs first in a persistent worker (one Python, started once
per session, torch and the strategies imported once, restarted after it dies): its memory
pass, or a first call where no memory pass runs. Only a cell whose worker
survived is then timed in the pytest process. docs/DESIGN.md, "Crash isolation", says why
it is built this way.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, BinaryIO

import torch

import strategies
from bench import device, measure
from bench.problems.grid import Case
from bench.run.cell import CaseData, hessian_call
from strategies import Strategy

__all__ = [
    "STDERR_LINES",
    "START_TIMEOUT_S",
    "RECYCLE_FRACTION",
    "RECYCLE_MIN_BYTES",
    "Request",
    "Reply",
    "Crashed",
    "ChildTraceback",
    "Worker",
    "serve",
]

#: how many of the worker's last stderr lines a crashed cell's reason keeps
STDERR_LINES = 20
#: longest the worker may take to start (import torch and the strategies)
START_TIMEOUT_S = 300.0
_STDERR_CHARS = 4000
#: a worker holding more than this share of the machine's memory after a pass (and at
#: least ``RECYCLE_MIN_BYTES``) is stopped, and the next pass starts a fresh one: a
#: default run's worker once held about 16 GiB that ``malloc_trim`` did not give back,
#: and the pytest process's cells were predicted over memory until it died. A restart
#: costs the imports (seconds): at a tenth of a 23 GiB machine, a default run had done
#: only about half its cells in 26 minutes (the whole run took 24.5 before)
RECYCLE_FRACTION = 0.25
RECYCLE_MIN_BYTES = 4 << 30


@dataclass(frozen=True)
class Request:
    """One cell's isolated pass: a first call, the memory pass, or both (first call first)."""

    case: Case
    strategy: str
    #: modules that register the strategy, imported by the worker before looking it up
    modules: tuple[str, ...]
    first_call: bool
    memory: bool

    @classmethod
    def of(cls, case: Case, strategy: Strategy, first_call: bool, memory: bool) -> Request:
        where = strategy.module.__name__ if strategy.module is not None else None
        modules = (where or getattr(strategy.compute_fn, "__module__", None),)
        return cls(case, strategy.name, tuple(m for m in modules if m), first_call, memory)


@dataclass(frozen=True)
class Reply:
    """What the isolated pass measured (None for the parts it did not run)."""

    first_call_s: float | None
    memory_s: float | None
    peak_bytes: int | None
    events: int | None


class Crashed(Exception):
    """The worker died (a signal or an exit) or hung during a cell's isolated pass."""


class ChildTraceback(Exception):
    """The worker's traceback of an exception it raised: the cause of the one re-raised here."""


def _describe(exitcode: int | None) -> str:
    if exitcode is None:
        return "the worker did not exit"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name
        if -exitcode == signal.SIGKILL:
            return f"the worker was killed by {name} (as the out-of-memory killer does)"
        return f"the worker was killed by {name}"
    return f"the worker exited with status {exitcode} without answering"


class Worker:
    """The pytest process's handle on the worker: starts, asks, notices a death, restarts.

    The worker is a fresh ``python`` (a subprocess, not ``multiprocessing``'s spawn, which
    would import the caller's ``__main__`` again) that talks over a socket pair, with this
    process's ``sys.path``, and its stdout and stderr in an unlinked temporary file (nothing
    is left behind, whoever dies first).

    Args:
        threads: ``torch.set_num_threads`` in the worker (the session's ``--threads``).
        timeout_s: longest one isolated pass may take before the worker is killed and the
            cell recorded as crashed (``--cell-timeout``); None waits for ever.
    """

    def __init__(self, threads: int, timeout_s: float | None):
        self.threads = threads
        self.timeout_s = timeout_s
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._log: BinaryIO | None = None
        self._ready = False

    def start(self) -> None:
        """Start the worker if none is running; returns at once (it imports in the background)."""
        if self._process is not None and self._process.poll() is None:
            return
        self.close()
        ours, theirs = multiprocessing.Pipe()
        fd, log_path = tempfile.mkstemp(prefix="hessbench-worker-", suffix=".log")
        path = os.pathsep.join(entry or os.getcwd() for entry in sys.path)
        with os.fdopen(fd, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-c", _COMMAND],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={
                    **os.environ,
                    "PYTHONPATH": path,
                    "PYTHONUNBUFFERED": "1",
                    "HESSBENCH_WORKER": f"{theirs.fileno()} {self.threads}",
                },
            )
        self._log = open(log_path, "rb")  # held until the worker goes
        os.unlink(log_path)
        theirs.close()  # else a dead worker's end stays open here and recv never sees EOF
        self._conn = ours

    def _wait(self, timeout_s: float | None, doing: str) -> Any:
        """The worker's next message; raises Crashed where it dies or stays silent."""
        assert self._conn is not None and self._process is not None
        try:
            answered = self._conn.poll(timeout_s)
            message = self._conn.recv() if answered else None
        except (EOFError, OSError):
            try:
                exitcode = self._process.wait(5)
            except subprocess.TimeoutExpired:
                exitcode = None
            reason = f"{_describe(exitcode)} {doing}"
        except BaseException:  # an interrupt: the worker's state is unknown, so it goes
            self.close()
            raise
        else:
            if answered:
                return message
            reason = f"timed out: no answer {doing} within {timeout_s:g} s (--cell-timeout)"
        tail = self._tail()
        self.close()
        raise Crashed(f"{reason}; last lines of its stderr:\n{tail}" if tail else reason)

    def run(self, request: Request) -> Reply:
        """The isolated pass of one cell.

        Raises:
            Crashed: the worker died or timed out; it is restarted by the next call.
            Exception: what the strategy raised in the worker, with the worker's traceback
                as its cause (so out-of-memory and errors are recorded as in-process ones).
        """
        self.start()
        assert self._conn is not None and self._log is not None
        if not self._ready:
            self._wait(START_TIMEOUT_S, "while starting")
            self._ready = True
        self._log.seek(0, os.SEEK_END)
        self._conn.send(request)
        doing = f"in the isolated pass of {request.strategy} on {request.case.id}"
        kind, payload = self._wait(self.timeout_s, doing)
        self._recycle()
        if kind == "raised":
            exc, text = payload
            raise exc from ChildTraceback(text)
        return payload

    @property
    def pid(self) -> int | None:
        """The running worker's process id (None before the first pass or after a stop)."""
        return None if self._process is None else self._process.pid

    def rss_bytes(self) -> int | None:
        """The worker's resident memory (Linux's ``/proc``), None where it cannot be read."""
        if self._process is None:
            return None
        try:
            with open(f"/proc/{self.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None

    def _recycle(self) -> None:
        """Stop the worker where it holds more than ``RECYCLE_FRACTION`` of the machine's
        memory (at least ``RECYCLE_MIN_BYTES``); the next ``run`` starts a fresh one."""
        held = self.rss_bytes()
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError):
            return
        if held is not None and held > max(RECYCLE_FRACTION * total, RECYCLE_MIN_BYTES):
            self.close()

    def _tail(self) -> str:
        """The last ``STDERR_LINES`` lines the worker wrote since the current request began."""
        if self._log is None:
            return ""
        text = self._log.read().decode("utf-8", errors="replace")
        return "\n".join(text.strip().splitlines()[-STDERR_LINES:])[-_STDERR_CHARS:]

    def close(self) -> None:
        """Stop the worker (politely if idle, else killed) and forget it."""
        process, conn, log = self._process, self._conn, self._log
        self._process = self._conn = self._log = None
        self._ready = False
        if conn is not None:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        if process is not None:
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if log is not None:
            log.close()


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (type and message intact), else a RuntimeError saying it."""
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _release_memory(device_type: str) -> None:
    """Give freed memory back, so that the timed calls in the pytest process find it free.

    JAX holds none: the worker's allocator gives each buffer back as it is freed
    (``bench.device.WORKER_JAX_ENV``).
    """
    if device_type == "cuda":
        torch.cuda.empty_cache()
    try:  # glibc keeps freed heap pages; the pytest process allocates next
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _answer(request: Request, cache: dict[Case, CaseData]) -> Reply:
    for module in request.modules:
        importlib.import_module(module)
    try:
        strategy = strategies.get(request.strategy)
    except KeyError:
        raise LookupError(
            f"strategy {request.strategy!r} is not registered in the worker after importing "
            f"{list(request.modules)}: register it in an importable module"
        ) from None
    if request.case not in cache:
        cache.clear()  # one case at a time, as in the pytest process
        cache[request.case] = CaseData.of(request.case)
    call = hessian_call(strategy, cache[request.case])
    first_call_s = memory_s = peak = events = None
    if request.first_call:
        start = time.perf_counter()
        call()
        first_call_s = time.perf_counter() - start
    if request.memory:
        start = time.perf_counter()
        _, peak, events = measure.peak_and_events(call, request.case.device)
        memory_s = time.perf_counter() - start
    return Reply(first_call_s, memory_s, peak, events)


#: what the worker's ``python -c`` runs
_COMMAND = "from bench.run.worker import serve; serve()"


def serve() -> None:
    """The worker's loop: answer requests until told to stop or the pytest process is gone.

    Started by ``Worker.start``, which names the socket and the threads in the environment.
    """
    fd, threads = map(int, os.environ.pop("HESSBENCH_WORKER").split())
    conn = Connection(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pytest process's to handle
    device.prepare_process(worker=True)
    torch.set_num_threads(threads)
    cache: dict[Case, CaseData] = {}
    try:
        conn.send("ready")
        while (request := conn.recv()) is not None:
            try:
                answer: tuple[str, Any] = ("ok", _answer(request, cache))
            except BaseException as exc:  # noqa: B036 (the pytest process decides)
                answer = ("raised", (_picklable(exc), traceback.format_exc()))
            conn.send(answer)
            _release_memory(request.case.device)
    except (EOFError, OSError):
        pass  # the pytest process is gone
