"""torch.compile of torch.func.hessian over the params dict, compiled once per problem structure.

``torch_func``'s ``torch.func.hessian`` (forward over ``jacrev``) through
``torch.compile(fullgraph=True, dynamic=False)``; the cache of compiled structures and what
torch 2.13 does when compiling it are in ``_compiled``. It refuses what ``torch_func``
refuses (normalisation layers through which the jacrev path is wrong) and nn.RNN, nn.GRU
and nn.LSTM, which dynamo does not trace. Every other configuration probed (MSE in both
reductions, cross-entropy, Huber, float64, GELU, ReLU, conv, attention, embedding, tied and
residual nets, parameter subsets) compiled into one graph and was exact.
"""

from __future__ import annotations

from torch import nn

from ._compiled import CompiledHessian, compile_supports
from ._hazards import JACREV_PATH, jacrev_path_supports
from ._problem import LossFn
from .torch_func import hessian

__all__ = [
    "NAME",
    "FAMILY",
    "MULTI_INPUT",
    "EAGER",
    "DESCRIPTION",
    "COMPILES",
    "compute",
    "cache",
    "supports",
]

NAME = "torch_func_compiled"
FAMILY = "transforms"
MULTI_INPUT = True
EAGER = "torch_func"
DESCRIPTION = "torch.compile(fullgraph, static shapes) of torch.func.hessian over the params dict"
COMPILES = True


#: ``compute(net, params, batch, loss_fn)``: the dense Hessian, compiled once per problem
#: structure; ``cache.clear()`` frees the compiled structures
compute = cache = CompiledHessian(NAME, hessian, JACREV_PATH)


def supports(net: nn.Module, loss_fn: LossFn | None = None) -> tuple[bool, str]:
    """What torch_func refuses (a wrong Hessian upstream), and what dynamo cannot trace."""
    ok, reason = jacrev_path_supports(net, loss_fn)
    return compile_supports(net, loss_fn) if ok else (ok, reason)
