"""torch.compile of forward-over-reverse, vmap of jvp(grad(f)) over the identity, per structure."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import vmap

from ._common import Problem
from ._compiled import CompiledHessian, compile_supports
from .vmap_jvp import hvp

NAME = "vmap_jvp_compiled"
DESCRIPTION = "torch.compile(fullgraph, static shapes) of vmap of jvp(grad(f)) over the identity"
COMPILES = True


def _hessian(problem: Problem) -> Tensor:
    basis = torch.eye(problem.P, dtype=problem.dtype, device=problem.device)
    return vmap(hvp(problem))(basis)


#: ``compute(net, params, batch, loss_fn)``: the dense Hessian, compiled once per problem
#: structure; ``cache.clear()`` frees the compiled structures
compute = cache = CompiledHessian(NAME, _hessian)

#: refuses what dynamo cannot trace in one graph
supports = compile_supports
