"""Every registered strategy against an independent float64 reference, on cases held as data."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strategies
from bench.reference import loop_hessian


def _mlp(act: type[nn.Module] = nn.Tanh, sizes=(3, 5, 4, 2), bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _regression(net: nn.Module, n_in: int, n_out: int, n: int = 7):
    return net, (torch.randn(n, n_in), torch.randn(n, n_out)), None


def tanh_mse():
    return _regression(_mlp(), 3, 2)


def ce_several_outputs():
    net = _mlp(sizes=(4, 6, 5))
    return net, (torch.randn(9, 4), torch.randint(0, 5, (9,))), F.cross_entropy


def relu_mse():
    return _regression(_mlp(nn.ReLU, sizes=(3, 6, 6, 2)), 3, 2)


def conv_net():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    return net, (torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,))), F.cross_entropy


def _batchnorm_net(train: bool):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.randn(16, 3) * 2 + 1)
    net.train(train)
    return _regression(net, 3, 2, n=8)


def batchnorm_eval():
    return _batchnorm_net(train=False)


def batchnorm_train():
    return _batchnorm_net(train=True)


def bias_free():
    return _regression(_mlp(sizes=(3, 4, 2), bias=False), 3, 2)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp(sizes=(3, 4, 2))
        self.spare = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return self.body(x)


def unused_parameter():
    return _regression(_Unused(), 3, 2)


class _Tied(nn.Module):
    """Applies the same square Linear twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(self.shared(h)))


def weight_used_twice():
    return _regression(_Tied(), 3, 1)


def _subset(builder: Callable, names: list[str]) -> Callable:
    def build():
        net, batch, loss_fn = builder()
        own = dict(net.named_parameters())
        return net, batch, loss_fn, {n: own[n] for n in names}

    return build


def _frozen():
    net, batch, loss_fn = tanh_mse()
    for p in net[0].parameters():
        p.requires_grad_(False)
    return net, batch, loss_fn


CASES: dict[str, Callable] = {
    "tanh_mse": tanh_mse,
    "ce_several_outputs": ce_several_outputs,
    "relu_mse": relu_mse,
    "conv_net": conv_net,
    "batchnorm_eval": batchnorm_eval,
    "batchnorm_train": batchnorm_train,
    # shuffled order: the output must follow the mapping, not the net
    "subset": _subset(tanh_mse, ["4.bias", "2.weight", "0.bias"]),
    "frozen_layer": _subset(_frozen, ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight"]),
    "bias_free": bias_free,
    "unused_parameter": unused_parameter,
    "weight_used_twice": weight_used_twice,
}


def build(case: str, dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    made = CASES[case]()
    net, batch, loss_fn = made[:3]
    net = net.to(dtype)
    names = list(made[3]) if len(made) == 4 else [n for n, _ in net.named_parameters()]
    own = dict(net.named_parameters())
    inputs, targets = batch
    inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    targets = targets.to(dtype) if targets.is_floating_point() else targets
    return net, {n: own[n] for n in names}, (inputs, targets), loss_fn


def snapshot(net: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in net.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()},
        "training": [m.training for m in net.modules()],
    }


def assert_unchanged(net: nn.Module, before: dict) -> None:
    after = snapshot(net)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    assert after["requires_grad"] == before["requires_grad"]
    for n, g in before["grad"].items():
        assert (g is None) == (after["grad"][n] is None), f"{n}.grad changed"
        if g is not None:
            assert torch.equal(g, after["grad"][n]), f"{n}.grad changed"
    assert after["training"] == before["training"]


def assert_close_to(H: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    scale = ref.abs().max().clamp_min(1e-30)
    err = (H.double() - ref).abs().max() / scale
    assert err <= rel, f"max error {err:.3e} relative to the largest entry (allowed {rel:.0e})"


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


@pytest.mark.parametrize("name", strategies.names())
def test_matches_float64_reference(name: str, case: str) -> None:
    net, params, batch, loss_fn = build(case)
    strategy = strategies.get(name)
    for p in net.parameters():  # a .grad that must survive untouched
        p.grad = torch.ones_like(p)
    before = snapshot(net)
    ok, reason = strategy.supports(net, loss_fn)
    if not ok:
        assert reason, "an unsupported problem needs a reason"
        with pytest.raises(ValueError, match="does not support"):
            strategy.compute(net, params, batch, loss_fn)
        assert_unchanged(net, before)
        return
    H = strategy.compute(net, params, batch, loss_fn)
    ref = loop_hessian(net, list(params), batch, loss_fn)
    P = sum(p.numel() for p in params.values())
    assert H.shape == (P, P)
    assert H.dtype == torch.float64
    assert_close_to(H, ref, 1e-10)
    assert_close_to(H, H.T, 1e-10)
    assert_unchanged(net, before)


@pytest.mark.parametrize("name", strategies.names())
@pytest.mark.parametrize("case", ["tanh_mse", "ce_several_outputs", "batchnorm_train"])
def test_float32(name: str, case: str) -> None:
    net, params, batch, loss_fn = build(case, torch.float32)
    strategy = strategies.get(name)
    if not strategy.supports(net, loss_fn)[0]:
        pytest.skip(f"{name} does not support {case}: {strategy.supports(net, loss_fn)[1]}")
    H = strategy.compute(net, params, batch, loss_fn)
    assert H.dtype == torch.float32
    assert_close_to(H, loop_hessian(net, list(params), batch, loss_fn), 1e-5)


def test_unused_parameter_rows_are_zero() -> None:
    """The reference itself: the rows and columns of a parameter the forward never uses are 0."""
    net, params, batch, loss_fn = build("unused_parameter")
    ref = loop_hessian(net, list(params), batch, loss_fn)
    names = list(params)
    start = sum(params[n].numel() for n in names[: names.index("spare")])
    spare = slice(start, start + params["spare"].numel())
    assert torch.count_nonzero(ref[spare]) == 0
    assert torch.count_nonzero(ref[:, spare]) == 0
    assert torch.count_nonzero(ref) > 0


@pytest.mark.parametrize("name", strategies.names())
def test_linear_regression_closed_form(name: str) -> None:
    """MSE of a bias-free Linear: H = 2/(N·D) (I_D ⊗ XᵀX) in row-major order of W[o, i]."""
    torch.manual_seed(1)
    N, d_in, D = 6, 3, 2
    net = nn.Sequential(nn.Linear(d_in, D, bias=False)).double()
    X, Y = torch.randn(N, d_in, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    strategy = strategies.get(name)
    if not strategy.supports(net, None)[0]:
        pytest.skip(strategy.supports(net, None)[1])
    H = strategy.compute(net, dict(net.named_parameters()), (X, Y))
    expected = 2.0 / (N * D) * torch.kron(torch.eye(D, dtype=torch.float64), X.T @ X)
    torch.testing.assert_close(H, expected, rtol=1e-12, atol=1e-12)


def test_blocks_round_trip_like_torch_func() -> None:
    net, params, batch, loss_fn = build("tanh_mse")
    H = strategies.compute("vmap_jvp", net, params, batch, loss_fn)
    blocks = strategies.to_blocks(H, params)
    for a in params:
        for b in params:
            assert blocks[a][b].shape == params[a].shape + params[b].shape
    assert torch.equal(strategies.from_blocks(blocks, params), H)
    with pytest.raises(ValueError, match="shape"):
        strategies.to_blocks(H[1:], params)


def test_registry() -> None:
    assert strategies.names()[:8] == [
        "full_autograd",
        "symmetric_half",
        "torch_func",
        "functorch",
        "jacfwd_jacrev",
        "vmap_vjp",
        "vmap_jvp",
        "autograd_functional",
    ]
    for name in strategies.names():
        assert strategies.get(name).description
    with pytest.raises(KeyError, match="valid names: full_autograd"):
        strategies.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        strategies.register("vmap_jvp", lambda *a: None, "again")


def test_symmetric_half_naive_slice_is_not_a_leaf() -> None:
    """The approach users try first: a slice of the concatenated gradient's input is no leaf."""
    net, params, batch, _ = build("tanh_mse")
    leaves = [p.detach().clone().requires_grad_(True) for p in params.values()]
    flat = torch.cat([p.reshape(-1) for p in leaves])
    loss = F.mse_loss(
        torch.func.functional_call(net, dict(zip(params, leaves)), batch[:1]), batch[1]
    )
    g = torch.cat([d.reshape(-1) for d in torch.autograd.grad(loss, leaves, create_graph=True)])
    (row,) = torch.autograd.grad(g[0], flat[0:], retain_graph=True, allow_unused=True)
    assert row is None


def _bad_inputs():
    torch.manual_seed(0)
    net = _mlp()
    params = dict(net.named_parameters())
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    int_net = _mlp()
    int_net.register_parameter("counts", nn.Parameter(torch.arange(3), requires_grad=False))
    mixed = _mlp()
    mixed[0].double()
    meta = _mlp()
    meta[0].to("meta")
    return {
        "empty params": (ValueError, "empty", net, {}, (x, y), None),
        "not a mapping": (TypeError, "mapping", net, list(params.values()), (x, y), None),
        "unknown name": (
            ValueError,
            "no parameter named",
            net,
            {"9.weight": params["0.weight"]},
            (x, y),
            None,
        ),
        "not the net's tensor": (
            ValueError,
            "not the net's parameter",
            net,
            {"0.weight": nn.Parameter(params["0.weight"].detach().clone())},
            (x, y),
            None,
        ),
        "non-floating": (TypeError, "floating", int_net, {"counts": int_net.counts}, (x, y), None),
        "loss not scalar": (ValueError, "scalar", net, params, (x, y), lambda o, t: (o - t) ** 2),
        "batch not a pair": (TypeError, "pair", net, params, (x,), None),
        "batch a bare tensor": (TypeError, "pair", net, params, x, None),
        "mixed dtypes": (
            ValueError,
            "mixed dtypes",
            mixed,
            dict(mixed.named_parameters()),
            (x, y),
            None,
        ),
        "mixed devices": (
            ValueError,
            "mixed devices",
            meta,
            dict(meta.named_parameters()),
            (x, y),
            None,
        ),
        "net not a module": (TypeError, "Module", lambda x: x, params, (x, y), None),
        "loss not callable": (TypeError, "callable", net, params, (x, y), 3),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("name", strategies.names())
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_input_raises_named_error(name: str, bad: str) -> None:
    error, match, net, params, batch, loss_fn = BAD[bad]
    # meta tensors cannot be compared; that net has no values to change anyway
    before = snapshot(net) if isinstance(net, nn.Module) and bad != "mixed devices" else None
    strategy = strategies.get(name)
    if bad == "loss not scalar" and not strategy.supports(net, loss_fn)[0]:
        error, match = ValueError, "does not support"  # refused before the loss is ever called
    with pytest.raises(error, match=match):
        strategy.compute(net, params, batch, loss_fn)
    if before is not None:
        assert_unchanged(net, before)
