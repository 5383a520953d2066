"""pytest plugin of the benchmark suite: options, the (case, strategy) grid, JSON hooks, the end.

Run as ``pytest bench --benchmark-json results/<run>.json [--grid smoke|default|full]``.
The session's state is ``bench.session.Run``; what happens in one cell is ``bench.policy``.
"""

from __future__ import annotations

import json
import os
import shlex
import traceback
from typing import Any

import pytest
import torch

import strategies
from bench import measure
from bench.grid import DEVICES, GRIDS, cases
from bench.session import Run
from bench.vocabulary import BASELINE

__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "pytest_generate_tests",
    "hessbench",
    "pytest_benchmark_update_machine_info",
    "pytest_benchmark_update_json",
    "partial_path",
    "pytest_runtest_logfinish",
    "pytest_terminal_summary",
    "pytest_sessionfinish",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hessbench", "Hessian benchmark grid")
    group.addoption("--grid", default="default", choices=sorted(GRIDS), help="named grid of cases")
    group.addoption(
        "--strategies",
        default=None,
        help="comma-separated strategy names (default: all registered)",
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
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)"
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


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--grid", default=None) is None:
        return
    valid = strategies.names()
    chosen = _csv(config.getoption("--strategies")) if config.getoption("--strategies") else valid
    unknown = [s for s in chosen if s not in valid]
    if unknown:
        raise pytest.UsageError(f"unknown strategies {unknown}; valid strategies: {valid}")
    devices = _csv(config.getoption("--devices"))
    bad = [d for d in devices if d not in DEVICES]
    if bad:
        raise pytest.UsageError(f"unknown devices {bad}; valid devices: {list(DEVICES)}")
    if not 0 < config.getoption("--memory-fraction") <= 1:
        raise pytest.UsageError("--memory-fraction must be in (0, 1]")
    if config.getoption("--time-budget") <= 0:
        raise pytest.UsageError("--time-budget must be positive")
    threads = config.getoption("--threads")
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError("--threads must be >= 1")
        torch.set_num_threads(threads)
    json_path = config.getoption("benchmark_json", default=None)
    if json_path is not None:
        # pytest-benchmark opens the file at the very end; a missing folder would lose the run.
        json_path.parent.mkdir(parents=True, exist_ok=True)
    _CONFIG.clear()
    _CONFIG["config"] = config
    grid = config.getoption("--grid")
    config._hessbench = Run(
        grid=grid,
        strategy_names=chosen,
        devices=devices,
        time_budget=config.getoption("--time-budget"),
        memory_fraction=config.getoption("--memory-fraction"),
        command=shlex.join(["pytest", *config.invocation_params.args]),
        cases={c.id: c for c in cases(grid, tuple(devices))},
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if {"case", "strategy"} <= set(metafunc.fixturenames):
        run: Run = metafunc.config._hessbench
        cells = [(c, s) for c in run.cases for s in run.strategy_names]
        metafunc.parametrize(
            ("case", "strategy"), cells, ids=[f"{c}-{s}" for c, s in cells], scope="function"
        )


@pytest.fixture(scope="session")
def hessbench(request: pytest.FixtureRequest) -> Run:
    """The session's benchmark state (options, caches, outcomes)."""
    return request.config._hessbench


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    cuda = torch.cuda.is_available()
    machine_info.update(
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpu_model=measure.cpu_model(),
        gpu_name=torch.cuda.get_device_name(0) if cuda else None,
        cuda_version=torch.version.cuda if cuda else None,
        machine_label=measure.machine_label(),
    )


def pytest_benchmark_update_json(
    config: pytest.Config, benchmarks: list, output_json: dict
) -> None:
    run: Run | None = getattr(config, "_hessbench", None)
    if run is not None:
        output_json["hessbench"] = {
            "grid": run.grid,
            "command": run.command,
            "outcomes": run.outcomes,
        }


def partial_path(benchmark_json: str | os.PathLike) -> str:
    """Where a run keeps what it has measured so far: ``<json>.partial``, removed at the end."""
    return f"{os.fspath(benchmark_json)}.partial"


def pytest_runtest_logfinish(nodeid: str, location: tuple) -> None:
    """After every cell, rewrite ``<json>.partial`` with everything measured so far.

    pytest-benchmark writes its JSON once, at the end; a run the host kills (out of memory,
    a wall-clock limit) would lose every cell. The partial file is the same JSON, made by
    pytest-benchmark's own hooks, so ``python -m bench.report results/<run>.json.partial``
    reads it.
    """
    config = _CONFIG.get("config")
    path = config.getoption("benchmark_json", default=None) if config else None
    session = getattr(config, "_benchmarksession", None)
    if path is None or session is None or not session.benchmarks:
        return
    if "machine_info" not in _CONFIG:  # slow to gather (cpuinfo, git): once per run
        _CONFIG["machine_info"] = session.get_machine_info()
        commit_info = config.hook.pytest_benchmark_generate_commit_info(config=config)
        config.hook.pytest_benchmark_update_commit_info(config=config, commit_info=commit_info)
        _CONFIG["commit_info"] = commit_info
    output = config.hook.pytest_benchmark_generate_json(
        config=config,
        benchmarks=session.benchmarks,
        include_data=True,
        machine_info=_CONFIG["machine_info"],
        commit_info=_CONFIG["commit_info"],
    )
    config.hook.pytest_benchmark_update_json(
        config=config, benchmarks=session.benchmarks, output_json=output
    )
    target = partial_path(path)
    with open(f"{target}.tmp", "w") as f:
        json.dump(output, f)
    os.replace(f"{target}.tmp", target)  # atomic: a kill never leaves half a file


#: the pytest config, for hooks that pytest calls without it
_CONFIG: dict[str, Any] = {}


def _summary_lines(run: Run) -> list[str]:
    lines = []
    for case_id in run.cases:
        rows = {s: timed for (c, s), timed in run.timed.items() if c == case_id}
        accurate = {s: timed for s, timed in rows.items() if timed.accurate and not timed.peer}
        if not accurate:
            if rows:
                lines.append(f"{case_id}: no accurate strategy timed")
            continue
        best = min(accurate, key=lambda s: accurate[s].seconds)
        seconds, peak = accurate[best].seconds, accurate[best].peak_bytes
        speedup = (
            f"{rows[BASELINE].seconds / seconds:.2f}x vs {BASELINE}"
            if BASELINE in rows
            else f"{BASELINE} not timed"
        )
        memory = "peak not measured" if peak is None else f"peak {peak / 2**20:.3g} MiB"
        lines.append(f"{case_id}: {best} {seconds:.4g} s, {memory}, {speedup}")
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    run: Run | None = getattr(config, "_hessbench", None)
    if run is None or not run.timed:
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
    if path is None or getattr(config, "_hessbench", None) is None:
        return
    if not os.path.exists(path):
        print(f"\nhessbench: no benchmark JSON at {path} (nothing was timed); no report")
        return
    if os.path.exists(partial_path(path)):  # the run reached its end: the JSON holds it all
        os.remove(partial_path(path))
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
