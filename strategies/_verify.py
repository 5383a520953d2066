"""Check any dense Hessian against one independent Hessian-vector product (Freivalds' test).

``verify`` draws a random vector ``v`` and compares ``H v`` and ``Hᵀ v`` with the product
computed by plain autograd: reverse over reverse (the gradient's own gradient along ``v``),
with no torch.func transform, so it shares no differentiation code with the strategies on
the torch.func paths (it shares the loss closure of ``prepare``, tested on its own against
the float64 references). Where torch's double backward is wrong through the forward
(``hazard(problem, DOUBLE_BACKWARD)``) the product is forward over reverse with autograd's
dual tensors instead. A wrong block of ``H`` shows in ``H v`` unless ``v`` happens to be
orthogonal to the error, which a Gaussian ``v`` is with probability zero. It costs one
Hessian-vector product (about two gradients) and one pass over ``H``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ._common import (
    DOUBLE_BACKWARD,
    LossFn,
    Problem,
    autograd_enabled,
    explain_autograd_error,
    flat_or_zeros,
    flatten,
    hazard,
    prepare,
    unflatten,
)

__all__ = ["default_rtol", "verify"]

#: elements of ``H`` read at a time, so that the check never holds a copy of ``H``
_BLOCK_ELEMENTS = 1 << 22


def default_rtol(dtype: torch.dtype) -> float:
    """``10 sqrt(eps)`` of ``dtype``: about 1.5e-7 for float64, 3.5e-3 for float32.

    Errors are measured against ``max_i (|H| |v|)_i``, the size the rounding of a correct
    ``H v`` scales with; the wrong Hessians this catches are off by 5% or more.
    """
    return 10 * torch.finfo(dtype).eps ** 0.5


def verify(
    H: Tensor,
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[bool, str]:
    """Whether ``H`` is the Hessian of the loss, by one independent Hessian-vector product.

    Args:
        H: a dense ``P x P`` matrix, e.g. what ``strategies.compute`` returned.
        net, params, batch, loss_fn: the problem, as given to ``strategies.compute``.
        rtol: the largest error allowed in ``H v`` and ``Hᵀ v``, relative to
            ``max_i (|H| |v|)_i``; default ``default_rtol`` of the coarser of ``H``'s and
            the params' dtypes.
        generator: draws ``v``; default a generator seeded with 0 on the params' device,
            so the check is reproducible and leaves torch's global random state alone.

    Returns:
        ``(ok, detail)``: the verdict and the measured error, in words.

    Raises:
        TypeError, ValueError: the problem's inputs are bad (as for ``strategies.compute``),
            or ``H`` is not a ``P x P`` tensor on the params' device. ValueError also where
            torch cannot compute the product itself (a derivative it does not implement).

    Example:
        >>> H = strategies.compute("vmap_jvp", net, params, batch)
        >>> ok, detail = strategies.verify(H, net, params, batch)
    """
    problem = prepare(net, params, batch, loss_fn)
    P = problem.P
    if not isinstance(H, Tensor) or tuple(H.shape) != (P, P):
        shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
        raise ValueError(f"H must be the {P} x {P} Hessian of params, got {shape}")
    if not H.is_floating_point():
        raise ValueError(f"H must be floating-point, got {H.dtype}")
    if H.device != problem.device:
        raise ValueError(f"H is on {H.device}, the params on {problem.device}")
    coarser = max(H.dtype, problem.dtype, key=lambda d: torch.finfo(d).eps)
    rtol = default_rtol(coarser) if rtol is None else rtol
    if generator is None:
        generator = torch.Generator(device=problem.device).manual_seed(0)
    v = torch.randn(P, generator=generator, dtype=problem.dtype, device=problem.device)
    with autograd_enabled():
        try:
            reference = _hvp(problem, v)
        except (NotImplementedError, RuntimeError) as error:
            explained = explain_autograd_error(error, "verify")
            if explained is None:
                raise
            raise explained from error

    vh = v.to(H.dtype)
    Hv = torch.empty(P, dtype=H.dtype, device=H.device)
    HTv = torch.zeros(P, dtype=H.dtype, device=H.device)
    scale = torch.zeros((), dtype=H.dtype, device=H.device)
    rows = max(1, _BLOCK_ELEMENTS // P)
    for start in range(0, P, rows):
        block = H[start : start + rows]
        if not bool(torch.isfinite(block).all()):
            return False, "H has NaN or infinite entries"
        Hv[start : start + rows] = block @ vh
        HTv += block.T @ vh[start : start + rows]
        scale = torch.maximum(scale, (block.abs() @ vh.abs()).max())
    reference = reference.to(torch.float64)
    scale = max(scale.item(), reference.abs().max().item())
    error = max(
        (Hv.to(torch.float64) - reference).abs().max().item(),
        (HTv.to(torch.float64) - reference).abs().max().item(),
    )
    relative = error / scale if scale > 0 else error
    detail = (
        f"max |H v - H_ref v| and |Hᵀ v - H_ref v| = {relative:.2e} x max(|H| |v|) "
        f"(allowed {rtol:.1e}) along one Gaussian v of {P} entries"
    )
    return relative <= rtol, detail


def _hvp(problem: Problem, v: Tensor) -> Tensor:
    """``H v`` by autograd: reverse over reverse, or where torch's double backward is wrong
    through the problem's forward (``hazard``), forward over reverse with dual tensors."""
    tangents = unflatten(v, problem.shapes)
    if hazard(problem, DOUBLE_BACKWARD):
        with fwAD.dual_level():
            leaves = [p.clone().requires_grad_(True) for p in problem.primals]
            duals = [fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)]
            loss = problem.loss(dict(zip(problem.names, duals)))
            grads = torch.autograd.grad(loss, duals, create_graph=True, allow_unused=True)
            pieces = [None if g is None else fwAD.unpack_dual(g).tangent for g in grads]
            return flatten([flat_or_zeros(t, p) for t, p in zip(pieces, leaves)]).detach()
    leaves = [p.clone().requires_grad_(True) for p in problem.primals]
    loss = problem.loss(dict(zip(problem.names, leaves)))
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    terms = [(g * t).sum() for g, t in zip(grads, tangents) if g is not None and g.requires_grad]
    if not terms:  # the loss is at most linear in the chosen params
        return torch.zeros_like(v)
    products = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
    return flatten([flat_or_zeros(h, p) for h, p in zip(products, leaves)])
