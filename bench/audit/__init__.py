"""Correctness audit: every registered strategy on every zoo model, against two float64 references.

Run ``python -m bench.audit [--json PATH] [--strategies a,b] [--models m1,m2] [--device cuda]``.
For each zoo model the audit computes the row-by-row double-backward loop and central finite
differences of the gradient (neither uses vmap or torch.func) on the CPU, checks that they
agree, and then records
per strategy x model a status of ``bench.vocabulary``: ok, wrong (with its error), error (with
the exception) or unsupported, the strategy computing on ``--device`` (the same seeded model
moved there; the references stay on the CPU, whatever the device's own kernels do).
It also runs a minimal reproduction of each known upstream bug and records whether it still
shows with the installed torch. The output follows the audit JSON contract (docs/DESIGN.md,
"The audit JSON").

Tolerances:
    ``FD_STEP = 1e-5``: central differences have truncation error O(h^2) and rounding error
    O(eps / h); both are about 1e-10 relative here, so the loop and FD agree to 1e-11..1e-8 on
    the zoo. ``REFERENCE_TOL = 1e-6`` leaves two orders of margin above that: a loop that
    disagrees by more is a broken reference and the audit exits non-zero.
    ``TOL = 1e-7``: a correct strategy differs from the loop only by float64 round-off
    (1e-16..1e-14 relative on the zoo); the upstream bugs found are 1e-2..1e-1. 1e-7 sits
    far from both and below the FD-certified accuracy of the loop.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

import strategies
from bench import cli, device
from bench.audit import known_bugs
from bench.measure import machine_label
from bench.problems import zoo
from bench.reference import fd_hessian, loop_hessian
from bench.vocabulary import AUDIT_KIND, ERROR, OK, UNSUPPORTED, WRONG
from strategies import Strategy

__all__ = [
    "FD_STEP",
    "REFERENCE_TOL",
    "TOL",
    "KNOWN_BUGS",
    "run_audit",
    "audit_model",
    "run_known_bugs",
    "references_agree",
    "format_matrix",
    "main",
]

FD_STEP = 1e-5
REFERENCE_TOL = 1e-6
TOL = 1e-7

#: Bugs in torch itself that the audit found or that the strategies work around. Each
#: reproduction is a module of ``bench.audit.known_bugs``, whose text runs in a fresh namespace
#: under a fixed seed and sets ``bug_shows``.
KNOWN_BUGS: tuple[dict[str, Any], ...] = (
    {
        "title": (
            "vmap's batching rules for normalisation backward are wrong inside jacrev: through "
            "an affine LayerNorm or BatchNorm in training mode, torch.func.hessian, "
            "functorch.hessian and jacfwd(jacrev(f)) return a wrong, "
            "asymmetric Hessian with no error, while vmap over jvp(grad(f)) or vjp(grad(f)) "
            "and the double-backward loop are right"
        ),
        "strategies": ["torch_func", "functorch", "jacfwd_jacrev"],
        "models": ["mlp_layernorm", "batchnorm_train"],
        "upstream": "pytorch/functorch#534",
        "reproduction": known_bugs.source("normalisation_jacrev"),
    },
    {
        "title": (
            "the same batching-rule bug through an affine InstanceNorm (which calls batch_norm "
            "inside): torch.func.hessian, functorch.hessian and jacfwd(jacrev(f)) return a "
            "wrong, asymmetric Hessian with no error"
        ),
        "strategies": ["torch_func", "functorch", "jacfwd_jacrev"],
        "models": ["conv_instancenorm"],
        "upstream": "pytorch/functorch#534",
        "reproduction": known_bugs.source("instancenorm_jacrev"),
    },
    {
        "title": (
            "forward-over-reverse of F.mse_loss with its default mean reduction raises "
            "'RuntimeError: ZeroTensors are immutable' (reduction='sum' works; "
            "strategies.mse_loss is the workaround)"
        ),
        "strategies": ["vmap_jvp", "block_symmetric", "autograd_functional"],
        "models": [],
        "upstream": None,
        "reproduction": known_bugs.source("mse_loss_forward_over_reverse"),
    },
    {
        "title": (
            "torch.autograd.functional.hessian(vectorize=True) cannot batch through nn.GRU: "
            "'Batching rule not implemented for aten::unsafe_split.Tensor'"
        ),
        "strategies": ["autograd_functional"],
        "models": ["gru"],
        "upstream": None,
        "reproduction": known_bugs.source("gru_vectorized_hessian"),
    },
    {
        "title": (
            "nn.MultiheadAttention with need_weights=False (scaled_dot_product_attention, "
            "flash kernel on CPU) has no double backward, so no Hessian through it; the zoo's "
            "attention model uses need_weights=True (the math path)"
        ),
        "strategies": [],
        "models": [],
        "upstream": "pytorch/pytorch#116350",
        "reproduction": known_bugs.source("attention_double_backward"),
    },
)


def _rel(diff: torch.Tensor, scale: torch.Tensor) -> float:
    return float(diff.abs().max() / scale) if scale > 0 else float(diff.abs().max())


def _net_state(net: torch.nn.Module) -> list[tuple]:
    """Everything a strategy promises not to change: values, requires_grad, .grad, modes."""
    state: list[tuple] = [("training", m.training) for m in net.modules()]
    for name, p in net.named_parameters():
        grad = None if p.grad is None else p.grad.clone()
        state.append((name, p.detach().clone(), p.requires_grad, grad))
    state.extend((name, b.clone()) for name, b in net.named_buffers())
    return state


def _same_state(a: list[tuple], b: list[tuple]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor):
                if u.shape != v.shape or not torch.equal(u, v):
                    return False
            elif u != v:
                return False
    return True


def _cell(
    strategy: Strategy,
    model: zoo.ZooModel,
    reference: torch.Tensor,
    ignore_supports: bool,
    on: str = "cpu",
) -> dict[str, Any]:
    """One strategy on one model, computing on device ``on``: a record of the audit JSON
    (without the model fields)."""
    net, params, batch, loss_fn = zoo.build(model, on)
    record: dict[str, Any] = {
        "strategy": strategy.name,
        "status": OK,
        "max_rel_err": None,
        "sym_err": None,
        "exception": None,
        "message": None,
        "seconds": None,
    }
    ok, reason = strategy.supports(net, loss_fn)
    if not ok and not ignore_supports:
        record.update(status=UNSUPPORTED, message=reason)
        return record
    notes = [] if ok else [f"ran although supports() says no: {reason}"]
    before = _net_state(net)
    start = time.perf_counter()
    try:
        # as users call it where supports() says yes (input contract, autograd on, torch's
        # missing formulas named); compute_fn skips the guard, to measure what it guards
        if ok:
            H = strategy.compute(net, params, batch, loss_fn)
        else:
            H = strategy.compute_fn(net, params, batch, loss_fn)
    except Exception as exc:  # the audit records any crash and goes on
        record.update(
            status=ERROR,
            exception=type(exc).__name__,
            message="; ".join([str(exc).strip().split("\n")[0][:300], *notes]),
            seconds=time.perf_counter() - start,
        )
        return record
    record["seconds"] = time.perf_counter() - start
    P = reference.shape[0]
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (P, P):
        shape = tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__
        record.update(status=WRONG, message=f"returned {shape}, expected {(P, P)}")
        return record
    H = H.detach()
    if not torch.isfinite(H).all():
        # NaN is not JSON: the errors stay null and the message says why
        record.update(status=WRONG, message="returned non-finite entries")
        return record
    scale = reference.abs().max()
    record["max_rel_err"] = _rel(H.to(reference) - reference, scale)
    record["sym_err"] = _rel(H - H.T, H.abs().max())
    problems = []
    if H.dtype != torch.float64:
        problems.append(f"returned {H.dtype} for float64 parameters")
    if not (record["max_rel_err"] <= TOL and record["sym_err"] <= TOL):
        problems.append(
            f"max_rel_err {record['max_rel_err']:.2e}, sym_err {record['sym_err']:.2e} "
            f"(tolerance {TOL:.0e})"
        )
    if not _same_state(before, _net_state(net)):
        problems.append("changed the net (values, requires_grad, .grad, buffers or mode)")
    if problems:
        record["status"] = WRONG
    record["message"] = "; ".join(problems + notes) or None
    return record


def audit_model(
    model: zoo.ZooModel,
    audited: Sequence[Strategy],
    ignore_supports: bool = False,
    on: str = "cpu",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reference check (on the CPU) and one record per strategy computing on device ``on``
    for one zoo model."""
    net, params, batch, loss_fn = zoo.build(model)
    names = list(params)
    check: dict[str, Any] = {
        "model": model.name,
        "P": sum(p.numel() for p in params.values()),
        "loop_vs_fd_rel_err": None,
        "fd_step": FD_STEP,
        "agree": False,
        "error": None,
    }
    try:
        loop = loop_hessian(net, names, batch, loss_fn)
        fd = fd_hessian(net, names, batch, loss_fn, step=FD_STEP)
    except Exception as exc:  # a model the references cannot differentiate is reported, not fatal
        check["error"] = f"{type(exc).__name__}: {exc}"
        return check, []
    check["loop_vs_fd_rel_err"] = _rel(loop - fd, loop.abs().max())
    check["agree"] = check["loop_vs_fd_rel_err"] <= REFERENCE_TOL
    kind = list(model.model_kind)
    records = [
        {"model": model.name, "model_kind": kind, **_cell(s, model, loop, ignore_supports, on)}
        for s in audited
    ]
    return check, records


def run_known_bugs(bugs: Iterable[dict[str, Any]] = KNOWN_BUGS) -> list[dict[str, Any]]:
    """Run each bug's reproduction in a fresh namespace and record whether it still shows."""
    out = []
    for bug in bugs:
        entry = {k: bug[k] for k in ("title", "strategies", "models", "upstream", "reproduction")}
        namespace: dict[str, Any] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                exec(
                    compile(bug["reproduction"], f"<known bug: {bug['title'][:40]}>", "exec"),
                    namespace,
                )
                entry["reproduces"] = bool(namespace.get("bug_shows", False))
            except Exception:
                entry["reproduces"] = False
                entry["error"] = traceback.format_exc(limit=1).strip().splitlines()[-1]
        out.append(entry)
    return out


def _resolve_strategies(
    strategy_names: Sequence[str] | None, strategy_objects: Sequence[Strategy] | None
) -> list[Strategy]:
    if strategy_objects is not None:
        if strategy_names is not None:
            raise ValueError("give strategy_names or strategy_objects, not both")
        return list(strategy_objects)
    return [strategies.get(n) for n in (strategy_names or strategies.names())]


def run_audit(
    strategy_names: Sequence[str] | None = None,
    models: Sequence[str | zoo.ZooModel] | None = None,
    *,
    strategy_objects: Sequence[Strategy] | None = None,
    known_bugs: bool = True,
    ignore_supports: bool = False,
    command: str | None = None,
    on: str = "cpu",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Audit strategies on zoo models; returns the audit JSON (see the module docstring).

    Args:
        strategy_names: registered strategies to audit; None means all of ``strategies.names()``.
        models: zoo model names or :class:`bench.problems.zoo.ZooModel` entries; None means the whole zoo.
        strategy_objects: strategies to audit instead of registered ones (e.g. in tests).
        known_bugs: also run the reproductions of the known upstream bugs.
        ignore_supports: compute where ``supports()`` says no too, to see whether a guard
            is still needed (such cells say so in their message).
        command: the command line recorded in the JSON.
        on: the device the strategies compute on ("cpu" or "cuda"); the references and the
            known bugs' reproductions run on the CPU.
        progress: called after each model with the audit JSON of what is done so far
            (``main`` keeps it in ``<json>.partial``).

    Raises:
        KeyError: an unknown strategy or model name.
    """
    device.prepare_process()  # TF32 off, as in the benchmark (the zoo is float64: no effect)
    audited = _resolve_strategies(strategy_names, strategy_objects)
    chosen = [m if isinstance(m, zoo.ZooModel) else zoo.get(m) for m in (models or zoo.ZOO)]
    start = time.perf_counter()
    references, records = [], []
    # The zoo's tensors are tiny: on a shared CPU, intra-op threads only add contention
    # (measured 5-10x slower with 2 threads than with 1). The caller's setting is restored.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bugs: list[dict[str, Any]] = []

    def audit_json() -> dict[str, Any]:
        return {
            "kind": AUDIT_KIND,
            "torch_version": torch.__version__,
            "machine_label": machine_label(),
            "device": on,
            **device.precision(),
            "command": command or "bench.audit.run_audit()",
            "tolerance": TOL,
            "reference_tolerance": REFERENCE_TOL,
            "records": records,
            "references": references,
            "known_bugs": bugs,
            "threads": 1,
            "wall_s": time.perf_counter() - start,
        }

    try:
        for model in chosen:
            check, model_records = audit_model(model, audited, ignore_supports, on)
            references.append(check)
            records.extend(model_records)
            if progress is not None:
                progress(audit_json())
        bugs = run_known_bugs() if known_bugs else []
    finally:
        torch.set_num_threads(threads)
    return audit_json()


def references_agree(audit: dict[str, Any]) -> bool:
    """Whether every model's loop and FD references ran and agreed (else the audit is void)."""
    return all(r["agree"] for r in audit["references"])


def _short(record: dict[str, Any]) -> str:
    status = record["status"]
    if status == OK:
        return "ok"
    if status == UNSUPPORTED:
        return "-"
    if status == ERROR:
        return f"ERR {record['exception']}"
    err = record["max_rel_err"]
    return "WRONG" if err is None else f"WRONG {err:.1e}"


def format_matrix(audit: dict[str, Any]) -> str:
    """A compact strategy x model matrix, the reference check and the known bugs, as text."""
    import pandas as pd

    lines = []
    if audit["records"]:
        frame = pd.DataFrame(audit["records"])
        frame["cell"] = [_short(r) for r in audit["records"]]
        matrix = frame.pivot(index="strategy", columns="model", values="cell")
        matrix = matrix.reindex(
            index=list(dict.fromkeys(frame["strategy"])),
            columns=list(dict.fromkeys(frame["model"])),
        )
        lines.append(matrix.fillna("").to_string())
    lines.append("")
    for r in audit["references"]:
        verdict = "ok" if r["agree"] else "REFERENCE CHECK FAILED"
        err = r["loop_vs_fd_rel_err"]
        detail = r["error"] if err is None else f"loop vs fd {err:.1e}"
        lines.append(f"reference {r['model']:16s} P={r['P']:<4d} {detail}  {verdict}")
    for bug in audit["known_bugs"]:
        shows = "reproduces" if bug["reproduces"] else "does not reproduce"
        lines.append(
            f"known bug ({bug['upstream'] or 'no upstream link'}): {shows}: {bug['title']}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(prog="python -m bench.audit", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("results") / f"audit-{socket.gethostname()}.json",
        help="where to write the audit JSON (default results/audit-<hostname>.json)",
    )
    parser.add_argument("--strategies", help="comma-separated strategy names (default: all)")
    parser.add_argument("--models", help="comma-separated zoo model names (default: all)")
    parser.add_argument(
        "--ignore-supports",
        action="store_true",
        help="compute where a strategy's supports() says no too (is the guard still needed?)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the strategies compute (default cpu); the references stay on the CPU",
    )
    return parser


def _names(text: str | None, option: str, valid: list[str]) -> list[str] | None:
    """The names an option lists (None: all); ValueError for an empty list or unknown names."""
    if text is None:
        return None
    names = cli.split_list(text, option)
    cli.check_names(names, valid, option.removeprefix("--"))
    return names


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns 1 if a reference check failed, 2 for a bad argument
    (one line on stderr), else 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    try:
        strategy_names = _names(args.strategies, "--strategies", strategies.names())
        models = _names(args.models, "--models", zoo.names())
        cli.output_file(args.json, "--json")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
    except ValueError as exc:
        return cli.fail(parser.prog, str(exc))
    partial = cli.partial_path(args.json)
    if os.path.exists(partial):  # an earlier audit that never reached its end: kept
        kept = cli.kept_partial_path(args.json)
        os.rename(partial, kept)
        print(f"an earlier audit left {partial} unfinished: kept as {kept}")
    audit = run_audit(
        strategy_names,
        models,
        ignore_supports=args.ignore_supports,
        command=shlex.join(["python", "-m", "bench.audit", *argv]),
        on=args.device,
        progress=lambda so_far: cli.write_json(so_far, partial, indent=1),
    )
    try:
        cli.write_json(audit, args.json, indent=1)
    except OSError as exc:
        kept = f"; the records are in {partial}" if os.path.exists(partial) else ""
        return cli.fail(parser.prog, f"cannot write {args.json}: {exc.strerror or exc}{kept}")
    if os.path.exists(partial):
        os.remove(partial)  # this audit's own: the JSON holds it all
    print(format_matrix(audit))
    print(f"\n{len(audit['records'])} cells in {audit['wall_s']:.1f} s; wrote {args.json}")
    return 0 if references_agree(audit) else 1
