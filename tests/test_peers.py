"""The peers (jax_hessian, curvlinops): exact in float64, honest refusals, and no crash."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strategies
from bench.reference import loop_hessian
from strategies import curvlinops_hessian, jax_hessian

PEERS = {"jax_hessian": "jax", "curvlinops": "curvlinops"}


def _mlp(activation: type[nn.Module] = nn.Tanh, sizes=(3, 5, 4, 2)) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers[:-1])


class _Custom(nn.Module):
    """Not a Sequential: a free parameter, a buffer, one Linear used twice, maybe one unused."""

    def __init__(self, spare: bool = False) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        if spare:
            self.spare = nn.Parameter(torch.randn(3))
        self.mix = nn.Parameter(torch.randn(4, 2))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x):
        h = self.inner(x)
        return torch.sin(h) @ self.mix * self.scale + h[:, :2] ** 2


def _regression(net, loss_fn=None, n: int = 7, spread: float = 1.0):
    outputs = net(torch.randn(1, 3)).shape[-1]
    return net, (torch.randn(n, 3), spread * torch.randn(n, outputs)), loss_fn


def _classification(net, loss_fn, n: int = 9):
    classes = net(torch.randn(1, 3)).shape[-1]
    return net, (torch.randn(n, 3), torch.randint(0, classes, (n,))), loss_fn


#: name -> (net, batch, loss_fn, parameter names or None for all), built in float64
CASES = {
    "tanh_mse": lambda: _regression(_mlp()),
    "gelu_ce": lambda: _classification(_mlp(nn.GELU, (3, 6, 5)), F.cross_entropy),
    "mse_sum_subset": lambda: (
        *_regression(_mlp(), functools.partial(F.mse_loss, reduction="sum")),
        ["4.bias", "2.weight", "0.bias"],
    ),
    "custom_module": lambda: _regression(_Custom()),
    "ce_module_options": lambda: _classification(
        _mlp(sizes=(3, 4, 3)),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1),
    ),
    "bce_with_logits": lambda: (
        _mlp(),
        (torch.randn(6, 3), torch.rand(6, 2)),
        nn.BCEWithLogitsLoss(reduction="sum"),
    ),
    # residuals on both sides of delta
    "huber": lambda: _regression(_mlp(), nn.HuberLoss(delta=0.5), spread=2.0),
    # gradients that do not depend on the parameters: "spare"'s, and the last bias's under
    # L1 and NLL of the logits (curvlinops alone fails there, see the fallback in compute)
    "unused_parameter": lambda: _regression(_Custom(spare=True)),
    "l1": lambda: _regression(_mlp(), nn.L1Loss(reduction="sum")),
    "nll_of_logits": lambda: _classification(_mlp(sizes=(3, 4, 3)), nn.NLLLoss()),
    "nll_of_log_softmax": lambda: _classification(
        nn.Sequential(_mlp(sizes=(3, 4, 3)), nn.LogSoftmax(dim=-1)), nn.NLLLoss()
    ),
}
SHARED = ["tanh_mse", "gelu_ce", "mse_sum_subset"]


def _build(case: str):
    torch.manual_seed(0)
    net, batch, loss_fn, *names = CASES[case]()
    net = net.double()
    if isinstance(loss_fn, nn.Module):
        loss_fn = loss_fn.double()
    inputs, targets = batch
    batch = (inputs.double(), targets.double() if targets.is_floating_point() else targets)
    own = dict(net.named_parameters())
    params = {n: own[n] for n in (names[0] if names else own)}
    return net, params, batch, loss_fn


@pytest.mark.parametrize(
    "name, case",
    [(name, case) for name in PEERS for case in SHARED]
    + [("curvlinops", case) for case in CASES if case not in SHARED],
)
def test_peer_is_exact_in_float64(name: str, case: str) -> None:
    pytest.importorskip(PEERS[name])
    net, params, batch, loss_fn = _build(case)
    assert strategies.get(name).supports(net, loss_fn) == (True, "")
    H = strategies.compute(name, net, params, batch, loss_fn)
    expected = loop_hessian(net, list(params), batch, loss_fn)
    assert H.dtype == torch.float64
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["unused_parameter", "l1", "nll_of_logits"])
def test_curvlinops_fallback_cases_do_hit_the_vmap_failure(case: str) -> None:
    """Those cases exercise the fallback: curvlinops alone raises there."""
    pytest.importorskip("curvlinops")
    net, params, batch, loss_fn = _build(case)
    problem = strategies.prepare(net, params, batch, loss_fn)
    with pytest.raises(RuntimeError, match="must match the existing size"):
        curvlinops_hessian._materialise(net, problem, curvlinops_hessian.loss_module(loss_fn))


def test_curvlinops_maps_functional_losses_to_modules() -> None:
    module = curvlinops_hessian.loss_module
    assert type(module(None)) is nn.MSELoss and module(None).reduction == "mean"
    assert type(module(F.mse_loss)) is nn.MSELoss
    ce = module(functools.partial(F.cross_entropy, reduction="sum", label_smoothing=0.2))
    assert type(ce) is nn.CrossEntropyLoss
    assert (ce.reduction, ce.label_smoothing) == ("sum", 0.2)
    huber = nn.HuberLoss()
    assert module(huber) is huber


@pytest.mark.parametrize(
    "net, loss_fn, reason",
    [
        (_mlp(), lambda o, t: ((o - t) ** 2).mean(), "nn.Module loss"),
        (_mlp(), nn.SoftMarginLoss(), "SoftMarginLoss"),
        (_mlp(), nn.MSELoss(reduction="none"), "reduction 'mean' or 'sum'"),
        (_mlp(), functools.partial(F.mse_loss, reduction="mean", weight=None), "no module"),
        (_mlp(), functools.partial(F.cross_entropy, torch.zeros(1)), "positional"),
        (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), None, "LayerNorm"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), None, "BatchNorm1d"),
    ],
)
def test_curvlinops_refuses_with_a_reason(net, loss_fn, reason: str) -> None:
    pytest.importorskip("curvlinops")
    ok, why = strategies.get("curvlinops").supports(net, loss_fn)
    assert not ok and reason in why
    batch = (torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="does not support"):
        strategies.compute("curvlinops", net, dict(net.named_parameters()), batch, loss_fn)


@pytest.mark.parametrize("inputs", [torch.tensor(1.0), torch.randn(0, 3)])
def test_curvlinops_needs_a_sample(inputs: torch.Tensor) -> None:
    pytest.importorskip("curvlinops")
    net = _mlp()
    targets = torch.randn(*inputs.shape[:1], 2)
    # the input contract answers first: an empty batch, or inputs the net cannot take
    with pytest.raises(ValueError, match="the batch is empty|the loss fails at these params"):
        strategies.compute("curvlinops", net, dict(net.named_parameters()), (inputs, targets))


def test_curvlinops_without_curvlinops(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "curvlinops", None)
    net = _mlp()
    s = strategies.get("curvlinops")
    assert s.supports(net, None) == (False, "curvlinops is not installed")
    with pytest.raises(ValueError, match="curvlinops is not installed"):
        s.compute(net, dict(net.named_parameters()), (torch.randn(4, 3), torch.randn(4, 2)))


def test_curvlinops_is_a_peer_that_does_not_compile() -> None:
    s = strategies.get("curvlinops")
    assert s.peer and not s.compiles


def test_jax_hessian_too_large_raises_instead_of_aborting() -> None:
    """A 1,001,000-weight Hessian (8 TB in float64): XLA would abort the whole process."""
    pytest.importorskip("jax")
    child = textwrap.dedent(
        """
        import torch
        from torch import nn
        from strategies import jax_hessian

        net = nn.Sequential(nn.Linear(1000, 1000)).double()
        batch = (torch.randn(2, 1000, dtype=torch.float64), torch.randn(2, 1000, dtype=torch.float64))
        jax_hessian.compute(net, dict(net.named_parameters()), batch)
        """
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", child], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, f"child ended with {done.returncode}: {done.stderr[-2000:]}"
    assert "MemoryError: jax_hessian needs" in done.stderr
    assert "1001000 x 1001000 Hessian alone" in done.stderr


def test_jax_hessian_counts_xla_scratch_memory(monkeypatch) -> None:
    """Room for the Hessian alone is not enough: XLA's scratch memory is counted too."""
    pytest.importorskip("jax")
    net, params, batch, loss_fn = _build("tanh_mse")
    P = sum(p.numel() for p in params.values())
    monkeypatch.setattr(jax_hessian, "available_bytes", lambda device: 2 * P * P * 8)
    with pytest.raises(MemoryError, match="XLA's scratch memory"):
        strategies.compute("jax_hessian", net, params, batch, loss_fn)
    monkeypatch.setattr(jax_hessian, "available_bytes", lambda device: P * P * 8 - 1)
    with pytest.raises(MemoryError, match="Hessian alone"):
        strategies.compute("jax_hessian", net, params, batch, loss_fn)
