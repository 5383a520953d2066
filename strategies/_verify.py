"""Check any dense Hessian against independent float64 Hessian-vector products.

``verify`` draws three seeded probe vectors (two Gaussian, one of random signs) and compares
``H v`` with the product computed by plain autograd in float64 (reverse over reverse: the
gradient's own gradient along ``v``, with no torch.func transform, so it shares no
differentiation code with the strategies on the torch.func paths; it shares the loss
closure of ``prepare``, tested on its own against the float64 references). A net in a
coarser dtype is evaluated with its params, buffers and batch cast to float64 for the
product (``in_float64``; the net is not copied), so the reference carries no rounding of
the dtype ``H`` was computed in. Where torch's double backward is wrong through the
forward (``hazard(problem, DOUBLE_BACKWARD)``) the product is forward over reverse with
autograd's dual tensors instead.

Two errors are measured, each against what rounding can explain:

- largest entry of ``H v - H_ref v``, relative to ``max |H|`` (a wrong block, a wrong entry,
  a block wrong but not its mirror: ``H_ref`` is symmetric, so every row of ``H`` is held to
  it, and an asymmetric ``H`` fails in the rows of its wrong half);
- ``|H v - H_ref v|`` relative to ``|H_ref v|`` (a wrong scale, a wrong dtype).

There is no entry by entry comparison of ``H`` with ``Hᵀ``: with one, ``bench.verify_power``
rejected exactly the same tries as without it (below), and reading each tile's mirror
transposed cost three times the rest of the scan.

What it catches, measured by ``python -m bench.verify_power --seeds 20`` (four small float32
nets, P = 67 to 126, 20 probe seeds and corruption sites each: 80 tries per row): a
symmetric pair of entries, one block with its mirror (by a constant or by random signs),
or one block without its mirror, off by 1% or by 0.1% of ``max |H|``: 80 of 80 rejected;
``H`` scaled by 1.001: 80 of 80; by 1.0001: 26 of 80. Float64 params with ``H`` passed as
float16 or bfloat16 and scaled by 1.2 or 1.3: 80 of 80; by 1.05: 80 of 80 in float16, 71
of 80 in bfloat16. Accepted: every correct float32 Hessian of those nets (full_autograd,
symmetric_half, vmap_jvp, block_symmetric, kron; their largest entry errors measure 5e-7
to 1.2e-6 of ``max |H|``, three hundred times below the float32 tolerance; 5e-7 to 7e-7
with the products in float64, as before), the unscaled
float16 and bfloat16 ``H`` (80 of 80), and the zero Hessian of a loss independent of the
chosen params (``H`` about 1e-32; tests/test_contract.py).

Cost: the problem's tensors cast to float64 (the net is not copied), one gradient with its graph
and three backward passes through it, and one read of ``H`` in bands of rows, each band's
products with the probes and its extremes taken while it is in cache (``_scan``). Measured
on one thread (medians of interleaved runs, float32 MLPs of the grid, ``H`` from ``kron``)
with the float64 scan of tiles and mirrors this replaced: at P = 49 (the forum net) the
whole check took 2.9 ms, of which the three float64 products 1.8 ms, ``prepare``'s checks
of the inputs 0.7 ms and the scan of ``H`` 0.16 ms (the products take 0.4x ``vmap_vjp``'s
whole time); at P = 641 (w64-d1-b128-tanh-mse) 6 ms, of which the products 2.6 ms and the
scan 2.1 ms. The scan at P = 13,121 takes 0.094 s, against 0.40 s for the tiles and
mirrors (two threads, a random symmetric float32 ``H``); the whole check at P = 4,801 and
13,121 (the custom form, two threads, 7 interleaved rounds) 0.024 s and 0.12 s, against
0.053 s and 0.31 s before, and ``auto`` there is ``kron``'s time x 1.14 and x 1.08, against
x 1.34 and x 1.38. The default probes are drawn once per size and kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ._blocks import flat_or_zeros, flatten, unflatten
from ._contract import in_float64, prepare
from ._errors import explain_autograd_error
from ._hazards import DOUBLE_BACKWARD, hazard
from ._problem import LossFn, Problem, autograd_enabled

__all__ = ["default_rtol", "verify"]

#: the probe vectors: Gaussian ones see every error pattern with probability one; signs of
#: equal size see an error in any single column at its full size
_PROBES = ("gaussian", "gaussian", "signs")
#: rounding ``H`` to its own dtype moves each ``(H v)_i`` by at most ``eps/2 (|H| |v|)_i``,
#: and by about ``eps / (2 sqrt 3) |H_i v|_2`` for independent roundings; this many ``eps``
#: times ``|H_i v|_2`` (seven standard deviations) is allowed for it
_STORAGE_EPS = 2.0


def default_rtol(dtype: torch.dtype) -> float:
    """``sqrt(eps)`` of ``dtype``: 1.5e-8 float64, 3.5e-4 float32, 0.031 float16, 0.088 bfloat16.

    The tolerance of ``verify`` for a Hessian computed in ``dtype``, relative to ``max |H|``
    and ``|H_ref v|``. The largest entry of ``(H - H_ref) v`` of correct float32 Hessians
    measured 2e-7 to 3e-6 of ``max |H|`` (six strategies, four nets of P = 466 to 1,507);
    errors of 0.1% of ``max |H|`` in one block are caught (the module docstring has the
    numbers).
    """
    return torch.finfo(dtype).eps ** 0.5


def _check_rtol(rtol: Any) -> float | None:
    if rtol is None:
        return None
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)):
        raise TypeError(f"rtol must be a non-negative number, got {type(rtol).__name__} {rtol!r}")
    if not math.isfinite(rtol) or rtol < 0:
        raise ValueError(f"rtol must be a finite non-negative number, got {rtol!r}")
    return float(rtol)


def _check_generator(generator: Any, device: torch.device) -> torch.Generator:
    if generator is None:
        return torch.Generator(device=device).manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device}, the params on {device}: pass "
            f"torch.Generator(device={str(device)!r})"
        )
    return generator


def verify(
    H: Tensor,
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Any, Tensor],
    loss_fn: LossFn | None = None,
    *,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[bool, str]:
    """Whether ``H`` is the Hessian of the loss, by independent float64 Hessian-vector products.

    ``H`` passes where, along each probe ``v``, every entry of ``H v - H_ref v`` is at most
    ``rtol max|H| rms(v)`` and its norm at most ``rtol |H_ref v|``; on top of each, what rounding ``H`` to its own dtype explains (where it
    is coarser than the params'), and an absolute floor at roundoff,
    ``eps |loss| / max(mean(params²), 1)`` per unit of ``v``, so that the Hessian of a loss
    independent of the chosen params (zero up to roundoff) passes.

    Args:
        H: a dense ``P x P`` matrix, e.g. what ``strategies.compute`` returned.
        net, params, batch, loss_fn: the problem, as given to ``strategies.compute``.
        rtol: the tolerance for errors of the computation, relative to ``max |H|`` and
            ``|H_ref v|``; default ``default_rtol`` of the params' dtype, the dtype every
            strategy computes in (a bfloat16 ``H`` of float64 params is held to the
            float64 tolerance plus bfloat16's rounding of each entry). A finite number, 0
            or more.
        generator: draws the probes; default a generator seeded with 0 on the params'
            device, so the check is reproducible and leaves torch's global random state alone.

    Returns:
        ``(ok, detail)``: the verdict and the measured errors, in words.

    Raises:
        TypeError, ValueError: the problem's inputs are bad (as for ``strategies.compute``),
            ``H`` is not a ``P x P`` floating tensor on the params' device, ``rtol`` is not a
            finite number 0 or more, ``generator`` is not a ``torch.Generator`` on the
            params' device. ValueError also where torch cannot compute the product itself (a
            derivative it does not implement).

    Example:
        >>> H = strategies.compute("vmap_jvp", net, params, batch)
        >>> ok, detail = strategies.verify(H, net, params, batch)
    """
    problem = prepare(net, params, batch, loss_fn, nested_autograd=True)
    P = problem.P
    if not isinstance(H, Tensor) or tuple(H.shape) != (P, P):
        shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise ValueError(f"H must be the {P} x {P} Hessian of params, got {shape}")
    if not H.is_floating_point():
        raise ValueError(f"H must be floating-point, got {H.dtype}")
    if H.device != problem.device:
        raise ValueError(f"H is on {H.device}, the params on {problem.device}")
    given = _check_rtol(rtol)
    if generator is not None:
        generator = _check_generator(generator, problem.device)
    # Strategies compute in the params' dtype; an H in a coarser dtype was rounded to it
    # afterwards, which is allowed for entry by entry on top of the params' tolerance.
    tol = default_rtol(problem.dtype) if given is None else given
    coarser = torch.finfo(H.dtype).eps > torch.finfo(problem.dtype).eps
    storage = _STORAGE_EPS * torch.finfo(H.dtype).eps if coarser else 0.0
    roundoff = torch.finfo(H.dtype if coarser else problem.dtype).eps

    V = (
        _default_probes(P, problem.device)
        if generator is None
        else _probes(P, generator, problem.device)
    )
    HV_ref, loss, reference, where = _reference(problem, V)
    theta = reference.flat_primal().detach().to(torch.float64)
    mean_square = float((theta * theta).mean()) if P else 0.0
    floor = roundoff * abs(loss) / max(mean_square, 1.0)

    scan = _scan(H, V, _work_dtype(H, problem.dtype), rounded=storage > 0)
    if scan is None:
        return False, "H has NaN or infinite entries"
    HV, rounding, max_abs = scan
    rms = V.pow(2).mean(dim=1).sqrt()  # (k,)
    residual = HV - HV_ref
    local = residual.abs().amax(dim=1)  # (k,)
    local_allowed = (tol * max_abs + floor) * rms
    local_ok = bool((residual.abs() <= local_allowed[:, None] + storage * rounding).all())
    norm = residual.norm(dim=1)
    norm_allowed = tol * HV_ref.norm(dim=1) + storage * rounding.norm(dim=1) + floor * V.norm(dim=1)
    norm_ok = bool((norm <= norm_allowed).all())

    entry = float((local / rms).max()) / max_abs if max_abs > 0 else float("inf")
    relative = float((norm / HV_ref.norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)).max())
    detail = (
        f"H v - H_ref v: largest entry {entry:.1e} x max|H|, norm {relative:.1e} x |H_ref v| "
        f"(allowed {tol:.1e}"
        + (f" + {H.dtype} rounding" if storage else "")
        + f", floor {floor:.1e}); {len(_PROBES)} probes of {P} entries, reference {where}"
    )
    return local_ok and norm_ok, detail


def _probes(P: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """The probe vectors, one a row (k x P, float64), drawn by ``generator``."""
    return torch.stack([_probe(kind, P, generator, device) for kind in _PROBES])


#: the default probes (drawn by a generator seeded with 0) of the last few (P, device): the
#: same vectors at every call, drawn once; never written to
_DEFAULT_PROBES: dict[tuple[int, str], Tensor] = {}
_DEFAULT_PROBES_KEPT = 4


def _default_probes(P: int, device: torch.device) -> Tensor:
    key = (P, str(device))
    V = _DEFAULT_PROBES.get(key)
    if V is None:
        with torch.inference_mode(False):  # kept: a normal tensor, whatever the caller's mode
            V = _probes(P, _check_generator(None, device), device)
        if len(_DEFAULT_PROBES) >= _DEFAULT_PROBES_KEPT:
            _DEFAULT_PROBES.pop(next(iter(_DEFAULT_PROBES)))
        _DEFAULT_PROBES[key] = V
    return V


def _probe(kind: str, P: int, generator: torch.Generator, device: torch.device) -> Tensor:
    if kind == "gaussian":
        return torch.randn(P, generator=generator, dtype=torch.float64, device=device)
    signs = torch.randint(0, 2, (P,), generator=generator, device=device)
    return (2 * signs - 1).to(torch.float64)


@torch.no_grad()  # an H that requires grad is read, not differentiated
def _scan(
    H: Tensor, V: Tensor, work: torch.dtype, rounded: bool
) -> tuple[Tensor, Tensor, float] | None:
    """``H V^T`` and, where ``rounded``, ``sqrt(H² (V²)^T)`` (k x P each, float64; else zeros)
    and ``max |H|``; None where ``H`` is not finite (``aminmax`` propagates NaN, and meets an
    infinity as one).

    One read of ``H``, in bands of rows (``_band``): each band's products with the probes
    (one GEMM of ``k`` rows) and its extremes are taken while it is in cache. The products
    are taken in ``work``: float64 where ``H`` or the params are float64, else float32
    (``_work_dtype``). A band in another dtype is copied into one reused buffer of ``work``
    first; a float32 or float64 ``H`` is read in place.
    """
    P, k = H.shape[0], V.shape[0]
    HV = torch.zeros(k, P, dtype=torch.float64, device=V.device)
    rounding = torch.zeros_like(HV)
    if not P:
        return HV, rounding, 0.0
    height = max(1, min(_band(H.device), P))
    probes = V.to(work)
    squares = probes * probes if rounded else probes
    buffer = None if H.dtype == work else torch.empty(height, P, dtype=work, device=H.device)
    lows: list[Tensor] = []
    highs: list[Tensor] = []
    for i in range(0, P, height):
        rows = slice(i, min(i + height, P))
        band = H[rows]
        if buffer is not None:
            band = buffer[: rows.stop - rows.start].copy_(band)
        low, high = torch.aminmax(band)
        lows.append(low)
        highs.append(high)
        HV[:, rows] = probes @ band.T
        if rounded:
            rounding[:, rows] = squares @ (band * band).T
    low, high = float(torch.stack(lows).min()), float(torch.stack(highs).max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    return HV, rounding.sqrt_() if rounded else rounding, max(high, -low)


def _work_dtype(H: Tensor, params_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``_scan`` takes ``H v`` in: float64 where ``H`` or the params are float64, so
    that the products add nothing to what the float64 tolerance allows; else float32, whose
    blocked sums over a row err by about ``eps32 sqrt(P)`` of its scale (3e-5 at P = 66,561
    in the worst blocked order), ten times below the float32 tolerance (3.5e-4) and far below
    float16's and bfloat16's."""
    return torch.float64 if torch.float64 in (H.dtype, params_dtype) else torch.float32


#: the rows of ``H`` ``_scan`` reads at a time, by device type. On a CPU, bands of 64 rows
#: (3.4 MiB of float32 at P = 13,121) stay in cache for the products and the extremes: the
#: scan of a float32 ``H`` at P = 13,121 measured 0.094 s with 64 rows, 0.10 s with 128,
#: 0.13 s with 256, 0.15 s with 512 (two threads; one product over the whole of ``H``
#: 0.11 s). Elsewhere (a GPU) larger bands, for fewer launches.
_BANDS = {"cpu": 64}
_BAND_ELSEWHERE = 1024


def _band(device: torch.device) -> int:
    return _BANDS.get(device.type, _BAND_ELSEWHERE)


def _reference(problem: Problem, V: Tensor) -> tuple[Tensor, float, Problem, str]:
    """``H_ref v`` for each row of ``V``, the loss, the problem they were computed on, and
    where (in words).

    In float64 (``in_float64``: the same module and loss, its tensors cast; no copy of the
    net); a net that does not run in float64 (a forward that makes tensors of its own dtype,
    a loss holding float32 weights), or whose loss is not finite there, is checked in its
    own dtype, and the detail says so.
    """
    why = ""
    if problem.dtype != torch.float64:
        reference = in_float64(problem)
        try:
            with autograd_enabled():
                HV_ref, loss = _hvps(reference, V)
            if math.isfinite(loss):
                return HV_ref, loss, reference, "in float64"
            why = f"its loss is {loss} there"
        except (RuntimeError, ValueError, TypeError) as error:
            why = str(error).splitlines()[0] if str(error) else type(error).__name__
    with autograd_enabled():
        try:
            HV_ref, loss = _hvps(problem, V)
        except (NotImplementedError, RuntimeError) as error:
            explained = explain_autograd_error(error, "verify")
            if explained is None:
                raise
            raise explained from error
    where = (
        "in float64" if not why else f"in {problem.dtype} (the net does not run in float64: {why})"
    )
    return HV_ref, loss, problem, where


def _hvps(problem: Problem, V: Tensor) -> tuple[Tensor, float]:
    """``H_ref v`` for each row ``v`` of ``V`` (in the problem's dtype, returned in float64),
    and the loss: reverse over reverse, or where torch's double backward is wrong through
    the problem's forward (``hazard``), forward over reverse with dual tensors."""
    V = V.to(problem.dtype)
    if hazard(problem, DOUBLE_BACKWARD):
        rows, loss_value = [], 0.0
        for v in V:
            with fwAD.dual_level():
                leaves = [p.clone().requires_grad_(True) for p in problem.primals]
                tangents = unflatten(v, problem.shapes)
                duals = [fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)]
                loss = problem.loss(dict(zip(problem.names, duals)))
                grads = torch.autograd.grad(loss, duals, create_graph=True, allow_unused=True)
                pieces = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
                rows.append(flatten([flat_or_zeros(t, p) for t, p in zip(pieces, leaves)]))
                loss_value = float(fwAD.unpack_dual(loss).primal)
        return torch.stack(rows).detach().to(torch.float64), loss_value
    leaves = [p.clone().requires_grad_(True) for p in problem.primals]
    loss = problem.loss(dict(zip(problem.names, leaves)))
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    rows = []
    for v in V:
        if not live:  # the loss is at most linear in the chosen params
            rows.append(torch.zeros_like(v))
            continue
        # the gradient's vector-Jacobian product along v: its grad_outputs, not a sum of
        # products (which costs a graph of its own, four times the time at P = 49)
        tangents = unflatten(v, problem.shapes)
        products = torch.autograd.grad(
            [grads[i] for i in live],
            leaves,
            grad_outputs=[tangents[i] for i in live],
            retain_graph=True,
            allow_unused=True,
        )
        rows.append(flatten([flat_or_zeros(h, p) for h, p in zip(products, leaves)]))
    return torch.stack(rows).detach().to(torch.float64), float(loss.detach())
