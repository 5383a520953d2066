"""torch.compile of forward-over-reverse, vmap of jvp(grad(f)) over the identity, per structure.

``vmap_jvp``'s product through ``torch.compile(fullgraph=True, dynamic=False)``; the cache of
compiled structures and what torch 2.13 does when compiling it are in ``_compiled``. With
any loss through ``F.mse_loss`` (the default included) the compiled graph holds an
efficient zero tensor that made inductor's code segfault; ``_compiled``'s post-grad pass
turns it into ordinary zeros, after which it is exact there, through LayerNorm, BatchNorm
in training mode and affine InstanceNorm too. It refuses nn.RNN, nn.GRU and nn.LSTM
(dynamo does not trace them); a loss without a forward-mode formula (``F.huber_loss``)
raises ValueError, as eager ``vmap_jvp`` raises.
"""

from __future__ import annotations

from ._compiled import CompiledHessian, compile_supports
from .vmap_jvp import hessian

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

NAME = "vmap_jvp_compiled"
FAMILY = "forward-over-reverse"
MULTI_INPUT = True
EAGER = "vmap_jvp"
DESCRIPTION = "torch.compile(fullgraph, static shapes) of vmap of jvp(grad(f)) over the identity"
COMPILES = True


#: ``compute(net, params, batch, loss_fn)``: the dense Hessian, compiled once per problem
#: structure; ``cache.clear()`` frees the compiled structures
compute = cache = CompiledHessian(NAME, hessian)

#: refuses what dynamo cannot trace in one graph
supports = compile_supports
