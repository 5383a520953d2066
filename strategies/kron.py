"""Exact Hessian of any net's loss, Linear weights from their Kronecker structure, the rest by HVPs.

A Linear layer ``z = a Wᵀ + b`` applied once to a ``(B, d_in)`` input: a unit change of
``W[i, j]`` changes sample b's pre-activation by ``a[b, j] e_i``. When samples are
independent through the net and the loss is a sum of per-sample terms, every tangent that
change causes in sample b is ``a[b, j]`` times the tangent of a unit change of ``z[b, i]``.
So for each output direction ``i`` one forward-over-reverse pass, for all samples at once,
gives the tangents ``δ̇_l`` of every Linear's backprop signal ``δ_l = ∂L/∂z_l`` and ``ȧ_l`` of
its input, and for the Linear layers l run at or after k

    H[(k,i,j), (l,p,q)] = Σ_b a_k[b,j] (δ̇_l[b,p] a_l[b,q] + δ_l[b,p] ȧ_l[b,q])

one GEMM of inner dimension B per direction, written straight into H (bias rows: ``a = 1``).
Blocks of layers run earlier are transposes; inside a layer's own block only the columns
``p >= i`` are computed and the rest mirrored. Every other chosen parameter (LayerNorm
affine, embeddings, convolutions, a bare Parameter, a Linear used twice or on a 3-D input)
gets its full rows from Hessian-vector products, and its cross blocks come with those rows.

Nothing is assumed about the forward: the Linear layers, their inputs and signals are found
with forward hooks (a hook adds the perturbation ``e_k`` to the layer's output, so that
``δ_k = ∂L/∂e_k``), and the preconditions are checked at run time on the batch:

- each Kronecker parameter is used by exactly one call of its Linear (else it gets HVP rows);
- samples are independent through the net: a forward-mode probe moves sample 0 only and
  checks that no module's output moves for the other samples, naming the first that does;
- the loss acts on each sample separately: its Hessian in the outputs is block diagonal per
  sample, checked with a random probe.

The loss enters only through its gradient ``g`` and per-sample Hessian ``A`` in the outputs
(reverse-over-reverse, through the loss alone); the tangent passes differentiate the
quadratic ``g·o + ½ (o - o₀)ᵀ A (o - o₀)``, which has the same gradient and Hessian at the
point. So losses with no forward-mode formula (``huber_loss_backward``) or with torch 2.13's
ZeroTensor failure (``F.mse_loss`` with mean reduction) work all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._common import LossFn, Problem, flatten, prepare
from ._memory import problem_chunk, unit_chunks

NAME = "kron"
FAMILY = "structured"
DESCRIPTION = (
    "any net: Linear weights from d_out tangent directions per layer and GEMMs of inner "
    "dimension B, other parameters by Hessian-vector rows; upper halves mirrored"
)

#: a temporary of one chunk of directions holds at most this fraction of the Hessian's bytes
_CHUNK_FRACTION = 1 / 2
_MIN_CHUNK_BYTES = 1 << 22
#: bytes of a direction's B x P_l product kept in cache at a time
_CACHE_BYTES = 1 << 21
#: rows per direction from which one GEMM per direction beats batched small GEMMs
_WIDE_ROWS = 32
#: rows of a block transposed at a time when mirroring
_MIRROR_BAND = 64


def supports(net: nn.Module, loss_fn: LossFn | None) -> tuple[bool, str]:
    """Whether ``net`` has a structure to exploit: an ``nn.Linear``, and no BatchNorm that
    normalises with batch statistics (it mixes samples). The batch-dependent preconditions
    are checked by ``compute``, which raises ValueError naming the module or the loss."""
    if not isinstance(net, nn.Module):
        return False, f"net must be a torch.nn.Module, got {type(net).__name__}"
    linear = False
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats
        ):
            return False, (
                f"module {name or 'net'!r} is {type(m).__name__} using batch statistics: "
                "it mixes samples, so the Kronecker structure does not hold"
            )
        linear = linear or isinstance(m, nn.Linear)
    if not linear:
        return False, "the net has no nn.Linear: no Kronecker structure to exploit"
    return True, ""


@dataclass
class _Site:
    """A Linear layer whose chosen weight and/or bias get Kronecker rows."""

    module: nn.Module
    name: str
    weight: str | None  # the chosen parameter's name, or None
    bias: str | None
    inputs: Tensor | None = None  # a, B x d_in
    delta: Tensor | None = None  # ∂L/∂z, B x d_out

    @property
    def d_out(self) -> int:
        return self.module.out_features

    @property
    def d_in(self) -> int:
        return self.module.in_features


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The dense Hessian of ``loss_fn(net(inputs), targets)`` w.r.t. ``params``.

    Args:
        chunk_size: Hessian-vector rows of non-Linear parameters computed at once; default:
            sized to free memory.

    Raises:
        ValueError: samples are mixed by the net (naming the module) or by the loss, or the
            outputs are not a ``(batch, ...)`` tensor.
    """
    problem = prepare(net, params, batch, loss_fn)
    with torch.enable_grad():
        sites, others = _discover(problem)
        outputs = _outputs(problem, sites, None)
        surrogate = _loss_surrogate(problem, outputs)
    H = torch.empty(problem.P, problem.P, dtype=problem.dtype, device=problem.device)
    offsets = dict(zip(problem.names, problem.offsets))
    try:
        if sites:
            _check_independent(problem, sites)
        # torch.func differentiates inside no_grad; outside it, nothing is recorded for autograd
        with torch.no_grad():
            if sites:
                _kron_blocks(H, problem, sites, offsets, surrogate)
            if others:
                _hvp_rows(H, problem, others, offsets, surrogate, chunk_size)
    except (NotImplementedError, RuntimeError):
        # an op of the net has no forward-mode formula or no batching rule (multi-head
        # attention, GRU): every row by reverse-over-reverse products, one at a time
        if sites:
            _check_independent_reverse(problem, sites)
        _reverse_rows(H, problem, surrogate)
    return H


# ---------------------------------------------------------------- finding the structure


def workload(problem: Problem) -> tuple[int, int]:
    """(parameters with Kronecker rows, parameters with Hessian-vector rows) on ``problem``:
    what the planner's estimate of ``kron`` rests on. One forward, nothing differentiated."""
    with torch.enable_grad():
        _, others = _discover(problem)
    sizes = dict(zip(problem.names, problem.sizes))
    other = sum(sizes[n] for n in others)
    return problem.P - other, other


class _Uses(TorchFunctionMode):
    """Counts the torch calls that take each chosen parameter (metadata reads excluded)."""

    def __init__(self, ids: dict[int, str]):
        super().__init__()
        self.ids = ids
        self.count = dict.fromkeys(ids.values(), 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a property read (shape, dtype) is no use; one that returns a tensor (.T, .data) is
        if getattr(func, "__name__", "") == "__get__" and not isinstance(out, Tensor):
            return out
        for leaf in tree_flatten((args, kwargs))[0]:
            name = self.ids.get(id(leaf))
            if name is not None:
                self.count[name] += 1
        return out


def _discover(problem: Problem) -> tuple[list[_Site], list[str]]:
    """The Linear layers whose chosen parameters get Kronecker rows, in the order the forward
    runs them, and the names of the other chosen parameters."""
    B = problem.inputs.shape[0]
    point = problem.primal_dict()
    owner = {}
    for name, m in problem.module.named_modules():
        if type(m) is nn.Linear:
            for kind in ("weight", "bias"):
                if f"{name}.{kind}" in point if name else kind in point:
                    owner.setdefault(id(m), name)
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(module: nn.Module, args: tuple, output: Tensor) -> None:
        shape = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else ()
        calls.append((module, shape))

    modules = {n: m for n, m in problem.module.named_modules() if id(m) in owner}
    handles = [m.register_forward_hook(record) for m in modules.values()]
    uses = _Uses({id(t): n for n, t in point.items()})
    try:
        with torch.no_grad(), uses:
            functional_call(problem.module, point, (problem.inputs,))
    finally:
        for h in handles:
            h.remove()
    times = {}
    for m, shape in calls:
        times.setdefault(id(m), []).append(shape)
    sites = []
    for m, shape in calls:
        if times[id(m)] != [shape] or len(shape) != 2 or shape[0] != B:
            continue  # used twice, or not on (B, d_in): its parameters get HVP rows
        prefix = f"{owner[id(m)]}." if owner[id(m)] else ""
        chosen = {
            kind: f"{prefix}{kind}"
            for kind in ("weight", "bias")
            if f"{prefix}{kind}" in point and uses.count[f"{prefix}{kind}"] == 1
        }
        if chosen:
            sites.append(_Site(m, owner[id(m)], chosen.get("weight"), chosen.get("bias")))
    kron = {n for s in sites for n in (s.weight, s.bias) if n}
    return sites, [n for n in problem.names if n not in kron]


def _outputs(problem: Problem, sites: list[_Site], perturb: tuple[Tensor, ...] | None,
             point: Mapping[str, Tensor] | None = None,
             captured: list | None = None) -> Tensor:  # fmt: skip
    """The net's outputs at ``point`` (default: the primals), with ``perturb[k]`` added to
    site k's output and its input stored in ``captured[k]``."""

    def hook(k: int):
        def add(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            if captured is not None:
                captured[k] = args[0]
            return output if perturb is None else output + perturb[k]

        return add

    handles = [s.module.register_forward_hook(hook(k)) for k, s in enumerate(sites)]
    try:
        return functional_call(
            problem.module, problem.primal_dict() if point is None else point, (problem.inputs,)
        )
    finally:
        for h in handles:
            h.remove()


def _check_independent(problem: Problem, sites: list[_Site]) -> None:
    """ValueError naming the first module whose output for other samples moves when only
    sample 0's input and Linear outputs move (forward mode, one pass)."""
    B = problem.inputs.shape[0]
    if B < 2:
        return
    generator = torch.Generator(device="cpu").manual_seed(0)

    def sample0(shape: torch.Size, dtype: torch.dtype) -> Tensor:
        t = torch.zeros(shape, dtype=dtype)
        t[0] = torch.randn(shape[1:], dtype=dtype, generator=generator)
        return t.to(problem.device)

    def leaks(x: object) -> bool:
        for t in tree_flatten(x)[0]:
            if isinstance(t, Tensor) and t.dim() and t.shape[0] == B:
                tangent = fwAD.unpack_dual(t).tangent
                if tangent is not None and bool(tangent[1:].ne(0).any()):
                    return True
        return False

    names = {id(m): n for n, m in problem.module.named_modules()}
    found: list[str] = []

    def before(module: nn.Module, args: tuple) -> None:
        if not found and leaks(args):
            found.append(
                f"an operation of the forward before module {names[id(module)]!r} mixes samples"
            )

    def after(module: nn.Module, args: tuple, output: object) -> None:
        if not found and leaks(output):
            found.append(
                f"module {names[id(module)] or 'net'!r} ({type(module).__name__}) mixes samples"
            )

    modules = [m for m in problem.module.modules() if m is not problem.module]
    handles = [m.register_forward_pre_hook(before) for m in modules]
    handles += [m.register_forward_hook(after) for m in modules]
    try:
        with torch.no_grad(), fwAD.dual_level():
            inputs = problem.inputs
            if inputs.is_floating_point() and inputs.dim():
                inputs = fwAD.make_dual(inputs, sample0(inputs.shape, inputs.dtype))
            perturb = tuple(
                fwAD.make_dual(
                    torch.zeros(B, s.d_out, dtype=problem.dtype, device=problem.device),
                    sample0(torch.Size((B, s.d_out)), problem.dtype),
                )
                for s in sites
            )
            swapped = Problem(**{**problem.__dict__, "inputs": inputs})
            outputs = _outputs(swapped, sites, perturb)
            if not found and leaks(outputs):
                found.append("the forward of the net mixes samples outside its submodules")
    finally:
        for h in handles:
            h.remove()
    if found:
        _refuse_mixing(found[0])


def _refuse_mixing(where: str) -> None:
    raise ValueError(
        f"kron needs samples to be independent through the net, but {where} (the outputs of "
        "other samples move when only sample 0 moves): use block_symmetric or full_autograd"
    )


def _check_independent_reverse(problem: Problem, sites: list[_Site]) -> None:
    """``_check_independent`` by one reverse pass, for nets without forward-mode formulas:
    the other samples' outputs and Linear inputs, weighted at random, must have zero
    gradient w.r.t. sample 0's input and Linear outputs. It cannot name the module."""
    B = problem.inputs.shape[0]
    if B < 2:
        return
    with torch.enable_grad():
        inputs = problem.inputs
        if inputs.is_floating_point() and inputs.dim():
            inputs = inputs.detach().clone().requires_grad_(True)
        perturb = tuple(
            torch.zeros(B, s.d_out, dtype=problem.dtype, device=problem.device, requires_grad=True)
            for s in sites
        )
        captured: list = [None] * len(sites)
        swapped = Problem(**{**problem.__dict__, "inputs": inputs})
        outputs = _outputs(swapped, sites, perturb, captured=captured)
        generator = torch.Generator(device="cpu").manual_seed(0)
        objective = sum(
            (
                t[1:] * torch.randn(t[1:].shape, generator=generator, dtype=t.dtype).to(t.device)
            ).sum()
            for t in [outputs, *captured]
        )
        leaves = [t for t in (inputs, *perturb) if t.requires_grad]
        grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    if any(g is not None and bool(g[0].ne(0).any()) for g in grads):
        _refuse_mixing("the forward mixes samples")


# ---------------------------------------------------------------- the loss


def _loss_surrogate(problem: Problem, outputs: Tensor) -> Callable[[Tensor], Tensor]:
    """A quadratic in the outputs with the loss's gradient and Hessian at ``outputs``.

    Raises:
        ValueError: the outputs are not a ``(batch, ...)`` tensor, or the loss's Hessian in
            the outputs couples samples (it is not a sum or mean of per-sample terms).
    """
    B = problem.inputs.shape[0]
    if not isinstance(outputs, Tensor) or outputs.dim() == 0 or outputs.shape[0] != B:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"kron needs the net's outputs to be a tensor of shape (batch, ...) with batch {B}, "
            f"got {shape}"
        )
    o0 = outputs.detach()
    o = o0.clone().requires_grad_(True)
    value = problem.loss_fn(o, problem.targets)  # prepare checked that it is a scalar
    (g,) = torch.autograd.grad(value, o, create_graph=True)
    flat_g = g.reshape(B, -1)
    C = flat_g.shape[1]
    A = torch.zeros(B, C, C, dtype=o0.dtype, device=o0.device)
    if flat_g.requires_grad:
        for c in range(C):
            (col,) = torch.autograd.grad(
                flat_g[:, c].sum(), o, retain_graph=True, allow_unused=True
            )
            if col is not None:
                A[:, :, c] = col.reshape(B, C)
        # one probe with different weights per sample: a per-sample loss gives A v exactly
        generator = torch.Generator(device="cpu").manual_seed(1)
        v = torch.randn(B, C, generator=generator, dtype=o0.dtype).to(o0.device)
        (hv,) = torch.autograd.grad(flat_g, o, v, allow_unused=True)
        hv = torch.zeros_like(v) if hv is None else hv.reshape(B, C)
        expected = torch.einsum("bcd,bd->bc", A, v)
        scale = (A.abs().amax() * v.abs().sum(1).amax()).item()
        tol = 1e3 * torch.finfo(o0.dtype).eps * max(scale, torch.finfo(o0.dtype).tiny)
        if (hv - expected).abs().amax().item() > tol:
            raise ValueError(
                "kron needs a loss that is a sum or mean over samples of per-sample terms, but "
                "this loss_fn couples samples (its Hessian in the outputs is not block "
                "diagonal per sample): use block_symmetric or full_autograd"
            )
    g0 = flat_g.detach()

    def surrogate(out: Tensor) -> Tensor:
        flat = out.reshape(B, C)
        d = flat - o0.reshape(B, C)
        return (g0 * flat).sum() + 0.5 * torch.einsum("bc,bcd,bd->", d, A, d)

    return surrogate


# ---------------------------------------------------------------- Kronecker rows


def _kron_blocks(
    H: Tensor,
    problem: Problem,
    sites: list[_Site],
    offsets: dict[str, int],
    surrogate: Callable[[Tensor], Tensor],
) -> None:
    """Fill every block between Kronecker parameters, and mirror it."""
    B = problem.inputs.shape[0]
    zeros = tuple(
        torch.zeros(B, s.d_out, dtype=problem.dtype, device=problem.device) for s in sites
    )

    def signals(perturb: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(δ_l, a_l)`` of every site at the point, with ``perturb`` added to the outputs."""

        def value(p: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
            captured: list = [None] * len(sites)
            out = _outputs(problem, sites, p, captured=captured)
            return surrogate(out), tuple(captured)

        return grad(value, has_aux=True)(perturb)

    deltas, inputs = signals(zeros)
    for site, delta, a in zip(sites, deltas, inputs):
        site.delta, site.inputs = delta.detach(), a.detach()

    # the directions of all sites in one vmap: direction r of site k is the unit change of
    # z_k[:, i] for all samples; basis[k] holds site k's share of every direction
    starts = [0]
    for s in sites:
        starts.append(starts[-1] + s.d_out)
    basis = []
    for k, s in enumerate(sites):
        b = torch.zeros(starts[-1], s.d_out, dtype=problem.dtype, device=problem.device)
        b[starts[k] : starts[k + 1]].fill_diagonal_(1)
        basis.append(b)

    def tangents(direction: tuple[Tensor, ...]) -> tuple:
        perturb = tuple(d.expand(B, -1) for d in direction)
        return jvp(signals, (zeros,), (perturb,))[1]

    itemsize = H.element_size()
    budget = max(int(H.numel() * itemsize * _CHUNK_FRACTION), _MIN_CHUNK_BYTES)
    widths = sum(s.d_out + s.d_in for s in sites)
    chunk = max(1, budget // max(1, 4 * B * widths * itemsize))
    for r0 in range(0, starts[-1], chunk):
        r1 = min(r0 + chunk, starts[-1])
        d_dots, a_dots = vmap(tangents)(tuple(b[r0:r1] for b in basis))
        for k, site in enumerate(sites):
            lo, hi = max(r0, starts[k]), min(r1, starts[k + 1])
            if lo >= hi:
                continue
            rows, local = slice(lo - r0, hi - r0), slice(lo - starts[k], hi - starts[k])
            for m in range(k, len(sites)):
                u, v = d_dots[m][rows], a_dots[m][rows]
                _gemms(H, site, sites[m], offsets, local, u, v, m == k)
    _mirror_sites(H, sites, offsets)


def _gemms(
    H: Tensor,
    row: _Site,
    col: _Site,
    offsets: dict[str, int],
    directions: slice,
    u: Tensor,
    v: Tensor,
    diagonal: bool,
) -> None:
    """Rows of ``row``'s directions ``directions`` against the columns of ``col``'s tensors.

    Weight row ``(i, j)`` has the row feature ``r = a_k[:, j]`` (bias rows ``r = 1``); against
    col's weight columns ``(p, q)`` it is, for all i at once, ``U_iᵀ (r ⊙ a_l) + (r ⊙ δ_l)ᵀ V_i``
    with ``U = δ̇_l``, ``V = ȧ_l``. On the site's own block (``diagonal``) ``V = 0`` and only
    the columns ``p >= i`` of the weight-weight and bias-bias blocks are needed.
    """
    c, B, d_l = u.shape
    P = H.shape[1]
    row_w = offsets.get(row.weight) if row.weight else None
    row_b = offsets.get(row.bias) if row.bias else None
    col_w = offsets.get(col.weight) if col.weight else None
    col_b = offsets.get(col.bias) if col.bias else None
    d_in, d_in_l = row.d_in, col.d_in
    a_t = row.inputs.T
    if diagonal:
        v = None
    i0 = directions.start
    wide = row_w is not None and d_in >= _WIDE_ROWS
    if col_w is not None:
        if wide:
            _wide_rows(H, row_w + i0 * d_in, d_in, col_w, a_t, u, v, col, diagonal, i0)
        features = [] if row_w is None or wide else [
            (row_w + i0 * d_in + j, d_in, a_t[j]) for j in range(d_in)
        ]  # fmt: skip
        if row_b is not None and not diagonal:
            features.append((row_b + i0, 1, None))
        u_t = u.transpose(1, 2)
        for first, stride, r in features:
            a_l = col.inputs if r is None else r[:, None] * col.inputs
            out = H.as_strided(
                (c, d_l, d_in_l), (stride * P, d_in_l, 1), H.storage_offset() + first * P + col_w
            )
            # into a contiguous result, then one strided copy: with a strided ``out`` bmm makes
            # one small GEMM call per direction, which stalls when the cores are shared
            block = torch.bmm(u_t, a_l.expand(c, B, d_in_l))
            if v is not None:
                delta = col.delta if r is None else r[:, None] * col.delta
                block.baddbmm_(delta.T.expand(c, d_l, B), v)
            out.copy_(block)
    if col_b is not None:
        cols = slice(col_b, col_b + d_l)
        if row_w is not None:
            out = H[row_w + i0 * d_in : row_w + directions.stop * d_in, cols]
            torch.matmul(a_t, u, out=out.view(c, d_in, -1))
        if row_b is not None:
            out = H[row_b + i0 : row_b + directions.stop, cols]
            ones = torch.ones(1, B, dtype=H.dtype, device=H.device)
            torch.matmul(ones, u, out=out.view(c, 1, -1))


def _wide_rows(H, first_row, d_in, col_w, a_t, u, v, col, diagonal, i0) -> None:
    """Weight rows with many features: one GEMM per direction against its ``B x P_l``
    product, a few directions at a time so that the product stays in cache. On the
    diagonal block direction i needs only the columns ``p >= i``."""
    c, B, d_l = u.shape
    d_in_l = col.d_in
    if diagonal:
        for s in range(c):
            p0 = i0 + s
            mw = u[s, :, p0:, None] * col.inputs[:, None, :]
            out = H[first_row + s * d_in : first_row + (s + 1) * d_in,
                    col_w + p0 * d_in_l : col_w + d_l * d_in_l]  # fmt: skip
            torch.matmul(a_t, mw.view(B, -1), out=out)
        return
    step = max(1, _CACHE_BYTES // (B * d_l * d_in_l * H.element_size()))
    cols = slice(col_w, col_w + d_l * d_in_l)
    for s0 in range(0, c, step):
        s1 = min(s0 + step, c)
        mw = u[s0:s1, :, :, None] * col.inputs[None, :, None, :]
        if v is not None:
            mw.addcmul_(col.delta[None, :, :, None], v[s0:s1, :, None, :])
        out = H[first_row + s0 * d_in : first_row + s1 * d_in, cols]
        torch.matmul(a_t, mw.view(s1 - s0, B, -1), out=out.view(s1 - s0, d_in, -1))


def _transpose_into(dst: Tensor, src: Tensor) -> None:
    """``dst[:] = src.T`` in bands of rows: a strided transpose of a whole block is slower."""
    for r0 in range(0, src.shape[0], _MIRROR_BAND):
        dst[:, r0 : r0 + _MIRROR_BAND] = src[r0 : r0 + _MIRROR_BAND].T


def _mirror_sites(H: Tensor, sites: list[_Site], offsets: dict[str, int]) -> None:
    """Fill the Kronecker blocks that were not computed from those that were."""
    span = []  # (site index, kind, offset, numel) of every Kronecker tensor
    for k, s in enumerate(sites):
        for kind, name in (("weight", s.weight), ("bias", s.bias)):
            if name:
                span.append((k, kind, offsets[name], getattr(s.module, kind).numel()))
    for k, kind_k, rk, nk in span:
        for m, kind_m, rm, nm in span:
            if m > k or (m == k and kind_k == "weight" and kind_m == "bias"):
                _transpose_into(H[rm : rm + nm, rk : rk + nk], H[rk : rk + nk, rm : rm + nm])
        if kind_k == "weight":
            # inside the weight's own block, the columns p < i of direction i's rows
            d_out, d_in = sites[k].d_out, sites[k].d_in
            for i in range(d_out - 1):
                rows = slice(rk + i * d_in, rk + (i + 1) * d_in)
                rest = slice(rk + (i + 1) * d_in, rk + nk)
                _transpose_into(H[rest, rows], H[rows, rest])


# ---------------------------------------------------------------- Hessian-vector rows


def _hvp_rows(
    H: Tensor,
    problem: Problem,
    others: list[str],
    offsets: dict[str, int],
    surrogate: Callable[[Tensor], Tensor],
    chunk_size: int | None,
) -> None:
    """Full rows of the non-Kronecker tensors by forward-over-reverse products of the
    surrogate, and their columns by symmetry."""
    point = problem.primal_dict()
    sizes = dict(zip(problem.names, problem.sizes))
    flat_grad = _flat_grad(problem, surrogate)

    n_other = sum(sizes[n] for n in others)
    step = problem_chunk(problem, n_other, chunk_size)
    for name in others:
        r0, n = offsets[name], sizes[name]
        shape = point[name].shape

        def row(v: Tensor, name: str = name, shape: torch.Size = shape) -> Tensor:
            tangent = {m: torch.zeros_like(t) for m, t in point.items()}
            tangent[name] = v.view(shape)
            return jvp(flat_grad, (point,), (tangent,))[1]

        for start, stop, basis in unit_chunks(n, step, problem.dtype, problem.device):
            H[r0 + start : r0 + stop] = vmap(row)(basis)
    kron = [n for n in problem.names if n not in others]
    for name in others:
        r0, n = offsets[name], sizes[name]
        for col in kron:
            c0, m = offsets[col], sizes[col]
            _transpose_into(H[c0 : c0 + m, r0 : r0 + n], H[r0 : r0 + n, c0 : c0 + m])


def _flat_grad(
    problem: Problem, surrogate: Callable[[Tensor], Tensor]
) -> Callable[[dict[str, Tensor]], Tensor]:
    """The surrogate loss's gradient w.r.t. the chosen parameters, flat in mapping order."""

    def flat_grad(p: dict[str, Tensor]) -> Tensor:
        g = grad(lambda q: surrogate(functional_call(problem.module, q, (problem.inputs,))))(p)
        return flatten([g[n] for n in problem.names])

    return flat_grad


def _reverse_rows(H: Tensor, problem: Problem, surrogate: Callable[[Tensor], Tensor]) -> None:
    """Every row by plain double backward, one at a time: no torch.func transform, so no
    forward-mode formula, batching rule or ``setup_context`` is needed."""
    leaves = [t.clone().requires_grad_(True) for t in problem.primals]
    with torch.enable_grad():
        out = functional_call(problem.module, dict(zip(problem.names, leaves)), (problem.inputs,))
        grads = torch.autograd.grad(surrogate(out), leaves, create_graph=True, allow_unused=True)
        flat = flatten([torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)])
        for i in range(problem.P):
            if not flat[i].requires_grad:
                H[i] = 0
                continue
            row = torch.autograd.grad(flat[i], leaves, retain_graph=True, allow_unused=True)
            H[i] = flatten([torch.zeros_like(t) if r is None else r for r, t in zip(row, leaves)])
