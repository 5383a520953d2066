"""pytest plugin of the benchmark suite: options, the (case, strategy) grid, JSON hooks, the end.

Run as ``pytest bench --benchmark-json results/<run>.json [--grid smoke|default|full]``.
The session's state is ``bench.run.session.Run``; what happens in one cell is ``bench.run.policy``.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import shlex
import traceback
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

import strategies
from bench import device, measure
from bench.cli import (
    check_names,
    default_strategies,
    kept_partial_path,
    lock_output,
    output_file,
    partial_path,
    split_list,
    unlock_output,
    write_json,
)
from bench.problems.grid import DEVICES, GRIDS, cases
from bench.run import close_calls
from bench.run.session import Run
from bench.run.worker import Worker
from bench.vocabulary import BASELINE

__all__ = [
    "State",
    "STATE",
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


@dataclass
class State:
    """What the plugin keeps for one pytest run, in one place: ``config.stash[STATE]``."""

    run: Run | None = None  # the session's benchmark state; None where --grid is not ours
    locked: str | None = None  # the --benchmark-json this run holds the lock of
    machine_info: dict | None = None  # gathered once per run (cpuinfo, git)
    commit_info: dict | None = None
    notes: list[str] = field(default_factory=list)  # lines for the terminal summary
    partial_written: bool = False  # this run has written its own ``<json>.partial``


#: the plugin's state on ``config.stash``
STATE = pytest.StashKey[State]()


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
    config.pluginmanager.register(_PartialWriter(config), "hessbench-partial")
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


def _output_json(config: pytest.Config) -> dict:
    """The benchmark JSON of everything measured so far, made by pytest-benchmark's own hooks."""
    session = config._benchmarksession
    state = config.stash[STATE]
    if state.machine_info is None:  # slow to gather (cpuinfo, git): once per run
        state.machine_info = session.get_machine_info()
        commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
        config.hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
        state.commit_info = commit_info
    output = config.hook.pytest_benchmark_generate_json(
        config=config,
        benchmarks=session.benchmarks,
        include_data=True,
        machine_info=state.machine_info,
        commit_info=state.commit_info,
    )
    config.hook.pytest_benchmark_update_json(
        config=config, benchmarks=session.benchmarks, output_json=output
    )
    return output


class _PartialWriter:
    """The hook that keeps ``<json>.partial``, registered by ``pytest_configure`` with the
    config it needs (``pytest_runtest_logfinish`` is called without one)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple) -> None:
        _write_partial(self.config)


def _write_partial(config: pytest.Config) -> None:
    """After every cell, rewrite ``<json>.partial`` with everything measured so far.

    pytest-benchmark writes its JSON once, at the end; a run the host kills (out of memory,
    a wall-clock limit) would lose every cell. The partial file is the same JSON, made by
    pytest-benchmark's own hooks, so ``python -m bench.report results/<run>.json.partial``
    reads it. An earlier run's ``<json>.partial`` (a run that never reached its end) is
    moved to ``kept_partial_path`` before this run first writes its own, never overwritten.
    """
    state = config.stash[STATE]
    path = config.getoption("benchmark_json", default=None)
    run = state.run
    session = getattr(config, "_benchmarksession", None)
    if path is None or run is None or session is None:
        return
    if not (session.benchmarks or run.outcomes):
        return
    target = partial_path(path)
    if not state.partial_written and os.path.exists(target):
        kept = kept_partial_path(path)
        os.rename(target, kept)
        state.notes.append(f"an earlier run left {target} unfinished: kept as {kept}")
    write_json(_output_json(config), target)
    state.partial_written = True


def _summary_lines(run: Run) -> list[str]:
    """Per case, the fastest by the report's rule: accurate, repeated (not too slow to
    repeat), no peer, no dispatcher; the least median; faster than the runner-up only by
    ``rule.versus`` (over their interleaved rounds where the case's close call was
    settled: ``rule.compared_rounds``), else tied with it."""
    from bench.analysis import rule

    lines = []
    for case_id in run.cases:
        rows = {s: timed for (c, s), timed in run.timed.items() if c == case_id}
        accurate, order = close_calls.contenders(run, case_id)
        if not order:
            if accurate:
                lines.append(
                    f"{case_id}: no accurate strategy repeated ({len(accurate)} too slow to "
                    "repeat, left out of every ranking)"
                )
            elif rows:
                lines.append(f"{case_id}: no accurate strategy timed")
            continue

        best = order[0]
        seconds, peak = accurate[best].median, accurate[best].peak_bytes
        speedup = (
            f"{rows[BASELINE].median / seconds:.2f}x vs {BASELINE}"
            if BASELINE in rows
            else f"{BASELINE} not timed"
        )
        memory = "peak not measured" if peak is None else f"peak {peak / 2**20:.3g} MiB"
        verdict = ""
        if len(order) > 1:
            interleaved = run.interleaved.get(case_id, {}).get("rounds_s", {})
            pair = [
                {"rounds_s": t.rounds, "min": t.seconds, "interleaved_s": interleaved.get(s)}
                for s, t in ((s, accurate[s]) for s in order[:2])
            ]
            faster = rule.versus(*rule.compared_rounds(*pair))
            verdict = f", {'faster than' if faster == 1 else 'tied with'} {order[1]}"
        lines.append(f"{case_id}: {best} {seconds:.4g} s median{verdict}, {memory}, {speedup}")
    return lines


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
            _write_partial(config)
    except KeyboardInterrupt:
        _write_partial(config)  # the case stopped says "interrupted"; the cells are all there
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
    for line in _summary_lines(run):
        terminalreporter.write_line(line)


def _run_audit(benchmark_json: str) -> str:
    """Run the audit beside the timings; its JSON goes next to the benchmark's, named after it."""
    from bench import audit

    root, _ = os.path.splitext(benchmark_json)
    audit_json = f"{root}-audit.json"
    if audit.main(["--json", audit_json]) != 0:
        raise RuntimeError("the audit's two references disagree: its matrix cannot be trusted")
    return audit_json


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
        write_json(_output_json(config), path)
    if _state(config).partial_written and os.path.exists(partial_path(path)):
        os.remove(partial_path(path))  # this run's own: it reached its end, the JSON holds it all
    inputs = [str(path)]
    try:
        if config.getoption("--audit"):
            inputs.append(_run_audit(str(path)))
        status = 0
        if not config.getoption("--no-report"):
            from bench import report

            report_dir = config.getoption("--report-dir")
            html_path = os.path.join(report_dir, "report.html")
            status = report.main([*inputs, "--plots-dir", report_dir, "--html", html_path])
    except Exception:
        print(f"\nhessbench: the audit or report failed on {path} (the JSON is intact):")
        traceback.print_exc()
        status = 1
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
