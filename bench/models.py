"""Model factory: the seeded net, batch and loss of a benchmark case, in each way it is written."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grid import Case

__all__ = [
    "ACTIVATION_MODULES",
    "LOSS_FUNCTIONS",
    "CustomMLP",
    "LayerNormMLP",
    "custom_mse",
    "make_problem",
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


def make_problem(case: Case, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor], object]:
    """The case's net, ``(inputs, targets)`` batch and loss function, deterministic in ``seed``.

    The Linear weights are the same whatever ``case.arch``: the ``custom`` form of a case
    has the weights of its ``nn.Sequential`` form.

    Returns:
        ``(net, batch, loss_fn)``: ``net`` on the case's device and dtype; ``loss_fn`` None
        for the default MSE, ``F.cross_entropy`` with integer class targets, or for the
        ``custom`` form ``custom_mse`` with ``(batch,)`` targets.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
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
