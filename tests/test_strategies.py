"""Every registered strategy against an independent float64 reference, on cases held as data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import CASES, assert_close_to, assert_unchanged, build, mlp, snapshot
from torch import nn

import strategies
from bench.reference import loop_hessian


@pytest.fixture(params=list(CASES))
def case(request):
    return request.param


#: the cases a strategy that compiles is checked on here: the caller's mapping of params
#: (a shuffled subset, a frozen layer, an unused param, a weight used twice), which its
#: wrapper handles; each other case compiles afresh, 13 to 25 s on a new machine, and the
#: architectures are checked for it by the audit of every registered strategy over the zoo
#: (tests/test_audit.py) and the normalisation nets (tests/test_contract.py)
COMPILED_ON = ("tanh_mse", "subset", "frozen_layer", "unused_parameter", "weight_used_twice")


@pytest.mark.parametrize("name", strategies.names())
def test_matches_float64_reference(name: str, case: str) -> None:
    if strategies.get(name).compiles and case not in COMPILED_ON:
        pytest.skip(f"compiled on {', '.join(COMPILED_ON)} only; its eager form on all")
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
    try:
        H = strategy.compute(net, params, batch, loss_fn)
    except ValueError as error:
        # a clear refusal, never a wrong matrix: torch has no formula on this strategy's path
        assert "which torch" in str(error) and "does not implement" in str(error), error
        assert_unchanged(net, before)
        return
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
    if strategies.get(name).compiles and case != "tanh_mse":
        pytest.skip("compiled on tanh_mse only (COMPILED_ON); its eager form on all")
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
    net = mlp()
    params = dict(net.named_parameters())
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    int_net = mlp()
    int_net.register_parameter("counts", nn.Parameter(torch.arange(3), requires_grad=False))
    mixed = mlp()
    mixed[0].double()
    meta = mlp()
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
