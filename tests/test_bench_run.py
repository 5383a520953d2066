"""End-to-end runs of the benchmark suite on tiny grids, in process through pytester."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench import conftest, report
from bench.analysis import numbers, rule, tidy
from bench.run import policy
from bench.vocabulary import (
    BASELINE,
    CRASHED,
    ERROR,
    OK,
    OOM,
    OVER_BUDGET,
    SKIPPED,
    UNSUPPORTED,
    WRONG,
)

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
HEADER = (
    "import torch\nimport strategies\nfrom bench.problems.grid import GRIDS\nTINY = {!r}\n".format(
        dict(input=3, output=1, activation="tanh", loss="mse", batch=4, dtype="float32")
    )
)
ROW_KEYS = {
    "case", "input", "width", "depth", "output", "activation", "loss", "batch", "dtype",
    "device", "strategy", "status", "P", "hessian_bytes", "peak_bytes", "max_abs_err",
    "max_rel_err", "accurate", "tolerance", "grad_s", "gemm_s", "cost_vs_grad", "vs_gemm",
    "first_call_s", "peer", "threads",
}  # fmt: skip
MACHINE_KEYS = {
    "torch_version", "torch_threads", "cpu_model", "gpu_name", "cuda_version", "machine_label",
    "tf32", "float32_matmul_precision",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The benchmark runs below are pytest sessions of their own. Under ``pytest -n``, they
    would inherit the worker's environment, by which pytest-benchmark turns itself off."""
    for name in [name for name in os.environ if name.startswith("PYTEST_XDIST")]:
        monkeypatch.delenv(name)


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, setup: str, *args: str
) -> tuple[pytest.RunResult, dict | None]:
    """Run ``pytest bench`` in a subprocess after ``setup`` (Python run as an early plugin).

    ``setup`` can replace grids and register test-only strategies: they live and die with
    the subprocess, so this process's registry is never touched.
    """
    pytester.makepyfile(hessbench_setup=HEADER + textwrap.dedent(setup))
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{pytester.path}")
    out = pytester.path / "run.json"
    result = pytester.runpytest_subprocess(
        str(ROOT / "bench"), "-p", "hessbench_setup", "--benchmark-json", str(out),
        "--no-report", "-p", "no:warnings", "-rs", *args,
    )  # fmt: skip
    return result, (json.loads(out.read_text()) if out.exists() else None)


def test_smoke_grid_writes_every_field(pytester, monkeypatch):
    result, data = _run(
        pytester, monkeypatch, 'GRIDS["smoke"] = GRIDS["smoke"][:2]',
        "--grid", "smoke", "--strategies", "torch_func,full_autograd", "--threads", "1",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    rows = data["benchmarks"]
    assert len(rows) == 4
    assert {(r["params"]["strategy"], r["group"]) for r in rows} == {
        (s, c) for s in ("torch_func", "full_autograd") for c in {r["group"] for r in rows}
    }
    for row in rows:
        info = row["extra_info"]
        assert ROW_KEYS <= set(info)
        assert info["status"] == OK and info["accurate"] is True
        assert info["threads"] == 1
        assert info["hessian_bytes"] == info["P"] ** 2 * (4 if info["dtype"] == "float32" else 8)
        assert info["peak_bytes"] >= info["hessian_bytes"]
        assert info["vs_gemm"] == pytest.approx(row["stats"]["min"] / info["gemm_s"])
        assert row["params"] == {"strategy": info["strategy"], "case": info["case"]}
        # the run's first cell too: the processes' one-time costs are paid before any timing
        assert row["stats"]["rounds"] >= policy.MIN_ROUNDS and row["stats"]["max"] < 0.5, row
    assert MACHINE_KEYS <= set(data["machine_info"])
    assert data["machine_info"]["torch_threads"] == 1
    # exact float32 (TF32 off), as every benchmark process sets it before it computes
    assert data["machine_info"]["tf32"] is False
    assert data["machine_info"]["float32_matmul_precision"] == "highest"
    hessbench = data["hessbench"]
    assert hessbench["grid"] == "smoke" and "--grid smoke" in hessbench["command"]
    if not torch.cuda.is_available():
        assert {o["status"] for o in hessbench["outcomes"]} == {SKIPPED}
    result.stdout.fnmatch_lines(["*fastest accurate strategy per case*", f"*x vs {BASELINE}*"])


@pytest.mark.parametrize(
    "args, message",
    [
        (("--grid", "nope"), "*argument --grid: invalid choice: 'nope'*"),
        (("--strategies", "nope"), "*unknown strategies*nope*valid strategies*torch_func*"),
        (("--strategies", " , "), "*--strategies names nothing*"),
        (("--devices", "gpu"), "*unknown devices*gpu*valid devices*"),
        (("--time-budget", "abc"), "*argument --time-budget: invalid float value: 'abc'*"),
        (("--time-budget", "nan"), "*--time-budget must be a positive number of seconds, got nan*"),
        (("--cell-timeout", "0"), "*--cell-timeout must be a positive number of seconds*"),
        (("-n", "2"), "*pytest-benchmark turns itself off under pytest -n*pytest-split*"),
        (
            ("--benchmark-json", "/dev/null/run.json"),
            "*--benchmark-json /dev/null/run.json: /dev/null is not a folder*",
        ),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else "says",
)
def test_a_bad_option_is_a_usage_error_with_a_clear_message(pytester, monkeypatch, args, message):
    result, _ = _run(pytester, monkeypatch, "", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stderr.str()


def test_predicted_over_budget_is_skipped_with_the_reason(pytester, monkeypatch):
    result, data = _run(
        pytester, monkeypatch, 'GRIDS["smoke"] = [dict(TINY, width=2, depth=[1, 3])]',
        "--grid", "smoke", "--devices", "cpu", "--strategies", "torch_func",
        "--time-budget", "1e-9",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    assert [r["extra_info"]["depth"] for r in data["benchmarks"]] == [1]
    [outcome] = data["hessbench"]["outcomes"]
    assert outcome["status"] == OVER_BUDGET and outcome["depth"] == 3
    assert "--time-budget" in outcome["reason"]
    result.stdout.fnmatch_lines([f"*{OVER_BUDGET}*"])


def test_wrong_row_reaches_the_json_and_fails(pytester, monkeypatch):
    setup = """
    GRIDS["smoke"] = [dict(TINY, width=2, depth=1)]
    def off_by_one(net, params, batch, loss_fn=None):
        H = strategies.compute("torch_func", net, params, batch, loss_fn)
        H[0, 0] += 1.0
        return H
    strategies.register("fake_wrong", off_by_one, "test-only: one wrong entry")
    """
    result, data = _run(
        pytester, monkeypatch, setup,
        "--grid", "smoke", "--devices", "cpu", "--strategies", "fake_wrong",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    [row] = data["benchmarks"]
    assert row["extra_info"]["status"] == WRONG and row["extra_info"]["accurate"] is False
    result.stdout.fnmatch_lines(["*fake_wrong*max_rel_err*> tolerance*"])


@pytest.mark.parametrize("interrupted_in", ["worker", "rounds"])
def test_oom_error_and_interrupt_are_recorded_and_keep_what_was_measured(
    pytester, monkeypatch, interrupted_in
):
    """Ctrl-C in the worker's pass, or in the timed rounds (where a deadline's SIGINT lands):
    either way the cell is an outcome, never a bare row, and the JSON reads."""
    setup = f"""
    import sys
    IN_WORKER = sys.argv[0] == "-c"  # the worker runs python -c
    GRIDS["smoke"] = [dict(TINY, width=2, depth=[1, 2])]
    def oom(net, params, batch, loss_fn=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
    strategies.register("fake_oom", oom, "test-only: runs out of memory")
    def broken(net, params, batch, loss_fn=None):
        raise RuntimeError("shapes do not match")
    def interrupted(net, params, batch, loss_fn=None):
        if {interrupted_in == "worker"} or not IN_WORKER:
            raise KeyboardInterrupt
        return strategies.compute("torch_func", net, params, batch, loss_fn)
    def refuses(net, params, batch, loss_fn=None):
        raise ValueError("the forward does what this strategy cannot differentiate")
    strategies.register("fake_error", broken, "test-only: raises")
    strategies.register("fake_refusal", refuses, "test-only: refuses at run time")
    strategies.register("fake_interrupt", interrupted, "test-only: Ctrl-C")
    """
    result, data = _run(
        pytester, monkeypatch, setup, "--grid", "smoke", "--devices", "cpu",
        "--strategies", "torch_func,fake_oom,fake_error,fake_refusal,fake_interrupt",
    )  # fmt: skip
    # The run stops at the first case's fake_interrupt: what came before reaches the JSON.
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert [r["extra_info"]["strategy"] for r in data["benchmarks"]] == ["torch_func"]
    outcomes = {o["strategy"]: o for o in data["hessbench"]["outcomes"]}
    assert {s: o["status"] for s, o in outcomes.items()} == {
        "fake_oom": OOM,
        "fake_error": ERROR,
        "fake_refusal": UNSUPPORTED,
        "fake_interrupt": SKIPPED,
    }
    assert outcomes["fake_refusal"]["reason"].startswith("refused at run time: ValueError: the")
    assert "out of memory" in outcomes["fake_oom"]["reason"]
    assert "shapes do not match" in outcomes["fake_error"]["reason"]
    df, _ = tidy.load([pytester.path / "run.json"])
    assert df.set_index("strategy")["status"].to_dict()["fake_interrupt"] == SKIPPED


def test_a_killed_run_keeps_what_it_measured_and_a_rerun_keeps_that(pytester, monkeypatch):
    """A run the host kills (SIGKILL: no session end) still leaves every finished cell, and
    running the command again keeps that file under a new name instead of overwriting it."""
    setup = """
        import os, signal
        GRIDS["smoke"] = GRIDS["smoke"][:1]
        # the pytest process, whose id the worker inherits: killing it is the host killing the run
        RUN_PID = int(os.environ.setdefault("HESSBENCH_TEST_RUN_PID", str(os.getpid())))

        def killed(net, params, batch, loss_fn=None):
            os.kill(RUN_PID, signal.SIGKILL)

        strategies.register("zz_killed", killed, "test only: the host kills the run")
    """
    result, data = _run(
        pytester, monkeypatch, setup, "--grid", "smoke", "--strategies", "torch_func,kron,zz_killed"
    )
    assert result.ret != 0 and data is None, "SIGKILL skips pytest-benchmark's own JSON"
    killed = (pytester.path / "run.json.partial").read_bytes()
    partial = json.loads(killed)
    assert {r["params"]["strategy"] for r in partial["benchmarks"]} == {"torch_func", "kron"}
    assert all(r["extra_info"]["accurate"] for r in partial["benchmarks"])
    assert partial["hessbench"]["grid"] == "smoke"

    rerun, data = _run(pytester, monkeypatch, setup, "--grid", "smoke", "--strategies", "kron")
    assert rerun.ret == 0 and data["benchmarks"]
    assert (pytester.path / "run.json.1.partial").read_bytes() == killed
    assert not (pytester.path / "run.json.partial").exists(), "the rerun's own is removed"
    rerun.stdout.fnmatch_lines(["*earlier run left*run.json.partial unfinished*kept as*1.partial*"])


def test_a_finished_run_removes_its_partial_file(pytester, monkeypatch):
    result, data = _run(
        pytester, monkeypatch, 'GRIDS["smoke"] = GRIDS["smoke"][:1]',
        "--grid", "smoke", "--strategies", "kron",
    )  # fmt: skip
    assert result.ret == 0 and data["benchmarks"]
    assert not (pytester.path / "run.json.partial").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_run_that_timed_nothing_still_writes_every_outcome(pytester, monkeypatch, tmp_path):
    result, data = _run(
        pytester, monkeypatch, 'GRIDS["smoke"] = GRIDS["smoke"][:2]',
        "--grid", "smoke", "--devices", "cuda", "--strategies", "torch_func,kron",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    assert data["benchmarks"] == [] and MACHINE_KEYS <= set(data["machine_info"])
    outcomes = data["hessbench"]["outcomes"]
    assert len(outcomes) == 4
    assert all(o["status"] == SKIPPED and "CUDA" in o["reason"] for o in outcomes)
    assert report.main([str(pytester.path / "run.json"), "--plots-dir", str(tmp_path)]) == 0


CRASHING = """
    import os, signal, sys
    GRIDS["smoke"] = [dict(TINY, width=2, depth=[1, 2])]

    def aborts(net, params, batch, loss_fn=None):
        print("zz_abort: about to abort", file=sys.stderr, flush=True)
        os.abort()

    def killed(net, params, batch, loss_fn=None):
        print("zz_sigkill: about to be killed", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    strategies.register("zz_abort", aborts, "test only: aborts its process (SIGABRT)")
    strategies.register("zz_sigkill", killed, "test only: its process is killed, as by the OOM killer")
"""


def test_a_crash_ends_only_its_cell(pytester, monkeypatch):
    result, data = _run(
        pytester, monkeypatch, CRASHING, "--grid", "smoke", "--devices", "cpu",
        "--strategies", "zz_abort, torch_func, zz_sigkill, kron",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    timed = {(r["params"]["strategy"], r["extra_info"]["depth"]) for r in data["benchmarks"]}
    assert timed == {(s, depth) for s in ("torch_func", "kron") for depth in (1, 2)}
    assert all(r["extra_info"]["status"] == OK for r in data["benchmarks"])
    crashed = {(o["strategy"], o["depth"]): o for o in data["hessbench"]["outcomes"]}
    assert set(crashed) == {(s, depth) for s in ("zz_abort", "zz_sigkill") for depth in (1, 2)}
    assert {o["status"] for o in crashed.values()} == {CRASHED}
    for depth in (1, 2):
        aborted = crashed[("zz_abort", depth)]["reason"]
        assert "killed by SIGABRT" in aborted
        # the worker's stderr: what the strategy printed, and faulthandler's stack
        assert "zz_abort: about to abort" in aborted
        assert "Fatal Python error: Aborted" in aborted and "in aborts" in aborted
        killed = crashed[("zz_sigkill", depth)]["reason"]
        assert "killed by SIGKILL" in killed and "zz_sigkill: about to be killed" in killed
    result.stdout.fnmatch_lines(["*Crashed: the worker was killed by SIGABRT*"])
    df, _ = tidy.load([pytester.path / "run.json"])
    not_timed = numbers.not_timed(df)
    assert set(not_timed.loc[not_timed["status"] == CRASHED, "strategy"]) == {
        "zz_abort",
        "zz_sigkill",
    }


def test_threads_apply_in_the_worker_too(pytester, monkeypatch):
    calls = pytester.path / "threads.txt"
    setup = f"""
        import os
        GRIDS["smoke"] = [dict(TINY, width=2, depth=1)]

        def counts_threads(net, params, batch, loss_fn=None):
            with open({str(calls)!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{torch.get_num_threads()}}\\n")
            return strategies.compute("torch_func", net, params, batch, loss_fn)

        strategies.register("zz_threads", counts_threads, "test only: notes its process's threads")
    """
    result, _ = _run(
        pytester, monkeypatch, setup, "--grid", "smoke", "--devices", "cpu",
        "--strategies", "zz_threads", "--threads", "3",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    pids, threads = zip(*(line.split() for line in calls.read_text().splitlines()))
    assert len(set(pids)) == 2, "called in the worker and in the pytest process"
    assert set(threads) == {"3"}


def test_users_nets_time_auto_with_its_first_call_planning_included(pytester, monkeypatch):
    """auto's first call of each case plans (its first_call_s); a CNN's head alone is chosen."""
    setup = """
    GRIDS["users"] = [
        dict(TINY, input=8, width=2, depth=1, output=3, loss="ce", device="cpu", arch="cnn"),
        dict(TINY, width=3, depth=1, device="cpu", arch="forum"),
    ]
    """
    result, data = _run(
        pytester, monkeypatch, setup,
        "--grid", "users", "--strategies", "auto,vmap_vjp", "--threads", "1",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    rows = {(r["extra_info"]["arch"], r["extra_info"]["strategy"]): r for r in data["benchmarks"]}
    assert set(rows) == {(a, s) for a in ("cnn", "forum") for s in ("auto", "vmap_vjp")}
    for (arch, strategy), row in rows.items():
        info = row["extra_info"]
        assert info["status"] == OK and info["P"] == (2 * 4 * 4 * 3 + 3 if arch == "cnn" else 16)
        assert (info["first_call_s"] is not None) is (strategy == "auto")
    df, _ = tidy.load([pytester.path / "run.json"])
    regrets = rule.regrets(df)
    assert len(regrets) == 2 and (regrets["fastest"] == "vmap_vjp").all()
    assert (regrets["regret"] > 0).all() and (regrets["first_call_regret"] > 0).all()


def test_a_second_run_on_one_json_is_refused(pytester, monkeypatch):
    """Two runs started together on one --benchmark-json each overwrote the other's cells."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (pytester.path / "run.json.lock").write_text(str(sleeper.pid))
        result, data = _run(pytester, monkeypatch, "", "--grid", "smoke")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*run.json is being written by another run (process {sleeper.pid}*"]
    )
    assert data is None and (pytester.path / "run.json.lock").read_text() == str(sleeper.pid)


@pytest.mark.parametrize("version, refused", [("5.2.1", True), ("4.0.0", True), ("5.3.0", False)])
def test_an_older_pytest_benchmark_is_a_usage_error(version, refused):
    if not refused:
        conftest.check_pytest_benchmark(version)
        return
    with pytest.raises(pytest.UsageError, match=f"needs pytest-benchmark>=5.3, found {version}"):
        conftest.check_pytest_benchmark(version)


def test_pyproject_asks_for_the_pytest_benchmark_the_plugin_checks():
    wanted = ".".join(map(str, conftest.PYTEST_BENCHMARK))
    assert f'"pytest-benchmark>={wanted}"' in (ROOT / "pyproject.toml").read_text()


def test_the_end_of_run_summary_follows_the_reports_rule():
    """Too slow to repeat, a peer or the planner never wins a case; a difference that is not
    1.1x and significant is a tie; a case with only cells too slow to repeat says so."""
    from types import SimpleNamespace

    from bench.run.finish import summary_lines
    from bench.run.session import Timed

    fast, slow = (0.10, 0.11, 0.10, 0.12, 0.10), (0.30, 0.31, 0.30, 0.32, 0.30)
    timed = {
        ("a", "one_round"): Timed(0.01, None, True, False, (0.01,), too_slow=True),
        ("a", "peer"): Timed(0.02, None, True, True, (0.02,) * 5),
        ("a", "auto"): Timed(0.03, None, True, False, (0.03,) * 5),
        ("a", "quick"): Timed(0.10, None, True, False, fast),
        ("a", "close"): Timed(0.10, None, True, False, tuple(t * 1.05 for t in fast)),
        ("a", BASELINE): Timed(0.30, None, True, False, slow),
        ("b", "quick"): Timed(0.10, None, True, False, fast),
        ("b", BASELINE): Timed(0.30, None, True, False, slow),
        ("c", "one_round"): Timed(9.0, None, True, False, (9.0,), too_slow=True),
    }
    run = SimpleNamespace(cases={"a": None, "b": None, "c": None}, timed=timed, interleaved={})
    a, b, c = summary_lines(run)
    assert a.startswith("a: quick 0.1 s median, tied with close") and "3.00x vs" in a
    assert b.startswith(f"b: quick 0.1 s median, faster than {BASELINE}")
    assert c == "c: no accurate strategy repeated (1 too slow to repeat, left out of every ranking)"
    # interleaved rounds, where the case has them, decide instead of the cells' own
    apart = {"quick": [0.1] * 5, BASELINE: [0.1] * 5}
    run.interleaved = {"b": {"strategies": list(apart), "rounds_s": apart}}
    assert summary_lines(run)[1].startswith(f"b: quick 0.1 s median, tied with {BASELINE}")


TWINS = """
GRIDS["smoke"] = [dict(TINY, width=2, depth=1), dict(TINY, width=3, depth=1)]
import time
import bench.analysis.rule
import bench.run.close_calls as close_calls
# every pair is a tie: a loaded machine can make one twin significantly faster by chance,
# and which pairs tie is rule.versus's own test (tests/test_report.py)
bench.analysis.rule.versus = lambda a, b: 0
def twin(net, params, batch, loss_fn=None):
    time.sleep(0.002)
    return strategies.compute("torch_func", net, params, batch, loss_fn)
for name in ("twin_a", "twin_b", "twin_c", "twin_d"):
    strategies.register(name, twin, "test-only: torch_func after 2 ms")
"""


def test_close_calls_are_timed_interleaved_and_kept_in_the_json(pytester, monkeypatch):
    result, data = _run(
        pytester, monkeypatch, TWINS,
        "--grid", "smoke", "--devices", "cpu", "--strategies", "twin_a,twin_b,twin_c,twin_d",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    interleaved = data["hessbench"]["interleaved"]
    assert set(interleaved) == {r["group"] for r in data["benchmarks"]}
    for entry in interleaved.values():
        assert len(entry["strategies"]) == 3 and set(entry["rounds_s"]) == set(entry["strategies"])
        counts = {len(seconds) for seconds in entry["rounds_s"].values()}
        assert len(counts) == 1 and counts.pop() >= 5
    assert not (pytester.path / "run.json.partial").exists()
    result.stdout.fnmatch_lines(["*close calls timed interleaved on 2 of 2 cases*"])


WRONG_WHEN_INTERLEAVED = """
_call = close_calls.hessian_call
def _wrong_b(strategy, data):  # twin_b passes its cell's check, then goes wrong
    call = _call(strategy, data)
    return (lambda: call() + 1.0) if strategy.name == "twin_b" else call
close_calls.hessian_call = _wrong_b
"""


def test_a_strategy_wrong_when_interleaved_leaves_the_case_skipped(pytester, monkeypatch):
    """Each interleaved contender is checked against the case's float64 reference before
    its rounds: one that fails there leaves the case's close call skipped, naming it, and
    the cells' own times stand."""
    result, data = _run(
        pytester, monkeypatch, TWINS + WRONG_WHEN_INTERLEAVED,
        "--grid", "smoke", "--devices", "cpu", "--strategies", "twin_a,twin_b,twin_c",
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    interleaved = data["hessbench"]["interleaved"]
    assert len(interleaved) == 2
    for entry in interleaved.values():
        assert "rounds_s" not in entry and "twin_b" in entry["skipped"], entry
    assert {r["params"]["strategy"] for r in data["benchmarks"]} == {"twin_a", "twin_b", "twin_c"}
    result.stdout.fnmatch_lines(["*close calls timed interleaved on 0 of 2 cases*"])


INTERRUPTED_WHEN_INTERLEAVED = """
def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt
close_calls.interleaved_rounds = _interrupt
"""


def test_an_interrupt_while_interleaving_loses_no_cell(pytester, monkeypatch):
    """Ctrl-C during the close calls: the run ends as interrupted, its JSON holds every cell
    already timed, and the case stopped says "interrupted" instead of rounds."""
    result, data = _run(
        pytester, monkeypatch, TWINS + INTERRUPTED_WHEN_INTERLEAVED,
        "--grid", "smoke", "--devices", "cpu", "--strategies", "twin_a,twin_b,twin_c",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    assert len(data["benchmarks"]) == 2 * 3
    (entry,) = data["hessbench"]["interleaved"].values()  # the run stopped at its first case
    assert entry == {"strategies": entry["strategies"], "skipped": "interrupted"}
    assert len(entry["strategies"]) >= 2


@pytest.mark.parametrize(
    ("setup", "args", "said"),
    [
        ("", ("--no-interleave",), None),
        ("close_calls.CASE_SECONDS = 1e-9", (), "over the 1e-09 s per case"),
        ("close_calls.TOTAL_SECONDS = 1e-9", (), "over the 1e-09 s of the whole run"),
    ],
)
def test_interleaving_opts_out_and_keeps_to_its_caps(pytester, monkeypatch, setup, args, said):
    result, data = _run(
        pytester, monkeypatch, TWINS + setup,
        "--grid", "smoke", "--devices", "cpu", "--strategies", "twin_a,twin_b,twin_c", *args,
    )  # fmt: skip
    assert result.ret == 0, result.stdout.str()
    interleaved = data["hessbench"]["interleaved"]
    if said is None:
        assert interleaved == {}
    else:
        assert len(interleaved) == 2
        assert all(said in e["skipped"] and "rounds_s" not in e for e in interleaved.values())
