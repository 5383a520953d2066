"""The input contract: the checks of net, params, batch and loss, and the preparation of a Problem.

``check_inputs`` checks what can be checked without running the net; ``prepare`` runs one
probe forward of the loss (cached per net, ``_PROBED``), which checks what the net and loss
return, refuses what leaves the Hessian ill-defined, records the normalisation ops the
forward calls (judged by ``_hazards``), and returns the ``Problem`` (``_problem``) every
strategy computes from. ``Strategy.compute`` in the registry runs ``check_inputs``, then the
strategy, which runs ``prepare``. docs/DESIGN.md, "The strategy contract".
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import functools
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ._hazards import ANY_PATH, BATCH_NORM_OPS, NORM_OPS, hazard
from ._kinds import uses_batch_statistics
from ._problem import (
    Inputs,
    LossFn,
    NormCall,
    Problem,
    autograd_enabled,
    call_net,
    input_parts,
    map_inputs,
    mse_loss,
)

__all__ = [
    "check_inputs",
    "NESTED_AUTOGRAD",
    "prepare",
    "sharing_problems",
    "in_float64",
    "WEIGHT_NORM_OP",
    "plain_weight_norm",
    "buffers_kept",
    "user_hooks",
]


def _updates_running_stats(net: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        and m.running_mean is not None
        for m in net.modules()
    )


def _copy(net: nn.Module) -> nn.Module:
    """``copy.deepcopy(net)``, also where a forward left a computed tensor on a module.

    ``nn.utils.weight_norm`` and ``spectral_norm`` (the hook forms) keep the weight they
    computed as a plain attribute, which deepcopy refuses (not a leaf); each hook computes
    it again before the copy's forward uses it, so the copy holds it detached.
    """
    memo: dict[int, Any] = {}
    for m in net.modules():
        for value in vars(m).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach()
    return copy.deepcopy(net, memo)


def _stateless(net: nn.Module) -> nn.Module:
    """The net itself, or where a forward would update running statistics, a copy that does not.

    In training mode BatchNorm normalises with batch statistics whether or not it tracks
    running ones, so dropping the running buffers in a copy leaves the loss unchanged while
    the net's own buffers stay untouched (and vmap never meets an in-place buffer update).
    """
    if not _updates_running_stats(net):
        return net
    clone = _copy(net)
    for m in clone.modules():
        if uses_batch_statistics(m):
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return clone


#: modules whose forward in training mode draws random numbers
_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.RReLU)


def _stochastic_module(net: nn.Module) -> str:
    """A description of the first module that makes the loss random, or ""."""
    for name, m in net.named_modules():
        if not m.training or not isinstance(m, _STOCHASTIC):
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0:
            continue  # p = 0 draws nothing: the identity
        return f"module {name or 'net'!r} is {m!r} in training mode"
    return ""


def _non_finite(tensor: Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


_META = (
    "on the meta device, which holds shapes but no values, so there is no Hessian to compute: "
    "materialise the net and batch first (e.g. net.to_empty(device='cpu') and load the weights)"
)


def _is_default_mse(loss_fn: Any) -> bool:
    """``F.mse_loss`` itself or ``nn.MSELoss()`` with mean reduction: replaced by ``mse_loss``."""
    return loss_fn is F.mse_loss or (type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean")


def check_inputs(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> LossFn:
    """Check a strategy's inputs without running the net; return the loss function to use.

    The default loss (``None``), ``F.mse_loss`` and ``nn.MSELoss()`` become ``mse_loss``.

    Raises:
        TypeError: ``net`` is not a Module, ``params`` not a mapping or not floating,
            ``batch`` not an ``(inputs, targets)`` pair (inputs a tensor, a tuple of
            tensors or a dict of tensors; targets one tensor), ``loss_fn`` not callable;
            integer targets with mean squared error (the default, ``F.mse_loss``,
            ``nn.MSELoss()``).
        ValueError: ``params`` empty, naming something that is not the net's parameter of
            that name, on mixed devices or dtypes, or not finite; params or batch on the
            meta device; the batch empty or not finite; tuple or dict inputs that are empty
            or differ in batch size; a stochastic module (dropout, RReLU) in training mode.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be a mapping name -> tensor (e.g. dict(net.named_parameters())), "
            f"got {type(params).__name__}"
        )
    if len(params) == 0:
        raise ValueError("params is empty: name at least one parameter of the net")
    own = dict(net.named_parameters())
    for name, tensor in params.items():
        if not isinstance(name, str):
            raise TypeError(f"params keys must be parameter names (str), got {name!r}")
        if name not in own:
            raise ValueError(
                f"params[{name!r}]: the net has no parameter named {name!r}; "
                f"its parameters are {sorted(own)}"
            )
        if tensor is not own[name]:
            raise ValueError(
                f"params[{name!r}] is not the net's parameter {name!r}: pass the net's own "
                f"tensors, e.g. dict(net.named_parameters())"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"params[{name!r}] has dtype {tensor.dtype}; a Hessian needs floating")
    dtypes = {t.dtype for t in params.values()}
    if len(dtypes) > 1:
        raise ValueError(f"params have mixed dtypes {sorted(map(str, dtypes))}; use one dtype")
    devices = {t.device for t in params.values()}
    if len(devices) > 1:
        raise ValueError(f"params are on mixed devices {sorted(map(str, devices))}; use one")
    if next(iter(devices)).type == "meta":
        raise ValueError(f"params are {_META}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    inputs, targets = batch
    if not isinstance(targets, Tensor):
        raise TypeError(
            "batch must be an (inputs, targets) pair with targets one tensor, got targets "
            f"of type {type(targets).__name__}"
        )
    parts = input_parts(inputs)
    for what, tensor in (*parts, ("targets", targets)):
        if tensor.numel() == 0 or (tensor.dim() > 0 and tensor.shape[0] == 0):
            raise ValueError(
                f"the batch is empty ({what} of shape {tuple(tensor.shape)}): the loss of no "
                "samples has no Hessian"
            )
    # Skipped on the meta device: it holds no values (the check that follows names it).
    named = [*parts, ("targets", targets)]
    named += [(f"params[{name!r}]", tensor) for name, tensor in params.items()]
    for what, tensor in named:
        if tensor.device.type == "meta":
            raise ValueError(f"{what} is {_META}")
        if _non_finite(tensor):
            raise ValueError(f"{what} holds NaN or infinite values: the Hessian there is undefined")
    stochastic = _stochastic_module(net)
    if stochastic:
        raise ValueError(
            f"{stochastic}: the loss is random, so it has no Hessian; call net.eval() "
            "(or set the module's p to 0) to take the Hessian of the deterministic loss"
        )
    if loss_fn is None or _is_default_mse(loss_fn):
        if not targets.is_floating_point():
            which = "the default loss" if loss_fn is None else "F.mse_loss / nn.MSELoss"
            raise TypeError(
                f"{which} (mean squared error) needs floating-point targets, got targets of "
                f"dtype {targets.dtype}: cast them (targets.float()), or for class labels pass "
                "loss_fn=F.cross_entropy"
            )
        return mse_loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(outputs, targets), got {type(loss_fn).__name__}")
    return loss_fn


def _saved_tensor_hooks() -> Any:
    """The pack hook of the innermost ``saved_tensors_hooks`` in force, or None."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return None if top is None else top[0]


#: the strategies that differentiate through a forward that differentiates itself
#: (``torch.autograd.grad`` inside it) or saves tensors through hooks (a non-reentrant
#: ``torch.utils.checkpoint``): the plain autograd loops; torch.func transforms and forward
#: mode cannot (measured in tests/test_contract.py)
NESTED_AUTOGRAD = ("full_autograd", "symmetric_half")


def _nested_autograd(
    recorder: _ForwardRecorder, value: Tensor, grad_call: str = ""
) -> tuple[str, bool]:
    """What the forward does that only plain autograd loops differentiate, or that none does
    (the flag), or ``("", False)``."""
    seen, stack = set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CheckpointFunction" in type(node).__name__:
            return (
                "calls torch.utils.checkpoint with use_reentrant=True, which torch cannot "
                "differentiate twice (its backward runs .backward() itself): pass "
                f"use_reentrant=False, which {', '.join(NESTED_AUTOGRAD)} differentiate",
                True,
            )
        stack.extend(next_node for next_node, _ in node.next_functions)
    if recorder.saved_tensor_hooks:
        return "saves tensors through hooks of its own (torch.utils.checkpoint?)", False
    if grad_call:
        return (
            f"calls {grad_call} itself (a PINN's derivatives in the inputs?)",
            False,
        )
    if recorder.backward_ops:
        return (
            f"computes derivatives itself (aten.{recorder.backward_ops[0]}: torch.autograd.grad "
            "inside the forward?)",
            False,
        )
    return "", False


class _ForwardRecorder(TorchDispatchMode):
    """Records, below autograd, the ops a forward calls: all by name, normalisation and random
    ops in detail, and embeddings whose gradient is not their derivative."""

    def __init__(
        self,
        module_names: Mapping[int, str] | None = None,
        in_transform: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__()
        #: id -> name of the modules of the net, to say where an op was called
        self.module_names = module_names or {}
        #: whether the ops now run inside a torch.func transform of the forward's own
        self.in_transform = in_transform
        self.norm_calls: list[NormCall] = []
        self.random_ops: list[str] = []
        #: derivatives the forward itself computes (torch.autograd.grad inside it)
        self.backward_ops: list[str] = []
        #: the forward saves tensors through hooks of its own (a non-reentrant checkpoint)
        self.saved_tensor_hooks = False
        self._outer_hooks = _saved_tensor_hooks()
        self.ops: set[str] = set()
        #: the first op whose gradient is not the derivative of its forward, and where
        self.not_derivative = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket.__name__
        if op.endswith("_backward") and not self.in_transform():
            self.backward_ops.append(op)
        if _saved_tensor_hooks() != self._outer_hooks:
            self.saved_tensor_hooks = True
        schema = func._schema.arguments
        bound = {a.name: a.default_value for a in schema if a.has_default_value()}
        bound |= dict(zip((a.name for a in schema), args)) | kwargs
        self.ops.add(op)
        if not self.not_derivative:
            reason = _embedding_gradient_hazard(op, bound)
            if reason:
                where = _module_on_stack(self.module_names)
                self.not_derivative = f"aten.{op}{where} {reason}"
        # seeded ops with a training flag (rrelu_with_noise, native_dropout) draw only in training
        if torch.Tag.nondeterministic_seeded in func.tags and bound.get(
            "training", bound.get("train", True)
        ):
            self.random_ops.append(op)
        if op in NORM_OPS:
            weight, bias = bound.get("weight"), bound.get("bias")
            training = bound.get("training", op == "_batch_norm_with_update")
            self.norm_calls.append(
                NormCall(
                    op=op,
                    batch_statistics=op in BATCH_NORM_OPS and bool(training),
                    weight=weight is not None,
                    bias=bias is not None,
                    weight_grad=weight is not None and weight.requires_grad,
                    bias_grad=bias is not None and bias.requires_grad,
                )
            )
        return func(*args, **kwargs)


def _normal(tensor: Tensor) -> Tensor:
    """``tensor``, or a normal copy of an inference tensor (autograd cannot save those)."""
    return tensor.clone() if tensor.is_inference() else tensor


def prepare(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    *,
    nested_autograd: bool = False,
) -> Problem:
    """Check a strategy's inputs, build the loss as a pure function of ``params`` and probe it.

    One probe forward of the loss at the params checks what only running the net shows, and
    records the normalisation ops it calls (``Problem.norm_calls``, for ``hazard``). Float
    targets of another dtype than the outputs are cast to the outputs' dtype for mean squared
    error (the default, ``F.mse_loss``, ``nn.MSELoss()``), so that the loss is computed in
    the net's dtype along every path.

    Args:
        nested_autograd: the caller differentiates with plain autograd loops, which handle
            a forward that differentiates itself or saves tensors through hooks (see
            ``NESTED_AUTOGRAD``); other callers get a ValueError for such a forward.

    Raises:
        TypeError: the errors of ``check_inputs``; the net returns something other than a
            tensor with the default loss; ``loss_fn`` returns something other than a
            floating-point tensor.
        ValueError: the errors of ``check_inputs``; outputs and targets of different shapes
            with the default loss (``F.mse_loss`` passed explicitly broadcasts them as torch
            does); ``loss_fn`` returns a tensor that is not 0-d, not finite, or detached from
            the outputs; the forward draws random numbers; it calls an op that torch cannot
            differentiate along any path (``hazard``); it calls a reentrant
            ``torch.utils.checkpoint``; without ``nested_autograd``, it calls
            ``torch.autograd.grad`` or saves tensors through hooks (a non-reentrant
            checkpoint), naming the strategies that handle it; what leaves the Hessian ill-defined
            (``_probe``: a value computed from the chosen params under ``torch.no_grad()``
            re-entering the graph, an embedding with ``padding_idx`` meeting that index, a
            buffer updated in place, a ``loss_fn`` reading the net's chosen parameters).

    Weight norm (``aten._weight_norm_interface``) is evaluated in plain ops on a copy of the
    net (``plain_weight_norm``); the net's buffers are as they were afterwards.
    """
    shared = _SHARED.get()
    key = _scope_identity(net, params, batch, loss_fn)
    problem = shared.get(key) if key is not None else None
    if problem is None:
        with autograd_enabled(), buffers_kept(net):
            problem = _prepare(net, params, batch, loss_fn)
        if key is not None:
            shared[key] = problem
    if problem.nested and not nested_autograd:
        raise ValueError(
            f"the forward {problem.nested}: torch.func transforms and forward mode cannot "
            f"differentiate through it; use a plain autograd loop ({', '.join(NESTED_AUTOGRAD)})"
        )
    return problem


T = TypeVar("T")

#: the problems ``prepare`` built inside ``sharing_problems``, by the identity of its arguments
#: (and under ``("checked", *identity)`` the loss function ``check_inputs_once`` returned, and
#: under ``(tag, *ids)`` what ``once_per_scope`` computed, the identity itself included)
_SHARED: contextvars.ContextVar[dict[tuple, Any] | None] = contextvars.ContextVar(
    "_SHARED", default=None
)


def _identity(net: Any, params: Any, batch: Any, loss_fn: Any) -> tuple | None:
    """The same objects, unmodified since (tensors' version counters): the same problem."""
    if not isinstance(params, Mapping) or not isinstance(batch, tuple):
        return None
    tensors = [*params.values(), *batch]
    if not all(isinstance(t, Tensor) for t in tensors):
        return None
    own = [*net.parameters(), *net.buffers()] if isinstance(net, nn.Module) else []
    if any(t.is_inference() for t in (*tensors, *own)):
        return None  # inference tensors keep no version counter: never shared
    return (
        id(net),
        id(loss_fn),
        net.training if isinstance(net, nn.Module) else None,
        tuple(params),
        tuple((id(t), t._version) for t in (*tensors, *own)),
    )


def once_per_scope(
    tag: str, f: Callable[[Any, Any, Any, Any], T], net: Any, params: Any, batch: Any, loss_fn: Any
) -> T:
    """``f(net, params, batch, loss_fn)``; inside ``sharing_problems``, computed once per
    scope for the same four objects (held by the scope, so their ids cannot be reused
    within it) and ``tag``, and reused.

    Within one call nothing modifies the arguments: a strategy never changes its inputs, and
    the probe refuses a forward that updates a buffer in place. So what depends on them
    alone (``_identity``, whose walk of the net costs about 24 us at P = 49 and ran six
    times per ``auto`` call; the planner's structure key) is computed when the scope first
    sees them.
    """
    shared = _SHARED.get()
    if shared is None:
        return f(net, params, batch, loss_fn)
    memo = (tag, id(net), id(params), id(batch), id(loss_fn))
    known = shared.get(memo)
    if known is not None and all(a is b for a, b in zip(known, (net, params, batch, loss_fn))):
        return known[4]
    value = f(net, params, batch, loss_fn)
    shared[memo] = (net, params, batch, loss_fn, value)
    return value


def _scope_identity(net: Any, params: Any, batch: Any, loss_fn: Any) -> tuple | None:
    """``_identity`` of the arguments, once per ``sharing_problems`` scope; None outside one
    (nothing is shared there) or where they cannot be identified."""
    if _SHARED.get() is None:
        return None
    return once_per_scope("identity", _identity, net, params, batch, loss_fn)


def check_inputs_once(
    net: nn.Module, params: Mapping[str, Tensor], batch: tuple[Any, Any], loss_fn: Any = None
) -> LossFn:
    """``check_inputs``; inside ``sharing_problems``, once per call's arguments (the same
    objects, unmodified when the scope first saw them: ``_identity``), however many strategies
    and checks they pass."""
    shared = _SHARED.get()
    key = _scope_identity(net, params, batch, loss_fn)
    if key is None:
        return check_inputs(net, params, batch, loss_fn)
    key = ("checked", *key)
    if key not in shared:
        shared[key] = check_inputs(net, params, batch, loss_fn)
    return shared[key]


@contextlib.contextmanager
def sharing_problems() -> Iterator[None]:
    """Within, ``prepare`` called again with the same, unmodified arguments returns the same
    ``Problem`` (and ``check_inputs_once`` checks them once): a call checks its input once,
    not once per strategy and verification."""
    token = _SHARED.set({} if _SHARED.get() is None else _SHARED.get())
    try:
        yield
    finally:
        _SHARED.reset(token)


def _prepare(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    given_loss_fn: LossFn | None,
) -> Problem:
    loss_fn = check_inputs_once(net, params, batch, given_loss_fn)
    inputs = map_inputs(_normal, batch[0])
    targets = _normal(batch[1])
    names = tuple(params)
    primals = tuple(_normal(params[n].detach()) for n in names)
    module = _stateless(net)
    # a copy of the net (weight norm, running statistics) is made afresh: never cached
    seen = _Seen.of(net, params, batch, given_loss_fn) if module is net else None
    known = _PROBED.get(net) if seen is not None else None
    probe = None
    if known is not None and known.seen == seen:
        probe = _probe(module, params, primals, inputs, targets, loss_fn, given_loss_fn, known)
    if probe is not None:
        found = known
    else:
        probe = _probe(module, params, primals, inputs, targets, loss_fn, given_loss_fn)
        if WEIGHT_NORM_OP in probe.recorder.ops:
            # torch's double backward of this op is wrong: the same weight norm in plain ops
            module, seen = plain_weight_norm(module), None
            probe = _probe(module, params, primals, inputs, targets, loss_fn, given_loss_fn)
        recorder = probe.recorder
        nested, impossible = (
            _nested_autograd(recorder, probe.value, probe.grad_call)
            if probe.value.requires_grad
            else ("", 0)
        )
        if impossible:
            raise ValueError(f"the forward {nested}")
        found = _Probed(
            seen,
            _graph_of(probe.value),
            tuple(recorder.norm_calls),
            frozenset(recorder.ops),
            nested,
        )
    value, targets, nested = probe.value, probe.targets, found.nested
    constant = not value.requires_grad
    problem = Problem(
        names=names,
        shapes=tuple(p.shape for p in primals),
        primals=primals,
        loss=_loss_closure(module, probe.fixed, inputs, targets, loss_fn, constant),
        inputs=inputs,
        targets=targets,
        loss_fn=loss_fn,
        module=module,
        norm_calls=found.norm_calls,
        ops=found.ops,
        nested=nested,
        fixed=probe.fixed,
        constant=constant,
    )
    reason = hazard(problem, ANY_PATH)
    if reason:
        raise ValueError(f"no strategy can differentiate this loss: {reason}")
    if found.seen is not None and found is not known:
        _PROBED[net] = found
    return problem


# --- the probe's findings, remembered per net (see DESIGN, "The strategy contract") ---


def _plain(value: Any) -> bool:
    """A setting of a module that the cache key may hold: a number, a string, a tuple of them."""
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return value is None or type(value) in (bool, int, float, str)


@dataclass(frozen=True)
class _Seen:
    """What a probe forward's findings hold for: the net's structure, and the very loss and
    batch it was run on, unmodified (weak references and version counters; the parameter
    values are left out, as they change from call to call in a Newton loop)."""

    #: per module: name, class, train mode, plain settings, hooks, an instance forward
    modules: tuple
    #: the net's params (name, shape, dtype, device, requires_grad), buffers, the chosen
    tensors: tuple
    #: the global module hooks
    hooks: tuple
    loss_fn: Any
    batch: tuple

    @classmethod
    def of(
        cls, net: nn.Module, params: Mapping[str, Tensor], batch: Any, loss_fn: Any
    ) -> _Seen | None:
        """The key of this call, or None where it is not cacheable (a loss or a batch tensor
        that takes no weak reference, an inference tensor, which keeps no version counter)."""
        parts = [t for _, t in input_parts(batch[0])] + [batch[1]]
        if any(t.is_inference() for t in parts):
            return None
        try:
            loss_ref = None if loss_fn is None else _Ref(loss_fn)
            batch_refs = tuple((_Ref(t), t._version) for t in parts)
        except TypeError:
            return None
        modules = tuple(
            (
                name,
                type(m),
                m.training,
                tuple(sorted((k, v) for k, v in vars(m).items() if _plain(v))),
                tuple(m._forward_pre_hooks),
                tuple(m._forward_hooks),
                getattr(vars(m).get("forward"), "__code__", None),
            )
            for name, m in net.named_modules()
        )
        tensors = (
            tuple(
                (n, p.shape, p.dtype, p.device, p.requires_grad) for n, p in net.named_parameters()
            ),
            tuple((n, b.shape, b.dtype, b.device) for n, b in net.named_buffers()),
            tuple(params),
        )
        hooks = (
            tuple(module_hooks._global_forward_pre_hooks),
            tuple(module_hooks._global_forward_hooks),
        )
        return cls(modules, tensors, hooks, loss_ref, batch_refs)


class _Ref:
    """A weak reference equal to another to the same live object (``weakref.ref`` compares
    dead references by identity, and live ones by their objects' ``==``)."""

    __slots__ = ("ref",)

    def __init__(self, obj: Any) -> None:
        self.ref = weakref.ref(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Ref):
            return NotImplemented
        mine = self.ref()
        return mine is not None and mine is other.ref()

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class _Probed:
    """What the probe forward found on a net (none of it refers to the net)."""

    seen: _Seen | None
    #: the autograd graph of the probed loss, node types in walk order
    graph: tuple[str, ...]
    norm_calls: tuple[NormCall, ...]
    ops: frozenset[str]
    nested: str


#: net -> the findings of its last probe forward, weakly keyed: the cache keeps no net alive
_PROBED: weakref.WeakKeyDictionary[nn.Module, _Probed] = weakref.WeakKeyDictionary()


def _graph_of(value: Tensor) -> tuple[str, ...]:
    """The types of the nodes of ``value``'s autograd graph, depth first."""
    out, seen, stack = [], set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        out.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in reversed(node.next_functions))
    return tuple(out)


def _in_dtype_of(outputs: Tensor, targets: Tensor) -> Tensor:
    """``targets`` in the floating dtype of ``outputs`` (a float32 net given float64 targets)."""
    if outputs.is_floating_point() and targets.is_floating_point():
        return targets.to(outputs.dtype)
    return targets


@dataclass
class _Probe:
    """What one probe forward of the loss found (see ``_probe``)."""

    #: the net's other params and buffers, held at their values
    fixed: dict[str, Tensor]
    value: Tensor
    #: what the dispatch modes recorded; None where a cached probe's findings were replayed
    recorder: _ForwardRecorder | None
    #: the targets the loss is computed with (cast to the outputs' dtype for MSE)
    targets: Tensor
    #: torch.autograd.grad or backward, where the forward called it itself (``_ProbeWatch``)
    grad_call: str = ""


def _probe(
    module: nn.Module,
    params: Mapping[str, Tensor],
    primals: tuple[Tensor, ...],
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn,
    given_loss_fn: LossFn | None,
    known: _Probed | None = None,
) -> _Probe | None:
    """Run the loss once at the params, checking what only running it shows.

    Raises ValueError where the forward or the loss draws random numbers, updates a buffer
    in place, feeds a value computed from the chosen params without autograd back into a
    differentiated op, takes an embedding gradient that is not the derivative of its
    forward, or where ``loss_fn`` reads the net's own chosen parameters.

    With ``known``, the findings of a probe of the same key (``_Seen``), it replays: the loss
    by a plain forward, without the dispatch modes. What depends on the parameter values
    still runs (the checks of the outputs and of the loss's value), and the autograd graph
    must be the probed one node for node; where anything differs (a buffer written) or fails
    it returns None, and the full probe then runs and says what it is.
    """
    names = tuple(params)
    fixed = _fixed(module, params)
    outputs_at = _outputs_at(module, fixed, inputs)
    leaves = {n: p.detach().requires_grad_(True) for n, p in zip(names, primals)}
    versions = _buffer_versions(module)

    def evaluate() -> tuple[Any, Tensor, Tensor]:
        outputs = outputs_at(leaves)
        loss_targets = targets
        if loss_fn is mse_loss and isinstance(outputs, Tensor):
            loss_targets = _in_dtype_of(outputs, targets)
        if given_loss_fn is None:
            _check_default_loss_outputs(outputs, loss_targets)
        _check_class_targets(loss_fn, outputs, loss_targets)
        if known is None:  # the watch of the full probe (below), from here on in the loss
            watch.in_loss = True
        return outputs, loss_fn(outputs, loss_targets), loss_targets

    if known is not None:
        try:
            outputs, value, targets = evaluate()
            _check_loss_value(value, outputs)
        except Exception:  # the full probe says what it is
            return None
        if _changed_buffers(module, versions) or _graph_of(value) != known.graph:
            return None
        return _Probe(fixed, value, None, targets)
    watch = _ProbeWatch(leaves.values(), params, module)
    recorder = _ForwardRecorder(watch.names, watch.in_transform)
    with recorder, watch:
        try:
            outputs, value, targets = evaluate()
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, IndexError) as error:
            # the first run of the caller's net and loss: what fails here is the input
            failure = f"{type(error).__name__}: {error}"
            for what, part in input_parts(inputs):
                if part.is_floating_point() and part.dtype != primals[0].dtype:
                    raise ValueError(
                        f"{what} must be in the params' dtype {primals[0].dtype}, got "
                        f"{part.dtype}: the loss fails with {failure}"
                    ) from error
            raise ValueError(f"the loss fails at these params and batch: {failure}") from error
    _check_loss_value(value, outputs)
    if recorder.random_ops:
        raise ValueError(
            f"the forward calls aten.{recorder.random_ops[0]}, which draws random numbers: "
            "the loss is random, so it has no Hessian (a dropout in training mode? call "
            "net.eval())"
        )
    _refuse_ill_defined(watch, recorder, _changed_buffers(module, versions))
    return _Probe(fixed, value, recorder, targets, watch.grad_call)


def _fixed(module: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The module's params other than the chosen ones (detached) and its buffers, by name."""
    fixed = {n: _normal(t.detach()) for n, t in module.named_parameters() if n not in params}
    fixed.update((n, _normal(t)) for n, t in module.named_buffers())
    return fixed


def _outputs_at(
    module: nn.Module, fixed: Mapping[str, Tensor], inputs: Inputs
) -> Callable[[Mapping[str, Tensor]], Any]:
    """The net's outputs as a function of the chosen params, the others held at ``fixed``."""

    def outputs_at(p: Mapping[str, Tensor]) -> Any:
        return call_net(module, {**fixed, **p}, inputs)

    return outputs_at


def _loss_closure(
    module: nn.Module,
    fixed: Mapping[str, Tensor],
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn,
    constant: bool,
) -> Callable[[Mapping[str, Tensor]], Tensor]:
    """``Problem.loss``: the loss as a pure function of the chosen params.

    A loss that none of the chosen params reaches (``constant``) has a zero Hessian; tied to
    them by a zero term it stays in the graph, so that every strategy finds zero derivatives
    rather than autograd's "element 0 of tensors does not require grad".
    """
    outputs_at = _outputs_at(module, fixed, inputs)

    def loss(p: Mapping[str, Tensor]) -> Tensor:
        value = loss_fn(outputs_at(p), targets)
        return value + 0 * sum(t.sum() for t in p.values()) if constant else value

    return loss


def in_float64(problem: Problem) -> Problem:
    """``problem`` with its params, the fixed params and buffers, inputs and targets in float64.

    The same module and loss (no copy of the net, no second probe forward): what ``verify``
    computes its reference with. Integer tensors (indices, class targets) stay as they are.
    A net that does not run in float64 fails only when its loss is called.
    """

    def cast(t: Tensor) -> Tensor:
        return t.to(torch.float64) if t.is_floating_point() else t

    fixed = {n: cast(t) for n, t in problem.fixed.items()}
    inputs = map_inputs(cast, problem.inputs)
    targets = cast(problem.targets)
    loss = _loss_closure(problem.module, fixed, inputs, targets, problem.loss_fn, problem.constant)
    return dataclasses.replace(
        problem,
        primals=tuple(cast(p) for p in problem.primals),
        loss=loss,
        inputs=inputs,
        targets=targets,
        fixed=fixed,
    )


# --- forwards whose Hessian is ill-defined, or that would silently lose part of the loss ---

#: the fused weight-norm op (``torch._weight_norm`` on CPU and CUDA), whose double backward is
#: wrong in torch 2.13 (28% to 87% off central differences); ``prepare`` routes around it
WEIGHT_NORM_OP = "_weight_norm_interface"


def _weight_norm_plain(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm(v, g, dim)`` in plain ops: ``v * g / ||v||`` over all dims but ``dim``."""
    if dim == -1:  # torch's "no dim": one norm of the whole tensor
        return v * (g / v.square().sum().sqrt())
    dim %= v.dim()
    others = [d for d in range(v.dim()) if d != dim]
    return v * (g / v.square().sum(others, keepdim=True).sqrt())


class _PlainWeightNormMode(TorchFunctionMode):
    """Every ``torch._weight_norm`` call (both weight-norm APIs use it) in plain ops."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch._weight_norm:
            return _weight_norm_plain(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def plain_weight_norm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose forward computes weight norm with plain ops; ``net`` is untouched.

    ``nn.utils.weight_norm`` and ``nn.utils.parametrizations.weight_norm`` call
    ``torch._weight_norm``, which runs the fused ``aten._weight_norm_interface``: torch 2.13's
    double backward of that op is wrong, while the same values written as ``v * g / ||v||``
    differentiate exactly along every path. The copy has the same parameter and buffer names.
    """
    clone = _copy(net)
    forward = clone.forward

    def routed(*args: Any, **kwargs: Any) -> Any:
        with _PlainWeightNormMode():
            return forward(*args, **kwargs)

    clone.forward = routed  # an instance attribute: what Module.__call__ runs
    return clone


def _embedding_gradient_hazard(op: str, bound: Mapping[str, Any]) -> str:
    """Why the gradient of this embedding call is not the derivative of its forward, or "".

    With ``padding_idx``, torch's embedding backward zeroes the padding row's gradient although
    the forward reads that row wherever the index occurs; with ``scale_grad_by_freq`` it
    scales each row's gradient by how often the row occurs. Either way the "Hessian" of the
    forward is not defined by autograd (reverse and forward mode disagree; the matrix is not
    symmetric). Only where the weight is differentiated, and the padding index occurs.
    """
    if op not in ("embedding", "_embedding_bag", "_embedding_bag_forward_only"):
        return ""
    weight, indices = bound.get("weight"), bound.get("indices")
    if not isinstance(weight, Tensor) or not weight.requires_grad:
        return ""
    padding = bound.get("padding_idx")
    if padding is not None and padding >= 0 and bool((indices == padding).any()):
        return (
            f"with padding_idx={padding} meets index {padding} in the batch: torch "
            "zeroes the padding row's gradient though the forward reads that row, so the "
            "gradient is not the derivative of the forward and its Hessian is undefined; leave "
            "the embedding's weight out of params, or keep the padding index out of the batch"
        )
    if bound.get("scale_grad_by_freq"):
        return (
            "with scale_grad_by_freq=True: torch scales the gradient by the "
            "frequency of each index in the batch, so it is not the derivative of the forward "
            "and its Hessian is undefined; leave the embedding's weight out of params"
        )
    return ""


def _module_on_stack(names: Mapping[int, str]) -> str:
    """ " in module 'name'" for the innermost module of ``names`` whose code is running, or ""."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            return f" in module {names[id(owner)] or 'net'!r}"
        frame = frame.f_back
    return ""


def _function_name(func: Any) -> str:
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    name = name.replace("TensorBase.", "Tensor.")
    module = getattr(func, "__module__", None) or ""
    if module.startswith(("torch.nn.functional", "torch._C._nn")):
        return f"F.{name}"
    return name if "." in name or not module.startswith("torch") else f"torch.{name}"


#: functions whose result is a constant to reverse and forward mode alike: detached values,
#: and tensors made from another's shape and dtype alone (``torch.ones_like(u)`` as the
#: ``grad_outputs`` of a PINN's ``autograd.grad``)
_DETACH = (
    Tensor.detach,
    torch.detach,
    Tensor.detach_,
    Tensor.data.__get__,
    torch.ones_like,
    torch.zeros_like,
    torch.empty_like,
    torch.full_like,
    Tensor.new_ones,
    Tensor.new_zeros,
    Tensor.new_empty,
    Tensor.new_full,
)


#: what computes derivatives: called by a forward, or by torch.func's transforms within it
_GRAD_CALLS = (torch.autograd.grad, torch.autograd.backward)


def _called_by_torch_func() -> bool:
    """Whether the innermost caller outside torch's autograd and override machinery is
    torch.func's own code (a transform computing its derivative)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(("torch.overrides", "torch.autograd")):
            return module.startswith("torch._functorch")
        frame = frame.f_back
    return False


class _ProbeWatch(TorchFunctionMode):
    """Watches the probe forward and loss, above autograd.

    It follows which tensors are computed from the chosen params (not through ``.detach()``,
    whose result every path holds constant), and records: ``cut``, the first op that takes
    such a tensor computed without autograd's graph (under ``torch.no_grad()``, which stops
    reverse mode but not forward mode) and returns a tensor in the graph; and
    ``penalty``, the first of the net's own chosen parameters that the loss function reads.
    """

    def __init__(self, leaves: Any, params: Mapping[str, Tensor], module: nn.Module) -> None:
        super().__init__()
        self.derived = WeakIdKeyDictionary()
        for leaf in leaves:
            self.derived[leaf] = True
        self.chosen = {id(t): n for n, t in params.items()}
        self.names = {id(m): n for n, m in module.named_modules()}
        self.in_loss = False
        self.cut = ""
        self.penalty = ""
        #: torch functions now running inside a torch.func transform of the forward's own
        #: (see ``in_transform``); the depth of functorch's layers the probe started at
        self._in_transform = 0
        self._base_depth = torch._C._functorch.get_dynamic_layer_stack_depth()
        #: the forward called torch.autograd.grad (or backward) itself, not through torch.func
        self.grad_call = ""

    def in_transform(self) -> bool:
        """Whether what runs now runs inside a torch.func transform that the forward applies
        itself (``vmap(hessian(u))`` in the inputs of a PINN): the derivatives such a
        transform takes (``*_backward`` ops, of reverse and of forward mode alike) are its
        own, and torch.func differentiates through them, unlike ``torch.autograd.grad``
        called by the forward."""
        return self._in_transform > 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GRAD_CALLS and not self.grad_call and not _called_by_torch_func():
            self.grad_call = f"torch.autograd.{func.__name__}"
        if torch._C._functorch.get_dynamic_layer_stack_depth() > self._base_depth:
            self._in_transform += 1
            try:
                return func(*args, **kwargs)
            finally:
                self._in_transform -= 1
        given = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if self.in_loss and not self.penalty:
            self.penalty = next((self.chosen[id(t)] for t in given if id(t) in self.chosen), "")
        out = func(*args, **kwargs)
        derived = [t for t in given if t in self.derived]
        # what .detach() returns is a constant to every path (forward mode drops its tangent)
        if derived and func not in _DETACH:
            returned = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
            for t in returned:
                self.derived[t] = True
            cut = any(
                (t.is_floating_point() or t.is_complex()) and not t.requires_grad for t in derived
            )
            if cut and not self.cut and any(t.requires_grad for t in returned):
                self.cut = f"{_function_name(func)}{_module_on_stack(self.names)}"
        return out


def _buffer_versions(module: nn.Module) -> dict[str, int]:
    out = {}
    for name, t in module.named_buffers():
        if not t.is_inference():  # inference tensors keep no version counter
            out[name] = t._version
    return out


def _changed_buffers(module: nn.Module, versions: Mapping[str, int]) -> list[str]:
    now = _buffer_versions(module)
    return [n for n, v in versions.items() if now.get(n, v) != v]


def _refuse_ill_defined(
    watch: _ProbeWatch, recorder: _ForwardRecorder, changed_buffers: list[str]
) -> None:
    """ValueError for what the probe found that leaves no Hessian every strategy agrees on."""
    if changed_buffers:
        raise ValueError(
            f"the forward updates the net's buffer {changed_buffers[0]!r} in place (spectral_norm "
            "in training mode?): the loss changes at every call, so it has no Hessian; call "
            "net.eval() to take the Hessian at the buffers as they are"
        )
    if watch.cut:
        raise ValueError(
            f"a value computed from the chosen params without autograd (under torch.no_grad()) "
            f"enters {watch.cut}, whose result autograd differentiates: reverse mode holds it "
            "constant but forward mode does not, so the paths differentiate different "
            "functions and the matrix is not a Hessian; compute the value with autograd on, "
            "hold it constant with .detach() instead (every path agrees on that), or leave "
            "the params it comes from out of params"
        )
    if recorder.not_derivative:
        raise ValueError(f"the forward calls {recorder.not_derivative}")
    if watch.penalty:
        raise ValueError(
            f"loss_fn reads the net's parameter {watch.penalty!r} directly (a weight penalty?): "
            "strategies evaluate the net at parameters of their own (torch.func.functional_call), "
            "so such a term would be silently dropped from the Hessian; compute it in the net's "
            "forward from self's parameters and return it with the outputs, or add its Hessian "
            "yourself (2 * c * I for c * sum(p ** 2))"
        )


@contextlib.contextmanager
def buffers_kept(net: nn.Module) -> Iterator[None]:
    """Whatever runs inside leaves the buffers of ``net`` as they were (values and objects).

    A strategy never changes the net; a forward that updates a buffer in place (spectral_norm
    in training mode) would, even in the probe forward of a strategy that then refuses.
    """
    saved = []
    # not a Module: check_inputs, which runs inside, says so
    for module in net.modules() if isinstance(net, nn.Module) else ():
        for name, t in module._buffers.items():
            if t is not None and not t.is_inference():
                saved.append((module, name, t, t._version, t.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, t, version, value in saved:
                if module._buffers.get(name) is not t:
                    module._buffers[name] = t
                if t._version != version:
                    t.copy_(value)


def user_hooks(net: nn.Module) -> list[str]:
    """The forward hooks and pre-hooks that run when ``net`` is called, each in words.

    Module hooks (``register_forward_hook``, ``register_forward_pre_hook``, also those of
    ``nn.utils.weight_norm``, ``spectral_norm`` and pruning) and global ones
    (``nn.modules.module.register_module_forward_hook`` ...). A strategy that rebuilds the
    net from its layers, rather than calling it, ignores them and must refuse such a net.
    """
    found = []
    global_hooks = (
        ("global forward pre-hook", module_hooks._global_forward_pre_hooks),
        ("global forward hook", module_hooks._global_forward_hooks),
    )
    found += [kind for kind, hooks in global_hooks if hooks]
    for name, m in net.named_modules():
        if m._forward_pre_hooks:
            found.append(f"forward pre-hook on module {name or 'net'!r}")
        if m._forward_hooks:
            found.append(f"forward hook on module {name or 'net'!r}")
    return found


def _check_default_loss_outputs(outputs: Any, targets: Tensor) -> None:
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"the default loss (mean squared error) needs the net to return a tensor, got "
            f"{type(outputs).__name__}: pass a loss_fn(outputs, targets) that takes what the "
            "net returns"
        )
    if outputs.shape != targets.shape:
        raise ValueError(
            f"outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} must match in "
            f"shape for the default loss (mean squared error): reshape the targets "
            f"(targets.view{tuple(outputs.shape)}), or pass loss_fn=F.mse_loss to broadcast "
            "them as torch does"
        )


def _cross_entropy_options(loss_fn: Any) -> dict[str, Any] | None:
    """``ignore_index`` and ``reduction`` of a torch cross-entropy loss, or None for another loss."""
    if type(loss_fn) is nn.CrossEntropyLoss:
        return {"ignore_index": loss_fn.ignore_index, "reduction": loss_fn.reduction}
    keywords: dict[str, Any] = {}
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        loss_fn, keywords = loss_fn.func, loss_fn.keywords
    if loss_fn is not F.cross_entropy:
        return None
    return {"ignore_index": -100, "reduction": "mean"} | {
        k: v for k, v in keywords.items() if k in ("ignore_index", "reduction")
    }


def _check_class_targets(loss_fn: Any, outputs: Any, targets: Tensor) -> None:
    """Class-index targets of torch's cross-entropy lie among the classes (or are ignored).

    Torch itself raises an IndexError deep inside the loss for one out of range, and returns
    NaN where the mean reduction meets only ignored targets.
    """
    options = _cross_entropy_options(loss_fn)
    if options is None or targets.is_floating_point() or not isinstance(outputs, Tensor):
        return
    classes = outputs.shape[1] if outputs.dim() > 1 else outputs.shape[0]
    ignored = targets == options["ignore_index"]
    valid = ((targets >= 0) & (targets < classes)) | ignored
    if not bool(valid.all()):
        bad = targets[~valid]
        raise ValueError(
            f"cross-entropy targets must lie in [0, {classes}) or equal ignore_index "
            f"{options['ignore_index']}, got {bad.min().item()}..{bad.max().item()}"
        )
    if options["reduction"] == "mean" and bool(ignored.all()):
        raise ValueError(
            f"cross-entropy targets must lie in [0, {classes}): every one equals ignore_index "
            f"{options['ignore_index']}, and the mean over no targets is undefined"
        )


def _check_loss_value(value: Any, outputs: Any) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(
            f"loss_fn must return a 0-d floating-point tensor, got {type(value).__name__}"
        )
    if value.dim() != 0:
        raise ValueError(
            f"loss_fn must return a scalar (0-d) tensor, got shape {tuple(value.shape)}"
        )
    if not value.is_floating_point():
        raise TypeError(
            f"loss_fn returned a {value.dtype} tensor; a Hessian needs a floating-point loss"
        )
    if not bool(torch.isfinite(value)):
        raise ValueError(
            f"the loss is {value.item()} at these params and batch: its Hessian is undefined"
        )
    # Only for a single output: of several, the loss may rightly use some that the chosen
    # params do not reach, and its Hessian is then zero.
    if isinstance(outputs, Tensor) and outputs.requires_grad and not value.requires_grad:
        raise ValueError(
            "loss_fn returned a value that does not depend on the net's outputs (detached, "
            "e.g. through .item(), .detach() or torch.tensor()): its Hessian would be zero"
        )
