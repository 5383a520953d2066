"""The README's test command: the tests that share one costly fixture run on one worker."""

from __future__ import annotations

import re
import textwrap

import pytest

pytest_plugins = ["pytester"]


def test_a_group_runs_on_one_worker_under_the_readmes_dist_mode(pytester: pytest.Pytester):
    """``--dist loadgroup`` sends the tests of an ``xdist_group`` to one worker, so that the
    audit of every registered strategy (tests/test_audit.py, minutes on a new machine) runs
    once. pytest 9.2 broke that: pytest-xdist 3.8 marks a group in ``item._nodeid``, which
    pytest 9.2's ``nodeid`` no longer reads, and the group's tests were spread over the
    workers, each running the audit (pyproject.toml holds pytest below 9.2)."""
    pytester.makepyfile(
        test_grouped=textwrap.dedent(
            """
            import os, pytest

            pytestmark = pytest.mark.xdist_group("shared")

            @pytest.mark.parametrize("i", range(6))
            def test_grouped(i):
                print("worker", os.environ["PYTEST_XDIST_WORKER"])
            """
        ),
        test_free=textwrap.dedent(
            """
            import pytest

            @pytest.mark.parametrize("i", range(6))
            def test_free(i):
                pass
            """
        ),
    )
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadgroup", "-rA", "-p", "no:randomly"
    )
    assert result.ret == 0, result.stdout.str()
    result.stdout.fnmatch_lines(["*test_grouped*@shared*"])
    workers = re.findall(r"worker (gw\d+)", result.stdout.str())
    assert len(workers) == 6 and len(set(workers)) == 1, workers
