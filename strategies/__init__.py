"""Registry of strategies that compute the dense Hessian of a loss w.r.t. a net's weights."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from ._common import LossFn, check_inputs, flatten, from_blocks, prepare, to_blocks, unflatten

__all__ = [
    "ComputeFn",
    "SupportsFn",
    "Strategy",
    "names",
    "get",
    "compute",
    "register",
    "prepare",
    "flatten",
    "unflatten",
    "to_blocks",
    "from_blocks",
]

#: ``compute(net, params, batch, loss_fn=None) -> dense P x P Hessian``
ComputeFn = Callable[..., Tensor]
#: ``supports(net, loss_fn) -> (ok, reason)``
SupportsFn = Callable[[nn.Module, "LossFn | None"], "tuple[bool, str]"]


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
    #: the module that defines it; its other public functions (e.g. auto's ``choose``) are
    #: reachable as attributes of the strategy
    module: ModuleType | None = field(default=None, repr=False)

    def __getattr__(self, attr: str) -> Any:
        module = self.__dict__.get("module")
        if module is not None and not attr.startswith("_") and hasattr(module, attr):
            return getattr(module, attr)
        raise AttributeError(f"strategy {self.__dict__.get('name')!r} has no attribute {attr!r}")

    def supports(self, net: nn.Module, loss_fn: LossFn | None = None) -> tuple[bool, str]:
        """Whether this strategy handles ``net`` with ``loss_fn``, and if not, why."""
        return self.supports_fn(net, loss_fn)

    def compute(
        self,
        net: nn.Module,
        params: Mapping[str, Tensor],
        batch: tuple[Tensor, Tensor],
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """The dense ``P x P`` Hessian; raises ValueError where ``supports`` says no."""
        check_inputs(net, params, batch, loss_fn)
        ok, reason = self.supports(net, loss_fn)
        if not ok:
            raise ValueError(f"strategy {self.name!r} does not support this problem: {reason}")
        return self.compute_fn(net, params, batch, loss_fn)


_REGISTRY: dict[str, Strategy] = {}


def register(
    name: str,
    compute_fn: ComputeFn,
    description: str,
    supports_fn: SupportsFn | None = None,
    peer: bool = False,
    compiles: bool = False,
    module: ModuleType | None = None,
) -> Strategy:
    """Add a strategy; a name that is already registered raises ValueError."""
    if name in _REGISTRY:
        raise ValueError(f"a strategy named {name!r} is already registered")
    strategy = Strategy(
        name, description, compute_fn, supports_fn or _supports_all, peer, compiles, module
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
) -> Tensor:
    """``get(name).compute(net, params, batch, loss_fn)``."""
    return get(name).compute(net, params, batch, loss_fn)


# One module per strategy; each defines NAME, DESCRIPTION, compute and optionally supports,
# PEER and COMPILES. Registration order is the order of names().
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
    "mlp_kron",
    "auto",
]
for _module in _MODULES:
    _register_module(importlib.import_module(f"{__name__}.{_module}"))
