"""Torch's own errors, for derivatives it lacks, translated into ValueErrors that say what to use.

``explain_autograd_error`` is called by ``Strategy.compute`` (and ``verify``, the compiled
variants) on whatever a strategy raised; ``REVERSE_MODE`` names the strategies that never need
a forward-mode derivative.
"""

from __future__ import annotations

import re

from ._contract import NESTED_AUTOGRAD
from ._problem import torch_version

__all__ = [
    "REVERSE_MODE",
    "explain_autograd_error",
]

#: strategies that differentiate twice in reverse mode, and so never need a forward-mode
#: derivative; where torch lacks one, these are what a user should turn to
REVERSE_MODE = ("full_autograd", "symmetric_half", "vmap_vjp")


#: torch's messages for what it does not implement, and what a caller should make of each
#: ({op}: the op the message names; {others}: the reverse-mode strategies)
_UNIMPLEMENTED = (
    (
        re.compile(r"Trying to use forward AD with (?:aten::)?(\w+) that does not support it"),
        "needs the forward-mode derivative of aten::{op}, which torch {version} does not "
        "implement: use a reverse-mode strategy ({others})",
    ),
    (
        re.compile(r"Batching rule not implemented for (?:aten::)?(\w+(?:\.\w+)?)"),
        "needs a vmap batching rule for aten::{op}, which torch {version} does not implement "
        "on its path: use a reverse-mode strategy ({others})",
    ),
    (
        re.compile(r"derivative for (?:aten::)?(\w+) is not implemented"),
        "needs the derivative of aten::{op}, which torch {version} does not implement: torch "
        "cannot differentiate this loss twice",
    ),
)


def explain_autograd_error(error: BaseException, strategy: str) -> ValueError | None:
    """A ValueError that says what ``strategy`` met and what to use instead, or None.

    torch 2.13 has no forward-mode derivative for some ops (``huber_loss_backward``,
    ``soft_margin_loss_backward``, ...), no vmap batching rule for others on some paths
    (``unsafe_split`` of nn.GRU in ``torch.autograd.functional``), no second derivative for
    a few (``multi_margin_loss_backward``), and forward-over-reverse of ``F.mse_loss`` with
    mean reduction called from a loss of the caller's own raises "ZeroTensors are
    immutable". A forward that changes in place a tensor autograd saved (torch's "modified by
    an inplace operation") is named with the op whose output it changed. Other errors are not
    recognised (None): the caller re-raises them as they are.
    """
    message = str(error)
    version = torch_version()
    others = ", ".join(n for n in REVERSE_MODE if n != strategy)
    if "autograd.Function with functorch transforms" in message or (
        "implement the jvp function for custom autograd.Function" in message
    ):
        return ValueError(
            f"strategy {strategy!r}: the forward calls a custom torch.autograd.Function "
            "(a reentrant torch.utils.checkpoint is one) without the vmap or jvp rule its path "
            f"needs: use a plain autograd loop ({', '.join(NESTED_AUTOGRAD)})"
        )
    if "Nested forward mode AD is not supported" in message:
        return ValueError(
            f"strategy {strategy!r}: its forward-mode derivative meets one of the forward's own "
            "(torch.func.jvp, jacfwd or hessian inside the forward?), and torch "
            f"{version} cannot nest forward mode in it: use a reverse-mode strategy ({others}) "
            "or block_symmetric"
        )
    if "don't yet support saved tensor hooks" in message:
        return ValueError(
            f"strategy {strategy!r} runs the forward under saved-tensor hooks of its own, "
            f"under which torch {version}'s torch.func transforms inside the forward "
            "(torch.func.hessian ...) cannot run: use a strategy that computes the whole "
            f"Hessian at once ({others}, block_symmetric)"
        )
    if "modified by an inplace operation" in message:
        found = re.search(
            r"\[(\d+(?:, \d+)*)?\]\], which is output \d+ of (\w+?)(?:Backward\d*)?,", message
        )
        what = f"the [{found.group(1)}] output of {found.group(2)} " if found else "a tensor "
        return ValueError(
            f"strategy {strategy!r}: the forward changes {what}in place after autograd saved "
            "it for the gradient (e.g. `h += 1` on h = torch.tanh(...), or an inplace=True "
            "activation), so even loss.backward() fails: write that op out of place "
            "(h = h + 1)"
        )
    if "ZeroTensors are immutable" in message:
        return ValueError(
            f"strategy {strategy!r} met torch {version}'s forward-over-reverse bug of "
            "F.mse_loss with mean reduction ('ZeroTensors are immutable'): pass F.mse_loss or "
            "nn.MSELoss() itself as loss_fn (both are replaced by an exact equivalent), use "
            f"reduction='sum', or a reverse-mode strategy ({others})"
        )
    for pattern, explanation in _UNIMPLEMENTED:
        found = pattern.search(message)
        if found:
            what = explanation.format(op=found.group(1), version=version, others=others)
            return ValueError(f"strategy {strategy!r} {what}")
    return None
