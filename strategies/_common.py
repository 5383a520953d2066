"""Shared pieces of every strategy: input checks, the loss closure, flatten/unflatten, blocks."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "LossFn",
    "Problem",
    "check_inputs",
    "prepare",
    "jacrev_normalisation_hazard",
    "jacrev_path_supports",
    "flatten",
    "unflatten",
    "to_blocks",
    "from_blocks",
    "mirror_upper",
    "mse_loss",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error, the default loss: the same value as ``F.mse_loss(outputs, targets)``.

    Written through ``reduction="sum"`` because in torch 2.13 forward-over-reverse of
    ``F.mse_loss`` with its default mean reduction raises "ZeroTensors are immutable"
    (``jvp(grad(f))`` with ``f`` ending in ``F.mse_loss(out, y)``); the sum reduction works.
    ``prepare`` puts this in place of ``F.mse_loss`` so every strategy can use it.
    """
    return F.mse_loss(outputs, targets, reduction="sum") / outputs.numel()


@dataclass(frozen=True)
class Problem:
    """A checked Hessian problem: the loss as a pure function of the chosen parameters.

    Attributes:
        names: parameter names, in the order of the caller's mapping.
        shapes: their shapes.
        primals: detached copies of their values (the point the Hessian is taken at).
        loss: ``loss(dict name -> tensor) -> scalar``; every other parameter and buffer of
            the net is held fixed at its value, and running statistics are never updated.
        inputs, targets, loss_fn: the batch and loss, as given.
        module: the module the loss evaluates (the net, or a copy that does not update
            BatchNorm running statistics).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    primals: tuple[Tensor, ...]
    loss: Callable[[Mapping[str, Tensor]], Tensor]
    inputs: Tensor
    targets: Tensor
    loss_fn: LossFn
    module: nn.Module

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(s.numel() for s in self.shapes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, total = [], 0
        for n in self.sizes:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def P(self) -> int:
        return sum(self.sizes)

    @property
    def dtype(self) -> torch.dtype:
        return self.primals[0].dtype

    @property
    def device(self) -> torch.device:
        return self.primals[0].device

    def primal_dict(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.primals))

    def flat_primal(self) -> Tensor:
        return flatten(self.primals)

    def flat_loss(self, flat: Tensor) -> Tensor:
        """The loss as a function of one flat vector of all chosen parameters."""
        return self.loss(dict(zip(self.names, unflatten(flat, self.shapes))))


def _updates_running_stats(net: nn.Module) -> bool:
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        and m.running_mean is not None
        for m in net.modules()
    )


def _stateless(net: nn.Module) -> nn.Module:
    """The net itself, or where a forward would update running statistics, a copy that does not.

    In training mode BatchNorm normalises with batch statistics whether or not it tracks
    running ones, so dropping the running buffers in a copy leaves the loss unchanged while
    the net's own buffers stay untouched (and vmap never meets an in-place buffer update).
    """
    if not _updates_running_stats(net):
        return net
    clone = copy.deepcopy(net)
    for m in clone.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
    return clone


def check_inputs(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> LossFn:
    """Check a strategy's inputs; return the loss function to use (the default filled in).

    Raises:
        TypeError: ``net`` is not a Module, ``params`` not a mapping or not floating,
            ``batch`` not an ``(inputs, targets)`` pair of tensors, ``loss_fn`` not callable.
        ValueError: ``params`` empty, naming something that is not the net's parameter of
            that name, or on mixed devices or dtypes.
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
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch must be an (inputs, targets) pair, got {type(batch).__name__}")
    inputs, targets = batch
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            "batch must be an (inputs, targets) pair of tensors, got "
            f"({type(inputs).__name__}, {type(targets).__name__})"
        )
    if loss_fn is None or loss_fn is F.mse_loss:
        loss_fn = mse_loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable(outputs, targets), got {type(loss_fn).__name__}")

    return loss_fn


def jacrev_normalisation_hazard(net: nn.Module) -> str:
    """Why forward-over-``jacrev`` Hessians of ``net`` are wrong in torch 2.13, or "" if not.

    torch.func.hessian (jacfwd(jacrev(f))) returns a wrong, asymmetric Hessian, with no
    error, through BatchNorm that normalises with batch statistics and through LayerNorm and
    InstanceNorm with an affine weight (relative errors of 5% to 33% on small nets): vmap's
    batching rules for normalisation backward (pytorch/functorch issue 534). Strategies on
    that path refuse such nets rather than return a wrong matrix.
    """
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats
        ):
            return f"{name or 'net'} is {type(m).__name__} using batch statistics (functorch#534)"
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            return f"{name or 'net'} is an affine LayerNorm (functorch#534)"
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.affine:
            return f"{name or 'net'} is an affine {type(m).__name__} (functorch#534)"
    return ""


def jacrev_path_supports(net: nn.Module, loss_fn: LossFn | None = None) -> tuple[bool, str]:
    """``supports`` of the strategies on the jacfwd(jacrev) path: no net with that hazard."""
    reason = jacrev_normalisation_hazard(net)
    return (False, f"wrong Hessian upstream: {reason}") if reason else (True, "")


def prepare(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Problem:
    """Check a strategy's inputs and build the loss as a pure function of ``params``.

    Raises the errors of ``check_inputs``; the loss raises ValueError when ``loss_fn`` does
    not return a scalar.
    """
    loss_fn = check_inputs(net, params, batch, loss_fn)
    inputs, targets = batch
    module = _stateless(net)
    names = tuple(params)
    fixed = {n: t.detach() for n, t in module.named_parameters() if n not in params}
    fixed.update(module.named_buffers())

    def loss(p: Mapping[str, Tensor]) -> Tensor:
        outputs = functional_call(module, {**fixed, **p}, (inputs,))
        value = loss_fn(outputs, targets)
        if not isinstance(value, Tensor) or value.dim() != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
        return value

    return Problem(
        names=names,
        shapes=tuple(params[n].shape for n in names),
        primals=tuple(params[n].detach() for n in names),
        loss=loss,
        inputs=inputs,
        targets=targets,
        loss_fn=loss_fn,
        module=module,
    )


def flatten(tensors: tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """Concatenate tensors into one vector, each flattened row-major."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, shapes: tuple[torch.Size, ...]) -> tuple[Tensor, ...]:
    """Split a vector (or the last dimension of a batch of them) back into shaped tensors."""
    sizes = [s.numel() for s in shapes]
    parts = torch.split(flat, sizes, dim=-1)
    return tuple(p.reshape(*flat.shape[:-1], *s) for p, s in zip(parts, shapes))


def to_blocks(H: Tensor, params: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split a dense ``P x P`` Hessian into blocks shaped like torch.func.hessian's output.

    ``blocks[a][b]`` has shape ``params[a].shape + params[b].shape``.
    """
    names = list(params)
    sizes = [params[n].numel() for n in names]
    if H.shape != (sum(sizes), sum(sizes)):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(sum(sizes), sum(sizes))}")
    rows = torch.split(H, sizes, dim=0)
    blocks: dict[str, dict[str, Tensor]] = {}
    for a, row in zip(names, rows):
        cols = torch.split(row, sizes, dim=1)
        blocks[a] = {b: c.reshape(*params[a].shape, *params[b].shape) for b, c in zip(names, cols)}
    return blocks


def from_blocks(blocks: Mapping[str, Mapping[str, Tensor]], params: Mapping[str, Tensor]) -> Tensor:
    """Assemble blocks shaped like torch.func.hessian's output into a dense ``P x P`` matrix."""
    names = list(params)
    sizes = [params[n].numel() for n in names]
    return torch.cat(
        [
            torch.cat([blocks[a][b].reshape(na, nb) for b, nb in zip(names, sizes)], dim=1)
            for a, na in zip(names, sizes)
        ],
        dim=0,
    )


def mirror_upper(H: Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Tensor:
    """Fill the blocks below the block diagonal from those above it, in place."""
    for k in range(len(sizes)):
        rk = slice(offsets[k], offsets[k] + sizes[k])
        for m in range(k + 1, len(sizes)):
            rm = slice(offsets[m], offsets[m] + sizes[m])
            H[rm, rk] = H[rk, rm].T
    return H
