"""``kron`` on the nets and losses users write, against the independent float64 loop reference."""

from __future__ import annotations

import pytest
import torch
from cases import USER_CASES, MeanOverBatch, build_user, seq
from torch import nn

import strategies
from bench.reference import loop_hessian


@pytest.mark.parametrize("case", USER_CASES)
def test_matches_float64_reference(case: str) -> None:
    net, params, batch, loss = build_user(case)
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    reference = loop_hessian(net, params, batch, loss)
    torch.testing.assert_close(H, reference, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["thread_model", "residual_silu_gelu", "layernorm_mlp"])
def test_float32_within_tolerance(case: str) -> None:
    net, params, batch, loss = build_user(case, torch.float32)
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    assert H.dtype == torch.float32
    reference = loop_hessian(net, params, batch, loss)
    scale = reference.abs().max()
    assert (H.double() - reference).abs().max() <= 1e-4 * scale


def test_wide_layer_uses_kronecker_rows_and_half_diagonal_blocks() -> None:
    """A layer with at least 32 inputs takes the one-GEMM-per-direction path, whose diagonal
    blocks are computed for p >= i only and mirrored: a wrong mirror shows here."""
    torch.manual_seed(1)
    net = seq(3, 33, 35, 2).double()
    params = dict(net.named_parameters())
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    H = strategies.compute("kron", net, params, batch)
    torch.testing.assert_close(H, loop_hessian(net, params, batch, None), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "net, loss, match",
    [
        (MeanOverBatch(), None, r"before module 'b' mixes samples"),
        (
            seq(4, 5, 1),
            lambda out, y: ((out - y).sum()) ** 2,
            r"loss_fn couples samples",
        ),
    ],
    ids=["net_mixes_samples", "loss_couples_samples"],
)
def test_refuses_sample_mixing_with_reason(net, loss, match) -> None:
    net = net.double()
    batch = (torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=match):
        strategies.compute("kron", net, dict(net.named_parameters()), batch, loss_fn=loss)


class _ReverseOnlyTanh(torch.autograd.Function):
    """tanh with a (twice differentiable) backward and no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class ReverseOnly(nn.Module):
    def __init__(self, mix: bool):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 2)
        self.mix = mix

    def forward(self, x):
        h = _ReverseOnlyTanh.apply(self.a(x))
        return self.b(h - h.mean(0) if self.mix else h)


def test_without_forward_mode_rows_come_from_reverse_mode_and_probe() -> None:
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    net = ReverseOnly(mix=False).double()
    params = dict(net.named_parameters())
    H = strategies.compute("kron", net, params, batch)
    torch.testing.assert_close(H, loop_hessian(net, params, batch, None), rtol=1e-9, atol=1e-11)
    net.mix = True
    with pytest.raises(ValueError, match="the forward mixes samples"):
        strategies.compute("kron", net, params, batch)


def test_refuses_batchnorm_in_training_mode() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))
    ok, reason = strategies.get("kron").supports(net, None)
    assert not ok and "'1'" in reason and "BatchNorm1d" in reason
    with pytest.raises(ValueError, match="BatchNorm1d using batch statistics"):
        strategies.compute(
            "kron", net, dict(net.named_parameters()), (torch.randn(6, 3), torch.randn(6, 1))
        )
    net.eval()
    assert strategies.get("kron").supports(net, None) == (True, "")


def test_refuses_net_without_linear() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 2), nn.Flatten())
    ok, reason = strategies.get("kron").supports(net, None)
    assert not ok and "nn.Linear" in reason


def test_outputs_must_be_batched() -> None:
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x).sum()

    net = Pooled()
    with pytest.raises(ValueError, match=r"outputs to be a tensor of shape \(batch, \.\.\.\)"):
        strategies.compute(
            "kron", net, dict(net.named_parameters()), (torch.randn(5, 3), torch.tensor(1.0)),
            loss_fn=lambda out, y: (out - y) ** 2,
        )  # fmt: skip


def test_net_is_unchanged_and_hooks_removed() -> None:
    net, params, batch, loss = build_user("layernorm_mlp")
    before = {n: t.clone() for n, t in net.state_dict().items()}
    strategies.compute("kron", net, params, batch, loss_fn=loss)
    for n, t in net.state_dict().items():
        assert torch.equal(t, before[n])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules()), (
        "kron left a hook on the net"
    )
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
