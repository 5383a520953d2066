"""``kron`` on the nets and losses users write, against the independent float64 loop reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import USER_CASES, MeanOverBatch, build_user, seq
from torch import nn

import strategies
from bench.reference import loop_hessian
from strategies.kron import has_linear as kron_has_linear


@pytest.mark.parametrize("case", USER_CASES)
def test_matches_float64_reference(case: str) -> None:
    net, params, batch, loss = build_user(case)
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    reference = loop_hessian(net, params, batch, loss)
    torch.testing.assert_close(H, reference, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_hessian_vector_rows_in_groups_match_float64_reference(chunk_size) -> None:
    """The LayerNorms' rows, between the Linears' Kronecker ones: in one group over all of
    them (None: the tiny net's rows fit one chunk), in groups split across chunks (5), one
    row at a time (1)."""
    net, params, batch, loss = build_user("layernorm_mlp")
    H = strategies.compute("kron", net, params, batch, loss_fn=loss, chunk_size=chunk_size)
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
    blocks are computed for p >= i only and mirrored: a wrong mirror shows here. The second
    layer's block (102 rows) spans two of the mirror's bands."""
    torch.manual_seed(1)
    net = seq(3, 33, 3, 2).double()
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


def test_net_without_linear_is_all_hessian_vector_rows() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 2),
                        nn.Flatten()).double()  # fmt: skip
    assert strategies.get("kron").supports(net, None) == (True, "")
    params = dict(net.named_parameters())
    batch = (torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    H = strategies.compute("kron", net, params, batch)
    torch.testing.assert_close(H, loop_hessian(net, params, batch, None), rtol=1e-9, atol=1e-11)


def test_outputs_must_be_batched() -> None:
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return self.fc(x).sum()

    net = Pooled()
    with pytest.raises(
        ValueError,
        match=r"outputs to be a tensor of shape \(batch, \.\.\.\) with batch 5, got \(\)",
    ):
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


# ---------------------------------------------------------------- shared weights, any linear map
# Nets whose linear maps see (B, T, d) inputs, are called functionally, or sit inside
# multi-head attention; each case: (builder, chosen parameter names or None for all).


class PreLNBlock(nn.Module):
    """A pre-LN transformer block on token ids or on features, per-token logits."""

    def __init__(self, tokens: bool, need_weights: bool = True, pool: bool = False):
        super().__init__()
        self.embed = nn.Embedding(7, 4) if tokens else None
        self.ln1, self.ln2 = nn.LayerNorm(4), nn.LayerNorm(4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc1, self.fc2, self.head = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 3)
        self.need_weights, self.pool = need_weights, pool

    def forward(self, x):
        x = self.embed(x) if self.embed is not None else x
        h = self.ln1(x)
        x = x + self.att(h, h, h, need_weights=self.need_weights)[0]
        x = x + self.fc2(torch.tanh(self.fc1(self.ln2(x))))
        return self.head(x.mean(1) if self.pool else x)


class FunctionalNet(nn.Module):
    """Only F.linear calls on bare parameters, on a (B, T, d) input, pooled."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5))
        self.w2 = nn.Parameter(torch.randn(2, 5))

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.w1, self.b1)), self.w2).sum(1)


class TimeFirstAttention(nn.Module):
    """nn.MultiheadAttention in its default (T, B, E) layout, the batch transposed in."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 1)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = x.transpose(0, 1)
        return self.out(torch.tanh(self.att(h, h, h)[0]).transpose(0, 1))


def _tokens_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _per_position_mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))


SHARED = {
    "transformer_tokens": (
        lambda: PreLNBlock(tokens=True), lambda: (torch.randint(0, 7, (3, 4)),
                                                  torch.randint(0, 3, (3, 4))), _tokens_ce, None,
    ),
    "transformer_tokens_embedding_and_head": (
        lambda: PreLNBlock(tokens=True), lambda: (torch.randint(0, 7, (3, 4)),
                                                  torch.randint(0, 3, (3, 4))), _tokens_ce,
        ["embed.weight", "head.weight"],
    ),
    "transformer_features_attention_only": (
        lambda: PreLNBlock(tokens=False), lambda: (torch.randn(3, 4, 4), torch.randint(0, 3, (3, 4))),
        _tokens_ce, ["att.in_proj_weight", "att.in_proj_bias", "att.out_proj.weight"],
    ),
    "transformer_pooled_subset": (
        lambda: PreLNBlock(tokens=False, pool=True), lambda: (torch.randn(3, 5, 4),
                                                              torch.randn(3, 3)),
        None, ["fc1.weight", "head.bias", "ln2.weight"],
    ),
    "linear_on_positions_mean_pooled": (
        lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2), _MeanOver1()),
        lambda: (torch.randn(4, 5, 3), torch.randn(4, 2)), None, None,
    ),
    "per_position_token_ce": (
        _per_position_mlp, lambda: (torch.randn(3, 4, 3), torch.randint(0, 4, (3, 4))),
        _tokens_ce, None,
    ),
    "per_position_ce_classes_in_dim_1": (
        _per_position_mlp, lambda: (torch.randn(3, 4, 3), torch.randint(0, 4, (3, 4))),
        lambda out, y: F.cross_entropy(out.transpose(1, 2), y), ["2.weight", "0.bias"],
    ),
    "functional_linear_only": (
        FunctionalNet, lambda: (torch.randn(4, 3, 3), torch.randn(4, 2)), None, None,
    ),
    "conv_max_pool_linear": (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Linear(8, 3)),
        lambda: (torch.randn(3, 1, 4, 4), torch.randint(0, 3, (3,))), F.cross_entropy, None,
    ),
    "conv2d_stride_padding_dilation": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                              nn.Conv2d(3, 2, 2, dilation=2, padding=(1, 0)), nn.Tanh(),
                              nn.Flatten(), nn.Linear(6, 3)),
        lambda: (torch.randn(3, 2, 6, 5), torch.randint(0, 3, (3,))), F.cross_entropy, None,
    ),
    "conv2d_groups_and_subset": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, groups=2, padding=1), nn.Tanh(),
                              nn.Conv2d(4, 2, 3, stride=2, padding_mode="reflect", padding=1),
                              nn.Flatten()),
        lambda: (torch.randn(3, 2, 4, 4), torch.randn(3, 8)), None, ["0.weight", "2.weight"],
    ),
    "conv1d_stride_padding": (
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=2), nn.Tanh(),
                              nn.Conv1d(3, 2, 2), nn.Flatten()),
        lambda: (torch.randn(4, 2, 7), torch.randn(4, 8)), None, None,
    ),
    "attention_time_first_layout": (
        TimeFirstAttention, lambda: (torch.randn(3, 5, 4), torch.randn(3, 5, 2)), None, None,
    ),
}  # fmt: skip


class _MeanOver1(nn.Module):
    def forward(self, x):
        return x.mean(1)


def _build_shared(case: str):
    """``(net, params, batch, loss_fn)`` of ``SHARED[case]`` in float64, deterministic."""
    make_net, make_batch, loss, names = SHARED[case]
    torch.manual_seed(0)
    net = make_net().double()
    inputs, targets = make_batch()
    batch = tuple(t.double() if t.is_floating_point() else t for t in (inputs, targets))
    params = {n: p for n, p in net.named_parameters() if names is None or n in names}
    return net, params, batch, loss


@pytest.mark.parametrize("case", SHARED)
def test_shared_weights_match_float64_reference(case: str) -> None:
    net, params, batch, loss = _build_shared(case)
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    reference = loop_hessian(net, params, batch, loss)
    torch.testing.assert_close(H, reference, rtol=1e-9, atol=1e-11)


def test_shared_weights_in_float32_within_tolerance() -> None:
    net, params, batch, loss = _build_shared("transformer_tokens")
    reference = loop_hessian(net, params, batch, loss)
    net = net.float()
    params = dict(net.named_parameters())
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    assert H.dtype == torch.float32
    assert (H.double() - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert kron_has_linear(net) and not kron_has_linear(nn.Sequential(nn.Tanh()))


def test_fused_attention_refused_naming_the_op() -> None:
    net = PreLNBlock(tokens=False, need_weights=False).double().eval()
    batch = (torch.randn(2, 3, 4, dtype=torch.float64), torch.randint(0, 3, (2, 3)))
    with pytest.raises(ValueError, match=r"aten\._scaled_dot_product_flash_attention\w*, torch's "
                                         r"fused .* no double backward"):  # fmt: skip
        strategies.compute("kron", net, dict(net.named_parameters()), batch, loss_fn=_tokens_ce)


# ---------------------------------------------------------------- nets that fooled the probes


class SecondOrderMix(nn.Module):
    """Samples mixed only in the second derivatives: the values and gradients are those of
    independent samples."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        z = self.a(x)
        m = z.mean(0)
        return self.b(torch.tanh(z + (m - m.detach()) ** 2))


def test_refuses_samples_mixed_at_second_order() -> None:
    torch.manual_seed(0)
    net = SecondOrderMix().double()
    batch = (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="second derivatives of the forward mix samples"):
        strategies.compute("kron", net, dict(net.named_parameters()), batch)


@pytest.mark.parametrize("pre", [False, True], ids=["forward_hook", "forward_pre_hook"])
def test_user_hooks_on_a_linear_are_part_of_the_net(pre: bool) -> None:
    torch.manual_seed(0)
    net = seq(3, 4, 2).double()
    if pre:
        net[0].register_forward_pre_hook(lambda m, args: (3 * args[0],))
    else:
        net[0].register_forward_hook(lambda m, args, out: 2 * out)
    params = dict(net.named_parameters())
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    H = strategies.compute("kron", net, params, batch)
    torch.testing.assert_close(H, loop_hessian(net, params, batch, None), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("loss", [F.cross_entropy, None], ids=["cross_entropy", "mse"])
def test_large_output_costs_no_square_of_classes(loss) -> None:
    """60,000 outputs, P = 16: a per-sample C x C output Hessian would take 115 GB."""
    torch.manual_seed(0)
    net = seq(3, 4, 60_000).double()
    params = {n: p for n, p in net.named_parameters() if n.startswith("0.")}
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 60_000, (4,)) if loss else torch.randn(4, 60_000, dtype=torch.float64)
    H = strategies.compute("kron", net, params, (x, y), loss_fn=loss)
    reference = loop_hessian(net, params, (x, y), loss)
    torch.testing.assert_close(H, reference, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("case", ["transformer_tokens", "conv2d_stride_padding_dilation",
                                  "conv1d_stride_padding"])  # fmt: skip
@pytest.mark.parametrize("directions", [True, False], ids=["all_directions", "all_rows"])
def test_either_choice_of_the_cost_model_is_exact(case: str, directions: bool, monkeypatch) -> None:
    """Every site by its directions, or every site by Hessian-vector rows: the same H."""
    from strategies import kron

    def choose(problem, sites, flops):
        return (
            (sites, set())
            if directions
            else ([], {n for s in sites for n in (s.weight, s.bias) if n})
        )

    monkeypatch.setattr(kron, "_choose", choose)
    net, params, batch, loss = _build_shared(case)
    H = strategies.compute("kron", net, params, batch, loss_fn=loss)
    torch.testing.assert_close(H, loop_hessian(net, params, batch, loss), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    "unfold_bytes, chunk_bytes",
    [(None, None), (10_000, None), (None, 1024)],
    ids=["whole_blocks", "one_direction_per_gemm", "one_direction_per_pass"],
)
@pytest.mark.parametrize("subset", [False, True], ids=["all", "subset"])
def test_unfolded_weight_blocks_are_exact(unfold_bytes, chunk_bytes, subset, monkeypatch) -> None:
    """A site's own weight block from one GEMM over the unfolded operand ``a ⊗ a``, its
    mirror written with it: whole, a direction per GEMM, and a direction per tangent pass
    (the pass's share of the block starts mid-site); a bias, a weight alone, a bias alone."""
    from strategies import kron

    calls = []
    unfolded = kron._unfolded_gemms

    def spy(*args):
        calls.append(args[1].d_out)
        return unfolded(*args)

    monkeypatch.setattr(kron, "_unfolded_gemms", spy)
    if unfold_bytes:
        monkeypatch.setattr(kron, "_UNFOLD_BYTES", unfold_bytes)
    if chunk_bytes:
        monkeypatch.setattr(kron, "_MIN_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(kron, "_CHUNK_FRACTION", 1e-12)
    torch.manual_seed(2)
    net = seq(3, 12, 10, 2).double()
    params = dict(net.named_parameters())
    if subset:
        params = {n: params[n] for n in ("0.bias", "2.weight", "4.weight", "4.bias")}
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    H = strategies.compute("kron", net, params, batch)
    assert 10 in calls and (subset or 12 in calls)
    torch.testing.assert_close(H, loop_hessian(net, params, batch, None), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
