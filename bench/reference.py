"""Independent float64 reference Hessians: a row-by-row double-backward loop and finite differences.

Both share no code with the strategies: they work on a float64 copy of the net, call the
copy itself (no functional_call, no torch.func), and take its own parameters as leaves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from strategies import uses_batch_statistics

__all__ = [
    "float64_copy",
    "loop_hessian",
    "batched_loop_hessian",
    "ProbeReference",
    "probe_reference",
    "fd_hessian",
    "reference_loss",
]


def reference_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error written out by hand, the reference's stand-in for the default loss."""
    return (outputs - targets).pow(2).mean()


def float64_copy(
    net: nn.Module, names: Sequence[str], batch: tuple[Tensor, Tensor]
) -> tuple[nn.Module, list[Tensor], tuple[Tensor, Tensor]]:
    """A float64 copy of ``net`` whose named parameters are fresh leaves, and the batch in float64.

    BatchNorm in training mode keeps normalising with batch statistics, but the copy's
    running statistics are dropped so that repeated evaluations see the same function.
    """
    clone = copy.deepcopy(net).to(torch.float64)
    for m in clone.modules():
        if uses_batch_statistics(m):
            m.running_mean = m.running_var = m.num_batches_tracked = None
    own = dict(clone.named_parameters())
    for p in own.values():
        p.requires_grad_(False)
    leaves = [own[n].requires_grad_(True) for n in names]
    inputs, targets = batch
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    targets = targets.double() if targets.is_floating_point() else targets
    return clone, leaves, (inputs, targets)


def _loss_fn(loss_fn: Callable[[Tensor, Tensor], Tensor] | None):
    return reference_loss if loss_fn is None or loss_fn is F.mse_loss else loss_fn


def _flat(
    grads: Sequence[Tensor | None], leaves: Sequence[Tensor], batch_shape: tuple[int, ...] = ()
) -> Tensor:
    """Gradients w.r.t. ``leaves`` as one vector (a row per leading ``batch_shape`` entry).

    None (a leaf the output does not use) stands for zeros.
    """
    return torch.cat(
        [
            p.new_zeros(*batch_shape, p.numel()) if d is None else d.reshape(*batch_shape, -1)
            for d, p in zip(grads, leaves)
        ],
        dim=-1,
    )


def _gradient_graph(
    net: nn.Module,
    names: Sequence[str],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
) -> tuple[list[Tensor], Tensor]:
    """The float64 copy's leaves and its flat gradient, with the graph kept for double backward."""
    clone, leaves, (inputs, targets) = float64_copy(net, names, batch)
    loss_fn = _loss_fn(loss_fn)
    with torch.enable_grad():
        loss = loss_fn(clone(inputs), targets)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    return leaves, _flat(grads, leaves)


def _double_backward(
    net: nn.Module,
    names: Sequence[str],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None,
    chunk: int,
) -> Tensor:
    """H by double backward: row by row (``chunk == 1``) or ``chunk`` rows per call."""
    leaves, g = _gradient_graph(net, names, batch, loss_fn)
    P = g.numel()
    H = torch.zeros(P, P, dtype=torch.float64, device=g.device)
    if not g.requires_grad:  # the loss does not depend on these parameters at all
        return H
    with torch.enable_grad():
        for start in range(0, P, chunk):
            stop = min(P, start + chunk)
            if chunk == 1:  # the plain loop: a batched grad would run through vmap
                rows = torch.autograd.grad(g[start], leaves, retain_graph=True, allow_unused=True)
            else:
                units = torch.zeros(stop - start, P, dtype=torch.float64, device=g.device)
                units[:, start:stop].fill_diagonal_(1.0)
                rows = torch.autograd.grad(
                    g, leaves, units, retain_graph=True, allow_unused=True, is_grads_batched=True
                )
            H[start:stop] = _flat(rows, leaves, (stop - start,))
    return H


def loop_hessian(
    net: nn.Module,
    names: Sequence[str],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """Float64 Hessian w.r.t. the parameters ``names`` by one double-backward per gradient entry."""
    return _double_backward(net, names, batch, loss_fn, chunk=1)


def batched_loop_hessian(
    net: nn.Module,
    names: Sequence[str],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    chunk: int = 256,
) -> Tensor:
    """``loop_hessian`` with ``chunk`` rows per double-backward, for references at large P.

    The same float64 double-backward as ``loop_hessian``, but ``torch.autograd.grad`` takes
    ``chunk`` unit vectors at once (``is_grads_batched=True``), which is what makes a float64
    reference at P ~ 13,000 affordable. It uses neither torch.func nor any strategy's code.
    ``chunk=1`` is ``loop_hessian`` itself.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return _double_backward(net, names, batch, loss_fn, chunk)


class ProbeReference:
    """A float64 reference of ``H`` along a few random vectors: ``products = H_ref @ vectors``.

    For Hessians whose dense float64 reference would not fit beside them (P^2 x 8 bytes) or
    take too long: a strategy's ``H @ vectors`` is compared with ``products``, computed by
    double backward on the float64 copy like ``loop_hessian``. A wrong block shows in the
    products along random vectors with probability 1.
    """

    def __init__(self, vectors: Tensor, products: Tensor):
        self.vectors = vectors  # P x k, float64
        self.products = products  # P x k, float64

    @property
    def kind(self) -> str:
        return f"{self.vectors.shape[1]} float64 Hessian-vector products"


def probe_reference(
    net: nn.Module,
    names: Sequence[str],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    probes: int = 4,
    seed: int = 0,
) -> ProbeReference:
    """``ProbeReference`` along ``probes`` Gaussian vectors drawn from ``seed``."""
    leaves, g = _gradient_graph(net, names, batch, loss_fn)
    P = g.numel()
    generator = torch.Generator().manual_seed(seed)
    vectors = torch.randn(P, probes, generator=generator, dtype=torch.float64).to(g.device)
    if not g.requires_grad:
        return ProbeReference(vectors, torch.zeros_like(vectors))
    with torch.enable_grad():
        columns = torch.autograd.grad(
            g, leaves, vectors.T.contiguous(), allow_unused=True, is_grads_batched=True
        )
    return ProbeReference(vectors, _flat(columns, leaves, (probes,)).T.contiguous())


def fd_hessian(
    net: nn.Module,
    names: Sequence[str],
    batch: tuple[Tensor, Tensor],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    step: float = 1e-5,
) -> Tensor:
    """Float64 Hessian by central differences of the gradient, symmetrised.

    Column j is ``(g(w + h e_j) - g(w - h e_j)) / 2h``; its error is O(h^2) times the third
    derivative plus O(eps / h) rounding, about 1e-9 relative for h = 1e-5 on smooth nets.
    """
    clone, leaves, (inputs, targets) = float64_copy(net, names, batch)
    loss_fn = _loss_fn(loss_fn)

    def gradient() -> Tensor:
        with torch.enable_grad():
            loss = loss_fn(clone(inputs), targets)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return _flat(grads, leaves)

    flat_views = [(p, j) for p in leaves for j in range(p.numel())]
    H = torch.empty(len(flat_views), len(flat_views), dtype=torch.float64, device=leaves[0].device)
    with torch.no_grad():
        for col, (p, j) in enumerate(flat_views):
            view = p.view(-1)
            original = view[j].item()
            view[j] = original + step
            plus = gradient()
            view[j] = original - step
            minus = gradient()
            view[j] = original
            H[:, col] = (plus - minus) / (2 * step)
    return (H + H.T) / 2
