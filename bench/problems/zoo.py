"""A zoo of small models held as data, for auditing strategies beyond the MLP grid.

Each entry names a model, tags the kinds of layer it contains (the tags ``auto`` routes on),
and builds a seeded float64 ``(net, batch, loss_fn)`` small enough (P of a few hundred at
most) that both float64 references are quick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.problems.models import LayerNormMLP, small_conv
from strategies import kinds_of

__all__ = ["ZooModel", "ZOO", "names", "get", "build", "kinds_of"]

Built = tuple[nn.Module, tuple[Tensor, Tensor], Callable[[Tensor, Tensor], Tensor]]


@dataclass(frozen=True)
class ZooModel:
    """One audited model.

    Attributes:
        name: short id, used in the audit JSON and on the command line.
        model_kind: tags naming what sets the net apart (e.g. "layernorm", "gru"), the same
            tags :func:`kinds_of` finds in any net. A strategy wrong on a model is routed
            away from every one of its tags, so a model carries only its distinctive ones.
        builder: ``builder() -> (net, (inputs, targets), loss_fn)`` in float64; called under
            a fixed seed by :func:`build`.
        params: names of the parameters to differentiate; None means all of them.
        seed: the seed :func:`build` sets before calling ``builder``.
    """

    name: str
    model_kind: tuple[str, ...]
    builder: Callable[[], Built]
    params: tuple[str, ...] | None = None
    seed: int = 0


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(x + self.inner(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, classes: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        mixed, _ = self.attn(x, x, x, need_weights=True)
        return self.head(mixed.mean(dim=1))


class _EmbeddingPool(nn.Module):
    def __init__(self, vocab: int, dim: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens).mean(dim=1)))


class _TiedAutoencoder(nn.Module):
    """Encoder and decoder share one weight (decoder uses its transpose)."""

    def __init__(self, features: int, code: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(code, features) / features**0.5)
        self.encode_bias = nn.Parameter(torch.randn(code) * 0.1)
        self.decode_bias = nn.Parameter(torch.randn(features) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        code = torch.tanh(F.linear(x, self.weight, self.encode_bias))
        return F.linear(code, self.weight.T, self.decode_bias)


class _GRUHead(nn.Module):
    def __init__(self, features: int, hidden: int) -> None:
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, last = self.gru(x)
        return self.head(last[-1])


def _mlp_tanh() -> Built:
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    return net.double(), (torch.randn(6, 3).double(), torch.randn(6, 2).double()), F.mse_loss


def _mlp_gelu_ce() -> Built:
    net = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))
    return net.double(), (torch.randn(8, 4).double(), torch.randint(0, 3, (8,))), F.cross_entropy


def _mlp_layernorm() -> Built:
    # Linear(4, 6) -> LayerNorm(6) -> Tanh -> Linear(6, 1): where torch.func.hessian is wrong
    net = LayerNormMLP([nn.Linear(4, 6), nn.Linear(6, 1)], "tanh").double()
    return net, (torch.randn(8, 4).double(), torch.randn(8, 1).double()), F.mse_loss


def _batchnorm(train: bool) -> Built:
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).double()
    # A few training passes give the running statistics values other than 0 and 1.
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 3).double() * 2 + 1)
    net.train(train)
    return net, (torch.randn(8, 3).double(), torch.randn(8, 1).double()), F.mse_loss


def _conv_instancenorm() -> Built:
    net = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=2),
        nn.InstanceNorm2d(3, affine=True),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 1),
    ).double()
    with torch.no_grad():  # affine parameters away from their 1 / 0 start
        net[1].weight.add_(torch.randn(3).double() * 0.3)
        net[1].bias.add_(torch.randn(3).double() * 0.3)
    return net, (torch.randn(4, 2, 3, 3).double(), torch.randn(4, 1).double()), F.mse_loss


def _conv() -> Built:
    net = small_conv().double()
    return net, (torch.randn(4, 1, 5, 5).double(), torch.randint(0, 3, (4,))), F.cross_entropy


def _residual() -> Built:
    net = _Residual(4).double()
    return net, (torch.randn(6, 4).double(), torch.randn(6, 2).double()), F.mse_loss


def _attention() -> Built:
    net = _Attention(dim=4, heads=2, classes=3).double().eval()
    return net, (torch.randn(3, 5, 4).double(), torch.randint(0, 3, (3,))), F.cross_entropy


def _embedding() -> Built:
    net = _EmbeddingPool(vocab=7, dim=4, classes=3).double()
    return net, (torch.randint(0, 7, (5, 4)), torch.randint(0, 3, (5,))), F.cross_entropy


def _tied() -> Built:
    net = _TiedAutoencoder(features=4, code=3).double()
    inputs = torch.randn(6, 4).double()
    return net, (inputs, inputs.clone()), F.mse_loss


def _gru() -> Built:
    net = _GRUHead(features=3, hidden=4).double()
    return net, (torch.randn(3, 4, 3).double(), torch.randn(3, 1).double()), F.mse_loss


ZOO: tuple[ZooModel, ...] = (
    ZooModel("mlp_tanh", ("mlp",), _mlp_tanh),
    ZooModel("mlp_gelu_ce", ("mlp",), _mlp_gelu_ce),
    ZooModel("mlp_layernorm", ("layernorm",), _mlp_layernorm),
    ZooModel("batchnorm_eval", ("batchnorm-eval",), lambda: _batchnorm(train=False)),
    ZooModel("batchnorm_train", ("batchnorm-train",), lambda: _batchnorm(train=True)),
    ZooModel("conv", ("conv",), _conv),
    ZooModel("conv_instancenorm", ("instancenorm",), _conv_instancenorm),
    ZooModel("residual", ("residual",), _residual),
    # A subset of the weights: the biases are held fixed, as a caller's mapping may ask.
    ZooModel(
        "attention",
        ("attention",),
        _attention,
        params=("attn.in_proj_weight", "attn.out_proj.weight", "head.weight"),
    ),
    ZooModel("embedding", ("embedding",), _embedding),
    ZooModel("tied", ("tied",), _tied),
    ZooModel("gru", ("gru",), _gru),
)


def names() -> list[str]:
    """Zoo model names, in order."""
    return [m.name for m in ZOO]


def get(name: str) -> ZooModel:
    """The zoo model called ``name``; an unknown name raises KeyError listing the valid ones."""
    for model in ZOO:
        if model.name == name:
            return model
    raise KeyError(f"unknown zoo model {name!r}; valid names: {', '.join(names())}")


def build(
    model: ZooModel, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Tensor], tuple[Tensor, Tensor], Callable]:
    """Seeded ``(net, params, batch, loss_fn)`` for ``model``, params in the net's order.

    Built on the CPU under the model's seed, then moved to ``device``: the same values on
    every device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model.seed)
        net, batch, loss_fn = model.builder()
    net = net.to(device)
    batch = (batch[0].to(device), batch[1].to(device))
    own = dict(net.named_parameters())
    chosen: Sequence[str] = model.params if model.params is not None else list(own)
    return net, {n: own[n] for n in chosen}, batch, loss_fn
