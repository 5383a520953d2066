"""``kron`` on the nets and losses users write, against the independent float64 loop reference."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strategies
from bench.reference import loop_hessian


class Model(nn.Module):
    """The form of the question this project answers: two Linear layers, a squeezed output."""

    def __init__(self, input_dim: int = 8, hidden_dim: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden_dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))).squeeze(-1)


def loss_fn(outputs, targets):
    return torch.mean((outputs - targets) ** 2, dim=0)


class Residual(nn.Module):
    """Functional activations and a skip connection around a wide Linear (the GEMM path)."""

    def __init__(self, width: int = 40):
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = F.silu(self.inp(x))
        h = h + F.gelu(self.hidden(h))
        return self.out(h)


class LayerNormMLP(nn.Module):
    """LayerNorm after each hidden Linear: its affine parameters get Hessian-vector rows."""

    def __init__(self, dims=(6, 12, 12, 2)):
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(b) for b in dims[1:-1])

    def forward(self, x):
        for linear, norm in zip(self.linears[:-1], self.norms):
            x = torch.tanh(norm(linear(x)))
        return self.linears[-1](x)


class FunctionalNorm(nn.Module):
    """F.layer_norm called in the forward with weights of its own."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.rand(6) + 0.5)
        self.b = nn.Linear(6, 2, bias=False)

    def forward(self, x):
        return self.b(torch.tanh(F.layer_norm(self.a(x), (6,), self.w)))


class Tied(nn.Module):
    """One Linear applied twice, and a weight also used outside its layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(torch.tanh(self.a(x)))
        return self.b(torch.tanh(h)) + 0.1 * (self.b.weight**2).sum()


class Sequence(nn.Module):
    """A Linear on a (batch, time, features) input: its rows come from Hessian-vector products."""

    def __init__(self):
        super().__init__()
        self.step = nn.Linear(3, 4)
        self.head = nn.Linear(4 * 5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.step(x)).flatten(1))


class Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)))


class Recurrent(nn.Module):
    """A GRU has no forward-mode batching rule: every row comes from reverse-over-reverse."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class MeanOverBatch(nn.Module):
    """Subtracts the batch mean: samples are not independent."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 1)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


def _seq(*dims, act=nn.Tanh):
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [act()] if k else []
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _x(n: int, d: int):
    return torch.randn(n, d)


#: name -> (net builder, batch builder, loss, parameter names or None for all)
CASES = {
    "thread_model": (Model, lambda: (_x(16, 8), torch.randn(16)), loss_fn, None),
    "residual_silu_gelu": (Residual, lambda: (_x(12, 5), torch.randn(12, 3)), None, None),
    "layernorm_mlp": (LayerNormMLP, lambda: (_x(10, 6), torch.randn(10, 2)), None, None),
    "functional_layer_norm": (FunctionalNorm, lambda: (_x(9, 4), torch.randn(9, 2)), None, None),
    "huber": (Residual, lambda: (_x(12, 5), 3 * torch.randn(12, 3)), F.huber_loss, None),
    "smooth_l1_sum": (
        Model,
        lambda: (_x(10, 8), 2 * torch.randn(10)),
        functools.partial(F.smooth_l1_loss, reduction="sum", beta=0.5),
        None,
    ),
    "bce_with_logits": (
        lambda: _seq(4, 9, 3),
        lambda: (_x(11, 4), torch.rand(11, 3)),
        F.binary_cross_entropy_with_logits,
        None,
    ),
    "ce_label_smoothing": (
        lambda: _seq(4, 9, 5, act=nn.GELU),
        lambda: (_x(11, 4), torch.randint(0, 5, (11,))),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        None,
    ),
    "ce_weight_ignore_index": (
        lambda: _seq(4, 9, 5),
        lambda: (_x(11, 4), torch.tensor([0, 1, 2, 3, 4, -100, 1, 2, 3, 0, 4])),
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0]), ignore_index=-100),
        None,
    ),
    "gaussian_nll": (
        lambda: _seq(4, 8, 2),
        lambda: (_x(10, 4), torch.randn(10, 1)),
        lambda out, y: F.gaussian_nll_loss(out[:, :1], y, F.softplus(out[:, 1:]) + 0.1),
        None,
    ),
    "mse_module": (Residual, lambda: (_x(12, 5), torch.randn(12, 3)), nn.MSELoss(), None),
    "weights_only": (
        lambda: _seq(4, 40, 6, 2),
        lambda: (_x(9, 4), torch.randn(9, 2)),
        None,
        ["0.weight", "2.weight", "4.weight"],
    ),
    "last_layer_only": (
        lambda: _seq(4, 6, 6, 2),
        lambda: (_x(9, 4), torch.randn(9, 2)),
        None,
        ["4.weight", "4.bias"],
    ),
    "shuffled_order": (
        LayerNormMLP,
        lambda: (_x(10, 6), torch.randn(10, 2)),
        None,
        [
            "linears.2.bias",
            "norms.0.weight",
            "linears.0.weight",
            "linears.1.bias",
            "linears.2.weight",
            "norms.1.bias",
            "linears.1.weight",
        ],
    ),  # fmt: skip
    "bias_without_weight": (
        lambda: _seq(3, 40, 2),
        lambda: (_x(9, 3), torch.randn(9, 2)),
        None,
        ["0.bias", "2.weight"],
    ),
    "tied_linear": (Tied, lambda: (_x(8, 4), torch.randn(8, 2)), None, None),
    "linear_on_sequence": (Sequence, lambda: (torch.randn(6, 5, 3), torch.randn(6, 2)), None, None),
    "embedding_inputs": (
        Embed,
        lambda: (torch.randint(0, 7, (10,)), torch.randint(0, 2, (10,))),
        F.cross_entropy,
        None,
    ),
    "gru_then_linear": (Recurrent, lambda: (torch.randn(5, 4, 3), torch.randn(5, 2)), None, None),
    "conv_then_linear": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)),
        lambda: (torch.randn(5, 1, 5, 5), torch.randint(0, 3, (5,))),
        F.cross_entropy,
        None,
    ),
}


def build(case: str, dtype: torch.dtype = torch.float64):
    make_net, make_batch, loss, names = CASES[case]
    torch.manual_seed(0)
    net = make_net().to(dtype)
    if isinstance(loss, nn.Module):
        loss = loss.to(dtype)
    batch = tuple(t.to(dtype) if t.is_floating_point() else t for t in make_batch())
    own = dict(net.named_parameters())
    params = own if names is None else {n: own[n] for n in names}
    return net, params, batch, loss


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case: str) -> None:
    net, params, batch, loss = build(case)
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    reference = loop_hessian(net, params, batch, loss)
    torch.testing.assert_close(H, reference, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["thread_model", "residual_silu_gelu", "layernorm_mlp"])
def test_float32_within_tolerance(case: str) -> None:
    net, params, batch, loss = build(case, torch.float32)
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    assert H.dtype == torch.float32
    reference = loop_hessian(net, params, batch, loss)
    scale = reference.abs().max()
    assert (H.double() - reference).abs().max() <= 1e-4 * scale


def test_wide_layer_uses_kronecker_rows_and_half_diagonal_blocks() -> None:
    """A layer with at least 32 inputs takes the one-GEMM-per-direction path, whose diagonal
    blocks are computed for p >= i only and mirrored: a wrong mirror shows here."""
    torch.manual_seed(1)
    net = _seq(3, 33, 35, 2).double()
    params = dict(net.named_parameters())
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64))
    H = strategies.compute("kron", net, params, batch)
    torch.testing.assert_close(H, loop_hessian(net, params, batch, None), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "net, loss, match",
    [
        (MeanOverBatch(), None, r"before module 'b' mixes samples"),
        (
            _seq(4, 5, 1),
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
        strategies.compute("kron", net, dict(net.named_parameters()), (_x(6, 3), _x(6, 1)))
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
            "kron", net, dict(net.named_parameters()), (_x(5, 3), torch.tensor(1.0)),
            loss_fn=lambda out, y: (out - y) ** 2,
        )  # fmt: skip


def test_net_is_unchanged_and_hooks_removed() -> None:
    net, params, batch, loss = build("layernorm_mlp")
    before = {n: t.clone() for n, t in net.state_dict().items()}
    strategies.compute("kron", net, params, batch, loss_fn=loss)
    for n, t in net.state_dict().items():
        assert torch.equal(t, before[n])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules()), (
        "kron left a hook on the net"
    )
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
