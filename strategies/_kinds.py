"""Model-kind tags of a net (layernorm, batchnorm-train, conv, ...), used to route ``auto``."""

from __future__ import annotations

from torch import nn

__all__ = ["kinds_of"]

_MLP_LAYERS = (nn.Linear, nn.Identity, nn.Tanh, nn.Sigmoid, nn.ReLU, nn.GELU, nn.SiLU, nn.Softplus)


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
            tags.add("batchnorm-train" if m.training else "batchnorm-eval")
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
