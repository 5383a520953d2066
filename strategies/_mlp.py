"""What MLP strategies share: the leaves of nested nn.Sequential, and which loss a loss_fn is."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from ._problem import LossFn, mse_loss

__all__ = ["MlpLoss", "flat_modules", "parse_loss"]


@dataclass(frozen=True)
class MlpLoss:
    """A loss an MLP strategy differentiates in closed form."""

    kind: str  # "mse" or "ce"
    reduction: str  # "mean" or "sum"


def flat_modules(seq: nn.Sequential) -> list[nn.Module]:
    """The leaves of nested nn.Sequential containers, repeats kept (iteration does not dedupe)."""
    out: list[nn.Module] = []
    for m in seq:
        if type(m) is nn.Sequential:
            out.extend(flat_modules(m))
        else:
            out.append(m)
    return out


_CE_DEFAULTS = {"weight": None, "ignore_index": -100, "label_smoothing": 0.0}


def parse_loss(loss_fn: LossFn | None) -> MlpLoss:
    """Which loss ``loss_fn`` is; ValueError for anything this strategy cannot differentiate."""
    if loss_fn is None or loss_fn is F.mse_loss or loss_fn is mse_loss:
        return MlpLoss("mse", "mean")
    if loss_fn is F.cross_entropy:
        return MlpLoss("ce", "mean")
    if type(loss_fn) is nn.MSELoss or type(loss_fn) is nn.CrossEntropyLoss:
        kind = "mse" if type(loss_fn) is nn.MSELoss else "ce"
        options = {}
        if kind == "ce":
            options = {
                "weight": loss_fn.weight,
                "ignore_index": loss_fn.ignore_index,
                "label_smoothing": loss_fn.label_smoothing,
            }
        return _checked(kind, loss_fn.reduction, options)
    if isinstance(loss_fn, functools.partial) and loss_fn.func in (F.mse_loss, F.cross_entropy):
        kind = "mse" if loss_fn.func is F.mse_loss else "ce"
        if loss_fn.args:
            raise ValueError("a functools.partial loss with positional arguments is not handled")
        options = dict(loss_fn.keywords)
        reduction = options.pop("reduction", "mean")
        allowed = _CE_DEFAULTS if kind == "ce" else {}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"loss keyword arguments {unknown} are not handled")
        return _checked(kind, reduction, options)
    raise ValueError(
        f"loss_fn {loss_fn!r} is not one this strategy differentiates in closed form: use MSE or "
        "cross-entropy (F.mse_loss, F.cross_entropy, nn.MSELoss, nn.CrossEntropyLoss, "
        "or functools.partial of the functions with reduction=)"
    )


def _checked(kind: str, reduction: str, options: dict) -> MlpLoss:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss reduction {reduction!r} is not handled; use 'mean' or 'sum'")
    for key, value in options.items():
        if value is not _CE_DEFAULTS[key] and value != _CE_DEFAULTS[key]:
            raise ValueError(f"cross-entropy with {key}={value!r} is not handled")
    return MlpLoss(kind, reduction)
