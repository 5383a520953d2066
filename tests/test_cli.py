"""The report and audit command lines: one line and exit status 2 for a bad input, no data lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import audit, cli, report

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"

#: pytest-benchmark's JSON of another project's suite: no hessbench cell in it
FOREIGN = {
    "machine_info": {"node": "elsewhere"},
    "commit_info": {},
    "benchmarks": [
        {
            "group": None,
            "name": "test_sort",
            "fullname": "tests/test_speed.py::test_sort",
            "params": None,
            "extra_info": {},
            "stats": {"min": 1e-3, "max": 2e-3, "mean": 1.5e-3, "rounds": 5},
        }
    ],
    "datetime": "2026-01-01T00:00:00",
    "version": "5.1.0",
}


def _exit_status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def _one_line_error(capsys: pytest.CaptureFixture, status: int) -> str:
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _write(path: Path, content: object) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def _bench_without(key: str) -> dict:
    data = json.loads((DATA / "bench_cpu.json").read_text())
    del data["hessbench"]["outcomes"][0][key]
    return data


def _bench_with(edit: Callable[[dict], None]) -> dict:
    data = json.loads((DATA / "bench_cpu.json").read_text())
    edit(data)
    return data


def _nan_times(data: dict) -> None:
    for bench in data["benchmarks"]:
        bench["stats"]["min"] = bench["stats"]["median"] = float("nan")


def _set(where: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], None]:
    return lambda data: where(data).__setitem__(key, value)


_cell = lambda data: data["benchmarks"][0]["extra_info"]  # noqa: E731

#: (id, edit of a good run, what the one line says): malformed fields of a run JSON
MALFORMED = [
    ("NaN min and median in every cell", _nan_times, "no benchmark has a finite stats.min"),
    ("P a string", _set(_cell, "P", "abc"), "benchmark 0: P must be a positive integer, got 'abc'"),
    ("P null", _set(_cell, "P", None), "benchmark 0: P must be a positive integer, got None"),
    (
        "outcome P a string",
        _set(lambda d: d["hessbench"]["outcomes"][0], "P", "abc"),
        "hessbench outcome 0: P must be a positive integer",
    ),
    ("commit_info a list", _set(lambda d: d, "commit_info", ["x"]), "'commit_info' must be an"),
    ("case an object", _set(_cell, "case", {"x": 1}), "benchmark 0: case must be a string"),
    ("width a string", _set(_cell, "width", "32"), "benchmark 0: width must be a positive"),
    (
        "stats.min a word",
        _set(lambda d: d["benchmarks"][0]["stats"], "min", "fast"),
        "benchmark 0: stats.min must be a number, got 'fast'",
    ),
    (
        "stats a list",
        _set(lambda d: d["benchmarks"][0], "stats", [1]),
        "benchmark 0: 'stats' must be an object, got a list",
    ),
]


def _audit_without(key: str) -> dict:
    data = json.loads((DATA / "audit.json").read_text())
    del data["records"][0][key]
    return data


#: (id, argv made in a tmp folder, what the one line says)
REPORT_PROBES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("foreign", lambda t: [_write(t / "other.json", FOREIGN)], "test_sort) is not a hessbench"),
    ("missing", lambda t: [str(t / "gone.json")], "gone.json: no such file"),
    ("not json", lambda t: [_write(t / "a.json", "not json")], "cannot read as JSON"),
    ("a list", lambda t: [_write(t / "a.json", "[1, 2]")], "not a pytest-benchmark JSON"),
    ("empty glob", lambda t: [str(t / "none" / "*.json")], "a shell pattern that matched nothing"),
    ("a folder", lambda t: [str(t)], "a directory, not a JSON file"),
    ("no file", lambda t: [], "no input files"),
    ("bad option", lambda t: [str(DATA / "audit.json"), "--bogus"], "unrecognized arguments"),
    (
        "outcome without status",
        lambda t: [_write(t / "b.json", _bench_without("status"))],
        "hessbench outcome 0 lacks ['status']",
    ),
    (
        "audit record without model",
        lambda t: [_write(t / "au.json", _audit_without("model"))],
        "audit record 0 lacks ['model']",
    ),
    *(
        (name, lambda t, edit=edit: [_write(t / "m.json", _bench_with(edit))], says)
        for name, edit, says in MALFORMED
    ),
    (
        "two inputs, one CSV",
        lambda t: [
            shutil.copy(DATA / "bench_cpu.json", t / "run.json"),
            shutil.copy(DATA / "bench_cpu.json", t / "run.txt"),
        ],
        "would both be",
    ),
    (
        "plots dir is a file",
        lambda t: [
            shutil.copy(DATA / "bench_cpu.json", t / "run.json"),
            "--plots-dir",
            _write(t / "file", ""),
        ],
        "cannot write",
    ),
]


@pytest.mark.parametrize(
    "make_argv, says", [p[1:] for p in REPORT_PROBES], ids=[p[0] for p in REPORT_PROBES]
)
def test_report_answers_a_bad_input_with_one_line(tmp_path, capsys, make_argv, says):
    argv = [str(a) for a in make_argv(tmp_path)]
    if "--plots-dir" not in argv and argv and not argv[-1].startswith("--"):
        argv += ["--plots-dir", str(tmp_path / "plots")]
    line = _one_line_error(capsys, _exit_status(report.main, argv))
    assert line.startswith("python -m bench.report: error: ") and says in line


AUDIT_PROBES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("unknown strategy", lambda t: ["--strategies", "nope"], "unknown strategies ['nope']"),
    ("unknown model", lambda t: ["--models", "tied,nope"], "unknown models ['nope']"),
    ("no strategy", lambda t: ["--strategies", " , "], "--strategies names nothing"),
    ("json is a folder", lambda t: ["--json", str(t)], "is a folder, not a file"),
    ("json under a file", lambda t: ["--json", _write(t / "f", "") + "/a.json"], "is not a folder"),
    ("bad option", lambda t: ["--bogus"], "unrecognized arguments: --bogus"),
    # os.access says yes to root here; opening it does not
    ("json unwritable", lambda t: ["--json", "/proc/hessbench-audit.json"], "/proc/hessbench"),
]


@pytest.mark.parametrize(
    "make_argv, says", [p[1:] for p in AUDIT_PROBES], ids=[p[0] for p in AUDIT_PROBES]
)
def test_audit_answers_a_bad_argument_with_one_line_before_running(
    tmp_path, capsys, monkeypatch, make_argv, says
):
    monkeypatch.setattr(audit, "run_audit", lambda *a, **k: pytest.fail("the audit ran"))
    line = _one_line_error(capsys, _exit_status(audit.main, make_argv(tmp_path)))
    assert line.startswith("python -m bench.audit: error: ") and says in line


def test_audit_strips_spaces_around_listed_names(tmp_path):
    path = tmp_path / "audit.json"
    argv = ["--json", str(path), "--strategies", "full_autograd, torch_func", "--models", " tied"]
    assert audit.main(argv) == 0
    records = json.loads(path.read_text())["records"]
    assert [(r["strategy"], r["model"]) for r in records] == [
        ("full_autograd", "tied"),
        ("torch_func", "tied"),
    ]


@pytest.mark.parametrize(
    "command, says",
    [
        (["bench.report", "other.json"], "is not a hessbench cell"),
        (["bench.audit", "--strategies", "nope"], "unknown strategies"),
    ],
    ids=["report", "audit"],
)
def test_a_bad_input_exits_2_with_one_line_as_a_process(tmp_path, command, says):
    _write(tmp_path / "other.json", FOREIGN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr


def _cells(csv: Path) -> int:
    return len(csv.read_text().strip().splitlines()) - 1


def test_two_runs_of_one_machine_each_keep_every_cell_in_their_csv(tmp_path):
    first = Path(shutil.copy(DATA / "bench_cpu.json", tmp_path / "first.json"))
    data = json.loads(first.read_text())
    data["benchmarks"] = data["benchmarks"][:5]  # a later run of some of the same cells
    second = Path(_write(tmp_path / "second.json", data))
    cells = 24 + 4  # first.json's timed cells and outcomes
    argv = [str(first), str(second), "--plots-dir", str(tmp_path / "plots")]
    assert report.main(argv) == 0
    assert _cells(tmp_path / "first.csv") == cells
    assert _cells(tmp_path / "second.csv") == 5 + 4


def test_an_unchanged_csv_is_not_rewritten(tmp_path):
    run = shutil.copy(DATA / "bench_cpu.json", tmp_path / "run.json")
    argv = [str(run), "--plots-dir", str(tmp_path / "plots")]
    assert report.main(argv) == 0
    csv = tmp_path / "run.csv"
    before = csv.read_bytes()
    os.utime(csv, ns=(0, 0))
    assert report.main(argv) == 0
    assert csv.read_bytes() == before and csv.stat().st_mtime_ns == 0


def test_the_committed_csvs_are_what_the_report_makes_of_the_committed_runs(tmp_path):
    results = ROOT / "results"
    for path in [*results.glob("*.json"), *results.glob("*.csv")]:
        shutil.copy(path, tmp_path)
    committed = {p.name: p.read_bytes() for p in tmp_path.glob("*.csv")}
    inputs = sorted(str(p) for p in tmp_path.glob("*.json"))
    assert report.main([*inputs, "--plots-dir", str(tmp_path / "plots")]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.csv")} == committed


def test_audit_keeps_its_records_as_they_come(tmp_path, monkeypatch):
    """A killed audit leaves ``<json>.partial`` with the models done; the next run keeps it
    as ``<json>.1.partial``, and its own partial file is gone once its JSON is written."""
    path = tmp_path / "audit.json"
    argv = ["--json", str(path), "--strategies", "full_autograd", "--models", "tied,mlp_tanh"]
    real = audit.audit_model
    done = []

    def killed_on_the_second(model, *args, **kwargs):
        if done:
            raise KeyboardInterrupt
        done.append(model.name)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(audit, "audit_model", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        audit.main(argv)
    assert not path.exists()
    partial = json.loads(Path(f"{path}.partial").read_text())
    assert [(r["strategy"], r["model"]) for r in partial["records"]] == [("full_autograd", "tied")]
    monkeypatch.setattr(audit, "audit_model", real)
    assert audit.main(argv) == 0
    assert json.loads(Path(f"{path}.1.partial").read_text()) == partial
    assert not Path(f"{path}.partial").exists()
    assert len(json.loads(path.read_text())["records"]) == 2


def test_output_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    out = tmp_path / "run.json"
    lock = Path(f"{out}.lock")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(str(sleeper.pid))
        with pytest.raises(ValueError, match=f"another run \\(process {sleeper.pid}"):
            cli.lock_output(out, "--benchmark-json")
    finally:
        sleeper.kill()
        sleeper.wait()
    cli.lock_output(out, "--benchmark-json")  # its holder is gone: taken over
    assert lock.read_text() == str(os.getpid())
    cli.unlock_output(out)
    assert not lock.exists()
