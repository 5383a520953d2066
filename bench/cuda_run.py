"""The GPU run in one command: install what is missing, benchmark, audit, report, auto's table.

``bash bench/cuda_run.sh --wheels wheels --out DIR`` (this module's command line) runs, on
a machine with a GPU and no package registry, everything the CUDA half of the results
needs, each step bounded in time so that the whole fits a short loan of the machine:

1. the wheels the environment lacks (``bench.wheels``) into a temporary folder put first
   on ``PYTHONPATH``; nothing installed there changes, and the project runs from its tree;
2. ``pytest bench --grid gpu --devices cuda`` (the default grid and the large one, the
   default set of strategies: every registered one, ``auto`` and the peers, but the
   compiled variants), stopped with Ctrl-C at its deadline, so that what it measured is
   kept (the JSON, or its ``.partial``);
3. the audit with ``--device cuda``, the same strategies;
4. the report of both, ``auto``'s table of the committed sources plus both, and a summary
   of the ratios the CUDA results are quoted by (``summary.md``).

``--devices cpu --grid smoke`` runs the same steps on a CPU (two to three minutes on a
shared 2-core machine): CI runs it so that the command is known to work before a GPU is lent.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import pandas as pd

from bench import cli, wheels
from bench.analysis import numbers, tidy
from bench.problems.grid import DEVICES, GRIDS
from bench.vocabulary import CRASHED, ERROR, OK, OOM, WRONG

__all__ = [
    "ROOT",
    "GRACE_S",
    "Step",
    "run_step",
    "run_json",
    "output_name",
    "summary",
    "main",
]

ROOT = Path(__file__).resolve().parent.parent
#: how long a step stopped at its deadline has to finish its current call and write its files
GRACE_S = 60.0
#: seconds kept for the steps after the benchmark (audit, report, table) out of --minutes
_AFTER_BENCH_S = 100.0
_AUDIT_S = 45.0


class Step:
    """A child command's outcome: exit status, seconds, whether its deadline stopped it."""

    def __init__(self, name: str, returncode: int, seconds: float, stopped: bool):
        self.name, self.returncode, self.seconds, self.stopped = name, returncode, seconds, stopped

    def __repr__(self) -> str:
        stopped = ", stopped at its deadline" if self.stopped else ""
        return f"{self.name}: exit {self.returncode} after {self.seconds:.0f} s{stopped}"


def _tee(stream: TextIO, sinks: Sequence[TextIO]) -> None:
    for line in stream:
        for sink in sinks:
            sink.write(line)
            sink.flush()


def run_step(
    name: str,
    command: Sequence[str],
    log: Path,
    deadline_s: float | None = None,
    env: dict[str, str] | None = None,
    grace_s: float = GRACE_S,
) -> Step:
    """Run ``command`` from the repository root, its output on stdout and in ``log``.

    At ``deadline_s`` it gets SIGINT (pytest's Ctrl-C: the cell in progress is recorded, the
    JSON written), and SIGKILL ``grace_s`` later if it is still there.
    """
    start = time.monotonic()
    # a run started in the background by a shell without job control (``nohup ... &`` in a
    # script) has SIGINT ignored, and its steps would inherit that and sleep through their
    # deadline until SIGKILL: they get the default instead (Python's KeyboardInterrupt)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with open(log, "w") as sink:
        print(f"cuda_run: {name}: {shlex.join(command)}", flush=True)
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert process.stdout is not None
        copier = threading.Thread(target=_tee, args=(process.stdout, (sys.stdout, sink)))
        copier.start()
        stopped = False
        try:
            process.wait(deadline_s)
        except subprocess.TimeoutExpired:
            stopped = True
            print(f"cuda_run: {name}: deadline of {deadline_s:.0f} s: interrupting", flush=True)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        copier.join()
    step = Step(name, process.returncode, time.monotonic() - start, stopped)
    print(f"cuda_run: {step}", flush=True)
    return step


def run_json(path: Path) -> Path | None:
    """The benchmark's JSON, or what it kept in ``<json>.partial`` where it did not finish."""
    for candidate in (path, Path(f"{path}.partial")):
        if candidate.is_file():
            return candidate
    return None


def output_name(devices: Sequence[str], grid: str, gpu_name: str | None) -> str:
    """The run's file stem: the GPU's name where CUDA ran, else ``cpu``, and the grid unless
    it is ``gpu`` (e.g. ``nvidia-h200``, ``cpu-smoke``)."""
    where = gpu_name if "cuda" in devices and gpu_name else "cpu"
    stem = re.sub(r"[^a-z0-9]+", "-", where.lower()).strip("-")
    return stem if grid == "gpu" else f"{stem}-{grid}"


def _kron_over(df: pd.DataFrame, other: str) -> pd.Series:
    """``kron``'s min time over ``other``'s, per case where both ran accurately."""
    pairs = numbers.speedups(df, other, "kron")
    return pd.Series(pairs["speedup"].to_numpy(), index=pairs["case"], dtype=float)


def summary(df: pd.DataFrame) -> str:
    """The numbers a run is quoted by, as Markdown: per case, ``kron`` over ``torch_func``,
    over the GEMM and over ``jax_hessian`` (min times, one run); the largest P each strategy
    ran accurately; every cell that was wrong, crashed, raised or ran out of memory."""
    timed = df[df["status"] == OK].sort_values(["P", "case"])
    kron = timed[timed["strategy"] == "kron"].set_index("case")["vs_gemm"]
    ratios = {"torch_func": _kron_over(df, "torch_func"), "GEMM": kron}
    ratios["jax_hessian"] = _kron_over(df, "jax_hessian")
    lines = [
        "| case | P | " + " | ".join(f"kron / {name}" for name in ratios) + " |",
        "|---|---|" + "---|" * len(ratios),
    ]
    for case, P in dict(zip(timed["case"], timed["P"])).items():
        cells = [f"{r[case]:.3g}" if case in r.index else "-" for r in ratios.values()]
        lines.append(f"| {case} | {int(P):,} | " + " | ".join(cells) + " |")
    largest = timed.groupby("strategy")["P"].max().sort_values(ascending=False)
    listed = ", ".join(f"`{s}` {int(p):,}" for s, p in largest.items())
    lines += ["", f"Largest P timed accurately: {listed or 'none'}."]
    failed = df[df["status"].isin([WRONG, CRASHED, ERROR, OOM])]
    lines += ["", f"Cells wrong, crashed, raising or out of memory: {len(failed)}."]
    for row in failed.itertuples():
        reason = row.reason if isinstance(row.reason, str) else f"max_rel_err {row.max_rel_err:.2g}"
        lines.append(
            f"- `{row.strategy}` on {row.case}: {row.status}: {reason.splitlines()[0][:200]}"
        )
    return "\n".join(lines) + "\n"


def _probe(python: str, env: dict[str, str]) -> dict:
    """The environment's versions and GPU, asked of a child (this process holds no GPU memory)."""
    code = (
        "import json, sys, torch\n"
        "cuda = torch.cuda.is_available()\n"
        "info = dict(python=sys.version.split()[0], torch=torch.__version__,\n"
        "            cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0) if cuda else None)\n"
        "try:\n    import jax; info['jax'] = jax.__version__\n"
        "except ImportError:\n    info['jax'] = None\n"
        "print(json.dumps(info))\n"
    )
    done = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parser() -> cli.Parser:
    parser = cli.Parser(prog="bench/cuda_run.sh", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=os.environ.get("OUT"),
        help="folder for the JSON, logs, report and table (default: $OUT)",
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        help="folder of wheels to install what is missing from (none: use what is installed)",
    )
    parser.add_argument("--devices", default="cuda", help="comma-separated devices (default cuda)")
    parser.add_argument("--grid", default="gpu", help="named grid (default gpu: default + large)")
    parser.add_argument(
        "--strategies", help="comma-separated strategy names (default: the benchmark's default set)"
    )
    parser.add_argument(
        "--minutes", type=float, default=8.0, help="the whole run's time, all steps (default 8)"
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=5.0,
        help="pytest bench --time-budget (default 5 s: on a GPU, what takes longer at a size "
        "where the fastest takes a fraction of a second is recorded as over budget)",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        help="pytest bench --memory-fraction (default 0.8 on CUDA alone, where running out "
        "raises and the run goes on; else the benchmark's own)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The steps of the module docstring; 0 where the report was built from a benchmark JSON."""
    parser = _parser()
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        if args.out is None:
            raise ValueError("--out is required where $OUT is not set")
        devices = cli.split_list(args.devices, "--devices")
        cli.check_names(devices, DEVICES, "devices")
        cli.check_names([args.grid], sorted(GRIDS), "grids")
        chosen = (
            cli.split_list(args.strategies, "--strategies")
            if args.strategies
            else cli.default_strategies()
        )
        if not args.minutes > 0:
            raise ValueError(f"--minutes must be positive, got {args.minutes}")
        if args.wheels is not None and not args.wheels.is_dir():
            raise ValueError(f"--wheels {args.wheels} is not a folder")
    except ValueError as exc:
        return cli.fail(parser.prog, str(exc))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    env = dict(os.environ)
    site = tempfile.TemporaryDirectory(prefix="hessbench-site-")
    if args.wheels is not None:
        installed = wheels.install(args.wheels.resolve(), Path(site.name))
        print(f"cuda_run: installed {[w.pin for w in installed] or 'nothing'} from {args.wheels}")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site.name, env.get("PYTHONPATH")) if p)
    check = subprocess.run(
        [python, "-m", "bench.wheels", "check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    lacking = [line.removeprefix("missing: ") for line in check.stdout.splitlines()]
    if "pytest-benchmark>=5.3" in lacking:
        return cli.fail(parser.prog, "pytest-benchmark >= 5.3 is missing: give --wheels FOLDER")
    if lacking:
        print(f"cuda_run: still missing (their cells say so): {' '.join(lacking)}")
    info = _probe(python, env)
    print(f"cuda_run: {json.dumps(info)}")
    if "cuda" in devices and info["gpu"] is None:
        return cli.fail(parser.prog, "--devices cuda: torch sees no GPU on this machine")

    name = output_name(devices, args.grid, info["gpu"])
    bench_json, audit_json = out / f"{name}.json", out / f"audit-{name}.json"
    fraction = args.memory_fraction or (0.8 if devices == ["cuda"] else None)
    bench = run_step(
        "benchmark",
        [
            python, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "--no-report",
            "--grid", args.grid, "--devices", ",".join(devices), "--strategies", ",".join(chosen),
            "--time-budget", str(args.time_budget), "--benchmark-json", str(bench_json),
            *(["--memory-fraction", str(fraction)] if fraction else []),
        ],
        out / f"{name}.log",
        deadline_s=max(60.0, args.minutes * 60 - _AFTER_BENCH_S - (time.monotonic() - started)),
        env=env,
    )  # fmt: skip
    measured = run_json(bench_json)
    # 1: some cells failed (recorded: data); 2: interrupted at the deadline (kept)
    if measured is None or bench.returncode not in (0, 1, 2):
        print(f"cuda_run: the benchmark failed ({bench}); see {out / f'{name}.log'}")
        return 1
    audit_device = "cuda" if "cuda" in devices else "cpu"
    audit = run_step(
        "audit",
        [python, "-m", "bench.audit", "--device", audit_device, "--strategies", ",".join(chosen),
         "--json", str(audit_json)],
        out / f"audit-{name}.log",
        deadline_s=_AUDIT_S * max(1.0, args.minutes / 8),
        env=env,
    )  # fmt: skip
    inputs = [str(measured)] + ([str(audit_json)] if audit_json.is_file() else [])
    report = run_step(
        "report",
        [python, "-m", "bench.report", *inputs, "--plots-dir", str(out / "report"),
         "--html", str(out / "report" / "report.html")],
        out / "report.log",
        env=env,
    )  # fmt: skip
    committed = json.loads((ROOT / "strategies" / "auto_table.json").read_text())["sources"]
    sources = [s for s in committed if (ROOT / s).is_file()]
    table = run_step(
        "auto_table",
        [
            python,
            "-m",
            "bench.auto_table",
            *sources,
            *inputs,
            "--out",
            str(out / "auto_table.json"),
        ],
        out / "auto_table.log",
        env=env,
    )
    df, _ = tidy.load([measured])
    text = summary(df[df["device"].isin(devices)])
    (out / "summary.md").write_text(text)
    print(text)
    steps = [bench, audit, report, table]
    print("cuda_run: " + "; ".join(map(repr, steps)))
    print(f"cuda_run: {time.monotonic() - started:.0f} s in all; files in {out}")
    site.cleanup()
    return 0 if report.returncode == 0 and table.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
