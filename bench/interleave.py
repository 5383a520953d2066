"""``python -m bench.interleave``: strategies and the GEMM baseline timed in interleaved rounds.

The benchmark times each cell on its own, minutes apart from the others; on a shared machine
the load drifts in between. For a ratio between two strategies, or between a strategy and
the ``(P x B) @ (B x P)`` product, this command times them in turn, round after round, on
the same case, and prints each one's median and the ratios of medians. Each result is
checked with ``strategies.verify`` first, so a fast wrong Hessian is never timed.

    python -m bench.interleave w64-d2-b128-tanh-mse-f32-cpu custom-w64-d2-b128-tanh-mse-f32-cpu \\
        --strategies kron,torch_func --rounds 7
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable

import torch

import strategies
from bench import cli, measure
from bench.problems.grid import GRIDS, Case, cases
from bench.problems.models import chosen_params, make_problem

__all__ = ["interleaved_rounds", "main"]

GEMM = "gemm"


def _parser() -> cli.Parser:
    parser = cli.Parser(prog="python -m bench.interleave", description=__doc__.split("\n")[0])
    parser.add_argument("cases", nargs="+", help="case ids of any grid (e.g. w64-d2-...-cpu)")
    parser.add_argument("--strategies", required=True, help="comma-separated strategy names")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of each (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    return parser


def _medians(case: Case, names: list[str], rounds: int) -> dict[str, float]:
    """Median seconds of the GEMM and of each strategy, timed in turn for ``rounds`` rounds.

    Raises:
        ValueError: a strategy's Hessian fails ``strategies.verify``, or it refuses the case.
    """
    net, batch, loss_fn = make_problem(case)
    params = chosen_params(case, net)
    device = torch.device(case.device)
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    left = torch.randn(case.P, case.batch, generator=generator, dtype=dtype).to(device)
    right = torch.randn(case.batch, case.P, generator=generator, dtype=dtype).to(device)
    calls = {GEMM: lambda: left @ right}
    for name in names:
        calls[name] = functools.partial(strategies.compute, name, net, params, batch, loss_fn)
        ok, detail = strategies.verify(calls[name](), net, params, batch, loss_fn)
        if not ok:
            raise ValueError(f"{name}: {detail}")
    seconds = interleaved_rounds(calls, rounds, device)
    return {name: statistics.median(s) for name, s in seconds.items()}


def interleaved_rounds(
    calls: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, list[float]]:
    """Each call's seconds in ``rounds`` rounds, the calls timed in turn within each round.

    Interleaved, a drift in the machine's load falls on every call alike; this is also how
    the benchmark settles close calls at the end of a run (``bench.run.close_calls``).
    """
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            measure.sync(device)
            start = time.perf_counter()
            call()
            measure.sync(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Print, per case, the median seconds of each strategy and of the GEMM, and their ratios."""
    parser = _parser()
    args = parser.parse_args(argv)
    known = {c.id: c for grid in GRIDS for c in cases(grid)}
    try:
        names = cli.split_list(args.strategies, "--strategies")
        cli.check_names(names, strategies.names(), "strategies")
        cli.check_names(args.cases, list(known), "cases")
    except ValueError as exc:
        return cli.fail(parser.prog, str(exc))
    if args.rounds < 1 or (args.threads is not None and args.threads < 1):
        return cli.fail(parser.prog, "--rounds and --threads must be positive")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for case_id in args.cases:
        try:
            medians = _medians(known[case_id], names, args.rounds)
        except ValueError as exc:
            return cli.fail(parser.prog, f"{case_id}: {exc}")
        print(f"{case_id} (P = {known[case_id].P:,}, {torch.get_num_threads()} threads, "
              f"{args.rounds} rounds)")  # fmt: skip
        for name, median in medians.items():
            ratios = "  ".join(
                f"{median / medians[other]:.3g}x {other}" for other in medians if other != name
            )
            print(f"  {name:>24} {median:10.4g} s  {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
