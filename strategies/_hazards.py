"""The normalisation hazards: where torch 2.13 differentiates a normalisation op wrongly.

``jacrev_normalisation_hazard`` looks at the modules alone (``supports`` of the jacfwd(jacrev)
strategies); ``hazard``/``refuse_hazard`` look at the normalisation ops the probe forward of
``_contract.prepare`` recorded, along a path of differentiation (``JACREV_PATH``,
``DOUBLE_BACKWARD``, ``LEGACY_VMAP_FORWARD``, ``ANY_PATH``). docs/DESIGN.md, "The strategy
contract".
"""

from __future__ import annotations

from torch import nn

from ._kinds import uses_batch_statistics
from ._problem import LossFn, NormCall, Problem, torch_version

__all__ = [
    "jacrev_normalisation_hazard",
    "jacrev_path_supports",
    "BATCH_NORM_OPS",
    "NORM_OPS",
    "JACREV_PATH",
    "DOUBLE_BACKWARD",
    "LEGACY_VMAP_FORWARD",
    "ANY_PATH",
    "hazard",
    "refuse_hazard",
]


def jacrev_normalisation_hazard(net: nn.Module) -> str:
    """Why forward-over-``jacrev`` Hessians of ``net`` are wrong in torch 2.13, or "" if not.

    torch.func.hessian (jacfwd(jacrev(f))) returns a wrong, asymmetric Hessian, with no
    error, through BatchNorm that normalises with batch statistics and through LayerNorm and
    InstanceNorm with an affine weight (relative errors of 5% to 33% on small nets): vmap's
    batching rules for normalisation backward (pytorch/functorch issue 534). Strategies on
    that path refuse such nets rather than return a wrong matrix. This looks at the modules
    only; ``hazard(problem, JACREV_PATH)`` also finds the functional calls
    (``F.layer_norm`` ...) in a custom forward, from the probe forward of ``prepare``.
    """
    for name, m in net.named_modules():
        if uses_batch_statistics(m):
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


# --- normalisation ops through which some differentiation paths of torch 2.13 go wrong ---

BATCH_NORM_OPS = frozenset(
    {
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_batch_norm_with_update",
        "cudnn_batch_norm",
        "miopen_batch_norm",
    }
)
NORM_OPS = BATCH_NORM_OPS | {"native_layer_norm", "native_group_norm"}

#: a path of differentiation: torch.func's jacfwd(jacrev(f)) (torch_func, functorch,
#: jacfwd_jacrev); reverse-over-reverse (full_autograd, symmetric_half, vmap_vjp); the
#: legacy vmap over forward-mode jacobians (autograd_functional)
JACREV_PATH = "jacfwd(jacrev) of torch.func"
DOUBLE_BACKWARD = "double backward"
LEGACY_VMAP_FORWARD = "torch.autograd.functional's vectorized forward-mode jacobian"
#: every path: torch 2.13 cannot take even the gradient
ANY_PATH = "any differentiation"


def _wrong_on(call: NormCall) -> dict[str, str]:
    """The paths on which torch 2.13 is wrong or fails through ``call``, each with why.

    Measured against central finite differences of the gradient on small float64 nets, for
    every op with no affine parameter, a weight, a bias, or both (tests/test_contract.py): a
    Hessian along a path not listed here matched them.
    """
    out: dict[str, str] = {}
    is_batch = call.op in BATCH_NORM_OPS
    if call.weight_grad and (
        call.op == "native_layer_norm" or (is_batch and call.batch_statistics)
    ):
        out[JACREV_PATH] = (
            "returns a wrong Hessian (3% to 80% off) through it with a differentiated affine "
            "weight: vmap's batching rule of the normalisation backward (functorch#534)"
        )
    if (call.op == "native_layer_norm" or is_batch) and call.bias_grad and not call.weight:
        out[DOUBLE_BACKWARD] = (
            "fails or returns a wrong Hessian (20% to 80% off) through it with a "
            "differentiated bias and no weight"
        )
    if call.op == "native_group_norm":
        out[LEGACY_VMAP_FORWARD] = "fails through it (a tangent of the wrong shape)"
        if call.bias_grad and not call.weight:
            out[ANY_PATH] = "cannot differentiate it w.r.t. a bias given without a weight"
    return out


def hazard(problem: Problem, path: str) -> str:
    """Why torch 2.13 differentiates ``problem``'s forward wrongly along ``path``, or ""."""
    for call in problem.norm_calls:
        why = _wrong_on(call).get(path)
        if why:
            return f"the forward calls aten.{call.op}; torch {torch_version()}'s {path} {why}"
    return ""


def refuse_hazard(problem: Problem, path: str, strategy: str) -> None:
    """Raise ValueError where ``hazard(problem, path)`` finds one, naming ``strategy``."""
    reason = hazard(problem, path)
    if reason:
        raise ValueError(f"strategy {strategy!r} refuses this problem: {reason}")
