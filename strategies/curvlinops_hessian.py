"""Peer: curvlinops' HessianLinearOperator materialised as ``H @ I``, as its users write it.

``HessianLinearOperator(net, loss, params, [(X, y)]) @ torch.eye(P)`` is how a curvlinops
user, and laplace-torch's curvlinops backend, get a dense Hessian: one vmapped
forward-over-reverse product (``jvp`` of ``jacrev``) per column of the identity.
curvlinops is imported lazily, so ``import strategies`` works without it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._contract import prepare
from ._hazards import JACREV_PATH, jacrev_path_supports, refuse_hazard
from ._problem import LossFn, Problem, mse_loss

__all__ = ["NAME", "FAMILY", "DESCRIPTION", "PEER", "loss_module", "supports", "compute"]

NAME = "curvlinops"
FAMILY = "peers"
DESCRIPTION = "peer: curvlinops.HessianLinearOperator(net, loss, params, [(X, y)]) @ I"
PEER = True

#: loss modules this peer passes to curvlinops, each checked exact against the float64
#: reference (L1Loss and NLLLoss only through the fallback in ``compute``). SoftMarginLoss
#: has no forward-mode formula in torch 2.13; other losses are unchecked.
_LOSS_MODULES = (
    nn.MSELoss,
    nn.CrossEntropyLoss,
    nn.HuberLoss,
    nn.SmoothL1Loss,
    nn.BCEWithLogitsLoss,
    nn.L1Loss,
    nn.NLLLoss,
)
#: functional losses and the module that computes the same value with the same keywords
_FUNCTIONAL = (
    (F.mse_loss, nn.MSELoss),
    (mse_loss, nn.MSELoss),
    (F.cross_entropy, nn.CrossEntropyLoss),
)


def _module_for(function: object) -> type[nn.Module] | None:
    return next((module for f, module in _FUNCTIONAL if function is f), None)


def loss_module(loss_fn: LossFn | None) -> nn.Module:
    """The nn.Module loss curvlinops takes for ``loss_fn``, computing the same value.

    curvlinops calls the loss as a module and reads its ``reduction`` to normalise over
    the batches; the default MSE (None), ``F.mse_loss`` and ``F.cross_entropy``, bare or as
    a ``functools.partial`` with keywords, become ``nn.MSELoss``/``nn.CrossEntropyLoss``
    with those keywords.

    Raises:
        ValueError: ``loss_fn`` is none of those or of ``_LOSS_MODULES``, or its reduction
            is neither ``"mean"`` nor ``"sum"``.
    """
    if loss_fn is None:
        module: nn.Module = nn.MSELoss()
    elif _module_for(loss_fn) is not None:
        module = _module_for(loss_fn)()
    elif isinstance(loss_fn, functools.partial) and _module_for(loss_fn.func) is not None:
        if loss_fn.args:
            raise ValueError("a functools.partial loss with positional arguments is not handled")
        try:
            module = _module_for(loss_fn.func)(**loss_fn.keywords)
        except TypeError as e:
            raise ValueError(
                f"loss keywords {sorted(loss_fn.keywords)} have no module: {e}"
            ) from None
    elif type(loss_fn) in _LOSS_MODULES:
        module = loss_fn
    else:
        handled = ", ".join(m.__name__ for m in _LOSS_MODULES)
        raise ValueError(
            f"curvlinops takes an nn.Module loss; {loss_fn!r} is not one of those handled "
            f"({handled}, or F.mse_loss / F.cross_entropy)"
        )
    if module.reduction not in ("mean", "sum"):
        raise ValueError(
            f"curvlinops normalises by reduction 'mean' or 'sum', got {module.reduction!r}"
        )
    return module


def supports(net: nn.Module, loss_fn: LossFn | None) -> tuple[bool, str]:
    """Whether curvlinops is installed, the loss is one it takes (see ``loss_module``), and
    ``net`` has no normalisation layer through which torch.func's ``jacrev`` is wrong; and if
    not, why."""
    try:
        import curvlinops  # noqa: F401
    except ImportError:
        return False, "curvlinops is not installed"
    try:
        loss_module(loss_fn)
    except ValueError as e:
        return False, str(e)
    # curvlinops multiplies by jvp(jacrev(loss)) under vmap: the path that is wrong through
    # affine LayerNorm (7% off on a small net) and fails through training-mode BatchNorm.
    return jacrev_path_supports(net, loss_fn)


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    """The dense Hessian as ``HessianLinearOperator(...) @ torch.eye(P)``.

    The batch is curvlinops' data set of one mini-batch, so its normalisation factor (batch
    size over data set size, for a mean reduction) is exactly 1 and the operator is the
    Hessian of ``loss_fn(net(inputs), targets)`` itself. ``check_deterministic`` is off:
    it runs two more gradients and products as a sanity check, not part of the Hessian.

    Raises:
        ValueError: the loss is not one curvlinops takes, or ``inputs`` has no batch
            dimension with at least one sample (curvlinops divides by the batch size).
    """
    problem = prepare(net, params, batch, loss_fn)
    # curvlinops batches its products with vmap: the same wrong batching rule through affine
    # normalisation as torch.func's jacrev path (found 7% to 75% off)
    refuse_hazard(problem, JACREV_PATH, NAME)
    module = loss_module(loss_fn)
    inputs = problem.inputs
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"curvlinops needs inputs with a batch dimension of at least one sample, got "
            f"shape {tuple(inputs.shape)}"
        )
    try:
        return _materialise(problem.module, problem, module)
    except RuntimeError as e:
        if "must match the existing size" not in str(e):
            raise
    # torch 2.13's vmap cannot put an output that does not depend on the mapped input on an
    # out_dim other than 0 (vmap(lambda v: torch.zeros(3), out_dims=1) raises the error
    # above), and curvlinops maps the Hessian's columns to the last axis: it fails wherever
    # a parameter's gradient does not depend on the parameters (an unused parameter; the
    # last bias under L1Loss or NLLLoss, linear in it). Adding 0 * |p|^2 of every chosen parameter to the
    # outputs makes each gradient depend on the parameters while adding exact zeros.
    return _materialise(_Touched(problem.module, problem.names), problem, module)


def _materialise(model: nn.Module, problem: Problem, loss: nn.Module) -> Tensor:
    from curvlinops import HessianLinearOperator

    # curvlinops finds each parameter's name by identity in the module it is given
    own = dict(model.named_parameters())
    prefix = "net." if isinstance(model, _Touched) else ""
    operator = HessianLinearOperator(
        model,
        loss,
        [own[prefix + name] for name in problem.names],
        [(problem.inputs, problem.targets)],
        check_deterministic=False,
    )
    return operator @ torch.eye(problem.P, dtype=problem.dtype, device=problem.device)


class _Touched(nn.Module):
    """``net``'s outputs plus ``0 * sum(p ** 2)`` over the named parameters (see ``compute``)."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.net = net
        self.names = names

    def forward(self, inputs: Tensor) -> Tensor:
        # attribute lookup, not get_parameter: under functional_call they are plain tensors
        weights = [functools.reduce(getattr, n.split("."), self.net) for n in self.names]
        return self.net(inputs) + 0 * sum(w.square().sum() for w in weights)
