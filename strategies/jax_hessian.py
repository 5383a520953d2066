"""Peer: jax.jit(jax.hessian(f)) of the same nn.Sequential MLP, weights and data, in JAX.

The chosen parameters enter as one flat vector in the params' mapping order, so the result
is the dense ``P x P`` matrix directly; the other parameters are passed as constants. jax is
imported lazily, so ``import strategies`` works without it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ._common import LossFn, prepare
from ._mlp import flat_modules, parse_loss

NAME = "jax_hessian"
FAMILY = "peers"
DESCRIPTION = "peer: jax.jit(jax.hessian) of the same MLP with the weights as one flat vector"
PEER = True
COMPILES = True

#: torch activation -> name of its jax.nn counterpart (GELU handled apart: two variants)
_ACTIVATIONS = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}


def _layers(net: nn.Module) -> tuple[tuple[str, ...], dict[str, tuple[int, str]]]:
    """The net as a tuple of layer kinds, and where each parameter name sits in it.

    Kinds: ``"linear"``, an activation name from ``_ACTIVATIONS``, ``"gelu"`` or
    ``"gelu_tanh"``. Parameter ``name`` is ``(layer index, "weight" | "bias")``.

    Raises:
        ValueError: ``net`` is not an nn.Sequential of Linear layers and those activations.
    """
    if type(net) is not nn.Sequential:
        raise ValueError(f"net must be an nn.Sequential MLP, got {type(net).__name__}")
    names = {id(m): n for n, m in net.named_modules()}
    kinds: list[str] = []
    where: dict[str, tuple[int, str]] = {}
    seen: set[int] = set()
    for m in flat_modules(net):
        if type(m) is nn.Linear:
            if id(m) in seen:
                raise ValueError(f"Linear {names[id(m)]!r} is used more than once")
            seen.add(id(m))
            for part in ("weight", "bias"):
                if getattr(m, part) is not None:
                    where[f"{names[id(m)]}.{part}"] = (len(kinds), part)
            kinds.append("linear")
        elif type(m) is nn.GELU:
            kinds.append("gelu_tanh" if m.approximate == "tanh" else "gelu")
        elif type(m) in _ACTIVATIONS:
            kinds.append(_ACTIVATIONS[type(m)])
        elif type(m) is not nn.Identity:
            allowed = ", ".join(
                t.__name__ for t in (nn.Linear, nn.GELU, nn.Identity, *_ACTIVATIONS)
            )
            raise ValueError(
                f"module {names.get(id(m), '?')!r} is a {type(m).__name__}; only {allowed} are handled"
            )
    if "linear" not in kinds:
        raise ValueError("net has no nn.Linear layer")
    return tuple(kinds), where


def supports(net: nn.Module, loss_fn: LossFn | None) -> tuple[bool, str]:
    """Whether jax is installed, ``net`` an MLP of Linear layers and the activations above, and
    ``loss_fn`` MSE or cross-entropy (as ``mlp_kron`` detects them), and if not, why."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return False, "jax is not installed"
    try:
        _layers(net)
        parse_loss(loss_fn)
    except ValueError as e:
        return False, str(e)
    return True, ""


@functools.lru_cache(maxsize=16)
def _jitted_hessian(kinds: tuple[str, ...], layout: tuple, loss: tuple[str, str]):
    """``jit(hessian(f))`` for one structure; jit itself keeps one compilation per input shape.

    Keyed by the layer kinds, ``layout`` (for each chosen parameter, its layer, part and
    shape, in mapping order) and the loss (kind, reduction); at most 16 structures are kept,
    least recently used first out. The dtype is not in the key: jit compiles per dtype.
    """
    import jax
    import jax.numpy as jnp

    activation = {
        "tanh": jnp.tanh,
        "relu": jax.nn.relu,
        "sigmoid": jax.nn.sigmoid,
        "silu": jax.nn.silu,
        "gelu": functools.partial(jax.nn.gelu, approximate=False),
        "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    }
    kind, reduction = loss
    reduce = jnp.mean if reduction == "mean" else jnp.sum

    def f(flat, fixed, inputs, targets):
        weights = dict(fixed)
        start = 0
        for layer, part, shape in layout:
            size = int(np.prod(shape))
            weights[(layer, part)] = flat[start : start + size].reshape(shape)
            start += size
        out = inputs
        for layer, k in enumerate(kinds):
            if k == "linear":
                out = out @ weights[(layer, "weight")].T
                if (layer, "bias") in weights:
                    out = out + weights[(layer, "bias")]
            else:
                out = activation[k](out)
        if kind == "mse":
            return reduce((out - targets) ** 2)
        logp = jax.nn.log_softmax(out, axis=-1)
        return -reduce(jnp.take_along_axis(logp, targets[:, None], axis=-1))

    return jax.jit(jax.hessian(f))


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    """The dense Hessian computed by JAX on its default device, returned as a torch tensor.

    Raises:
        ValueError: the net or loss is not handled (see ``supports``), the dtype is not
            float32/float64, or the batch does not fit the loss (MSE: outputs and targets of
            one shape; cross-entropy: ``B x C`` logits and ``B`` integer class targets).
    """
    import jax

    problem = prepare(net, params, batch, loss_fn)
    kinds, where = _layers(net)
    loss = parse_loss(loss_fn)
    if problem.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"jax_hessian handles float32 and float64, got {problem.dtype}")
    inputs, targets = problem.inputs, problem.targets
    if not inputs.is_floating_point() or inputs.dtype != problem.dtype:
        raise ValueError(f"inputs must have the params' dtype {problem.dtype}, got {inputs.dtype}")
    if loss.kind == "ce":
        if targets.is_floating_point() or targets.dim() != 1 or inputs.dim() != 2:
            raise ValueError(
                "cross-entropy needs B x C logits and B integer class targets, got inputs "
                f"{tuple(inputs.shape)} and {targets.dtype} targets {tuple(targets.shape)}"
            )
        classes = [m for m in flat_modules(net) if type(m) is nn.Linear][-1].out_features
        if targets.numel() and not (0 <= int(targets.min()) and int(targets.max()) < classes):
            raise ValueError(f"cross-entropy targets must be class indices in [0, {classes})")
    elif targets.dtype != problem.dtype:
        raise ValueError(f"MSE targets must have the params' dtype {problem.dtype}")

    chosen = {where[n] for n in problem.names}
    layout = tuple((*where[n], tuple(s)) for n, s in zip(problem.names, problem.shapes))
    hessian = _jitted_hessian(kinds, layout, (loss.kind, loss.reduction))

    def numpy(t: Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    own = dict(net.named_parameters())
    fixed = {key: numpy(own[name]) for name, key in where.items() if key not in chosen}
    with jax.enable_x64(problem.dtype == torch.float64):
        H = np.array(hessian(numpy(problem.flat_primal()), fixed, numpy(inputs), numpy(targets)))
    return torch.from_numpy(H).to(device=problem.device, dtype=problem.dtype)
