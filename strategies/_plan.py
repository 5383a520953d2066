"""The planner's estimate: each strategy's time and peak memory on one problem, from its structure.

FFTW's ``ESTIMATE`` mode, for Hessians: nothing is run but one gradient of the loss and two
one-direction probes. The committed measurements (``auto_table.json``, made from the
reference runs by ``python -m bench.auto_table``) give, per size range of P, each
strategy's cost in gradients per Hessian row (``cost_vs_grad``: min time over P x the time
of one gradient of the same loss) and its peak over the Hessian's size. A strategy's
predicted time on a new net is that cost x the rows it must compute on this net x this
net's own gradient time; on the nets the runs measured, this reproduces the runs' ranking
(the time of one gradient cancels), so the report's recommendation and ``auto``'s choice
are one rule. The structure enters through the rows:

- ``kron``: its Kronecker directions cost what they cost on the measured MLPs; its other
  parameters' rows cost Hessian-vector products (forward-over-reverse where the net has
  forward-mode formulas, else one double backward per row, as ``full_autograd``);
- strategies built on forward-mode (``forward-over-reverse`` family) cannot run where the
  forward-mode probe fails, and ``kron`` then computes every row by one double backward;
  torch.func transforms (``kron`` included) cannot run where the ``vjp(grad)`` probe fails
  (e.g. ``autograd.grad`` inside the forward): these are predicted unrunnable (``inf``),
  and ``auto`` tries them after the reverse-mode loops rather than never.

The structure key (``structure_key``) names what a plan depends on, for the planner's
wisdom: module types and their settings, the forward code of custom modules, parameter
names and shapes, which are chosen, batch shapes and dtypes, device, and the loss.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp

from ._problem import Problem, autograd_enabled

__all__ = [
    "TABLE_PATH",
    "UNMEASURED_PEAK_RATIO",
    "Estimate",
    "Probes",
    "load_table",
    "regime",
    "measured",
    "peak_ratio",
    "probe",
    "estimate",
    "kinds_measured",
    "structure_key",
]

TABLE_PATH = Path(__file__).with_name("auto_table.json")
#: peak memory assumed for a strategy the table has no measurement of, in Hessian sizes
UNMEASURED_PEAK_RATIO = 3.0
#: the strategy whose per-row cost stands for one double backward per row
_ROW_BY_ROW = "full_autograd"
#: the strategy whose per-row cost stands for vmapped forward-over-reverse rows
_VMAPPED_ROWS = "vmap_jvp"
#: families that need forward-mode formulas for every op of the net
_FORWARD_FAMILIES = ("forward-over-reverse",)
#: families built on torch.func's reverse-over-reverse transforms
_TRANSFORM_FAMILIES = ("transforms",)


@functools.cache
def load_table(path: Path = TABLE_PATH) -> dict[str, Any]:
    """The committed table (see the module docstring)."""
    with open(path) as f:
        return json.load(f)


def _log_distance(r: Mapping[str, Any], P: int) -> float:
    if r["P_min"] <= P < r["P_max"]:
        return 0.0
    edge = r["P_min"] if P < r["P_min"] else r["P_max"]
    return abs(math.log(P) - math.log(edge))


def _regimes(table: Mapping[str, Any], device: str, dtype: str) -> list[dict[str, Any]]:
    """The measured regimes of ``device``, those of ``dtype`` where there are any."""
    regimes = [r for r in table["regimes"] if r["device"] == device]
    return [r for r in regimes if r["dtype"] == dtype] or regimes


def regime(table: Mapping[str, Any], device: str, dtype: str, P: int) -> dict[str, Any] | None:
    """The measured regime nearest to (device, dtype, P): same device first, then same dtype,
    then the range of P containing P, or else the nearest range on a log scale."""
    regimes = _regimes(table, device, dtype)
    return min(regimes, key=lambda r: _log_distance(r, P)) if regimes else None


def measured(
    table: Mapping[str, Any], key: str, name: str, device: str, dtype: str, P: int
) -> float | None:
    """``name``'s ``key`` (``cost_vs_grad``, ``peak_ratio``, ``time_s``) in the nearest regime
    that measured it, or None where none did."""
    having = [r for r in _regimes(table, device, dtype) if name in r.get(key, {})]
    if not having:
        return None
    return float(min(having, key=lambda r: _log_distance(r, P))[key][name])


def _kinds_costs(
    table: Mapping[str, Any], device: str, dtype: str, P: int, kinds: str
) -> Mapping[str, float]:
    """The ``cost_vs_grad`` of the nets of signature ``kinds`` (``bench.auto_table``'s
    ``kinds``) in the nearest size range to P, not above it, that ranked such nets; nothing
    where none did. A transformer larger than any the runs could repeat is costed as the
    largest ones they did, not as the MLPs of its own range; a net smaller than any of its
    signature is costed as the plain nets of its range, as a row's cost against a gradient
    falls with P: borrowed from 1,000-3,000, the LayerNorm nets' costs put ``kron`` first
    on LayerNorm MLPs at P = 301 and 661, 3.2x and 1.4x ``vmap_vjp``'s time there
    (``bench.analysis.rule.decision`` is the report's side)."""
    if not kinds:
        return {}
    having = [
        r
        for r in _regimes(table, device, dtype)
        if r.get("kinds", {}).get(kinds) and r["P_min"] <= P
    ]
    if not having:
        return {}
    nearest = min(having, key=lambda r: _log_distance(r, P))
    return nearest["kinds"][kinds].get("cost_vs_grad", {})


def kinds_measured(problem: Problem, name: str, kinds: str) -> bool:
    """Whether ``name`` was ranked on the nets of signature ``kinds`` in the size range of P
    nearest to ``problem``'s, not above it, that ranked such nets (``_kinds_costs``): its cost there is
    measured on nets like this one, and ``estimate`` takes it per row, as for every strategy
    (``kron``'s structural breakdown is for a net unlike those it was measured on)."""
    device, dtype = problem.device.type, str(problem.dtype).removeprefix("torch.")
    return name in _kinds_costs(load_table(), device, dtype, problem.P, kinds)


def _cost_per_row(
    table: Mapping[str, Any],
    name: str,
    device: str,
    dtype: str,
    P: int,
    here: Mapping[str, Any] | None,
    own: Mapping[str, float],
) -> float | None:
    """``name``'s ``cost_vs_grad`` in ``own`` (the nets of the problem's kinds signature in
    the size range nearest to P, not above it, that ranked them, ``_kinds_costs``) where it was ranked there; else in
    that range, ``here`` (``regime``); else interpolated on a log-log scale between the
    ranges (by their geometric centres) that measured it, the nearest end's value beyond
    them; None where none did."""
    if name in own:
        return float(own[name])
    if here is not None and name in here.get("cost_vs_grad", {}):
        return float(here["cost_vs_grad"][name])
    points = sorted(
        (math.log(math.sqrt(r["P_min"] * r["P_max"])), math.log(r["cost_vs_grad"][name]))
        for r in _regimes(table, device, dtype)
        if name in r.get("cost_vs_grad", {})
    )
    if not points:
        return None
    x = math.log(P)
    if x <= points[0][0]:
        return math.exp(points[0][1])
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return math.exp(points[-1][1])


def peak_ratio(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype,
    P: int,
    unmeasured: float = UNMEASURED_PEAK_RATIO,
) -> float:
    """``name``'s predicted peak memory over the Hessian's own size for a problem of size P:
    its measured ratio in the nearest size range, or ``unmeasured`` where it has none."""
    device, dtype_name = torch.device(device).type, str(dtype).removeprefix("torch.")
    ratio = measured(load_table(), "peak_ratio", name, device, dtype_name, P)
    return unmeasured if ratio is None else ratio


@dataclass(frozen=True)
class Probes:
    """What the planner learns by running the loss's derivatives once.

    Attributes:
        grad_s: the time of one gradient of the loss w.r.t. the chosen params.
        forward_mode: one forward-over-reverse product (``jvp`` of ``grad``) ran.
        transforms: one reverse-over-reverse product of torch.func (``vjp`` of ``grad``) ran.
    """

    grad_s: float
    forward_mode: bool
    transforms: bool


def _runs(f: Any) -> bool:
    try:
        f()
    except Exception:  # any failure means "this path does not run here"
        return False
    return True


def probe(problem: Problem, repeats: int = 3) -> Probes:
    """Time one gradient (the least of ``repeats``) and try one product of each mode."""
    leaves = [p.detach().requires_grad_(True) for p in problem.primals]

    def gradient() -> None:
        with autograd_enabled():
            value = problem.loss(dict(zip(problem.names, leaves)))
            torch.autograd.grad(value, leaves, allow_unused=True)

    synchronize = torch.cuda.synchronize if problem.device.type == "cuda" else (lambda: None)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        gradient()
        synchronize()
        seconds.append(time.perf_counter() - start)
    point = problem.flat_primal()
    direction = torch.ones_like(point)
    with torch.no_grad():  # torch.func differentiates inside no_grad
        forward = _runs(lambda: jvp(grad(problem.flat_loss), (point,), (direction,)))
        transforms = _runs(lambda: vjp(grad(problem.flat_loss), point)[1](direction))
    return Probes(min(seconds), forward, transforms)


@dataclass(frozen=True)
class Estimate:
    """One strategy's predicted cost on one problem.

    Attributes:
        name: the strategy.
        time_s: predicted seconds per Hessian; ``inf`` where it is predicted not to run.
        peak_bytes: predicted peak memory, the Hessian included.
        basis: how the prediction was made, in words.
        in_range: the strategy ran accurately on every measured case it supports of the
            size range of P nearest to this problem's (the report's candidates there); the others'
            costs are interpolated from other ranges, and they are ranked after these.
    """

    name: str
    time_s: float
    peak_bytes: int
    basis: str
    in_range: bool = False


def estimate(
    problem: Problem,
    name: str,
    family: str,
    probes: Probes,
    kron_rows: tuple[list[tuple[int, int]], int] | None = None,
    kinds: str = "",
) -> Estimate:
    """``name``'s predicted time and peak on ``problem`` (see the module docstring).

    Args:
        family: the strategy's family (``strategies.FAMILIES``).
        kron_rows: for ``kron``, ``kron.workload``: (rows, positions) of each site with
            Kronecker directions, and the number of Hessian-vector rows, on this net; None
            where its cost per row is taken as measured (``kinds_measured``).
        kinds: the net's ``strategies.kinds_signature``: where a size range measured nets
            of that signature, the costs measured on them in the range nearest to P, not
            above it, that did (and a strategy ranked there is in range); the others' from
            P's own range, ranked after them.
    """
    table = load_table()
    device, dtype = problem.device.type, str(problem.dtype).removeprefix("torch.")
    P = problem.P
    hessian_bytes = P * P * problem.primals[0].element_size()
    peak = int(max(peak_ratio(name, problem.device, problem.dtype, P), 1.0) * hessian_bytes)

    here = regime(table, device, dtype, P)
    own = _kinds_costs(table, device, dtype, P, kinds)
    if own:
        in_range = name in own
    else:
        in_range = here is not None and name in here.get("cost_vs_grad", {})

    def cost(strategy: str) -> float | None:
        return _cost_per_row(table, strategy, device, dtype, P, here, own)

    needs_forward = family in _FORWARD_FAMILIES
    if needs_forward and not probes.forward_mode:
        return Estimate(name, math.inf, peak, "no forward-mode formula for an op of this net")
    if family in _TRANSFORM_FAMILIES and not probes.transforms:
        return Estimate(name, math.inf, peak, "torch.func cannot differentiate this loss twice")
    per_row = cost(name)
    if per_row is None:
        return Estimate(name, math.inf, peak, "never measured on this device")
    measured_on = f", as measured on {kinds} nets" if name in own else ""
    if kron_rows is None:
        return Estimate(
            name,
            per_row * P * probes.grad_s,
            peak,
            f"{per_row:.3g} gradients per row x {P:,} rows{measured_on}",
            in_range,
        )
    if not probes.transforms:
        return Estimate(name, math.inf, peak, "torch.func cannot differentiate this loss twice")
    sites, other = kron_rows
    hvp = _VMAPPED_ROWS if probes.forward_mode else _ROW_BY_ROW
    per_hvp = cost(hvp)
    if per_hvp is None:
        per_hvp = per_row
    if not probes.forward_mode:
        # without forward-mode formulas every row is one double backward (kron's fallback)
        sites, other = [], P
    # a site's directions cost what the measured MLPs' did per row, once per position; kron
    # keeps a site with positions only where its own cost model finds the directions
    # cheaper than the site's Hessian-vector rows, so it costs at most those
    rows = sum(r for r, _ in sites)
    gradients = sum(min(per_row * r * T, per_hvp * r) if T > 1 else per_row * r for r, T in sites)
    seconds = (gradients + per_hvp * other) * probes.grad_s
    shared = sum(r for r, T in sites if T > 1)
    return Estimate(
        name,
        seconds,
        peak,
        f"{rows:,} Kronecker rows ({shared:,} of them shared over positions) x {per_row:.3g} "
        f"gradients, {other:,} Hessian-vector rows x {per_hvp:.3g} (as {hvp}){measured_on}",
        in_range,
    )


def _code_digest(code: Any) -> str:
    """What a function does, independent of where it was defined: its bytecode, names and
    constants (nested functions included)."""
    parts = [code.co_code.hex(), repr(code.co_names)]
    for const in code.co_consts:
        parts.append(_code_digest(const) if hasattr(const, "co_code") else repr(const))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _callable_key(f: Any) -> str:
    if f is None:
        return "default"
    if isinstance(f, functools.partial):
        return f"partial({_callable_key(f.func)}, {f.args!r}, {sorted(f.keywords.items())!r})"
    if isinstance(f, nn.Module):
        settings = {k: v for k, v in vars(f).items() if isinstance(v, (bool, int, float, str))}
        return f"{type(f).__qualname__}{sorted(settings.items())}"
    name = f"{getattr(f, '__module__', '')}.{getattr(f, '__qualname__', type(f).__qualname__)}"
    code = getattr(f, "__code__", None)
    return f"{name}:{_code_digest(code)}" if code is not None else name


def _tensor_key(t: Any) -> Any:
    if isinstance(t, Tensor):
        return [list(t.shape), str(t.dtype), t.device.type]
    if isinstance(t, Mapping):
        return {str(k): _tensor_key(v) for k, v in t.items()}
    if isinstance(t, (tuple, list)):
        return [_tensor_key(v) for v in t]
    return type(t).__qualname__


def _module_key(net: nn.Module) -> list[Any]:
    modules = []
    for name, m in net.named_modules():
        kind = type(m)
        forward = getattr(kind.forward, "__code__", None)
        custom = forward is not None and not kind.__module__.startswith("torch.")
        modules.append(
            [
                name,
                kind.__qualname__,
                m.extra_repr(),
                m.training,
                _code_digest(forward) if custom else "",
                len(m._forward_hooks) + len(m._forward_pre_hooks),
            ]
        )
    return modules


def structure_key(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Any],
    loss_fn: Any,
) -> str:
    """A digest of everything a plan depends on; values are left out (see the module docstring)."""
    parts = {
        "modules": _module_key(net),
        "parameters": [[n, list(p.shape)] for n, p in net.named_parameters()],
        "chosen": [[n, list(p.shape), str(p.dtype), p.device.type] for n, p in params.items()],
        "buffers": [[n, list(b.shape), str(b.dtype)] for n, b in net.named_buffers()],
        "batch": _tensor_key(batch),
        "loss": _callable_key(loss_fn),
        "torch": torch.__version__,
    }
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:20]
