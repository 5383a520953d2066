"""Model-kind tags of a net (layernorm, batchnorm-train, conv, ...), used to route ``auto``,
and what a module does with the batch (``uses_batch_statistics``)."""

from __future__ import annotations

from torch import nn

__all__ = ["kinds_of", "kinds_signature", "uses_batch_statistics"]

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


def kinds_of(net: nn.Module) -> set[str]:
    """The model_kind tags of an arbitrary net, found from its modules.

    "residual" and "tied" live in ``forward`` rather than in the modules, so they are never
    found here; "mlp" means an ``nn.Sequential`` of Linear layers and activations only.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
    tags = set()
    for m in net.modules():
        if isinstance(m, nn.LayerNorm):
            tags.add("layernorm")
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            tags.add("instancenorm")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            # by the statistics it normalises with: eval mode without running ones is "train"
            tags.add("batchnorm-train" if uses_batch_statistics(m) else "batchnorm-eval")
        elif isinstance(m, nn.modules.conv._ConvNd):
            tags.add("conv")
        elif isinstance(m, nn.MultiheadAttention):
            tags.add("attention")
        elif isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            tags.add("embedding")
        elif isinstance(m, nn.GRU):
            tags.add("gru")
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
