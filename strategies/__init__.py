"""Registry of strategies that compute the dense Hessian of a loss w.r.t. a net's weights.

``compute(name, net, params, batch, loss_fn=None, **options)`` is the one way in: it checks
the inputs (``check_inputs``), the options the strategy takes, its ``supports``, and that
the Hessian fits in the memory of the params' device, then runs the strategy with autograd
on (whatever the caller turned off) and turns torch's errors for derivatives it lacks into
ValueErrors that name the op and what to use instead. ``verify`` checks any Hessian against
an independent Hessian-vector product.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ._blocks import flatten, from_blocks, to_blocks, unflatten
from ._contract import (
    buffers_kept,
    check_inputs,
    check_inputs_once,
    prepare,
    sharing_problems,
)
from ._errors import REVERSE_MODE, explain_autograd_error
from ._kinds import kinds_of, kinds_on_path, kinds_signature, uses_batch_statistics
from ._memory import (
    POSITIVE_INTEGER_OPTIONS,
    available_bytes,
    check_fits,
    check_positive,
    reading_for_next_check,
)
from ._plan import peak_ratio
from ._problem import LossFn, Problem, autograd_enabled, mse_loss
from ._verify import default_rtol, verify

__all__ = [
    "ComputeFn",
    "SupportsFn",
    "FAMILIES",
    "LossFn",
    "Problem",
    "Strategy",
    "REVERSE_MODE",
    "names",
    "get",
    "compute",
    "register",
    "verify",
    "default_rtol",
    "check_inputs",
    "prepare",
    "flatten",
    "unflatten",
    "to_blocks",
    "from_blocks",
    "mse_loss",
    "kinds_of",
    "kinds_on_path",
    "kinds_signature",
    "uses_batch_statistics",
    "available_bytes",
]

#: ``compute(net, params, batch, loss_fn=None, **options) -> dense P x P Hessian``
ComputeFn = Callable[..., Tensor]
#: ``supports(net, loss_fn) -> (ok, reason)``
SupportsFn = Callable[[nn.Module, "LossFn | None"], "tuple[bool, str]"]

#: the positional arguments every ``ComputeFn`` takes before its options
_PROBLEM_ARGUMENTS = 4


#: how a strategy computes the Hessian, for grouping in reports: plain autograd loops,
#: torch.func transforms (reverse-over-reverse and jacfwd(jacrev)), forward-over-reverse
#: products, structure-exploiting strategies, other frameworks (comparison only), dispatchers
FAMILIES = ("loops", "transforms", "forward-over-reverse", "structured", "peers", "dispatcher")


def _supports_all(net: nn.Module, loss_fn: LossFn | None) -> tuple[bool, str]:
    return True, ""


@dataclass(frozen=True)
class Strategy:
    """One registered way to compute the Hessian."""

    name: str
    description: str
    compute_fn: ComputeFn = field(repr=False)
    supports_fn: SupportsFn = field(default=_supports_all, repr=False)
    #: a reference for comparison only (e.g. another framework), never a PyTorch default
    peer: bool = False
    #: compiles on its first call for a given problem shape: first-call time is apart
    compiles: bool = False
    #: the module that defines it (None for a strategy registered from a function); its other
    #: names (e.g. auto's ``choose``) are used from the module, not through the strategy
    module: ModuleType | None = field(default=None, repr=False)
    #: one of ``FAMILIES``
    family: str = "transforms"
    #: for a compiled variant, the name of the strategy it compiles; else None
    eager: str | None = None
    #: takes inputs as a tuple (``net(*inputs)``) or a dict (``net(**inputs)``), not only a
    #: tensor; a strategy says so with ``MULTI_INPUT = True`` once it passes them on
    multi_input: bool = False

    def supports(self, net: nn.Module, loss_fn: LossFn | None = None) -> tuple[bool, str]:
        """Whether this strategy handles ``net`` with ``loss_fn``, and if not, why."""
        return self.supports_fn(net, loss_fn)

    @functools.cached_property
    def options(self) -> tuple[str, ...] | None:
        """The keyword options ``compute`` accepts (e.g. ``chunk_size``); None: any (read
        from ``compute_fn``'s signature once: every call checks its options against it)."""
        parameters = list(inspect.signature(self.compute_fn).parameters.values())
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        problem = [p for p in parameters if p.kind in positional][:_PROBLEM_ARGUMENTS]
        return tuple(
            p.name
            for p in parameters
            if p not in problem
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )

    def compute(
        self,
        net: nn.Module,
        params: Mapping[str, Tensor],
        batch: tuple[Tensor, Tensor],
        loss_fn: LossFn | None = None,
        **options: Any,
    ) -> Tensor:
        """The dense ``P x P`` Hessian.

        Args:
            options: passed to the strategy, e.g. ``chunk_size`` or ``memory_budget``
                (``options`` lists those it accepts).

        Raises:
            TypeError: a bad input (see ``check_inputs``), or an option the strategy does
                not accept.
            ValueError: a bad input; ``chunk_size`` or ``memory_budget`` given and not a
                positive integer (checked here for every strategy that takes them); a
                problem ``supports`` says no to (tuple or dict inputs included, unless
                ``multi_input``), or one the strategy finds at run time it cannot
                differentiate exactly (a derivative torch does not implement, an op torch
                differentiates wrongly on its path).
            MemoryError: the strategy's predicted peak (its measured peak over the Hessian's
                size in the committed runs, times this Hessian's size; the Hessian alone where
                it was never measured) does not fit in the memory of the params' device.

        The net's buffers are as they were afterwards, whatever the strategy did. The inputs
        are checked once per call (``check_inputs_once`` within ``sharing_problems``): by this
        wrapper, not again by the strategy's ``prepare``, nor, under a dispatcher, by the
        wrapper of the strategy it runs; a direct call of any strategy checks them itself.
        """
        with buffers_kept(net), sharing_problems():
            return self._compute(net, params, batch, loss_fn, options)

    def _compute(
        self,
        net: nn.Module,
        params: Mapping[str, Tensor],
        batch: tuple[Tensor, Tensor],
        loss_fn: LossFn | None,
        options: dict[str, Any],
    ) -> Tensor:
        check_inputs_once(net, params, batch, loss_fn)
        if not isinstance(batch[0], Tensor) and not self.multi_input:
            raise ValueError(
                f"strategy {self.name!r} does not support this problem: it takes the inputs as "
                f"one tensor, got a {type(batch[0]).__name__} of them"
            )
        accepted = self.options
        if accepted is not None:
            for option in options:
                if option not in accepted:
                    takes = ", ".join(accepted) or "none"
                    raise TypeError(
                        f"strategy {self.name!r} takes no option {option!r} (its options: {takes})"
                    )
        shared = {k: v for k, v in options.items() if k in POSITIVE_INTEGER_OPTIONS}
        check_positive(**shared)
        options = {**options, **{k: int(v) for k, v in shared.items() if v is not None}}
        ok, reason = self.supports(net, loss_fn)
        if not ok:
            raise ValueError(f"strategy {self.name!r} does not support this problem: {reason}")
        first = next(iter(params.values()))
        P = sum(t.numel() for t in params.values())
        # its measured working peak, not the Hessian alone: a strategy that starts whenever H
        # fits dies in the allocator half way (a dispatcher sizes its own choice)
        ratio = (
            1.0
            if self.family == "dispatcher"
            else peak_ratio(self.name, first.device, first.dtype, P, unmeasured=1.0)
        )
        if self.family == "dispatcher":
            # its H alone must fit; the strategy it runs checks its own peak against the same
            # reading of the free memory (taken once, before either allocates anything)
            with reading_for_next_check(first.device) as reading:
                check_fits(params, ratio, self.name, available=reading)
                return self._run((net, params, batch, loss_fn), options)
        available = check_fits(params, ratio, self.name)
        # the strategy's own check of its directions, if it makes one, compares against it
        with reading_for_next_check(first.device, available):
            return self._run((net, params, batch, loss_fn), options)

    def _run(self, problem: tuple[Any, ...], options: dict[str, Any]) -> Tensor:
        """``compute_fn`` on the checked ``(net, params, batch, loss_fn)``, autograd on."""
        hooks_enabled = torch._C._autograd._saved_tensors_hooks_is_enabled()
        with autograd_enabled():
            try:
                return self.compute_fn(*problem, **options)
            except (NotImplementedError, RuntimeError) as error:
                explained = explain_autograd_error(error, self.name)
                if explained is None:
                    raise
                raise explained from error
            finally:
                # torch.compile failing inside torch.func leaves saved tensor hooks disabled
                # for the rest of the process (torch 2.13), which breaks every later call
                # through a checkpointed net
                if hooks_enabled and not torch._C._autograd._saved_tensors_hooks_is_enabled():
                    torch._C._autograd._saved_tensors_hooks_enable()


_REGISTRY: dict[str, Strategy] = {}


def register(
    name: str,
    compute_fn: ComputeFn,
    description: str,
    supports_fn: SupportsFn | None = None,
    peer: bool = False,
    compiles: bool = False,
    module: ModuleType | None = None,
    family: str = "transforms",
    eager: str | None = None,
    multi_input: bool = False,
) -> Strategy:
    """Add a strategy; a name that is already registered, or a family not in ``FAMILIES``,
    raises ValueError."""
    if name in _REGISTRY:
        raise ValueError(f"a strategy named {name!r} is already registered")
    if family not in FAMILIES:
        raise ValueError(f"strategy {name!r}: family {family!r} is not one of {FAMILIES}")
    strategy = Strategy(
        name,
        description,
        compute_fn,
        supports_fn or _supports_all,
        peer,
        compiles,
        module,
        family,
        eager,
        multi_input,
    )
    _REGISTRY[name] = strategy
    return strategy


def _register_module(module: ModuleType) -> None:
    register(
        module.NAME,
        module.compute,
        module.DESCRIPTION,
        getattr(module, "supports", None),
        getattr(module, "PEER", False),
        getattr(module, "COMPILES", False),
        module,
        module.FAMILY,
        getattr(module, "EAGER", None),
        getattr(module, "MULTI_INPUT", False),
    )


def names() -> list[str]:
    """Registered strategy names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Strategy:
    """The strategy called ``name``; an unknown name raises KeyError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid names: {', '.join(_REGISTRY)}") from None


def compute(
    name: str,
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
    **options: Any,
) -> Tensor:
    """``get(name).compute(net, params, batch, loss_fn, **options)``."""
    return get(name).compute(net, params, batch, loss_fn, **options)


# One module per strategy; each defines NAME, FAMILY, DESCRIPTION, compute (its keyword
# arguments after the first four are its options) and optionally supports, PEER, COMPILES,
# EAGER and MULTI_INPUT. Registration order is the order of names().
_MODULES = [
    "full_autograd",
    "symmetric_half",
    "torch_func",
    "functorch_api",
    "jacfwd_jacrev",
    "vmap_vjp",
    "vmap_jvp",
    "autograd_functional",
    "block_symmetric",
    "vmap_jvp_chunked",
    "block_symmetric_chunked",
    "torch_func_compiled",
    "vmap_jvp_compiled",
    "jax_hessian",
    "curvlinops_hessian",
    "kron",
    "auto",
]
for _module in _MODULES:
    _register_module(importlib.import_module(f"{__name__}.{_module}"))
