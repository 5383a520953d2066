"""End-to-end runs of the benchmark suite on tiny grids, in process through pytester."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from bench.vocabulary import BASELINE, ERROR, OK, OOM, OVER_BUDGET, SKIPPED, WRONG

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
HEADER = "import torch\nimport strategies\nfrom bench.grid import GRIDS\nTINY = {!r}\n".format(
    dict(input=3, output=1, activation="tanh", loss="mse", batch=4, dtype="float32")
)
ROW_KEYS = {
    "case", "input", "width", "depth", "output", "activation", "loss", "batch", "dtype",
    "device", "strategy", "status", "P", "hessian_bytes", "peak_bytes", "max_abs_err",
    "max_rel_err", "accurate", "tolerance", "grad_s", "gemm_s", "cost_vs_grad", "vs_gemm",
    "first_call_s", "peer", "threads",
}  # fmt: skip
MACHINE_KEYS = {
    "torch_version", "torch_threads", "cpu_model", "gpu_name", "cuda_version", "machine_label"
}  # fmt: skip


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
    assert MACHINE_KEYS <= set(data["machine_info"])
    assert data["machine_info"]["torch_threads"] == 1
    hessbench = data["hessbench"]
    assert hessbench["grid"] == "smoke" and "--grid smoke" in hessbench["command"]
    if not torch.cuda.is_available():
        assert {o["status"] for o in hessbench["outcomes"]} == {SKIPPED}
    result.stdout.fnmatch_lines(["*fastest accurate strategy per case*", f"*x vs {BASELINE}*"])


def test_unknown_strategy_is_a_usage_error_listing_valid_names(pytester, monkeypatch):
    result, _ = _run(pytester, monkeypatch, "", "--strategies", "nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown strategies*nope*valid strategies*torch_func*"])


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


def test_oom_error_and_interrupt_are_recorded_and_keep_what_was_measured(pytester, monkeypatch):
    setup = """
    GRIDS["smoke"] = [dict(TINY, width=2, depth=[1, 2])]
    def oom(net, params, batch, loss_fn=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
    strategies.register("fake_oom", oom, "test-only: runs out of memory")
    def broken(net, params, batch, loss_fn=None):
        raise RuntimeError("shapes do not match")
    def interrupted(net, params, batch, loss_fn=None):
        raise KeyboardInterrupt
    strategies.register("fake_error", broken, "test-only: raises")
    strategies.register("fake_interrupt", interrupted, "test-only: Ctrl-C")
    """
    result, data = _run(
        pytester, monkeypatch, setup, "--grid", "smoke", "--devices", "cpu",
        "--strategies", "torch_func,fake_oom,fake_error,fake_interrupt",
    )  # fmt: skip
    # The run stops at the first case's fake_interrupt: what came before reaches the JSON.
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert [r["extra_info"]["strategy"] for r in data["benchmarks"]] == ["torch_func"]
    outcomes = {o["strategy"]: o for o in data["hessbench"]["outcomes"]}
    assert {s: o["status"] for s, o in outcomes.items()} == {
        "fake_oom": OOM,
        "fake_error": ERROR,
        "fake_interrupt": SKIPPED,
    }
    assert "out of memory" in outcomes["fake_oom"]["reason"]
    assert "shapes do not match" in outcomes["fake_error"]["reason"]


def test_a_killed_run_keeps_what_it_measured(pytester, monkeypatch):
    """A run the host kills (SIGKILL: no session end) still leaves every finished cell."""
    setup = """
        import os, signal
        GRIDS["smoke"] = GRIDS["smoke"][:1]

        def killed(net, params, batch, loss_fn=None):
            os.kill(os.getpid(), signal.SIGKILL)

        strategies.register("zz_killed", killed, "test only: the host kills the run")
    """
    result, data = _run(
        pytester, monkeypatch, setup,
        "--grid", "smoke", "--strategies", "torch_func,mlp_kron,zz_killed", "-p", "no:randomly",
    )  # fmt: skip
    assert result.ret != 0 and data is None, "SIGKILL skips pytest-benchmark's own JSON"
    partial = json.loads((pytester.path / "run.json.partial").read_text())
    assert {r["params"]["strategy"] for r in partial["benchmarks"]} == {"torch_func", "mlp_kron"}
    assert all(r["extra_info"]["accurate"] for r in partial["benchmarks"])
    assert partial["hessbench"]["grid"] == "smoke"


def test_a_finished_run_removes_its_partial_file(pytester, monkeypatch):
    result, data = _run(
        pytester, monkeypatch, 'GRIDS["smoke"] = GRIDS["smoke"][:1]',
        "--grid", "smoke", "--strategies", "mlp_kron",
    )  # fmt: skip
    assert result.ret == 0 and data["benchmarks"]
    assert not (pytester.path / "run.json.partial").exists()
