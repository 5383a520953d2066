"""Model-kind tags of a net (layernorm, batchnorm-train, conv, ...), used to route ``auto``,
and what a module does with the batch (``uses_batch_statistics``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ._problem import autograd_enabled

if TYPE_CHECKING:
    from ._problem import Problem

__all__ = ["kinds_of", "kinds_on_path", "kinds_signature", "uses_batch_statistics"]

_MLP_LAYERS = (nn.Linear, nn.Identity, nn.Tanh, nn.Sigmoid, nn.ReLU, nn.GELU, nn.SiLU, nn.Softplus)


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm that normalises with the batch's own statistics.

    torch's rule (``_BatchNorm.forward``): in training mode, and in eval mode where it keeps
    no running statistics (``track_running_stats=False``). Such a module mixes the samples
    of a batch, and its Hessian is what torch.func's batching rules get wrong (functorch#534).
    """
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or (module.running_mean is None and module.running_var is None)
    )


def _tag(m: nn.Module) -> str | None:
    """The model_kind tag of one module, or None for a module that sets no net apart."""
    if isinstance(m, nn.LayerNorm):
        return "layernorm"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "instancenorm"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        # by the statistics it normalises with: eval mode without running ones is "train"
        return "batchnorm-train" if uses_batch_statistics(m) else "batchnorm-eval"
    if isinstance(m, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(m, nn.MultiheadAttention):
        return "attention"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(m, nn.GRU):
        return "gru"
    return None


def kinds_of(net: nn.Module) -> set[str]:
    """The model_kind tags of an arbitrary net, found from its modules.

    "residual" and "tied" live in ``forward`` rather than in the modules, so they are never
    found here; "mlp" means an ``nn.Sequential`` of Linear layers and activations only.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    tags = {tag for m in net.modules() if (tag := _tag(m))}
    layers = list(net.children())
    if isinstance(net, nn.Sequential) and all(isinstance(m, _MLP_LAYERS) for m in layers):
        tags.add("mlp")
    return tags


def kinds_signature(kinds: set[str] | frozenset[str]) -> str:
    """The kinds that set a net apart from a plain MLP, sorted and joined by "+": "" for a plain
    net ("mlp" only says how it is written), "layernorm", "attention+layernorm", "conv".
    ``auto``'s estimate takes a strategy's cost from the measured nets of the same signature
    where the committed runs have them (``bench.auto_table``)."""
    return "+".join(sorted(k for k in kinds if k != "mlp"))


def _tensors(value: object) -> list[Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, Tensor)]


def kinds_on_path(problem: Problem) -> set[str]:
    """The tags of the modules the Hessian's derivatives pass through: those whose output
    depends on the chosen params, found by one forward of the loss at them (the other params
    and buffers are held fixed, detached). A CNN whose last Linear alone is chosen is a
    plain net for the Hessian: its convolutions only compute that Linear's input.

    Where the forward does not show it (it fails here, no module output is seen, or an
    input of the batch already requires grad), every module's tag counts
    (:func:`kinds_of`), as a net of more kinds only ranks the strategies more carefully.
    """
    everything = kinds_of(problem.module)
    if any(t.requires_grad for t in _tensors(problem.inputs)):
        return everything
    tags: set[str] = set()
    seen = []

    def hook(module: nn.Module, args: object, output: object) -> None:
        seen.append(module)
        tag = _tag(module)
        if tag and any(t.requires_grad for t in _tensors(output)):
            tags.add(tag)

    handles = [m.register_forward_hook(hook) for m in problem.module.modules()]
    try:
        leaves = {n: p.detach().requires_grad_(True) for n, p in problem.primal_dict().items()}
        with autograd_enabled():
            problem.loss(leaves)
    except Exception:  # a forward that runs only under a strategy's own transforms
        return everything
    finally:
        for handle in handles:
            handle.remove()
    return tags if seen else everything
