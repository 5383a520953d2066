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

from ._contract import prepare, user_hooks
from ._memory import available_bytes
from ._mlp import flat_modules, parse_loss
from ._problem import LossFn

__all__ = ["NAME", "FAMILY", "DESCRIPTION", "PEER", "COMPILES", "supports", "compute"]

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
                if getattr(m, part) is not None and m._parameters.get(part) is None:
                    # a forward pre-hook or a parametrization makes it from other tensors
                    raise ValueError(
                        f"Linear {names[id(m)]!r} computes its {part} from "
                        f"{sorted(n for n, _ in m.named_parameters()) or 'buffers'} (pruning, "
                        "nn.utils.weight_norm or a parametrization), which jax_hessian does not "
                        "reproduce"
                    )
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
    """Whether jax is installed, ``net`` an MLP of Linear layers and the activations above with
    no forward hook or pre-hook (``user_hooks``), and ``loss_fn`` MSE or cross-entropy (as
    ``mlp_kron`` detects them), and if not, why."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return False, "jax is not installed"
    hooks = user_hooks(net)
    if hooks:
        return False, f"it rebuilds the net from its layers, so it would ignore the {hooks[0]}"
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

    The flat vector is cut with one ``jnp.split``, as ``jax.flatten_util.ravel_pytree``
    does, not with a slice per parameter: the transpose of a slice is a ``P``-long pad, so
    the reverse pass summed one padded ``P x P`` block per parameter tensor (10 for a
    4-hidden-layer MLP) where a split's transpose is one concatenation. With slices this peer
    was 1.2x to 1.6x slower than a plain ``jax.jit(jax.hessian)`` of a raveled pytree at
    P = 4,801 and 13,121 (interleaved rounds on a shared 2-core CPU); with the split, on par.
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
    cuts = np.cumsum([int(np.prod(shape)) for _, _, shape in layout])[:-1].tolist()

    def f(flat, fixed, inputs, targets):
        weights = dict(fixed)
        for (layer, part, shape), piece in zip(layout, jnp.split(flat, cuts)):
            weights[(layer, part)] = piece.reshape(shape)
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


def _jax_available_bytes() -> int | None:
    """Memory jax can still allocate on its default device, or None where it cannot be told."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return available_bytes(torch.device("cpu"))
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def _check_fits(needed: int, what: str) -> None:
    """MemoryError where ``needed`` bytes exceed what jax's device has free.

    XLA aborts the whole process (SIGABRT) when an allocation fails, so a problem too large
    must be refused before the executable runs.
    """
    available = _jax_available_bytes()
    if available is not None and needed > available:
        raise MemoryError(
            f"jax_hessian needs {needed / 2**30:.2f} GiB ({what}) but only "
            f"{available / 2**30:.2f} GiB are available; XLA would abort the process"
        )


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
        MemoryError: the Hessian, or the compiled executable's output and scratch memory,
            exceed the memory free on jax's device (checked before anything is allocated).
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
    itemsize = torch.empty((), dtype=problem.dtype).element_size()
    _check_fits(problem.P * problem.P * itemsize, f"the {problem.P} x {problem.P} Hessian alone")

    chosen = {where[n] for n in problem.names}
    layout = tuple((*where[n], tuple(s)) for n, s in zip(problem.names, problem.shapes))
    hessian = _jitted_hessian(kinds, layout, (loss.kind, loss.reduction))

    def numpy(t: Tensor) -> np.ndarray:
        return t.detach().cpu().numpy()

    own = dict(net.named_parameters())
    fixed = {key: numpy(own[name]) for name, key in where.items() if key not in chosen}
    args = (numpy(problem.flat_primal()), fixed, numpy(inputs), numpy(targets))
    with jax.enable_x64(problem.dtype == torch.float64):
        # Lowering and compiling here hits jit's own cache after the first call (well under a
        # millisecond), and tells the executable's whole footprint before it runs.
        executable = hessian.lower(*args).compile()
        memory = executable.memory_analysis()
        if memory is not None:
            _check_fits(
                memory.output_size_in_bytes + memory.temp_size_in_bytes,
                "the Hessian and XLA's scratch memory",
            )
        H = executable(*args)
    # dlpack shares jax's buffer: copying the P x P result into numpy took 0.35 s at
    # P = 13,121 (0.05 s at 4,801) on a 2-core CPU, time no plain jax user spends.
    return torch.from_dlpack(H).to(device=problem.device, dtype=problem.dtype)
