"""The linear maps ``kron`` exploits: every ``F.linear`` call, found and perturbed by a torch function mode.

A call ``z = F.linear(a, W, b)`` (an ``nn.Linear``, a functional call, or one of the
projections inside ``F.multi_head_attention_forward``) is a *site* when its chosen weight
and/or bias is used by that call only. Its input may have any leading dims: the rows of
``a`` (the flattened leading dims) belong to samples in a *layout* found by a forward-mode
probe, ``(outer, B, inner)``, so that ``a`` reads as ``(B, T, d_in)`` with ``T = outer *
inner`` positions per sample. The same mode later adds a perturbation ``e`` to each site's
output, in that canonical ``(B, T, d_out)`` form, and records its input; hooks on modules
are not used, so a user's own forward hooks are part of the net like any other op.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ._problem import Problem

__all__ = ["Site", "LinearMode", "run", "discover", "has_linear"]

_OPENED: dict[Callable, Callable] = {}


def _no_dispatch(*args: object, **kwargs: object) -> bool:
    return False


def _opened(func: Callable) -> Callable:
    """A copy of a Python function of ``torch.nn.functional`` that does not hand itself to
    the active mode again, so that the mode sees the torch calls inside it (the ``F.linear``
    projections of ``multi_head_attention_forward``) instead of one opaque call."""
    copy = _OPENED.get(func)
    if copy is None:
        env = dict(func.__globals__)
        env.update(
            has_torch_function=_no_dispatch,
            has_torch_function_unary=_no_dispatch,
            has_torch_function_variadic=_no_dispatch,
        )
        copy = types.FunctionType(
            func.__code__, env, func.__name__, func.__defaults__, func.__closure__
        )
        copy.__kwdefaults__ = func.__kwdefaults__
        _OPENED[func] = copy
    return copy


def _linear_args(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None, Tensor | None]:
    bound = list(args) + [None] * (3 - len(args))
    return (
        kwargs.get("input", bound[0]),
        kwargs.get("weight", bound[1]),
        kwargs.get("bias", bound[2]),
    )


_CONVS = (F.conv1d, F.conv2d)


def _conv_args(args: tuple, kwargs: dict) -> tuple:
    """``(input, weight, bias, geometry)`` of a conv call; geometry None where its patches
    are not read here (string padding, groups)."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    bound = dict(zip(names, defaults)) | dict(zip(names, args)) | kwargs
    a, w = bound["input"], bound["weight"]
    n = w.dim() - 2
    geometry = None
    if bound["groups"] == 1 and not isinstance(bound["padding"], str) and a.dim() == n + 2:

        def pair(v):
            v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
            return ((1,) + v) if n == 1 else v  # conv1d as conv2d of height 1

        kernel = tuple(w.shape[2:])
        geometry = (
            ((1,) + kernel) if n == 1 else kernel,
            pair(bound["stride"]),
            tuple(0 if n == 1 and i == 0 else p for i, p in enumerate(pair(bound["padding"]))),
            pair(bound["dilation"]),
        )
    return a, w, bound["bias"], geometry


@dataclass
class Site:
    """A linear map whose chosen weight and/or bias get Kronecker rows.

    Attributes:
        weight, bias: the chosen parameters' names, or None.
        d_in, d_out: its widths.
        lead: the leading dims of its input; ``inner``: the layout (see the module doc).
        conv: for a convolution, ``(kernel, stride, padding, dilation)`` in 2-D and the
            output's spatial shape: its input is read as unfolded patches, ``T`` of them.
        inputs: ``a`` as ``(B, T, d_in)``; ``delta``: ``∂L/∂z`` as ``(B, T, d_out)``.
    """

    weight: str | None
    bias: str | None
    d_in: int
    d_out: int
    lead: tuple[int, ...]
    inner: int
    batch: int
    inputs: Tensor | None = None
    delta: Tensor | None = None
    conv: tuple | None = None
    #: an embedding: its weight ``(d_in, d_out)`` is the transpose of a linear map's, and
    #: its input, indices, is read as one-hot rows
    embedding: bool = False
    dtype: torch.dtype | None = None

    @property
    def rows(self) -> int:
        return self.d_out * (self.d_in * bool(self.weight) + bool(self.bias))

    @property
    def flat_inputs(self) -> Tensor:
        """``a`` as ``(B, d_in)``, for a site with one position."""
        return self.inputs[:, 0]

    @property
    def flat_delta(self) -> Tensor:
        return self.delta[:, 0]

    @property
    def T(self) -> int:
        if self.conv is not None:
            return _numel(self.conv[1])
        n = 1
        for s in self.lead:
            n *= s
        return n // self.batch

    def canonical(self, t: Tensor) -> Tensor:
        """The input ``(*lead, d)`` -> ``(B, T, d)`` (also under vmap); a convolution's
        input -> its patches."""
        if self.conv is not None:
            (kernel, stride, padding, dilation), _ = self.conv
            x = t.unsqueeze(2) if t.dim() == 3 else t
            patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
            return patches.transpose(1, 2)
        if self.embedding:
            t = F.one_hot(t, self.d_in).to(self.dtype)
        d = t.shape[-1]
        outer = self.T // self.inner
        return t.reshape(outer, self.batch, self.inner, d).transpose(0, 1).reshape(
            self.batch, self.T, d
        )

    def native(self, t: Tensor) -> Tensor:
        """A perturbation ``(B, T, d)`` -> the output's shape."""
        if self.conv is not None:
            return t.transpose(1, 2).reshape(self.batch, self.d_out, *self.conv[1])
        d = t.shape[-1]
        outer = self.T // self.inner
        return t.reshape(self.batch, outer, self.inner, d).transpose(0, 1).reshape(
            *self.lead, d
        )


@dataclass
class _Call:
    weight: int
    bias: int | None
    lead: tuple[int, ...]
    d_in: int
    d_out: int
    moved: list[Tensor] = field(default_factory=list)  # per probe: rows whose input moved
    conv: tuple | None = None
    embedding: torch.dtype | None = None  # an embedding's dtype


class LinearMode(TorchFunctionMode):
    """Sees every ``F.linear`` call (inside ``torch.nn.functional`` helpers too).

    Args:
        keys: ``id`` of a chosen weight or bias -> site index.
        perturb: per site, ``(B, T, d_out)`` added to its output (or None), or None.
        captured: filled with each site's input as ``(B, T, d_in)``.
        uses: ``id`` of a chosen tensor -> name; counts the torch calls taking each one.
        calls: where to record every ``F.linear`` call (discovery).
        seed: ``(inputs, make_tangent)``: outputs of calls on the integer ``inputs`` get the
            tangent ``make_tangent(out)`` (the layout probe of token inputs).
    """

    def __init__(
        self,
        sites: list[Site] | None = None,
        keys: Mapping[int, int] | None = None,
        perturb: tuple[Tensor, ...] | None = None,
        captured: list | None = None,
        uses: Mapping[int, str] | None = None,
        calls: list[_Call] | None = None,
        seed: tuple[Tensor, Callable[[Tensor], Tensor | None]] | None = None,
    ):
        super().__init__()
        self.sites, self.keys = sites or [], keys or {}
        self.perturb, self.captured = perturb, captured
        self.uses = uses or {}
        self.count = dict.fromkeys(self.uses.values(), 0)
        self.calls, self.seed = calls, seed
        self.opening: set[Callable] = set()

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            isinstance(func, types.FunctionType)
            and func.__module__ == "torch.nn.functional"
            and func.__closure__ is None  # a dispatching wrapper (max_pool2d) calls the original
            and func not in self.opening
        ):
            self.opening.add(func)
            try:
                with self:
                    return _opened(func)(*args, **kwargs)
            finally:
                self.opening.discard(func)
        out = func(*args, **kwargs)
        # a property read (shape, dtype) is no use; one that returns a tensor (.T, .data) is
        if self.uses and not (
            getattr(func, "__name__", "") == "__get__" and not isinstance(out, Tensor)
        ):
            for leaf in tree_flatten((args, kwargs))[0]:
                name = self.uses.get(id(leaf))
                if name is not None:
                    self.count[name] += 1
        call, a, w, b = _read_call(func, args, kwargs, out)
        if call is not None:
            if self.calls is not None:
                self.calls.append(call)
            k = self.keys.get(id(w), self.keys.get(id(b)) if b is not None else None)
            if k is not None:
                site = self.sites[k]
                if self.captured is not None:
                    self.captured[k] = site.canonical(a)
                if self.perturb is not None and self.perturb[k] is not None:
                    out = out + site.native(self.perturb[k])
        if self.seed is not None and isinstance(out, Tensor) and out.is_floating_point():
            inputs, make = self.seed
            if any(leaf is inputs for leaf in tree_flatten((args, kwargs))[0]):
                tangent = make(out)
                if tangent is not None:
                    out = fwAD.make_dual(out, tangent)
        return out


def _read_call(func: Callable, args: tuple, kwargs: dict, out: object) -> tuple:
    """``(call, input, weight, bias)`` of a linear map's call (None where ``func`` is not
    one, or one whose input is not read here), or ``(None, None, None, None)``."""
    if func is F.linear:
        a, w, b = _linear_args(args, kwargs)
        if w is not None and w.dim() == 2:
            call = _Call(id(w), None if b is None else id(b), tuple(a.shape[:-1]),
                         w.shape[1], w.shape[0])  # fmt: skip
            return call, a, w, b
    elif func in _CONVS:
        a, w, b, geometry = _conv_args(args, kwargs)
        if geometry is not None:
            call = _Call(id(w), None if b is None else id(b), (a.shape[0],),
                         _numel(tuple(w.shape[1:])), w.shape[0],
                         conv=(geometry, tuple(out.shape[2:])))  # fmt: skip
            return call, a, w, b
    elif func is torch.embedding:
        names = ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args)) | kwargs
        w, a = bound["weight"], bound["indices"]
        # F.embedding passes padding_idx -1 for none; a padding row has no gradient
        plain = bound.get("padding_idx", -1) == -1 and not bound.get("scale_grad_by_freq")
        if plain and w.dim() == 2 and a.dim() >= 1:
            call = _Call(id(w), None, tuple(a.shape), w.shape[0], w.shape[1],
                         embedding=w.dtype)  # fmt: skip
            return call, a, w, None
    return None, None, None, None


def run(
    problem: Problem,
    sites: list[Site],
    perturb: tuple[Tensor, ...] | None,
    point: Mapping[str, Tensor] | None = None,
    captured: list | None = None,
    inputs: Tensor | None = None,
) -> Tensor:
    """The net's outputs at ``point`` (default: the primals) on ``inputs`` (default: the
    batch's), with ``perturb[k]`` added to site k's output and its input in ``captured[k]``."""
    keys = {}
    point = problem.primal_dict() if point is None else point
    for k, s in enumerate(sites):
        for name in (s.weight, s.bias):
            if name:
                keys[id(point[name])] = k
    with LinearMode(sites, keys, perturb, captured):
        return functional_call(
            problem.module, point, (problem.inputs if inputs is None else inputs,)
        )


def _layout(call: _Call, batch: int) -> int | None:
    """The ``inner`` of the call's rows from the probes' moved rows, or None if unclear."""
    n = 1
    for s in call.lead:
        n *= s
    if not call.lead or n % batch:
        return None
    if batch == 1:
        return n
    per = n // batch
    rows = torch.arange(n)
    found = []
    for inner in [d for d in range(1, per + 1) if per % d == 0]:
        owner = (rows // inner) % batch
        if all(not bool((m & (owner != s)).any()) for s, m in enumerate(call.moved)):
            exact = all(bool((m == (owner == s)).all()) for s, m in enumerate(call.moved))
            found.append((not exact, inner))
    if not found or not any(bool(m.any()) for m in call.moved):
        return None
    return min(found)[1]


def discover(problem: Problem) -> tuple[list[Site], list[str], float]:
    """The sites (in the order the forward calls them), the other chosen parameters' names,
    and the forward's multiply-adds in its linear maps (for the cost model)."""
    B = problem.inputs.shape[0]
    point = problem.primal_dict()
    names = {id(t): n for n, t in point.items()}
    calls: list[_Call] = []
    mode = LinearMode(uses=names, calls=calls)
    with torch.no_grad(), mode:
        functional_call(problem.module, point, (problem.inputs,))
    flops = float(
        sum(c.d_in * c.d_out * max(1, _numel(c.lead)) * _positions(c) for c in calls)
    )
    candidates = [
        c
        for c in calls
        if any(
            names.get(key) is not None and mode.count[names[key]] == 1
            for key in (c.weight, c.bias)
        )
    ]
    if candidates:
        _probe_layouts(problem, candidates)
    sites = []
    for c in candidates:
        inner = _layout(c, B)
        if inner is None:
            continue  # its rows do not belong to samples in a layout we can read: HVP rows
        chosen = [names.get(key) for key in (c.weight, c.bias)]
        weight, bias = (n if n is not None and mode.count[n] == 1 else None for n in chosen)
        sites.append(
            Site(weight, bias, c.d_in, c.d_out, c.lead, inner, B, conv=c.conv,
                 embedding=c.embedding is not None, dtype=c.embedding)  # fmt: skip
        )
    kron = {n for s in sites for n in (s.weight, s.bias) if n}
    return sites, [n for n in problem.names if n not in kron], flops


def _positions(call: _Call) -> int:
    return 1 if call.conv is None else _numel(call.conv[1])


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _probe_layouts(problem: Problem, calls: list[_Call]) -> None:
    """Fill ``call.moved``: the rows of each call's input that move when only sample 0 (then
    sample 1) moves, by forward mode from the input (or from the outputs of ops on integer
    inputs, such as an embedding). Without forward-mode formulas, a ``(B, d_in)`` input is
    read as one row per sample and other inputs are left to HVP rows."""
    B = problem.inputs.shape[0]
    by_key = {c.weight: c for c in calls}
    generator = torch.Generator(device="cpu").manual_seed(2)

    def only(sample: int) -> Callable[[Tensor], Tensor | None]:
        def make(t: Tensor) -> Tensor | None:
            if t.dim() == 0 or t.shape[0] != B:
                return None
            tangent = torch.zeros_like(t)
            noise = torch.randn(t.shape[1:], generator=generator, dtype=t.dtype)
            tangent[sample] = noise.to(t.device)
            return tangent

        return make

    try:
        for sample in range(min(B, 2)):
            make = only(sample)
            inputs = problem.inputs
            seeded = inputs.is_floating_point() and inputs.dim() > 0
            with torch.no_grad(), fwAD.dual_level():
                if seeded:
                    inputs = fwAD.make_dual(inputs, make(inputs))
                mode = _Record(by_key, seed=None if seeded else (problem.inputs, make))
                with mode:
                    functional_call(problem.module, problem.primal_dict(), (inputs,))
    except (NotImplementedError, RuntimeError):
        for c in calls:
            two_d = len(c.lead) == 1 and c.lead[0] == B
            c.moved = [torch.arange(B) == s for s in range(min(B, 2))] if two_d else []
        return
    # a call made more than once per forward (a site it cannot be) records several times
    for c in calls:
        if len(c.moved) != min(B, 2):
            c.moved = []


def _moved(t: Tensor, call: _Call) -> Tensor:
    """The rows of ``t``, a call's input or output, that carry a tangent."""
    tangent = fwAD.unpack_dual(t).tangent
    if tangent is None:
        return torch.zeros(_numel(call.lead), dtype=torch.bool)
    return tangent.reshape(_numel(call.lead), -1).ne(0).any(1).cpu()


class _Record(LinearMode):
    """Records, for each call in ``by_key`` (by its weight's id), the rows that moved."""

    def __init__(self, by_key: dict[int, _Call], **options: object):
        super().__init__(**options)
        self.by_key = by_key

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = super().__torch_function__(func, types_, args, kwargs)
        call, a, w, _ = _read_call(func, args, kwargs or {}, out)
        call = self.by_key.get(id(w)) if call is not None else None
        if call is not None:
            # an embedding's indices carry no tangent: its output's rows tell the layout
            call.moved.append(_moved(out if call.embedding else a, call))
        return out


def has_linear(net: nn.Module) -> bool:
    """Whether ``net`` holds a module whose weight ``kron`` can read as a linear map
    (``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``, ``nn.MultiheadAttention``): a planner's hint;
    functional calls are found at run time."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)
    return any(isinstance(m, kinds) for m in net.modules())
