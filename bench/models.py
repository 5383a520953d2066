"""Model factory: the seeded MLP, batch and loss of a benchmark case."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grid import Case

__all__ = ["ACTIVATION_MODULES", "LOSS_FUNCTIONS", "make_problem"]

ACTIVATION_MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
#: mse is None: the strategies' default mean squared error (prepare substitutes it for F.mse_loss)
LOSS_FUNCTIONS = {"mse": None, "ce": F.cross_entropy}


def make_problem(case: Case, seed: int = 0) -> tuple[nn.Sequential, tuple[Tensor, Tensor], object]:
    """The case's MLP, ``(inputs, targets)`` batch and loss function, deterministic in ``seed``.

    Returns:
        ``(net, batch, loss_fn)``: ``net`` an ``nn.Sequential`` of Linear layers and the
        activation, on the case's device and dtype; ``loss_fn`` None for the default MSE or
        ``F.cross_entropy`` with integer class targets.
    """
    generator = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    dims = [case.input] + [case.width] * case.depth + [case.output]
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if k:
            layers.append(ACTIVATION_MODULES[case.activation]())
        layers.append(nn.Linear(a, b))
    net = nn.Sequential(*layers)
    # Initialise from our own generator so a case is the same net whatever ran before it.
    with torch.no_grad():
        for p in net.parameters():
            bound = 1.0 / max(1, p.shape[-1]) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.empty(p.shape).uniform_(-1, 1, generator=generator) * bound)
    net = net.to(device=case.device, dtype=dtype)
    inputs = torch.randn(case.batch, case.input, generator=generator, dtype=dtype)
    if case.loss == "ce":
        targets = torch.randint(0, case.output, (case.batch,), generator=generator)
    else:
        targets = torch.randn(case.batch, case.output, generator=generator, dtype=dtype)
    return net, (inputs.to(case.device), targets.to(case.device)), LOSS_FUNCTIONS[case.loss]
