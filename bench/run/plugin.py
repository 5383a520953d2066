"""pytest plugin of the benchmark suite: options, the (case, strategy) grid, JSON hooks, the end.

Run as ``pytest bench --benchmark-json results/<run>.json [--grid smoke|default|full]``.
The session's state is ``bench.run.session.Run``; what happens in one cell is ``bench.run.policy``.
The plugin's own state is ``bench.run.state``; ``<json>.partial`` is written by
``bench.run.partial``; the summary, audit and report at the end are ``bench.run.finish``.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import shlex
from typing import Any

import pytest
import torch

import strategies
from bench import device, measure
from bench.cli import (
    check_names,
    default_strategies,
    lock_output,
    output_file,
    partial_path,
    split_list,
    unlock_output,
    write_json,
)
from bench.problems.grid import DEVICES, GRIDS, cases
from bench.run import close_calls
from bench.run.finish import audit_and_report, summary_lines
from bench.run.partial import PartialWriter, output_json, write_partial
from bench.run.session import Run
from bench.run.state import STATE, State
from bench.run.worker import Worker

__all__ = [
    "pytest_addoption",
    "PYTEST_BENCHMARK",
    "check_pytest_benchmark",
    "pytest_configure",
    "pytest_generate_tests",
    "hessbench",
    "pytest_benchmark_update_machine_info",
    "pytest_benchmark_update_json",
    "pytest_runtestloop",
    "pytest_terminal_summary",
    "pytest_sessionfinish",
    "pytest_unconfigure",
]


def _state(config: pytest.Config) -> State:
    """The plugin's state of this run (an empty one before ``pytest_configure`` made it)."""
    return config.stash.get(STATE, State())


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hessbench", "Hessian benchmark grid")
    group.addoption("--grid", default="default", choices=sorted(GRIDS), help="named grid of cases")
    group.addoption(
        "--strategies",
        default=None,
        help="comma-separated strategy names, or 'all' (default: every registered strategy "
        "but the compiled variants of others: a compile per cell would double a run)",
    )
    group.addoption(
        "--devices", default=",".join(DEVICES), help="comma-separated devices (default: cpu,cuda)"
    )
    group.addoption(
        "--time-budget",
        type=float,
        default=60.0,
        help="skip a strategy predicted to take longer than this many seconds per call",
    )
    group.addoption(
        "--memory-fraction",
        type=float,
        default=0.4,
        help="skip a strategy whose predicted peak exceeds this share of the available memory "
        "(default 0.4: the host kills the whole run, losing it, where a prediction falls short)",
    )
    group.addoption(
        "--cell-timeout",
        type=float,
        default=None,
        help="longest a cell's isolated pass in the worker may take before the cell is "
        "recorded as crashed (default: 10 x --time-budget, at least 600)",
    )
    group.addoption(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
    )
    group.addoption(
        "--no-interleave",
        action="store_true",
        help="do not time the top 3 of each close case interleaved at the end (about 11 s "
        "on the default grid, at most 10 s a case and 60 s in all)",
    )
    group.addoption(
        "--no-report", action="store_true", help="do not run bench.report on the JSON at the end"
    )
    group.addoption(
        "--audit",
        action="store_true",
        help="also run the correctness audit (python -m bench.audit) and report it with the run",
    )
    group.addoption(
        "--report-dir",
        default="plots",
        help="where the report at the end writes its figures and report.html (default: plots)",
    )


def _positive(config: pytest.Config, option: str) -> float | None:
    """The option's value; a usage error unless positive (``inf`` allowed: no limit)."""
    value = config.getoption(option)
    if value is not None and not value > 0:  # also refuses nan
        raise pytest.UsageError(f"{option} must be a positive number of seconds, got {value}")
    return value


def _benchmark_json(config: pytest.Config, state: State) -> None:
    """``--benchmark-json`` checked, its folder made and the file claimed now: pytest-benchmark
    opens it only at the end, and a run that cannot write its JSON loses every cell; two runs
    started together on one JSON would each overwrite the other's cells, so the second is
    refused (``cli.lock_output``) until the first ends."""
    path = config.getoption("benchmark_json", default=None)
    if path is not None:
        try:
            output_file(path, "--benchmark-json")
            lock_output(path, "--benchmark-json")
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        state.locked = path


#: the oldest pytest-benchmark whose hooks and JSON this plugin uses (pyproject.toml says so too)
PYTEST_BENCHMARK = (5, 3)


def check_pytest_benchmark(version: str) -> None:
    """A usage error unless ``version`` of pytest-benchmark is at least ``PYTEST_BENCHMARK``."""
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < PYTEST_BENCHMARK:
        wanted = ".".join(map(str, PYTEST_BENCHMARK))
        raise pytest.UsageError(
            f"the hessbench benchmark needs pytest-benchmark>={wanted}, found {version}: "
            f"pip install 'pytest-benchmark>={wanted}'"
        )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--grid", default=None) is None:
        return
    check_pytest_benchmark(importlib.metadata.version("pytest-benchmark"))
    if config.getoption("dist", default="no") != "no" or os.environ.get("PYTEST_XDIST_WORKER"):
        raise pytest.UsageError(
            "the benchmark times one cell at a time, and pytest-benchmark turns itself off "
            "under pytest -n: split a large grid into shards with pytest-split "
            "(--splits N --group K, each shard its own --benchmark-json) instead"
        )
    valid = strategies.names()
    try:
        listed = config.getoption("--strategies")
        if listed is None:
            chosen = default_strategies()
        elif listed.strip() == "all":
            chosen = valid
        else:
            chosen = split_list(listed, "--strategies")
        check_names(chosen, valid, "strategies")
        devices = split_list(config.getoption("--devices"), "--devices")
        check_names(devices, DEVICES, "devices")
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not 0 < config.getoption("--memory-fraction") <= 1:
        raise pytest.UsageError("--memory-fraction must be in (0, 1]")
    time_budget = _positive(config, "--time-budget")
    cell_timeout = _positive(config, "--cell-timeout") or max(600.0, 10 * time_budget)
    threads = config.getoption("--threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError("--threads must be >= 1")
        torch.set_num_threads(threads)
    device.prepare_process()  # before anything computes or imports JAX; the worker inherits it
    state = config.stash[STATE] = State()
    _benchmark_json(config, state)
    config.pluginmanager.register(PartialWriter(config), "hessbench-partial")
    grid = config.getoption("--grid")
    state.run = Run(
        grid=grid,
        strategy_names=chosen,
        devices=devices,
        time_budget=time_budget,
        memory_fraction=config.getoption("--memory-fraction"),
        command=shlex.join(["pytest", *config.invocation_params.args]),
        cases={c.id: c for c in cases(grid, tuple(devices))},
        worker=Worker(
            torch.get_num_threads(), cell_timeout if math.isfinite(cell_timeout) else None
        ),
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"case", "strategy"} <= set(metafunc.fixturenames):
        run = metafunc.config.stash[STATE].run
        cells = [(c, s) for c in run.cases for s in run.strategy_names]
        metafunc.parametrize(
            ("case", "strategy"), cells, ids=[f"{c}-{s}" for c, s in cells], scope="function"
        )


@pytest.fixture(scope="session")
def hessbench(request: pytest.FixtureRequest) -> Run:
    """The session's benchmark state (options, caches, outcomes)."""
    return request.config.stash[STATE].run


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    cuda = torch.cuda.is_available()
    machine_info.update(
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpu_model=measure.cpu_model(),
        gpu_name=torch.cuda.get_device_name(0) if cuda else None,
        cuda_version=torch.version.cuda if cuda else None,
        machine_label=measure.machine_label(),
        **device.precision(),
    )


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict
) -> None:
    run = _state(config).run
    if run is not None:
        output_json["hessbench"] = {
            "grid": run.grid,
            "command": run.command,
            "outcomes": run.outcomes,
            "interleaved": run.interleaved,
        }


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Any:
    """After the grid's cells, the close calls settled (``bench.run.close_calls``): here,
    not in ``pytest_sessionfinish``, whose start is where pytest-benchmark writes the JSON."""
    result = yield
    config = session.config
    run = _state(config).run
    skip = run is None or config.getoption("--no-interleave") or not run.timed
    if skip or session.shouldstop or session.shouldfail:
        return result
    try:
        for _ in close_calls.settle(run):
            write_partial(config)
    except KeyboardInterrupt:
        write_partial(config)  # the case stopped says "interrupted"; the cells are all there
        raise
    settled = [e for e in run.interleaved.values() if "rounds_s" in e]
    if run.interleaved:
        _state(config).notes.append(
            f"close calls timed interleaved on {len(settled)} of {len(run.interleaved)} cases"
        )
    return result


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run = _state(config).run
    if run is None:
        return
    for note in _state(config).notes:
        terminalreporter.write_line(f"hessbench: {note}")
    if not run.timed:
        return
    terminalreporter.section("hessbench: fastest accurate strategy per case")
    for line in summary_lines(run):
        terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # pytest-benchmark writes its JSON in a hookwrapper, i.e. before this runs.
    config = session.config
    path = config.getoption("benchmark_json", default=None)
    run = _state(config).run
    if run is not None:
        run.worker.close()  # its memory is the report's now
    if path is None or run is None:
        return
    if not config._benchmarksession.benchmarks:
        if not run.outcomes:  # no cell ran (e.g. --collect-only): an earlier JSON stays as is
            print(f"\nhessbench: no cell ran; {path} not written, no report")
            return
        # pytest-benchmark writes no JSON where nothing was timed: the outcomes would be lost
        write_json(output_json(config), path)
    if _state(config).partial_written and os.path.exists(partial_path(path)):
        os.remove(partial_path(path))  # this run's own: it reached its end, the JSON holds it all
    status = audit_and_report(config, path)
    if status:
        print(f"\nhessbench: the audit or report exited with {status}")
        session.exitstatus = (
            pytest.ExitCode.TESTS_FAILED if session.exitstatus == 0 else session.exitstatus
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    run = _state(config).run
    if run is not None:
        run.worker.close()
    state = _state(config)
    if state.locked:
        unlock_output(state.locked)
        state.locked = None
