"""Model factory: the seeded net, batch and loss of a benchmark case, in each way it is written."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grid import HEADS, MLP_ARCHS, SEQUENCE, Case

__all__ = [
    "ACTIVATION_MODULES",
    "LOSS_FUNCTIONS",
    "CustomMLP",
    "LayerNormMLP",
    "custom_mse",
    "small_conv",
    "Model",
    "ConvNet",
    "PoissonPINN",
    "HessianPINN",
    "TransformerBlock",
    "TokenClassifier",
    "make_problem",
    "chosen_params",
]

ACTIVATION_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
#: mse is None: the strategies' default mean squared error (prepare substitutes it for F.mse_loss)
LOSS_FUNCTIONS = {"mse": None, "ce": F.cross_entropy}


class CustomMLP(nn.Module):
    """The net as users write it: Linear layers in attributes, a forward of its own that ends
    in ``squeeze(-1)``, so a one-output net returns ``(batch,)``."""

    def __init__(self, linears: list[nn.Linear], activation: str):
        super().__init__()
        self.fcs = nn.ModuleList(linears)
        self.act = ACTIVATION_MODULES[activation]()

    def forward(self, x: Tensor) -> Tensor:
        for fc in self.fcs[:-1]:
            x = self.act(fc(x))
        return self.fcs[-1](x).squeeze(-1)


def custom_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """The hand-written loss that goes with ``CustomMLP``: mean over the batch dimension."""
    return torch.mean((outputs - targets) ** 2, dim=0)


class LayerNormMLP(nn.Module):
    """An MLP with an affine LayerNorm after each hidden Linear, before the activation."""

    def __init__(self, linears: list[nn.Linear], activation: str):
        super().__init__()
        self.fcs = nn.ModuleList(linears)
        self.norms = nn.ModuleList(nn.LayerNorm(fc.out_features) for fc in linears[:-1])
        self.act = ACTIVATION_MODULES[activation]()

    def forward(self, x: Tensor) -> Tensor:
        for fc, norm in zip(self.fcs[:-1], self.norms):
            x = self.act(norm(fc(x)))
        return self.fcs[-1](x)


def small_conv() -> nn.Sequential:
    """A 3x3 convolution of a 1 x 5 x 5 image, tanh, then a Linear head of 3 classes: the
    audit's ``conv`` model (``bench.problems.zoo``) and the tests' conv net."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))


class Model(nn.Module):
    """A forum thread's Model, verbatim but for its sizes: two Linear layers in attributes."""

    def __init__(self, n_in: int = 1, hidden: int = 16, n_out: int = 1, activation: str = "tanh"):
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.act = ACTIVATION_MODULES[activation]()
        self.fc2 = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNet(nn.Module):
    """A small image classifier: conv, activation and pooling blocks, then (where ``hidden``)
    a hidden Linear ``hidden`` with the activation, and a Linear head ``fc``."""

    def __init__(
        self, side: int, channels: int, blocks: int, classes: int, activation: str, hidden: int = 0
    ):
        super().__init__()
        convs = [
            nn.Conv2d(1 if k == 0 else channels, channels, 3, padding=1) for k in range(blocks)
        ]
        self.convs = nn.ModuleList(convs)
        self.act = ACTIVATION_MODULES[activation]()
        self.pool = nn.MaxPool2d(2)
        features = channels * (side // 2**blocks) ** 2
        self.hidden = nn.Linear(features, hidden) if hidden else None
        self.fc = nn.Linear(hidden or features, classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = self.pool(self.act(conv(x)))
        x = torch.flatten(x, 1)
        if self.hidden is not None:
            x = self.act(self.hidden(x))
        return self.fc(x)


class PoissonPINN(nn.Module):
    """A PINN for Poisson's equation: the forward returns ``-laplacian(u)`` at the points ``x``,
    its derivatives by ``torch.autograd.grad(..., create_graph=True)``, as most PINNs do."""

    def __init__(self, u: nn.Module):
        super().__init__()
        self.u = u

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        u = self.u(x)
        (du,) = torch.autograd.grad(u, x, torch.ones_like(u), create_graph=True)
        laplacian = torch.zeros_like(u)
        for i in range(x.shape[1]):
            (d2u,) = torch.autograd.grad(du[:, i].sum(), x, create_graph=True)
            laplacian = laplacian + d2u[:, i : i + 1]
        return -laplacian


class HessianPINN(nn.Module):
    """The same PINN with ``-laplacian(u)`` from ``vmap(hessian(u))`` in the inputs."""

    def __init__(self, u: nn.Module):
        super().__init__()
        self.u = u

    def forward(self, x: Tensor) -> Tensor:
        def u_at(point: Tensor) -> Tensor:
            return self.u(point).squeeze()

        hessians = torch.func.vmap(torch.func.hessian(u_at))(x)
        return -hessians.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)


def pinn_loss(residual: Tensor, source: Tensor) -> Tensor:
    """The PINN's loss as written: the mean squared residual of ``-laplacian(u) = f``."""
    return ((residual - source) ** 2).mean()


class TransformerBlock(nn.Module):
    """A pre-LayerNorm block: self-attention (weights returned) and an MLP, both residual."""

    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width),
            ACTIVATION_MODULES[activation](),
            nn.Linear(2 * width, width),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        attended, _ = self.attn(h, h, h, need_weights=True)
        x = x + attended
        return x + self.mlp(self.norm2(x))


class TokenClassifier(nn.Module):
    """Per-token logits: an input projection, transformer blocks, a Linear head."""

    def __init__(self, n_in: int, width: int, blocks: int, classes: int, activation: str):
        super().__init__()
        self.proj = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, HEADS, activation) for _ in range(blocks)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


#: per arch, the module whose parameters are the chosen ones (the rest are not differentiated)
_CHOSEN_MODULE = {"cnn": "fc"}


def chosen_params(case: Case, net: nn.Module) -> dict[str, Tensor]:
    """The parameters whose Hessian the case asks for, by name: all of the net's, or for
    ``cnn`` the Linear head's alone. ``case.P`` is their number of entries."""
    prefix = _CHOSEN_MODULE.get(case.arch)
    return {n: p for n, p in net.named_parameters() if prefix is None or n.startswith(f"{prefix}.")}


def _seeded(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """``net`` with every parameter drawn from ``generator`` (a fan-in scaled uniform), so
    that a case is the same net whatever ran before it; LayerNorm keeps its ones and zeros."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.LayerNorm):
                continue
            for p in module.parameters(recurse=False):
                fan_in = p[0].numel() if p.dim() > 1 else 0
                bound = 1.0 / max(1, fan_in) ** 0.5 if fan_in else 0.1
                p.copy_(torch.empty(p.shape).uniform_(-1, 1, generator=generator) * bound)
    return net


def _user_problem(case: Case, generator: torch.Generator) -> tuple[nn.Module, Tensor, Tensor, Any]:
    """A case's net (float32, cpu), inputs, targets and loss, as users write them: every arch
    but ``MLP_ARCHS``."""
    B, act = case.batch, case.activation
    if case.arch == "forum":
        net: nn.Module = Model(case.input, case.width, case.output, act)
        inputs = torch.randn(B, case.input, generator=generator)
        return net, inputs, torch.randn(B, case.output, generator=generator), nn.MSELoss()
    if case.arch in ("cnn", "convnet"):
        hidden = 4 * case.width if case.arch == "convnet" else 0
        net = ConvNet(case.input, case.width, case.depth, case.output, act, hidden)
        inputs = torch.randn(B, 1, case.input, case.input, generator=generator)
        targets = torch.randint(0, case.output, (B,), generator=generator)
        return net, inputs, targets, nn.CrossEntropyLoss()
    if case.arch in ("pinn_grad", "pinn_hessian"):
        dims = [case.input] + [case.width] * case.depth + [1]
        layers: list[nn.Module] = []
        for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [nn.Tanh()] if k else []
            layers.append(nn.Linear(a, b))
        pinn = PoissonPINN if case.arch == "pinn_grad" else HessianPINN
        net = pinn(nn.Sequential(*layers))
        inputs = torch.rand(B, case.input, generator=generator)
        return net, inputs, torch.randn(B, 1, generator=generator), pinn_loss
    if case.arch == "transformer":
        net = TokenClassifier(case.input, case.width, case.depth, case.output, act)
        inputs = torch.randn(B, SEQUENCE, case.input, generator=generator)
        targets = torch.randint(0, case.output, (B, SEQUENCE), generator=generator)
        classes = case.output
        return (
            net,
            inputs,
            targets,
            lambda logits, y: F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1)),
        )
    if case.arch == "weighted":
        dims = [case.input] + [case.width] * case.depth + [case.output]
        layers = []
        for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers += [ACTIVATION_MODULES[act]()] if k else []
            layers.append(nn.Linear(a, b))
        net = nn.Sequential(*layers)
        inputs = torch.randn(B, case.input, generator=generator)
        targets = torch.randn(B, case.output, generator=generator)
        weights = torch.rand(B, generator=generator) + 0.5
        return net, inputs, targets, lambda out, y: (weights * ((out - y) ** 2).sum(-1)).mean()
    raise ValueError(f"arch {case.arch!r} is an MLP form (bench.problems.grid.MLP_ARCHS)")


def make_problem(case: Case, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor], object]:
    """The case's net, ``(inputs, targets)`` batch and loss function, deterministic in ``seed``.

    The Linear weights are the same whatever MLP ``case.arch``: the ``custom`` form of a
    case has the weights of its ``nn.Sequential`` form. Any other arch is built as
    its users write it (``bench.problems.grid.ARCHS`` says how), with its own loss.

    Returns:
        ``(net, batch, loss_fn)``: ``net`` on the case's device and dtype; ``loss_fn`` None
        for the default MSE, ``F.cross_entropy`` with integer class targets, for the
        ``custom`` form ``custom_mse`` with ``(batch,)`` targets, or a user net's own loss.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    if case.arch not in MLP_ARCHS:
        net, inputs, targets, user_loss = _user_problem(case, generator)
        net = _seeded(net, generator).to(device=case.device, dtype=dtype)
        inputs = inputs.to(device=case.device, dtype=dtype)
        if targets.is_floating_point():
            targets = targets.to(dtype)
        return net, (inputs, targets.to(case.device)), user_loss
    dims = [case.input] + [case.width] * case.depth + [case.output]
    linears = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
    # Initialise from our own generator so a case is the same net whatever ran before it.
    with torch.no_grad():
        for p in (p for fc in linears for p in fc.parameters()):
            bound = 1.0 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.empty(p.shape).uniform_(-1, 1, generator=generator) * bound)
    net: nn.Module
    if case.arch == "custom":
        net = CustomMLP(linears, case.activation)
    elif case.arch == "layernorm":
        net = LayerNormMLP(linears, case.activation)
    else:
        layers: list[nn.Module] = []
        for k, fc in enumerate(linears):
            layers += [ACTIVATION_MODULES[case.activation]()] if k else []
            layers.append(fc)
        net = nn.Sequential(*layers)
    net = net.to(device=case.device, dtype=dtype)
    inputs = torch.randn(case.batch, case.input, generator=generator, dtype=dtype)
    loss_fn = LOSS_FUNCTIONS[case.loss]
    if case.loss == "ce":
        targets = torch.randint(0, case.output, (case.batch,), generator=generator)
    else:
        targets = torch.randn(case.batch, case.output, generator=generator, dtype=dtype)
    if case.arch == "custom":
        targets, loss_fn = targets.squeeze(-1), custom_mse
    return net, (inputs.to(case.device), targets.to(case.device)), loss_fn
