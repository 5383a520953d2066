"""Exact Hessian of an nn.Sequential MLP's loss from the Kronecker structure of weight directions.

For Linear layer k with per-sample input ``ã_{k-1}`` (a trailing 1 for the bias), a unit
change of ``W̃_k[i, j]`` changes the pre-activation ``z_k[b]`` by ``ã_{k-1}[b, j] e_i``. Samples
are independent, so every tangent it causes is ``ã_{k-1}[b, j]`` times the tangent of a unit
change of ``z_k[b, i]``: only ``d_k`` directions per layer are propagated, all at once as a
leading dimension, through closed-form forward and backward passes. For ``l >= k``

    H[(k,i,j), (l,p,q)] = Σ_b ã_{k-1}[b,j] (Ḋ_l^(i)[b,p] ã_{l-1}[b,q] + δ_l[b,p] ȧ_{l-1}^(i)[b,q])

where ``δ_l = ∂L/∂z_l`` per sample and ``Ḋ_l^(i)``, ``ȧ_{l-1}^(i)`` are the tangents of ``δ_l``
and of ``ã_{l-1}`` (zero for ``l = k``). For each ``i`` this is one GEMM,
``ã_{k-1}ᵀ (d_{k-1} x B)`` against a ``B x P_l`` matrix, written straight into the
preallocated Hessian; the blocks with ``l < k`` are transposes of those computed.

Activations enter through their first and second derivatives, taken from ``torch.func.jvp``
so that they match autograd's conventions (e.g. ReLU's derivative 0 at 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

from ._common import LossFn, prepare
from ._mlp import MlpLoss, flat_modules, parse_loss

NAME = "mlp_kron"
FAMILY = "structured"
DESCRIPTION = "closed-form tangents of d_k directions per Linear layer; one GEMM per direction"

#: elementwise activations without parameters: their derivatives are taken by torch.func.jvp
_ACTIVATIONS = (
    nn.Identity,
    nn.Tanh,
    nn.Sigmoid,
    nn.ReLU,
    nn.GELU,
    nn.Softplus,
    nn.ELU,
    nn.LeakyReLU,
)

#: a temporary of one chunk of directions holds at most this fraction of the Hessian's bytes
_CHUNK_FRACTION = 1 / 4
_MIN_CHUNK_BYTES = 1 << 22
_CACHE_BYTES = 1 << 21
#: rows per direction from which a GEMM against the B x P_l product beats small GEMMs
_WIDE_ROWS = 32
#: rows of a block transposed at a time when mirroring
_MIRROR_BAND = 64


@dataclass
class _Layer:
    """One Linear layer and the elementwise activations after it, with what the passes store."""

    name: str
    linear: nn.Linear
    acts: list[nn.Module]
    inputs: Tensor | None = None  # a_{k-1}, B x d_{k-1}
    delta: Tensor | None = None  # ∂L/∂z_k, B x d_k
    #: per activation s: f_s'(u_{s-1}) and f_s''(u_{s-1}) * ∂L/∂u_s
    first: list[Tensor] = field(default_factory=list)
    second_grad: list[Tensor] = field(default_factory=list)


def _parse_net(net: nn.Module) -> tuple[list[nn.Module], list[_Layer]]:
    """The activations before the first Linear, and the layers; ValueError naming what is not an MLP."""
    if type(net) is not nn.Sequential:
        raise ValueError(f"net must be an nn.Sequential MLP, got {type(net).__name__}")
    names = {id(m): n for n, m in net.named_modules()}
    leaves = flat_modules(net)
    pre: list[nn.Module] = []
    layers: list[_Layer] = []
    seen: set[int] = set()
    for m in leaves:
        if type(m) is nn.Linear:
            if id(m) in seen:
                raise ValueError(f"Linear {names[id(m)]!r} is used more than once")
            seen.add(id(m))
            layers.append(_Layer(names[id(m)], m, []))
        elif type(m) in _ACTIVATIONS:
            if type(m) is nn.Identity:
                continue
            (layers[-1].acts if layers else pre).append(m)
        else:
            allowed = ", ".join(t.__name__ for t in (nn.Linear, *_ACTIVATIONS))
            raise ValueError(
                f"module {names.get(id(m), '?')!r} is a {type(m).__name__}; only {allowed} are handled"
            )
    if not layers:
        raise ValueError("net has no nn.Linear layer")
    return pre, layers


def supports(net: nn.Module, loss_fn: LossFn | None) -> tuple[bool, str]:
    """Whether ``net`` is an MLP of Linear layers and elementwise activations, with MSE or CE."""
    try:
        _parse_net(net)
        parse_loss(loss_fn)
    except ValueError as e:
        return False, str(e)
    return True, ""


def _derivatives(act: nn.Module, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``f(u)``, ``f'(u)``, ``f''(u)`` elementwise, by nested forward-mode AD."""
    ones = torch.ones_like(u)

    def first(x: Tensor) -> Tensor:
        # clone: an inplace activation must not overwrite the point it is differentiated at
        return jvp(lambda y: act(y.clone()), (x,), (ones,))[1]

    d1, d2 = jvp(first, (u,), (ones,))
    return act(u.clone()), d1, d2


class _LossTerms:
    """The loss's gradient w.r.t. the outputs and its Hessian-vector product, per sample."""

    def __init__(self, loss: MlpLoss, outputs: Tensor, targets: Tensor):
        B, C = outputs.shape
        self.kind = loss.kind
        if loss.kind == "mse":
            if targets.shape != outputs.shape:
                raise ValueError(
                    f"MSE targets have shape {tuple(targets.shape)}, outputs {tuple(outputs.shape)}: "
                    "they must match (torch would broadcast them)"
                )
            self.scale = 2.0 / (outputs.numel() if loss.reduction == "mean" else 1)
            self.grad = self.scale * (outputs - targets.to(outputs.dtype))
        else:
            if targets.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                raise ValueError("cross-entropy needs class-index targets, not probabilities")
            if targets.shape != (B,):
                raise ValueError(
                    f"cross-entropy targets have shape {tuple(targets.shape)}, expected ({B},)"
                )
            if B and (int(targets.min()) < 0 or int(targets.max()) >= C):
                raise ValueError(f"cross-entropy targets must lie in [0, {C}) (no ignore_index)")
            self.scale = 1.0 / (B if loss.reduction == "mean" else 1)
            self.probs = torch.softmax(outputs, dim=1)
            self.grad = self.scale * (self.probs - F.one_hot(targets.long(), C).to(outputs.dtype))

    def hvp(self, v: Tensor) -> Tensor:
        """``∇²ℓ v`` for tangents ``v`` of shape ``(c, B, C)``."""
        if self.kind == "mse":
            return self.scale * v
        p = self.probs
        pv = (p * v).sum(-1, keepdim=True)
        return self.scale * p * (v - pv)


def _forward_backward(
    pre: list[nn.Module], layers: list[_Layer], inputs: Tensor, loss: MlpLoss, targets: Tensor
) -> _LossTerms:
    """Store each layer's input, δ, and the activation derivatives the tangent passes need."""
    a = inputs
    for act in pre:
        a = act(a.clone())
    caches: list[list[tuple[Tensor, Tensor]]] = []
    for layer in layers:
        layer.inputs = a
        u = F.linear(a, layer.linear.weight.detach(), _bias(layer))
        cache = []
        for act in layer.acts:
            u, d1, d2 = _derivatives(act, u)
            cache.append((d1, d2))
        caches.append(cache)
        a = u
    terms = _LossTerms(loss, a, targets)
    g = terms.grad
    for layer, cache in zip(reversed(layers), reversed(caches)):
        layer.first, layer.second_grad = [], []
        for d1, d2 in reversed(cache):
            layer.first.insert(0, d1)
            layer.second_grad.insert(0, d2 * g)
            g = d1 * g
        layer.delta = g
        g = g @ layer.linear.weight.detach()
    return terms


def _bias(layer: _Layer) -> Tensor | None:
    b = layer.linear.bias
    return None if b is None else b.detach()


def _tangents(
    layers: list[_Layer], k: int, rows: slice, terms: _LossTerms
) -> tuple[list[Tensor], list[Tensor]]:
    """For unit changes of ``z_k[:, i]``, i in ``rows``: ``Ḋ_l`` and ``ȧ_{l-1}`` for l >= k.

    Each has shape ``(c, B, d)``, c = number of directions; ``ȧ_{k-1}`` is None (zero).
    """
    layer = layers[k]
    B, d = layer.delta.shape
    eye = torch.eye(d, dtype=layer.delta.dtype, device=layer.delta.device)
    dz = eye[rows, None, :].expand(-1, B, -1)
    act_inputs: list[list[Tensor]] = []  # per layer: u̇_{s-1} for each activation s
    a_dots: list[Tensor | None] = [None]
    for m in range(k, len(layers)):
        if m > k:
            a_dots.append(dz)
            dz = dz @ layers[m].linear.weight.detach().T
        us = []
        for d1 in layers[m].first:
            us.append(dz)
            dz = d1 * dz
        act_inputs.append(us)
    dg = terms.hvp(dz)
    d_dots: list[Tensor] = []
    for m in range(len(layers) - 1, k - 1, -1):
        lm = layers[m]
        for s in range(len(lm.first) - 1, -1, -1):
            dg = lm.second_grad[s] * act_inputs[m - k][s] + lm.first[s] * dg
        d_dots.append(dg)
        if m > k:
            dg = dg @ lm.linear.weight.detach()
    d_dots.reverse()
    return d_dots, a_dots


def compute(
    net: nn.Module,
    params: Mapping[str, Tensor],
    batch: tuple[Tensor, Tensor],
    loss_fn: LossFn | None = None,
) -> Tensor:
    """The dense Hessian of an MLP's MSE or cross-entropy loss w.r.t. any of its Linear params.

    Raises:
        ValueError: the net or loss is not one this strategy handles (see ``supports``), the
            inputs are not ``B x in_features`` in the params' dtype and device, or the targets
            do not fit the loss.
    """
    pre, layers = _parse_net(net)
    loss = parse_loss(loss_fn)
    problem = prepare(net, params, batch, loss_fn)
    dtype, device = problem.dtype, problem.device
    inputs, targets = problem.inputs, problem.targets
    for layer in layers:
        for p in layer.linear.parameters():
            if p.dtype != dtype or p.device != device:
                raise ValueError(f"Linear {layer.name!r} is not in {dtype} on {device}")
    if inputs.dim() != 2 or inputs.dtype != dtype or inputs.device != device:
        raise ValueError(
            f"inputs must be a (batch, features) tensor in {dtype} on {device}, got "
            f"{tuple(inputs.shape)} {inputs.dtype} on {inputs.device}"
        )
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device}, params on {device}")

    # where each chosen tensor sits: (layer index, "weight" | "bias") -> offset in H
    where: dict[tuple[int, str], int] = {}
    for name, offset in zip(problem.names, problem.offsets):
        prefix, _, kind = name.rpartition(".")
        index = next(i for i, layer in enumerate(layers) if layer.name == prefix)
        where[(index, kind)] = offset

    P = problem.P
    H = torch.empty(P, P, dtype=dtype, device=device)
    with torch.no_grad():
        terms = _forward_backward(pre, layers, inputs, loss, targets)
        _fill_upper(H, layers, where, terms)
        _mirror(H, layers, where)
    return H


def _fill_upper(
    H: Tensor, layers: list[_Layer], where: dict[tuple[int, str], int], terms: _LossTerms
) -> None:
    """Write every block whose row tensor's layer is at most its column tensor's layer."""
    B = terms.grad.shape[0]
    itemsize = H.element_size()
    budget = max(int(H.numel() * itemsize * _CHUNK_FRACTION), _MIN_CHUNK_BYTES)
    for k, layer in enumerate(layers):
        row_w, row_b = where.get((k, "weight")), where.get((k, "bias"))
        if row_w is None and row_b is None:
            continue
        d_out, d_in = layer.linear.weight.shape
        widths = sum(layers[m].linear.weight.shape[0] for m in range(k, len(layers)))
        # tangents of all directions at once, as far as the budget allows (a few per width)
        chunk = max(1, min(d_out, budget // max(1, 4 * B * widths * itemsize)))
        a_t = layer.inputs.T
        # the bias rows' sum over the batch, as a GEMM: a strided sum is several times slower
        ones = torch.ones(1, B, dtype=H.dtype, device=H.device)
        for i0 in range(0, d_out, chunk):
            d_dots, a_dots = _tangents(layers, k, slice(i0, min(i0 + chunk, d_out)), terms)
            for m in range(k, len(layers)):
                col_w, col_b = where.get((m, "weight")), where.get((m, "bias"))
                if col_w is None and col_b is None:
                    continue
                lm = layers[m]
                rows = slice(i0, i0 + d_dots[m - k].shape[0])
                _gemms(
                    H, rows, (row_w, row_b, d_in), (col_w, col_b), a_t, ones, lm,
                    d_dots[m - k], a_dots[m - k],
                )  # fmt: skip


def _gemms(H, rows, row_where, col_where, a_t, ones, lm, u, v) -> None:
    """Rows ``rows`` (directions i) of layer k's tensors against the columns of layer l's tensors.

    Row ``(i, j)`` of the weight has the row feature ``r = ã_{k-1}[:, j]`` (the bias rows have
    ``r = 1``); against layer l's weight columns ``(p, q)`` it is, for all i at once,
    ``U_iᵀ (r ⊙ a_{l-1}) + (r ⊙ δ_l)ᵀ V_i``: a batch over i of small GEMMs written straight
    into H, with no ``B x P_l`` product ever formed.
    """
    row_w, row_b, d_in = row_where
    col_w, col_b = col_where
    c, B, d_l = u.shape
    P = H.shape[1]
    features = []  # (first row of direction rows.start, rows between directions, r)
    wide = row_w is not None and d_in >= _WIDE_ROWS
    if row_w is not None and not wide:
        features += [(row_w + rows.start * d_in + j, d_in, a_t[j]) for j in range(d_in)]
    if row_b is not None:
        features.append((row_b + rows.start, 1, None))
    if col_w is not None:
        u_t = u.transpose(1, 2)
        d_in_l = lm.inputs.shape[1]
        for first, stride, r in features:
            a_l = lm.inputs if r is None else r[:, None] * lm.inputs
            out = H.as_strided(
                (c, d_l, d_in_l),
                (stride * P, d_in_l, 1),
                H.storage_offset() + first * P + col_w,
            )
            # into a contiguous result, then one strided copy: with a strided ``out`` bmm makes
            # one small GEMM call per direction, which stalls when the cores are shared
            block = torch.bmm(u_t, a_l.expand(c, B, d_in_l))
            if v is not None:
                delta = lm.delta if r is None else r[:, None] * lm.delta
                block.baddbmm_(delta.T.expand(c, d_l, B), v)
            out.copy_(block)
        if wide:
            # many rows per direction: one GEMM per direction against its B x P_l product,
            # a few directions at a time so that the product stays in cache
            cols = slice(col_w, col_w + d_l * d_in_l)
            step = max(1, _CACHE_BYTES // (B * d_l * d_in_l * H.element_size()))
            for s0 in range(0, c, step):
                s1 = min(s0 + step, c)
                mw = u[s0:s1, :, :, None] * lm.inputs[None, :, None, :]
                if v is not None:
                    mw.addcmul_(lm.delta[None, :, :, None], v[s0:s1, :, None, :])
                r0, r1 = rows.start + s0, rows.start + s1
                out = H[row_w + r0 * d_in : row_w + r1 * d_in, cols]
                torch.matmul(a_t, mw.view(s1 - s0, B, -1), out=out.view(s1 - s0, d_in, -1))
    if col_b is not None:
        cols = slice(col_b, col_b + d_l)
        if row_w is not None:
            out = H[row_w + rows.start * d_in : row_w + rows.stop * d_in, cols]
            torch.matmul(a_t, u, out=out.view(c, d_in, -1))
        if row_b is not None:
            out = H[row_b + rows.start : row_b + rows.stop, cols]
            torch.matmul(ones, u, out=out.view(c, 1, -1))


def _mirror(H: Tensor, layers: list[_Layer], where: dict[tuple[int, str], int]) -> None:
    """Fill the blocks whose row tensor's layer is after their column tensor's, by transposition."""
    span = {key: (off, _numel(layers[key[0]], key[1])) for key, off in where.items()}
    for (k, _kind_k), (rk, nk) in span.items():
        for (m, _kind_m), (rm, nm) in span.items():
            if m > k:
                src, dst = H[rk : rk + nk, rm : rm + nm], H[rm : rm + nm, rk : rk + nk]
                # in bands of rows: a strided transpose of a whole large block is slower
                for r0 in range(0, nk, _MIRROR_BAND):
                    dst[:, r0 : r0 + _MIRROR_BAND] = src[r0 : r0 + _MIRROR_BAND].T


def _numel(layer: _Layer, kind: str) -> int:
    return getattr(layer.linear, kind).numel()
