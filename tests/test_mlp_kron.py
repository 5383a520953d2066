"""mlp_kron against the float64 double-backward reference, and what it refuses."""

from __future__ import annotations

import copy
import functools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strategies
from bench.reference import loop_hessian
from strategies import mlp_kron
from strategies._common import mse_loss

ACTIVATIONS = [
    nn.Tanh,
    nn.ReLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Identity,
    nn.Softplus,
    nn.ELU,
    nn.LeakyReLU,
]
LOSSES = {
    "mse-default": None,
    "mse-F": F.mse_loss,
    "mse-common": mse_loss,
    "mse-sum": nn.MSELoss(reduction="sum"),
    "mse-partial-sum": functools.partial(F.mse_loss, reduction="sum"),
    "ce-F": F.cross_entropy,
    "ce-sum": nn.CrossEntropyLoss(reduction="sum"),
    "ce-partial-mean": functools.partial(F.cross_entropy, reduction="mean"),
}


def _mlp(act, widths, bias=True, dtype=torch.float64) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def _batch(widths, loss_name, n=9, dtype=torch.float64):
    inputs = torch.randn(n, widths[0], dtype=dtype)
    if loss_name.startswith("ce"):
        return inputs, torch.randint(0, widths[-1], (n,))
    return inputs, torch.randn(n, widths[-1], dtype=dtype)


def _assert_matches_reference(net, params, batch, loss_fn, rel=1e-10):
    H = strategies.compute("mlp_kron", net, params, batch, loss_fn)
    reference = loop_hessian(net, list(params), batch, loss_fn)
    assert H.shape == reference.shape
    assert H.dtype == next(iter(params.values())).dtype
    scale = reference.abs().max()
    assert scale > 0
    assert ((H.double() - reference).abs().max() / scale) <= rel


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
@pytest.mark.parametrize("widths", [(3, 4), (3, 5, 4), (3, 5, 4, 3)], ids=["d1", "d2", "d3"])
def test_activations_and_depths(act, widths):
    torch.manual_seed(0)
    net = _mlp(act, widths)
    _assert_matches_reference(net, dict(net.named_parameters()), _batch(widths, "mse"), None)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_losses(loss_name, bias):
    torch.manual_seed(1)
    widths = (4, 6, 5, 3)
    net = _mlp(nn.Tanh, widths, bias=bias)
    batch = _batch(widths, loss_name)
    _assert_matches_reference(net, dict(net.named_parameters()), batch, LOSSES[loss_name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subset_in_shuffled_order(seed):
    torch.manual_seed(seed)
    widths = (3, 5, 4, 2)
    net = _mlp(nn.GELU, widths)
    names = [n for n, _ in net.named_parameters()]
    random.Random(seed).shuffle(names)
    own = dict(net.named_parameters())
    params = {n: own[n] for n in names[: 2 + seed]}
    _assert_matches_reference(net, params, _batch(widths, "ce"), F.cross_entropy)


def test_wide_rows_take_the_other_gemm_path():
    """Layers with at least _WIDE_ROWS inputs go through the per-direction B x P_l product."""
    torch.manual_seed(3)
    widths = (mlp_kron._WIDE_ROWS, 3, mlp_kron._WIDE_ROWS + 1, 2)
    net = _mlp(nn.Tanh, widths)
    _assert_matches_reference(net, dict(net.named_parameters()), _batch(widths, "mse"), None)


def test_nested_sequential_and_activation_before_first_linear():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Tanh(), nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Tanh()), nn.Linear(4, 2)
    ).double()
    _assert_matches_reference(net, dict(net.named_parameters()), _batch((3, 2), "mse"), None)


@pytest.mark.parametrize("loss_name", ["mse-default", "ce-F"])
def test_float32(loss_name):
    torch.manual_seed(5)
    widths = (4, 8, 8, 3)
    net = _mlp(nn.Tanh, widths, dtype=torch.float32)
    batch = _batch(widths, loss_name, dtype=torch.float32)
    _assert_matches_reference(net, dict(net.named_parameters()), batch, LOSSES[loss_name], 1e-5)


def test_net_unchanged():
    torch.manual_seed(6)
    net = _mlp(nn.Tanh, (3, 5, 2))
    net.eval()
    net[0].weight.requires_grad_(False)
    before = copy.deepcopy(net.state_dict())
    flags = [p.requires_grad for p in net.parameters()]
    strategies.compute("mlp_kron", net, dict(net.named_parameters()), _batch((3, 2), "mse"))
    assert not net.training
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name])


_lin = nn.Linear(3, 3)
REFUSED = {
    "conv": (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 1)), None),
    "layernorm": (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1)), None),
    "lambda-loss": (nn.Sequential(nn.Linear(3, 1)), lambda o, t: ((o - t) ** 2).mean()),
    "linear-twice": (nn.Sequential(_lin, nn.Tanh(), _lin), None),
    "not-sequential": (nn.ModuleList([nn.Linear(3, 1)]), None),
    "label-smoothing": (nn.Sequential(nn.Linear(3, 2)), nn.CrossEntropyLoss(label_smoothing=0.1)),
    "class-weights": (nn.Sequential(nn.Linear(3, 2)), nn.CrossEntropyLoss(weight=torch.ones(2))),
    "ignore-index": (nn.Sequential(nn.Linear(3, 2)), nn.CrossEntropyLoss(ignore_index=1)),
    "reduction-none": (nn.Sequential(nn.Linear(3, 2)), nn.MSELoss(reduction="none")),
    "other-loss": (nn.Sequential(nn.Linear(3, 2)), F.l1_loss),
    # torch has no second forward-mode derivative of SiLU
    "silu": (nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1)), None),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refuses(case):
    net, loss_fn = REFUSED[case]
    ok, reason = strategies.get("mlp_kron").supports(net, loss_fn)
    assert not ok and reason
    params = dict(net.named_parameters())
    batch = (torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        strategies.compute("mlp_kron", net, params, batch, loss_fn)
    with pytest.raises(ValueError):
        mlp_kron.compute(net, params, batch, loss_fn)


def test_supports_the_listed_problems():
    net = _mlp(nn.ReLU, (3, 4, 2))
    for loss_fn in LOSSES.values():
        assert mlp_kron.supports(net, loss_fn) == (True, "")


@pytest.mark.parametrize(
    "batch, loss_fn, match",
    [
        ((torch.randn(5, 3), torch.full((5,), 2)), F.cross_entropy, "targets must lie"),
        ((torch.randn(5, 3), torch.full((5,), -100)), F.cross_entropy, "targets must lie"),
        ((torch.randn(5, 3), torch.rand(5, 2)), F.cross_entropy, "class-index"),
        ((torch.randn(5, 3), torch.randn(5)), None, "must match"),
        ((torch.randn(5, 3).double(), torch.randn(5, 2)), None, "inputs must be"),
    ],
    ids=["ce-class-out-of-range", "ce-ignored-target", "ce-probabilities", "mse-shape", "dtype"],
)
def test_bad_batch_raises(batch, loss_fn, match):
    net = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        mlp_kron.compute(net, dict(net.named_parameters()), batch, loss_fn)
