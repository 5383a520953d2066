"""``<json>.partial``: the benchmark JSON of everything measured so far, rewritten after every
cell, so that a run the host kills keeps its cells (docs/DESIGN.md, "Nothing measured is
lost")."""

from __future__ import annotations

import os

import pytest

from bench.cli import kept_partial_path, partial_path, write_json
from bench.run.state import STATE

__all__ = ["output_json", "PartialWriter", "write_partial"]


def output_json(config: pytest.Config) -> dict:
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


class PartialWriter:
    """The hook that keeps ``<json>.partial``, registered by ``pytest_configure`` with the
    config it needs (``pytest_runtest_logfinish`` is called without one)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    def pytest_runtest_logfinish(self, nodeid: str, location: tuple) -> None:
        write_partial(self.config)


def write_partial(config: pytest.Config) -> None:
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
    write_json(output_json(config), target)
    state.partial_written = True
