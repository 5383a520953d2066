"""What a Hessian problem is: the types of the contract, the checked ``Problem``, how a net is called.

Below every other private module of the strategies: the names a check, a hazard, an error
and a strategy all speak of (``LossFn``, ``Inputs``, ``NormCall``, ``Problem``), the default
loss, autograd forced on, and the calls on a batch's inputs (``input_parts``, ``map_inputs``,
``call_net``). docs/DESIGN.md, "The strategy contract".
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._blocks import flatten, unflatten

__all__ = [
    "LossFn",
    "Inputs",
    "mse_loss",
    "autograd_enabled",
    "NormCall",
    "Problem",
    "torch_version",
    "input_parts",
    "map_inputs",
    "call_net",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
#: what the net is called on: ``net(inputs)``, ``net(*inputs)`` or ``net(**inputs)``
Inputs = Tensor | tuple[Tensor, ...] | Mapping[str, Tensor]


def mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error: the value of ``F.mse_loss(outputs, targets)``, broadcasting included.

    Written out as ``(outputs - targets).square().mean()`` because in torch 2.13
    forward-over-reverse of ``F.mse_loss`` with its default mean reduction raises
    "ZeroTensors are immutable" (``jvp(grad(f))`` with ``f`` ending in
    ``F.mse_loss(out, y)``). The mean is over the broadcast ``outputs - targets``, as
    torch's is, so that where the shapes differ this is still exactly the loss the caller
    passed. Of the forms that work on every path it costs least under the transforms
    (``torch.func.hessian`` of the forum net, P = 49: 0.90x ``F.mse_loss`` itself, where
    ``F.mse_loss(..., reduction="sum") / size`` cost 1.16x). ``check_inputs`` puts this in
    place of ``F.mse_loss`` and ``nn.MSELoss()`` (mean).
    """
    return (outputs - targets).square().mean()


@contextlib.contextmanager
def autograd_enabled() -> Iterator[None]:
    """Autograd on, whatever the caller turned off (``torch.no_grad``, ``torch.inference_mode``).

    A Hessian is made of derivatives: under ``inference_mode`` the double-backward loop
    fails and ``torch.autograd.functional`` returns zeros, so every strategy runs inside this.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


@dataclass(frozen=True)
class NormCall:
    """One normalisation op the loss's forward called, as the probe forward saw it.

    Attributes:
        op: the aten op, e.g. ``"native_layer_norm"``.
        batch_statistics: it normalises with statistics of the batch (batch or instance
            norm in training mode, or without running statistics).
        weight, bias: it was given an affine weight, a bias.
        weight_grad, bias_grad: that weight, that bias depends on the chosen params.
    """

    op: str
    batch_statistics: bool
    weight: bool
    bias: bool
    weight_grad: bool
    bias_grad: bool


@dataclass(frozen=True)
class Problem:
    """A checked Hessian problem: the loss as a pure function of the chosen parameters.

    Attributes:
        names: parameter names, in the order of the caller's mapping.
        shapes: their shapes.
        primals: detached copies of their values (the point the Hessian is taken at).
        loss: ``loss(dict name -> tensor) -> scalar``; every other parameter and buffer of
            the net is held fixed at its value, and running statistics are never updated.
        inputs, targets, loss_fn: the batch, and the loss in use (the default filled in).
        module: the module the loss evaluates (the net, or a copy that does not update
            BatchNorm running statistics).
        norm_calls: the normalisation ops the forward called (see ``hazard``).
        ops: the names of every aten op the forward and loss called (e.g. ``"addmm"``).
        nested: what the forward does that only the plain autograd loops differentiate
            (``torch.autograd.grad`` inside it, a non-reentrant checkpoint), or "";
            ``prepare`` refuses such a problem unless its caller is one of them.
        fixed: the net's other params and buffers, by name, held at their values.
        constant: none of the chosen params reaches the loss (its Hessian is zero).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    primals: tuple[Tensor, ...]
    loss: Callable[[Mapping[str, Tensor]], Tensor]
    inputs: Inputs
    targets: Tensor
    loss_fn: LossFn
    module: nn.Module
    norm_calls: tuple[NormCall, ...] = ()
    ops: frozenset[str] = frozenset()
    nested: str = ""
    fixed: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)
    constant: bool = False

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.numel() for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.sizes:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def P(self) -> int:
        return sum(self.sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self.primals[0].dtype

    @property
    def device(self) -> torch.device:
        return self.primals[0].device

    def primal_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.primals))

    def flat_primal(self) -> Tensor:
        return flatten(self.primals)

    def flat_loss(self, flat: Tensor) -> Tensor:
        """The loss as a function of one flat vector of all chosen parameters."""
        return self.loss(dict(zip(self.names, unflatten(flat, self.shapes))))


def torch_version() -> str:
    return torch.__version__.split("+")[0]


# --- the batch users bring: one tensor, a tuple of tensors, a dict of tensors ---


def input_parts(inputs: Any) -> list[tuple[str, Tensor]]:
    """The tensors of ``inputs``, each with the name an error message gives it.

    Raises:
        TypeError: ``inputs`` is not a tensor, a non-empty tuple (or list) of tensors, or a
            non-empty dict of tensors with string keys.
        ValueError: the tensors of a tuple or dict differ in batch size (the first dimension
            of each), or one has no batch dimension.
    """
    if isinstance(inputs, Tensor):
        return [("inputs", inputs)]
    if isinstance(inputs, (tuple, list)):
        parts = [(f"inputs[{i}]", t) for i, t in enumerate(inputs)]
    elif isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"dict inputs need str keys (the forward's argument names), got {bad[0]!r}"
            )
        parts = [(f"inputs[{k!r}]", t) for k, t in inputs.items()]
    else:
        raise TypeError(
            "inputs must be a tensor, a tuple of tensors (passed as net(*inputs)) or a dict of "
            f"tensors (passed as net(**inputs)), got {type(inputs).__name__}"
        )
    if not parts:
        raise ValueError("inputs is an empty tuple or dict: give the net at least one tensor")
    for what, t in parts:
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a tensor, got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"{what} has no batch dimension: the batch dimension comes first")
    first, size = parts[0][0], parts[0][1].shape[0]
    for what, t in parts[1:]:
        if t.shape[0] != size:
            raise ValueError(
                f"{what} has batch size {t.shape[0]} but {first} has {size}: the batch "
                "dimension comes first in every input"
            )
    return parts


def map_inputs(fn: Callable[[Tensor], Tensor], inputs: Inputs) -> Inputs:
    """``fn`` applied to each tensor of ``inputs``, keeping its form (a list becomes a tuple)."""
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(t) for k, t in inputs.items()}
    return tuple(fn(t) for t in inputs)


def call_net(module: nn.Module, tensors: Mapping[str, Tensor], inputs: Inputs) -> Any:
    """``module`` called on ``inputs`` with ``tensors`` in place of its own (functional_call).

    A tensor is passed as ``module(inputs)``, a tuple as ``module(*inputs)``, a dict as
    ``module(**inputs)``.
    """
    if isinstance(inputs, Tensor):
        return functional_call(module, tensors, (inputs,))
    if isinstance(inputs, Mapping):
        return functional_call(module, tensors, (), dict(inputs))
    return functional_call(module, tensors, tuple(inputs))
