"""torch.compile for the compiled strategies: one compiled Hessian per problem structure, in an LRU.

A compiled strategy is an eager one (``hessian(problem) -> P x P``) run through
``torch.compile(fullgraph=True, dynamic=False)``. The compiled function takes everything
that changes from call to call as arguments (the chosen parameters' values, the other
parameters and buffers, inputs, targets) and rebuilds the ``Problem`` from them inside the
graph, so a second call with new values and the same structure reuses the compiled code;
a new structure (another batch size, dtype, net, loss function, parameter subset) compiles
again, and at most ``MAX_ENTRIES`` structures are kept per strategy.

What torch 2.13 does here, found on CPU (inductor, fullgraph, static shapes; each probe in
a subprocess; float64 reference ``bench.reference.loop_hessian``):

==========================================  ===================  ===========================
configuration                               torch_func_compiled  vmap_jvp_compiled
==========================================  ===================  ===========================
MSE, the default (``F.mse_loss`` summed)    exact                SIGSEGV without the zero-
                                                                 tensor pass below; exact
                                                                 with it
``F.mse_loss`` mean reduction (a lambda)    exact                as the default (eager
                                                                 ``vmap_jvp`` raises
                                                                 "ZeroTensors are immutable")
MSE written out, ``((o - t) ** 2).mean()``  exact                exact
float64; GELU (both); ReLU                  exact                exact (with the pass)
cross-entropy                               exact                exact
``F.huber_loss``                            exact                ValueError: no forward-mode
                                                                 formula (as eager)
another batch size                          compiles again (a    compiles again (a new
                                            new entry), exact    entry), exact
custom modules: residual, tied weights,     exact                exact
attention, embedding, conv, subset
LayerNorm / BatchNorm train / affine        refused (wrong       exact
InstanceNorm                                upstream, as eager)
nn.GRU (and RNN, LSTM)                      refused: dynamo      refused: dynamo
                                            "Attempted to wrap   "Attempted to wrap
                                            RNN, GRU, or LSTM"   RNN, GRU, or LSTM"
a graph break in the loss                   ValueError           ValueError
==========================================  ===================  ===========================

No configuration that compiled had a graph break (``counters["graph_break"]`` empty, one
graph); with ``dynamic=None`` or ``dynamic=True`` every new batch size compiled a new graph
as well, so static shapes cost nothing and keep the cache key exact.

- Forward-mode AD of ``F.mse_loss`` (any reduction) puts ``aten._efficientzerotensor`` in
  the compiled graph; inductor hands that storage-less tensor to a fused C++ kernel, which
  reads through a null pointer: a segfault, not an exception (``backend="aot_eager"``
  crashes too, and eager torch under any ``TorchDispatchMode`` segfaults the same way on
  ``mul.Scalar`` of such a tensor). A post-grad pass of our own replaces each one with a
  tensor of zeros of the same size, dtype and device: the same values, in ordinary memory.
  ``torch.func.hessian`` (forward over ``jacrev``) never produced one.
- Dynamo keeps its compiled variants per Python code object and, past
  ``recompile_limit`` (8) variants, either falls back to eager silently or, with
  ``fullgraph=True``, raises ``FailOnRecompileLimitHit``. Closures from one factory share
  their code object, so the ninth structure would fail; every cache entry here gets a code
  object of its own instead: the limit then counts the variants of one structure, and an
  entry that leaves the LRU takes its variants with it.
- ``fullgraph=True``: a graph break raises instead of running part of the Hessian eagerly;
  any dynamo or inductor error is re-raised as ValueError naming the strategy and the
  innermost cause, and the entry is dropped.
"""

from __future__ import annotations

import functools
import re
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import NamedTuple

import torch
import torch.fx
from torch import Tensor, nn

from ._contract import prepare
from ._errors import explain_autograd_error
from ._hazards import refuse_hazard
from ._problem import Inputs, LossFn, Problem, call_net, input_parts

__all__ = [
    "MAX_ENTRIES",
    "CompiledHessian",
    "Structure",
    "COMPILE_WRONG_OPS",
    "compile_supports",
    "refuse_compile_hazard",
    "check_symmetric",
    "materialise_zero_tensors",
    "problem_of",
]

#: compiled structures kept per strategy, least recently used first out
MAX_ENTRIES = 8

_PLAIN = (bool, int, float, str, type(None))


def materialise_zero_tensors(graph: torch.fx.Graph) -> None:
    """``aten._efficientzerotensor(size, ...)`` -> ``aten.full(size, 0, ...)``, in place.

    Both take ``dtype, layout, device, pin_memory`` as keywords. ``aten.full`` rather than
    ``aten.zeros``: after the decompositions inductor lowers ``full`` and refuses ``zeros``.
    """
    for node in graph.nodes:
        if (
            node.op == "call_function"
            and node.target is torch.ops.aten._efficientzerotensor.default
        ):
            node.target = torch.ops.aten.full.default
            node.args = (node.args[0], 0)


@functools.cache
def _compile_options() -> dict:
    """inductor's options: ``materialise_zero_tensors`` as its post-grad pass.

    Built on the first compile: importing torch._inductor (or torch._dynamo) up front
    would double the time of ``import strategies``.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class MaterialiseZeroTensors(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            materialise_zero_tensors(graph)

        def uuid(self) -> bytes:
            # part of inductor's cache key: an edit of this file invalidates cached graphs
            return get_hash_for_files((__file__,))

    return {"post_grad_custom_pre_pass": MaterialiseZeroTensors()}


def compile_supports(net: nn.Module, loss_fn: LossFn | None = None) -> tuple[bool, str]:
    """Whether dynamo can trace ``net`` in one graph: not through nn.RNN, nn.GRU or nn.LSTM.

    Dynamo refuses those modules ("Attempted to wrap RNN, GRU, or LSTM"); with
    ``fullgraph=True`` that is an error on every call, so the strategies say so up front.
    """
    for name, m in net.named_modules():
        if isinstance(m, nn.RNNBase):
            return (
                False,
                f"{name or 'net'} is an nn.{type(m).__name__}, which dynamo does not trace",
            )
    return True, ""


def _plain_state(net: nn.Module) -> tuple:
    """Every module's plain attributes (training, eps, padding, ...) as a hashable tuple.

    The compiled code reads the net's modules; dynamo guards what it read where it traced the
    net itself, but not where ``prepare`` traced a copy (BatchNorm in training mode), so a
    change of any of these attributes must make a new cache entry.
    """
    return tuple(
        (type(m), tuple(sorted((k, v) for k, v in vars(m).items() if _is_plain(v))))
        for m in net.modules()
    )


def _is_plain(value: object) -> bool:
    if isinstance(value, tuple):  # kernel_size, padding, normalized_shape, ...
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _root(exc: BaseException) -> BaseException:
    """The innermost exception behind a compile error (dynamo wraps it twice)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _cause(exc: BaseException) -> str:
    """The innermost exception behind a compile error, in one line."""
    exc = _root(exc)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _meta(t: Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device)


def _fixed(problem: Problem) -> dict[str, Tensor]:
    """The net's parameters not chosen, and its buffers: held fixed at their values."""
    fixed = {n: t.detach() for n, t in problem.module.named_parameters() if n not in problem.names}
    fixed.update(problem.module.named_buffers())
    return fixed


class Structure(NamedTuple):
    """What a compiled function keeps of the problem it was compiled for: no tensor values."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    fixed_names: tuple[str, ...]
    module: nn.Module
    loss_fn: LossFn


def problem_of(
    structure: Structure,
    primals: tuple[Tensor, ...],
    fixed: tuple[Tensor, ...],
    inputs: Inputs,
    targets: Tensor,
) -> Problem:
    """The problem of ``structure`` at these values: what the compiled function rebuilds."""
    module, loss_fn = structure.module, structure.loss_fn
    others = dict(zip(structure.fixed_names, fixed))

    def loss(p: Mapping[str, Tensor]) -> Tensor:
        return loss_fn(call_net(module, {**others, **p}, inputs), targets)

    return Problem(
        names=structure.names,
        shapes=structure.shapes,
        primals=primals,
        loss=loss,
        inputs=inputs,
        targets=targets,
        loss_fn=loss_fn,
        module=module,
    )


def _own_code(fn: types.FunctionType) -> types.FunctionType:
    """``fn`` with a code object of its own, so dynamo's per-code cache is this entry's alone."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


#: aten ops through which inductor's code for a Hessian is wrong in torch 2.13, though
#: eager torch.func is exact: ``nn.Upsample(mode="nearest")`` in a small U-Net gave
#: relative errors of 1e2 to 1e4 and an asymmetric matrix (``torch.compile`` of
#: ``torch.func.hessian`` alone gives the same wrong matrix)
COMPILE_WRONG_OPS = re.compile(r"_?upsample_nearest(?:_exact)?\d?d?")


def refuse_compile_hazard(problem: Problem, strategy: str) -> None:
    """ValueError where the probe forward called an op of ``COMPILE_WRONG_OPS``."""
    wrong = sorted(op for op in problem.ops if COMPILE_WRONG_OPS.fullmatch(op))
    if wrong:
        raise ValueError(
            f"strategy {strategy!r} refuses this problem: the forward calls aten.{wrong[0]}, "
            f"through which torch {torch.__version__.split('+')[0]}'s compiled Hessian is "
            "wrong (1e2 to 1e4 relative error); use the eager strategy"
        )


def check_symmetric(H: Tensor, strategy: str) -> Tensor:
    """``H``, or ValueError where it is further from symmetric than roundoff allows.

    A cheap last check on what compiled code returns (one pass over ``H``): a Hessian is
    symmetric, and the wrong matrices compiled code was found to return were not. The
    tolerance is the square root of the dtype's machine epsilon, relative to ``max|H|``.
    """
    scale = H.abs().max()
    if not bool(torch.isfinite(scale)):
        raise ValueError(f"strategy {strategy!r} returned NaN or infinite entries")
    # in blocks of rows, so that the check holds no second P x P matrix
    rows = max(1, 2**22 // max(1, H.shape[0]))
    asymmetry = torch.zeros((), dtype=H.dtype, device=H.device)
    for start in range(0, H.shape[0], rows):
        block = H[start : start + rows] - H[:, start : start + rows].T
        asymmetry = torch.maximum(asymmetry, block.abs().max())
    allowed = torch.finfo(H.dtype).eps ** 0.5 * scale
    if bool(asymmetry > allowed):
        raise ValueError(
            f"strategy {strategy!r} returned a matrix that is not symmetric (max |H - Hᵀ| = "
            f"{asymmetry.item():.2e}, max |H| = {scale.item():.2e}): compiled code is wrong "
            "on this net; use the eager strategy"
        )
    return H


class CompiledHessian:
    """``compute`` of a compiled strategy: ``hessian(problem)`` compiled once per structure.

    The structure (cache key) is: the net (by identity, with the plain attributes of its
    modules), the chosen parameters' names, shapes, dtype and device, the fixed parameters'
    and buffers' names and shapes, the inputs' and targets' shapes and dtypes, and the loss
    function (by identity: a new lambda each call compiles each call). A cache entry holds
    the net and the loss function alive until it leaves the LRU.
    """

    def __init__(
        self, name: str, hessian: Callable[[Problem], Tensor], hazard_path: str | None = None
    ) -> None:
        self.name = name
        self._hessian = hessian
        #: the differentiation path whose upstream bugs this strategy refuses at run time
        self._hazard_path = hazard_path
        self._entries: OrderedDict[Hashable, Callable[..., Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every compiled structure (the next call of each compiles again)."""
        self._entries.clear()

    def __call__(
        self,
        net: nn.Module,
        params: Mapping[str, Tensor],
        batch: tuple[Tensor, Tensor],
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        problem = prepare(net, params, batch, loss_fn)
        if self._hazard_path is not None:
            refuse_hazard(problem, self._hazard_path, self.name)
        refuse_compile_hazard(problem, self.name)
        return check_symmetric(self._run(net, problem), self.name)

    def _run(self, net: nn.Module, problem: Problem) -> Tensor:
        fixed = _fixed(problem)
        key = (
            id(net),
            _plain_state(net),
            problem.names,
            tuple(_meta(p) for p in problem.primals),
            tuple((n, _meta(t)) for n, t in fixed.items()),
            tuple((what, _meta(t)) for what, t in input_parts(problem.inputs)),
            _meta(problem.targets),
            id(problem.loss_fn),
        )
        compiled = self._entries.get(key)
        if compiled is None:
            # eagerly once per structure: a loss that is not a scalar raises its ValueError
            # here, and a forward that fails fails with its own message, not dynamo's
            problem.loss(problem.primal_dict())
            structure = Structure(
                problem.names, problem.shapes, tuple(fixed), problem.module, problem.loss_fn
            )
            compiled = self._compile(structure)
            self._entries[key] = compiled
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        try:
            return compiled(problem.primals, tuple(fixed.values()), problem.inputs, problem.targets)
        except torch._dynamo.exc.TorchDynamoException as exc:  # imported by torch.compile
            # a graph break (fullgraph), a backend failure, a recompile limit: never a
            # silent eager fallback; the entry is dropped so the next call starts afresh
            self._entries.pop(key, None)
            # a derivative torch lacks is named the same way as for the eager strategies
            explained = explain_autograd_error(_root(exc), self.name)
            if explained is not None:
                raise explained from exc
            raise ValueError(
                f"strategy {self.name!r}: torch.compile failed on this problem: {_cause(exc)}"
            ) from exc

    def _compile(self, structure: Structure) -> Callable[..., Tensor]:
        hessian = self._hessian

        def compiled_hessian(primals, fixed, inputs, targets):
            return hessian(problem_of(structure, primals, fixed, inputs, targets))

        return torch.compile(
            _own_code(compiled_hessian),
            fullgraph=True,
            dynamic=False,
            options=_compile_options(),
        )
