"""Exact Hessian of any net's loss, linear maps' weights from their Kronecker structure, the rest by HVPs.

A linear map ``z = a Wᵀ + b`` (an ``nn.Linear``, an ``F.linear`` call, the projections of
multi-head attention, a convolution on its unfolded patches, an embedding on one-hot
indices) whose input reads as ``(B, T, d_in)``, T positions per sample sharing
W: a unit change of ``W[i, j]`` changes sample b's pre-activations by ``a[b, t, j]`` at
``z[b, t, i]`` for every position t. When samples are independent through the net and the
loss is a sum of per-sample terms, every tangent that change causes in sample b is
``Σ_t a[b, t, j]`` times the tangent of a unit change of ``z[b, t, i]``. So for each
*direction* ``(i, t)`` one forward-over-reverse pass, for all samples at once, gives the
tangents ``U = δ̇_l`` of every site's backprop signal ``δ_l = ∂L/∂z_l`` and ``V = ȧ_l`` of
its input, and for the sites l run at or after k

    H[(k,i,j), (l,p,q)] = Σ_{b,t} a_k[b,t,j] Σ_s (U^{(i,t)}[b,s,p] a_l[b,s,q]
                                                  + δ_l[b,s,p] V^{(i,t)}[b,s,q])

a GEMM of inner dimension ``B·T_k`` per output unit i (bias rows and columns: ``a = 1``).
With one position (``(B, d_in)`` inputs) it is one GEMM of inner dimension B per direction
written straight into H, except a site's own weight block: one GEMM over the unfolded
operand, ``Y[(i,p),(j,q)] = Σ_b U[i,b,p] a[b,j] a[b,q]`` for ``p >= i``, permuted into H,
its symmetric tiles their own mirror. Blocks of sites run earlier are transposes; inside a
site's own block the columns ``p < i`` are mirrored. A per-site cost model takes directions
only where ``d_out · T`` passes and the assembly cost less than the site's own
Hessian-vector rows (few positions against d_in). Every other chosen parameter (LayerNorm
affine, grouped convolutions, a linear map used twice) gets its full rows from
Hessian-vector products, and its cross blocks come with those rows; a net with no linear
map is all HVP rows.

Nothing is assumed about the forward: the sites, their inputs and signals are found by a
torch function mode (``_kron_sites``) that adds a perturbation ``e_k`` to the output of the
``F.linear`` call itself, so that ``δ_k = ∂L/∂e_k`` whatever the net does afterwards (a
user's forward hook included). The preconditions are checked at run time on the batch:

- each Kronecker parameter is used by exactly one call (else it gets HVP rows);
- samples are independent through the net: a forward-mode probe moves sample 0 only and
  checks that no module's output moves for the other samples, naming the first that does;
  a second-order probe (forward over reverse) moves sample 0's, then the last sample's,
  site outputs and checks that no other sample's ``δ_l`` or ``a_l`` moves, which catches
  nets that mix samples only in their second derivatives;
- the loss acts on each sample separately: its Hessian in the outputs is block diagonal per
  sample, checked with a random probe.

The loss enters only through its gradient ``g`` and per-sample Hessian ``A`` in the outputs
(reverse-over-reverse, through the loss alone); the tangent passes differentiate the
quadratic ``g·o + ½ (o - o₀)ᵀ A (o - o₀)``, which has the same gradient and Hessian at the
point. So losses with no forward-mode formula (``huber_loss_backward``) or with torch 2.13's
ZeroTensor failure (``F.mse_loss`` with mean reduction) work all the same. Where A is a
per-row multiple of the softmax Hessian ``diag(p) - p pᵀ`` over the last dim (cross-entropy,
with weights or label smoothing; checked with random probes), it is kept in that form, so a
large vocabulary costs ``O(C)`` per row, not ``C²``; where A would not fit otherwise, every
row comes from Hessian-vector products of the loss itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils._pytree import tree_flatten

from ._blocks import flatten, unflatten
from ._contract import prepare
from ._kinds import uses_batch_statistics
from ._kron_sites import Site, discover, has_linear, run
from ._memory import check_positive, problem_chunk, unit_chunks
from ._problem import LossFn, Problem

__all__ = ["NAME", "FAMILY", "DESCRIPTION", "supports", "compute", "has_linear", "workload"]

NAME = "kron"
FAMILY = "structured"
DESCRIPTION = (
    "any net: linear maps' weights from d_out tangent directions per position and GEMMs of "
    "inner dimension B·T, other parameters by Hessian-vector rows; upper halves mirrored"
)

#: a temporary of one chunk of directions holds at most this fraction of the Hessian's bytes
_CHUNK_FRACTION = 1 / 2
_MIN_CHUNK_BYTES = 1 << 22
#: a chunk of directions with positions, or of Hessian-vector rows, may take this much
#: beyond the half of the Hessian that bounds the other chunks: each vmap call of the tangent
#: passes costs about 70 ms of overhead on the transformer block, a pass about 1 ms; on a
#: CNN of P = 3,510 (``convnet`` of the structured grid, on 64 images) its convolutions' 188 rows took 47
#: calls of 4 rows under that half, and ``kron`` 1.04 s; 0.45 s with 128 MiB, 0.37 s with
#: 256 MiB, 0.32 s with 512 MiB
_SHARED_CHUNK_BYTES = 1 << 28
#: bytes of a direction's B x P_l product kept in cache at a time
_CACHE_BYTES = 1 << 21
#: rows per direction from which one GEMM per direction beats batched small GEMMs
_WIDE_ROWS = 32
#: bytes of an unfolded operand, and of the products of a chunk of directions
_UNFOLD_BYTES = 1 << 24
#: an unfolded block has at least this many times B tiles ``(i, p)``
_UNFOLD_RATIO = 4
#: rows of a block transposed at a time when mirroring
_MIRROR_BAND = 64
#: a tangent pass (forward over reverse) costs about this many forwards
_PASS_FORWARDS = 6
#: torch ops of fused attention, which have no double backward on CPU
_FUSED_ATTENTION = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient")


def supports(net: nn.Module, loss_fn: LossFn | None) -> tuple[bool, str]:
    """Whether ``kron`` can take this net: any ``nn.Module`` without a BatchNorm that
    normalises with batch statistics (it mixes samples). The batch-dependent preconditions
    are checked by ``compute``, which raises ValueError naming the module or the loss. A
    net with no linear map is supported, with every row a Hessian-vector row (``has_linear``
    tells the planner whether there is structure to exploit)."""
    if not isinstance(net, nn.Module):
        return False, f"net must be a torch.nn.Module, got {type(net).__name__}"
    for name, m in net.named_modules():
        if uses_batch_statistics(m):
            return False, (
                f"module {name or 'net'!r} is {type(m).__name__} using batch statistics: "
                "it mixes samples, so the Kronecker structure does not hold"
            )
    return True, ""


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The dense Hessian of ``loss_fn(net(inputs), targets)`` w.r.t. ``params``.

    Args:
        chunk_size: Hessian-vector rows of non-Kronecker parameters computed at once;
            default: sized to free memory.

    Raises:
        ValueError: samples are mixed by the net (naming the module) or by the loss; the
            outputs are not a ``(batch, ...)`` tensor (naming their shape); the forward
            calls torch's fused attention (naming the op); ``chunk_size`` is not a positive
            integer.
    """
    check_positive(chunk_size=chunk_size)
    problem = _prepare(net, params, batch, loss_fn)
    with torch.enable_grad():
        sites, others, flops = discover(problem)
        outputs = run(problem, [], None)
        surrogate = _loss_surrogate(problem, outputs)
    H = torch.empty(problem.P, problem.P, dtype=problem.dtype, device=problem.device)
    offsets = dict(zip(problem.names, problem.offsets))
    if surrogate is None:  # the loss's Hessian in the outputs is too large to hold
        loss = problem.loss_fn
        _all_hvp_rows(H, problem, lambda out: loss(out, problem.targets), chunk_size)
        return H
    sites, moved = _choose(problem, sites, flops)
    others = [n for n in problem.names if n in set(others) | moved]
    try:
        if sites:
            _check_independent(problem, sites)
        # torch.func differentiates inside no_grad; outside it, nothing is recorded for autograd
        with torch.no_grad():
            if sites:
                _kron_blocks(H, problem, sites, offsets, surrogate)
                _untranspose(H, sites, offsets)
            if others:
                _hvp_rows(H, problem, others, offsets, surrogate, chunk_size)
    except (NotImplementedError, RuntimeError):
        # an op of the net has no forward-mode formula or no batching rule (GRU, a custom
        # autograd Function): every row by reverse-over-reverse products, one at a time
        if sites:
            _check_independent_reverse(problem, sites)
        _reverse_rows(H, problem, surrogate)
    return H


def _prepare(
    net: nn.Module, params: Mapping[str, Tensor], batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None,
) -> Problem:  # fmt: skip
    """``prepare``, with torch's fused attention named for what it is: its kernel is tagged
    as drawing random numbers, but what stops every Hessian is its missing double backward."""
    try:
        return prepare(net, params, batch, loss_fn)
    except ValueError as error:
        op = next((op for op in _FUSED_ATTENTION if f"aten.{op}" in str(error)), None)
        if op is None:
            raise
        name = str(error).split("aten.", 1)[1].split(",", 1)[0]
        raise ValueError(
            f"the forward calls aten.{name}, torch's fused scaled-dot-product attention, "
            "which has no double backward on CPU, so no Hessian can be taken through it (in "
            "nn.MultiheadAttention, pass need_weights=True to use the differentiable path)"
        ) from error


def workload(problem: Problem) -> tuple[list[tuple[int, int]], int]:
    """What the planner's estimate of ``kron`` rests on: the rows and positions of each site
    that gets Kronecker directions, and the number of Hessian-vector rows. One forward (and
    the layout probes), nothing differentiated twice."""
    with torch.enable_grad():
        sites, others, flops = discover(problem)
    kept, moved = _choose(problem, sites, flops)
    sizes = dict(zip(problem.names, problem.sizes))
    other = sum(sizes[n] for n in problem.names if n in set(others) | moved)
    return [(s.rows, s.T) for s in kept], other


def _all_hvp_rows(
    H: Tensor, problem: Problem, loss: Callable[[Tensor], Tensor], chunk_size: int | None
) -> None:
    """Every row from Hessian-vector products of ``loss`` of the outputs, or by double
    backward where the net or the loss has no forward-mode formula."""
    offsets = dict(zip(problem.names, problem.offsets))
    try:
        with torch.no_grad():
            _hvp_rows(H, problem, list(problem.names), offsets, loss, chunk_size)
    except (NotImplementedError, RuntimeError):
        _reverse_rows(H, problem, loss)


# ---------------------------------------------------------------- the cost model


def _choose(problem: Problem, sites: list[Site], flops: float) -> tuple[list[Site], set[str]]:
    """The sites whose directions cost less than their Hessian-vector rows, and the names of
    the others' parameters (they get HVP rows). With one position a site always wins (d_out
    passes against d_out·(d_in+1)); with T positions its d_out·T passes and the assembly,
    ``B·T·P_l`` multiply-adds per direction and later site l plus a GEMM of ``d_in·B·T·P_l``
    per output unit, are weighed against its rows, each a pass."""
    B = problem.inputs.shape[0]
    forward = max(flops, float(B * problem.P))  # multiply-adds of one forward
    kept, moved = [], set()
    for k, s in enumerate(sites):
        if s.T == 1:
            kept.append(s)
            continue
        later = sites[k:]
        assembly = sum(
            s.d_out * B * s.T * (2 * o.T + s.d_in + 1) * (o.d_out * (o.d_in + 1)) for o in later
        )
        directions = s.d_out * s.T * _PASS_FORWARDS * forward + assembly
        rows = s.rows * _PASS_FORWARDS * forward
        if directions < rows:
            kept.append(s)
        else:
            moved.update(n for n in (s.weight, s.bias) if n)
    return kept, moved


# ---------------------------------------------------------------- independence probes


def _sample_tangent(shape: torch.Size, dtype: torch.dtype, device: torch.device, sample: int,
                    generator: torch.Generator) -> Tensor:  # fmt: skip
    t = torch.zeros(shape, dtype=dtype)
    t[sample] = torch.randn(shape[1:], dtype=dtype, generator=generator)
    return t.to(device)


def _check_independent(problem: Problem, sites: list[Site]) -> None:
    """ValueError naming the first module whose output for other samples moves when only
    sample 0's input and site outputs move (forward mode, one pass)."""
    B = problem.inputs.shape[0]
    if B < 2:
        return
    generator = torch.Generator(device="cpu").manual_seed(0)

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
    dtype, device = problem.dtype, problem.device
    try:
        with torch.no_grad(), fwAD.dual_level():
            inputs = problem.inputs
            if inputs.is_floating_point() and inputs.dim():
                inputs = fwAD.make_dual(
                    inputs, _sample_tangent(inputs.shape, inputs.dtype, device, 0, generator)
                )
            perturb = tuple(
                fwAD.make_dual(
                    torch.zeros(B, s.T, s.d_out, dtype=dtype, device=device),
                    _sample_tangent(torch.Size((B, s.T, s.d_out)), dtype, device, 0, generator),
                )
                for s in sites
            )
            outputs = run(problem, sites, perturb, inputs=inputs)
            if not found and leaks(outputs):
                found.append("the forward of the net mixes samples outside its submodules")
    finally:
        for h in handles:
            h.remove()
    if found:
        _refuse_mixing(found[0])


def _check_second_order(
    problem: Problem, sites: list[Site], signals: Callable, zeros: tuple[Tensor, ...]
) -> None:
    """ValueError where moving one sample's site outputs moves another sample's signals
    ``δ_l`` or inputs ``a_l`` (forward over reverse, samples 0 and B-1): the Kronecker rows
    need exactly that independence, first and second order."""
    B = problem.inputs.shape[0]
    if B < 2:
        return
    generator = torch.Generator(device="cpu").manual_seed(3)
    probes = tuple(
        torch.stack([
            _sample_tangent(z.shape, z.dtype, z.device, sample, generator)
            for sample in (0, B - 1)
        ])
        for z in zeros
    )  # fmt: skip
    d_dots, a_dots = vmap(lambda t: jvp(signals, (zeros,), (t,))[1])(probes)
    # independent samples leave exact zeros, but some kernels (group norm's) leave roundoff,
    # about 1e-12 of the scale in float64; a mix that matters is of the order of the scale
    tol = torch.finfo(problem.dtype).eps ** 0.5
    for n, sample in enumerate((0, B - 1)):
        others = torch.arange(B, device=problem.device) != sample
        moved = [t[n] for t in (*d_dots, *a_dots)]
        scale = max((float(t.abs().max()) for t in moved if t.numel()), default=0.0)
        leak = max((float(t[others].abs().max()) for t in moved if t.numel()), default=0.0)
        if leak > tol * scale:
            _refuse_mixing(
                f"the second derivatives of the forward mix samples (moving sample {sample}'s "
                "linear outputs moves another sample's gradient signals)"
            )


def _refuse_mixing(where: str) -> None:
    raise ValueError(
        f"kron needs samples to be independent through the net, but {where} (the outputs of "
        "other samples move when only sample 0 moves): use block_symmetric or full_autograd"
    )


def _check_independent_reverse(problem: Problem, sites: list[Site]) -> None:
    """``_check_independent`` by one reverse pass, for nets without forward-mode formulas:
    the other samples' outputs and site inputs, weighted at random, must have zero gradient
    w.r.t. sample 0's input and site outputs. It cannot name the module."""
    B = problem.inputs.shape[0]
    if B < 2:
        return
    with torch.enable_grad():
        inputs = problem.inputs
        if inputs.is_floating_point() and inputs.dim():
            inputs = inputs.detach().clone().requires_grad_(True)
        perturb = tuple(
            torch.zeros(B, s.T, s.d_out, dtype=problem.dtype, device=problem.device,
                        requires_grad=True)
            for s in sites
        )  # fmt: skip
        captured: list = [None] * len(sites)
        outputs = run(problem, sites, perturb, captured=captured, inputs=inputs)
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


def _loss_surrogate(problem: Problem, outputs: Tensor) -> Callable[[Tensor], Tensor] | None:
    """A quadratic in the outputs with the loss's gradient and Hessian at ``outputs``, or
    None where the per-sample Hessian ``A`` would not fit in memory and has no softmax form.

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
    g0 = flat_g.detach()
    if not flat_g.requires_grad:  # the loss is linear in the outputs

        def linear(out: Tensor) -> Tensor:
            return (g0 * out.reshape(B, C)).sum()

        return linear

    def hvp(v: Tensor) -> Tensor:
        (hv,) = torch.autograd.grad(g, o, v.view_as(o), retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.reshape(v.shape)

    generator = torch.Generator(device="cpu").manual_seed(1)
    eps = torch.finfo(o0.dtype).eps
    softmax = _softmax_form(o0, hvp, generator, eps)
    if softmax is not None:
        p, scale = softmax

        def structured(out: Tensor) -> Tensor:
            d = out - o0
            pd = (p * d).sum(-1)
            quad = (scale * ((p * d * d).sum(-1) - pd * pd)).sum()
            return (g0 * out.reshape(B, C)).sum() + 0.5 * quad

        return structured
    itemsize = o0.element_size()
    hessian_bytes = problem.P * problem.P * itemsize
    if B * C * C * itemsize > max(hessian_bytes * _CHUNK_FRACTION, _MIN_CHUNK_BYTES):
        return None
    A = torch.zeros(B, C, C, dtype=o0.dtype, device=o0.device)
    for c in range(C):
        (col,) = torch.autograd.grad(flat_g[:, c].sum(), o, retain_graph=True, allow_unused=True)
        if col is not None:
            A[:, :, c] = col.reshape(B, C)
    # one probe with different weights per sample: a per-sample loss gives A v exactly
    v = torch.randn(B, C, generator=generator, dtype=o0.dtype).to(o0.device)
    hv = hvp(v)
    expected = torch.einsum("bcd,bd->bc", A, v)
    bound = (A.abs().amax() * v.abs().sum(1).amax()).item()
    if (hv - expected).abs().amax().item() > 1e3 * eps * max(bound, torch.finfo(o0.dtype).tiny):
        _refuse_coupled_loss()

    def surrogate(out: Tensor) -> Tensor:
        flat = out.reshape(B, C)
        d = flat - o0.reshape(B, C)
        return (g0 * flat).sum() + 0.5 * torch.einsum("bc,bcd,bd->", d, A, d)

    return surrogate


def _refuse_coupled_loss() -> None:
    raise ValueError(
        "kron needs a loss that is a sum or mean over samples of per-sample terms, but this "
        "loss_fn couples samples (its Hessian in the outputs is not block diagonal per "
        "sample): use block_symmetric or full_autograd"
    )


def _softmax_form(
    o0: Tensor, hvp: Callable[[Tensor], Tensor], generator: torch.Generator, eps: float
) -> tuple[Tensor, Tensor] | None:
    """``(p, s)`` where the loss's Hessian in the outputs is ``s_r (diag(p_r) - p_r p_rᵀ)``
    for every row r of the last dim, ``p = softmax(o0)``: ``s`` from one random probe (a
    Rayleigh quotient per row), the form checked on a second. Else None."""
    if o0.dim() < 2 or o0.shape[-1] < 2:
        return None
    p = torch.softmax(o0, -1)

    def softmax_hvp(v: Tensor) -> Tensor:
        return p * v - p * (p * v).sum(-1, keepdim=True)

    v1, v2 = (
        torch.randn(o0.shape, generator=generator, dtype=o0.dtype).to(o0.device) for _ in "12"
    )
    h1, s1 = hvp(v1), softmax_hvp(v1)
    scale = (v1 * h1).sum(-1) / (v1 * s1).sum(-1).clamp_min(torch.finfo(o0.dtype).tiny)
    expected, actual = scale[..., None] * softmax_hvp(v2), hvp(v2)
    bound = float(actual.abs().max()) + float(expected.abs().max())
    if float((actual - expected).abs().max()) > 1e4 * eps * max(bound, 1e-300):
        return None
    return p, scale


# ---------------------------------------------------------------- Kronecker rows


def _kron_blocks(
    H: Tensor,
    problem: Problem,
    sites: list[Site],
    offsets: dict[str, int],
    surrogate: Callable[[Tensor], Tensor],
) -> None:
    """Fill every block between Kronecker parameters, and mirror it."""
    B = problem.inputs.shape[0]
    dtype, device = problem.dtype, problem.device
    zeros = tuple(torch.zeros(B, s.T, s.d_out, dtype=dtype, device=device) for s in sites)

    def signals(perturb: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(δ_l, a_l)`` of every site at the point, with ``perturb`` added to the outputs."""

        def value(p: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
            captured: list = [None] * len(sites)
            out = run(problem, sites, p, captured=captured)
            return surrogate(out), tuple(captured)

        return grad(value, has_aux=True)(perturb)

    deltas, inputs = signals(zeros)
    for site, delta, a in zip(sites, deltas, inputs):
        site.delta, site.inputs = delta.detach(), a.detach()
    _check_second_order(problem, sites, signals, zeros)

    # direction r of site k is the unit change of z_k[:, t, i] for all samples (r = i·T + t);
    # basis[k] holds site k's share of every direction
    starts = [0]
    for s in sites:
        starts.append(starts[-1] + s.d_out * s.T)

    def tangents(direction: tuple[Tensor, ...]) -> tuple:
        perturb = tuple(d.expand(B, -1, -1) for d in direction)
        return jvp(signals, (zeros,), (perturb,))[1]

    def basis(r0: int, r1: int) -> tuple[Tensor, ...]:
        out = []
        for k, s in enumerate(sites):
            b = torch.zeros(r1 - r0, s.d_out * s.T, dtype=dtype, device=device)
            lo, hi = max(r0, starts[k]), min(r1, starts[k + 1])
            if lo < hi:
                b[lo - r0 : hi - r0, lo - starts[k] : hi - starts[k]].fill_diagonal_(1)
            # local index i·T + t -> the (t, i) entry of a (T, d_out) perturbation
            out.append(b.view(r1 - r0, s.d_out, s.T).transpose(1, 2))
        return tuple(out)

    itemsize = H.element_size()
    budget = max(int(H.numel() * itemsize * _CHUNK_FRACTION), _MIN_CHUNK_BYTES)
    widths = sum(s.T * (s.d_out + s.d_in) for s in sites)
    unfolded: set[int] = set()  # sites whose own weight block is written with its mirror
    if all(s.T == 1 for s in sites):
        chunk = max(1, budget // max(1, 4 * B * widths * itemsize))
        for r0 in range(0, starts[-1], chunk):
            r1 = min(r0 + chunk, starts[-1])
            d_dots, a_dots = vmap(tangents)(basis(r0, r1))
            for k, site in enumerate(sites):
                lo, hi = max(r0, starts[k]), min(r1, starts[k + 1])
                if lo >= hi:
                    continue
                rows, local = slice(lo - r0, hi - r0), slice(lo - starts[k], hi - starts[k])
                for m in range(k, len(sites)):
                    u, v = d_dots[m][rows, :, 0], a_dots[m][rows, :, 0]
                    if m == k and _unfolds(site, itemsize):
                        unfolded.add(k)
                        _unfolded_gemms(H, site, offsets, local.start, u)
                        _unfolded_biases(H, site, offsets, local.start, u)
                    else:
                        _gemms(H, site, sites[m], offsets, local, u, v, m == k)
    else:
        widest = max(s.d_out * (s.d_in + 1) for s in sites)
        for k, site in enumerate(sites):
            # per output unit: its T directions' tangents and the B·T x P_l products
            later = sites[k:]
            per_unit = site.T * B * (4 * sum(s.T * (s.d_out + s.d_in) for s in later)
                                     + 2 * widest) * itemsize  # fmt: skip
            units = max(1, max(budget, _SHARED_CHUNK_BYTES) // per_unit)
            from_site = _signals_from(problem, sites, k, surrogate, zeros)
            for i0 in range(0, site.d_out, units):
                i1 = min(i0 + units, site.d_out)
                unit = torch.zeros((i1 - i0) * site.T, site.d_out * site.T, dtype=dtype,
                                   device=device)  # fmt: skip
                unit[:, i0 * site.T : i1 * site.T].fill_diagonal_(1)
                # local index i·T + t -> the (t, i) entry of a (T, d_out) perturbation
                unit = unit.view(-1, site.d_out, site.T).transpose(1, 2)
                d_dots, a_dots = vmap(
                    lambda d, f=from_site, z=zeros[k]: jvp(f, (z,), (d.expand(B, -1, -1),))[1],
                    in_dims=(0,),
                )(unit)
                for m in range(k, len(sites)):
                    _shared_gemms(H, site, sites[m], offsets, i0, i1, d_dots[m - k],
                                  a_dots[m - k], m == k)  # fmt: skip
    _mirror_sites(H, sites, offsets, unfolded)


def _untranspose(H: Tensor, sites: list[Site], offsets: dict[str, int]) -> None:
    """An embedding's weight is ``(d_in, d_out)``, its entries in H so far in a linear map's
    ``(d_out, d_in)`` order: permute its rows and columns into the parameter's own order
    (the other rows' entries there are written later)."""
    for s in sites:
        if s.embedding and s.weight:
            o, n = offsets[s.weight], s.d_in * s.d_out
            perm = torch.arange(n, device=H.device).view(s.d_out, s.d_in).T.reshape(-1)
            H[o : o + n] = H[o : o + n][perm]
            H[:, o : o + n] = H[:, o : o + n][:, perm]


def _signals_from(
    problem: Problem, sites: list[Site], k: int, surrogate: Callable[[Tensor], Tensor],
    zeros: tuple[Tensor, ...],
) -> Callable[[Tensor], tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:  # fmt: skip
    """``e_k -> (δ_l, a_l)`` for the sites l >= k only: the backward stops at site k, and the
    sites before it are not perturbed."""

    def signals(e_k: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        def value(later: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
            captured: list = [None] * len(sites)
            out = run(problem, sites, (None,) * k + later, captured=captured)
            return surrogate(out), tuple(captured[k:])

        return grad(value, has_aux=True)((e_k, *zeros[k + 1 :]))

    return signals


def _shared_gemms(
    H: Tensor, row: Site, col: Site, offsets: dict[str, int], i0: int, i1: int,
    u: Tensor, v: Tensor, diagonal: bool,
) -> None:  # fmt: skip
    """Rows of ``row``'s output units ``i0:i1`` against the columns of ``col``'s tensors,
    for sites with positions: ``u = δ̇_l``, ``v = ȧ_l`` of the directions ``(i, t)``, shaped
    ``(c·T_k, B, T_l, d)``. On the site's own block ``ȧ_k = 0``, and the bias rows against
    the weight columns are left to the mirror."""
    c, B, T_k = i1 - i0, row.batch, row.T
    row_w = offsets[row.weight] if row.weight else None
    row_b = offsets[row.bias] if row.bias else None
    col_w = offsets[col.weight] if col.weight else None
    col_b = offsets[col.bias] if col.bias else None
    u = u.reshape(c, T_k, B, col.T, col.d_out)
    # row features ordered (t, b), as the products' rows below
    a_k = row.inputs.transpose(0, 1).reshape(T_k * B, row.d_in)
    if col_w is not None:
        n = col.d_out * col.d_in
        prod = torch.matmul(u.transpose(-1, -2), col.inputs)  # c, T_k, B, d_l, d_in_l
        if not diagonal:
            v = v.reshape(c, T_k, B, col.T, col.d_in)
            prod += torch.matmul(col.delta.transpose(-1, -2), v)
        prod = prod.reshape(c, T_k * B, n)
        if row_w is not None:
            out = H[row_w + i0 * row.d_in : row_w + i1 * row.d_in, col_w : col_w + n]
            out.view(c, row.d_in, n).copy_(torch.matmul(a_k.T, prod))
        if row_b is not None and not diagonal:
            H[row_b + i0 : row_b + i1, col_w : col_w + n] = prod.sum(1)
    if col_b is not None:
        sums = u.sum(3).reshape(c, T_k * B, col.d_out)
        if row_w is not None:
            out = H[row_w + i0 * row.d_in : row_w + i1 * row.d_in, col_b : col_b + col.d_out]
            out.view(c, row.d_in, col.d_out).copy_(torch.matmul(a_k.T, sums))
        if row_b is not None:
            H[row_b + i0 : row_b + i1, col_b : col_b + col.d_out] = sums.sum(1)


def _gemms(
    H: Tensor,
    row: Site,
    col: Site,
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
    a_t = row.flat_inputs.T
    if diagonal:
        v = None
    i0 = directions.start
    wide = row_w is not None and d_in >= _WIDE_ROWS
    if col_w is not None:
        if wide:
            _wide_rows(
                H,
                u,
                v,
                col=col,
                a_t=a_t,
                first_row=row_w + i0 * d_in,
                col_w=col_w,
                i0=i0,
                diagonal=diagonal,
            )
        features = [] if row_w is None or wide else [
            (row_w + i0 * d_in + j, d_in, a_t[j]) for j in range(d_in)
        ]  # fmt: skip
        if row_b is not None and not diagonal:
            features.append((row_b + i0, 1, None))
        u_t = u.transpose(1, 2)
        for first, stride, r in features:
            a_l = col.flat_inputs if r is None else r[:, None] * col.flat_inputs
            out = H.as_strided(
                (c, d_l, d_in_l), (stride * P, d_in_l, 1), H.storage_offset() + first * P + col_w
            )
            # into a contiguous result, then one strided copy: with a strided ``out`` bmm makes
            # one small GEMM call per direction, which stalls when the cores are shared
            block = torch.bmm(u_t, a_l.expand(c, B, d_in_l))
            if v is not None:
                delta = col.flat_delta if r is None else r[:, None] * col.flat_delta
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


def _wide_rows(
    H: Tensor,
    u: Tensor,
    v: Tensor | None,
    *,
    col: Site,
    a_t: Tensor,
    first_row: int,
    col_w: int,
    i0: int,
    diagonal: bool,
) -> None:
    """Weight rows with many features: one GEMM per direction against its ``B x P_l``
    product, a few directions at a time so that the product stays in cache. On the
    diagonal block direction i needs only the columns ``p >= i``.

    ``u``, ``v``, ``col`` and ``diagonal`` as for ``_gemms``; ``a_t``: the row site's
    features, ``(d_in, B)``; ``first_row``: the row of direction ``i0``'s first feature;
    ``col_w``: the column of ``col``'s weight.
    """
    c, B, d_l = u.shape
    d_in = a_t.shape[0]
    d_in_l = col.d_in
    if diagonal:
        for s in range(c):
            p0 = i0 + s
            mw = u[s, :, p0:, None] * col.flat_inputs[:, None, :]
            out = H[first_row + s * d_in : first_row + (s + 1) * d_in,
                    col_w + p0 * d_in_l : col_w + d_l * d_in_l]  # fmt: skip
            torch.matmul(a_t, mw.view(B, -1), out=out)
        return
    step = max(1, _CACHE_BYTES // (B * d_l * d_in_l * H.element_size()))
    cols = slice(col_w, col_w + d_l * d_in_l)
    for s0 in range(0, c, step):
        s1 = min(s0 + step, c)
        mw = u[s0:s1, :, :, None] * col.flat_inputs[None, :, None, :]
        if v is not None:
            mw.addcmul_(col.flat_delta[None, :, :, None], v[s0:s1, :, None, :])
        out = H[first_row + s0 * d_in : first_row + s1 * d_in, cols]
        torch.matmul(a_t, mw.view(s1 - s0, B, -1), out=out.view(s1 - s0, d_in, -1))


@contextlib.contextmanager
def _one_thread(like: Tensor) -> Iterator[None]:
    """Torch ops on the CPU in one thread: many small copies in a row, each a parallel
    region of its own, stall at every region's barrier when the cores are shared."""
    threads = torch.get_num_threads()
    if like.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _unfolds(site: Site, itemsize: int) -> bool:
    """Whether the site's own weight block is assembled from the unfolded operand
    ``a_k ⊗ a_k`` (``B x d_in²``): it has a weight, the operand is small, and the block has
    many more tiles ``(i, p)`` than samples. Blocks between two sites keep one GEMM per
    direction against its ``B x P_l`` product: the unfolded form would take two GEMMs
    there (``Σ_b U a_k a_l`` and ``Σ_b a_k δ_l V``), twice the flops, and measured slower
    on 2 cores (a 4096 x 4096 block: 0.087 s against 0.057 s)."""
    if not site.weight or site.embedding:
        return False
    B = site.batch
    return B * site.d_in**2 * itemsize <= _UNFOLD_BYTES and _UNFOLD_RATIO * B <= site.d_out**2


def _unfolded_gemms(
    H: Tensor, site: Site, offsets: dict[str, int], i0: int, u: Tensor
) -> None:  # fmt: skip
    """The weight rows of the site's directions ``i0 : i0 + c`` against its own weight
    columns, and their mirror, for a site with one position, without a ``B x P`` product
    per direction. Ordered as ``(i, p) x (j, q)`` the block is one GEMM over the unfolded
    operand,

        Y[(i,p), (j,q)] = Σ_b U[i,b,p] (a[b,j] a[b,q]),   H[(i,j), (p,q)] = Y[i,p,j,q],

    formed for the pairs ``p >= i`` only (half the flops) and permuted into H with q
    contiguous. Each ``d_in x d_in`` tile ``Y[i,p]`` is symmetric (``a ⊗ a`` is), so it is
    also the tile at ``(p, i)``: the mirror is a copy without a transpose. ``u``:
    ``(c, B, d_out)`` as for ``_gemms``."""
    c, B, d_out = u.shape
    d_in = site.d_in
    w = offsets[site.weight]
    n = d_out * d_in
    a = site.flat_inputs
    X = (a[:, :, None] * a[:, None, :]).reshape(B, d_in * d_in)
    step = max(1, _UNFOLD_BYTES // (n * d_in * H.element_size()))
    ut = u.transpose(1, 2).contiguous()  # c, d_out, B
    for s0 in range(0, c, step):
        s1 = min(s0 + step, c)
        firsts = [i0 + s for s in range(s0, s1)]
        pairs = torch.cat([ut[s, p0:] for s, p0 in zip(range(s0, s1), firsts)])
        Y = torch.mm(pairs, X).view(-1, d_in, d_in)
        t = 0
        with _one_thread(H):  # many small copies
            for p0 in firsts:
                m = d_out - p0
                tiles = Y[t : t + m]
                t += m
                rows = slice(w + p0 * d_in, w + (p0 + 1) * d_in)
                H[rows, w + p0 * d_in : w + n].view(d_in, m, d_in).copy_(tiles.transpose(0, 1))
                if m > 1:
                    out = H[w + (p0 + 1) * d_in : w + n, rows]
                    out.view(m - 1, d_in, d_in).copy_(tiles[1:])


def _unfolded_biases(H: Tensor, site: Site, offsets: dict[str, int], i0: int, u: Tensor) -> None:
    """The weight rows of the site's directions ``i0 : i0 + c`` against its bias columns,
    ``Σ_b a[b,j] U[i,b,p]``, one GEMM, and its bias-bias rows; the bias rows against the
    weight columns are left to the mirror, as in ``_gemms``."""
    if not site.bias:
        return
    c, B, d_out = u.shape
    d_in, w, b = site.d_in, offsets[site.weight], offsets[site.bias]
    ub = u.transpose(0, 1).reshape(B, c * d_out)
    out = H[w + i0 * d_in : w + (i0 + c) * d_in, b : b + d_out].view(c, d_in, d_out)
    out.copy_(torch.mm(site.flat_inputs.T, ub).view(d_in, c, d_out).transpose(0, 1))
    H[b + i0 : b + i0 + c, b : b + d_out] = u.sum(1)


def _transpose_into(dst: Tensor, src: Tensor) -> None:
    """``dst[:] = src.T`` in bands of rows: a strided transpose of a whole block is slower."""
    for r0 in range(0, src.shape[0], _MIRROR_BAND):
        dst[:, r0 : r0 + _MIRROR_BAND] = src[r0 : r0 + _MIRROR_BAND].T


def _mirror_sites(
    H: Tensor, sites: list[Site], offsets: dict[str, int], unfolded: set[int]
) -> None:
    """Fill the Kronecker blocks that were not computed from those that were; the own
    weight blocks of the sites in ``unfolded`` were written with their mirror."""
    span = []  # (site index, kind, offset, numel) of every Kronecker tensor
    for k, s in enumerate(sites):
        for kind, name in (("weight", s.weight), ("bias", s.bias)):
            if name:
                span.append((k, kind, offsets[name], s.d_out * (s.d_in if kind == "weight" else 1)))
    for k, kind_k, rk, nk in span:
        for m, kind_m, rm, nm in span:
            if m > k or (m == k and kind_k == "weight" and kind_m == "bias"):
                _transpose_into(H[rm : rm + nm, rk : rk + nk], H[rk : rk + nk, rm : rm + nm])
        if kind_k == "weight" and k not in unfolded:
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
    """The rows of the non-Kronecker tensors by forward-over-reverse products of the
    surrogate, and their columns by symmetry.

    The rows of a group of consecutive such tensors (in mapping order) take the columns of
    the tensors from the group's first on and of the Kronecker tensors before it: the
    gradient is taken w.r.t. those only, so the backward stops at the group's first tensor
    (a convolution's input gradient is not taken). A group grows while its rows fit one
    vmapped chunk: each vmap call has a fixed cost, so one call per tensor took 0.36 s of
    ``kron``'s 0.64 s on a pre-LN block of width 24 (P = 5,188, its LayerNorm and input
    projection tensors six), 0.14 s in groups. Between two such tensors the later one's
    rows take the mirror of the earlier one's block, as every block below the diagonal
    does."""
    point = problem.primal_dict()
    sizes = dict(zip(problem.names, problem.sizes))
    order = {n: i for i, n in enumerate(problem.names)}
    rest = set(others)
    total = sum(sizes[n] for n in others)
    step = problem_chunk(problem, total, chunk_size, min_extra=_SHARED_CHUNK_BYTES)
    groups: list[list[str]] = []
    rows = step  # of the last group
    for name in others:
        if rows + sizes[name] <= step:
            groups[-1].append(name)
            rows += sizes[name]
        else:
            groups.append([name])
            rows = sizes[name]
    for group in groups:
        cols = [n for n in problem.names if order[n] >= order[group[0]] or n not in rest]
        _group_rows(H, problem, point, group, cols, offsets, surrogate, step)
        for name in group:
            r0, m = offsets[name], sizes[name]
            for col in cols:
                if col in rest and order[col] <= order[name]:
                    continue
                c0, w = offsets[col], sizes[col]
                _transpose_into(H[c0 : c0 + w, r0 : r0 + m], H[r0 : r0 + m, c0 : c0 + w])


def _group_rows(
    H: Tensor,
    problem: Problem,
    point: dict[str, Tensor],
    group: list[str],
    cols: list[str],
    offsets: dict[str, int],
    surrogate: Callable[[Tensor], Tensor],
    step: int,
) -> None:
    """``H[rows of group, cols]`` by ``vmap(jvp(grad))``, ``step`` rows at a time: the tangents
    in the group's tensors, the gradient w.r.t. ``cols``."""
    shapes = tuple(point[n].shape for n in group)
    where = torch.cat(
        [torch.arange(offsets[n], offsets[n] + point[n].numel(), device=H.device) for n in group]
    )
    spans = [(offsets[c], offsets[c] + point[c].numel()) for c in cols]

    def flat_grad(*moved: Tensor) -> Tensor:
        def loss(q: dict[str, Tensor]) -> Tensor:
            out = functional_call(problem.module, {**point, **q}, (problem.inputs,))
            return surrogate(out)

        held = dict(zip(group, moved))
        g = grad(loss)({c: held.get(c, point[c]) for c in cols})
        return flatten([g[c] for c in cols])

    def row(v: Tensor) -> Tensor:
        return jvp(flat_grad, tuple(point[n] for n in group), unflatten(v, shapes))[1]

    n = int(where.numel())
    for start, stop, basis in unit_chunks(n, step, problem.dtype, problem.device):
        rows = vmap(row)(basis)
        c = 0
        for c0, c1 in spans:
            H[where[start:stop], c0:c1] = rows[:, c : c + c1 - c0]
            c += c1 - c0


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
