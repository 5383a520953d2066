"""Tests of the memory-bounded, compiled and JAX-peer strategies against the float64 loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import assert_unchanged, mlp, snapshot
from torch import nn

import strategies
from bench.reference import loop_hessian
from strategies import _memory

CHUNKED = ["vmap_jvp_chunked", "block_symmetric_chunked"]


def _mlp(activation: type[nn.Module], sizes=(3, 5, 4, 2)) -> nn.Sequential:
    return mlp(activation, sizes).double()


def _conv() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 2),
    ).double()


def _case(name: str):
    """``(net, batch, loss_fn)`` for a small float64 problem, deterministic."""
    torch.manual_seed(0)
    if name == "tanh-mse":
        net = _mlp(nn.Tanh)
        batch = (torch.randn(6, 3).double(), torch.randn(6, 2).double())
        return net, batch, None
    if name == "gelu-ce":
        net = _mlp(nn.GELU, sizes=(4, 6, 3))
        batch = (torch.randn(5, 4).double(), torch.randint(0, 3, (5,)))
        return net, batch, F.cross_entropy
    if name == "conv-bn-train":
        net = _conv()
        batch = (torch.randn(4, 1, 5, 5).double(), torch.randn(4, 2).double())
        return net, batch, None
    raise KeyError(name)


CASES = ["tanh-mse", "gelu-ce", "conv-bn-train"]


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_matches_loop(name, case, chunk_size):
    net, batch, loss_fn = _case(case)
    params = dict(net.named_parameters())
    before = snapshot(net)
    H = strategies.compute(name, net, params, batch, loss_fn, chunk_size=chunk_size)
    assert_unchanged(net, before)
    expected = loop_hessian(net, list(params), batch, loss_fn)
    assert H.dtype == torch.float64 and H.shape == expected.shape
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_subset_of_params_in_given_order(name):
    net, batch, loss_fn = _case("tanh-mse")
    own = dict(net.named_parameters())
    params = {"2.bias": own["2.bias"], "0.weight": own["0.weight"]}
    H = strategies.compute(name, net, params, batch, loss_fn, chunk_size=2)
    expected = loop_hessian(net, list(params), batch, loss_fn)
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_rejects_bad_chunk_size(name, bad):
    net, batch, loss_fn = _case("tanh-mse")
    with pytest.raises(ValueError, match="chunk_size"):
        strategies.compute(name, net, dict(net.named_parameters()), batch, loss_fn, chunk_size=bad)


@pytest.mark.parametrize(
    "directions, per_direction, hessian_bytes, available",
    [
        (4801, 10_000, 4801**2 * 4, 2**34),  # budget-bound: 0.5 x H
        (13121, 3_000_000, 13121**2 * 4, 2**34),
        (10, 100, 400, 2**34),  # tiny Hessian: the floor allows every direction at once
        (4801, 10_000, 4801**2 * 4, 4801**2 * 4 + 50_000),  # little free memory
        (4801, 10**12, 4801**2 * 4, 2**34),  # one direction is over budget: still 1
        (4801, 10_000, 4801**2 * 4, 0),  # no free memory at all: still 1
    ],
)
def test_choose_chunk_within_bound(directions, per_direction, hessian_bytes, available):
    chunk = _memory.choose_chunk(directions, per_direction, hessian_bytes, available)
    assert isinstance(chunk, int) and 1 <= chunk <= directions
    extra = max((_memory.HEADROOM - 1) * hessian_bytes, _memory.MIN_EXTRA_BYTES)
    extra = min(extra, 0.8 * max(available - hessian_bytes, 0))
    if chunk > 1:
        assert chunk * per_direction <= extra
    if chunk < directions:
        # the largest chunk that fits: one more would not
        assert (chunk + 1) * per_direction > extra


def test_choose_chunk_uses_half_the_hessian():
    hessian_bytes = 4801**2 * 4
    chunk = _memory.choose_chunk(4801, 10_000, hessian_bytes, 2**40)
    assert chunk == int(0.5 * hessian_bytes // 10_000)


@pytest.mark.parametrize("field", ["directions", "per_direction", "hessian_bytes"])
def test_choose_chunk_rejects_non_positive(field):
    args = {"directions": 10, "per_direction": 10, "hessian_bytes": 10, "available": 10}
    args[field] = 0
    with pytest.raises(ValueError, match=field):
        _memory.choose_chunk(**args)


def test_direction_bytes_grows_with_batch():
    net = _mlp(nn.Tanh)
    small = strategies.prepare(net, dict(net.named_parameters()), _batch(8), None)
    large = strategies.prepare(net, dict(net.named_parameters()), _batch(64), None)
    assert _memory.direction_bytes(large) > _memory.direction_bytes(small)
    # at least the three parameter-sized vectors
    assert _memory.direction_bytes(small) >= 3 * small.P * 8


def _batch(n: int):
    return torch.randn(n, 3).double(), torch.randn(n, 2).double()


def test_available_bytes_positive():
    assert strategies.available_bytes(torch.device("cpu")) > 0


def test_direction_bytes_leaves_net_unchanged():
    net, batch, loss_fn = _case("conv-bn-train")
    before = snapshot(net)
    _memory.direction_bytes(strategies.prepare(net, dict(net.named_parameters()), batch, loss_fn))
    assert_unchanged(net, before)


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_registered_and_generic(name):
    s = strategies.get(name)
    assert s.supports(_conv(), None) == (True, "")
    assert not s.peer


JAX_CASES = ["tanh-mse", "gelu-ce"]


@pytest.mark.parametrize("case", JAX_CASES)
def test_jax_hessian_matches_loop(case):
    pytest.importorskip("jax")
    net, batch, loss_fn = _case(case)
    params = dict(net.named_parameters())
    before = snapshot(net)
    H = strategies.compute("jax_hessian", net, params, batch, loss_fn)
    assert_unchanged(net, before)
    expected = loop_hessian(net, list(params), batch, loss_fn)
    assert H.dtype == torch.float64
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)


def test_jax_hessian_float32_subset_in_mapping_order():
    pytest.importorskip("jax")
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh"), nn.Linear(4, 2))
    batch = (torch.randn(6, 3), torch.randn(6, 2))
    own = dict(net.named_parameters())
    params = {"2.weight": own["2.weight"], "0.bias": own["0.bias"]}
    H = strategies.compute("jax_hessian", net, params, batch, nn.MSELoss(reduction="sum"))
    expected = loop_hessian(net, list(params), batch, nn.MSELoss(reduction="sum"))
    assert H.dtype == torch.float32
    torch.testing.assert_close(H.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "net, loss_fn, reason",
    [
        (nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 1)), None, "Dropout"),
        (_conv(), None, "Conv2d"),
        (nn.Linear(2, 1), None, "nn.Sequential"),
        (nn.Sequential(nn.Tanh()), None, "no nn.Linear"),
        (nn.Sequential(nn.Linear(2, 1)), nn.L1Loss(), "L1Loss"),
        (
            nn.Sequential(nn.Linear(2, 2)),
            nn.CrossEntropyLoss(label_smoothing=0.1),
            "label_smoothing",
        ),
    ],
)
def test_jax_hessian_refuses(net, loss_fn, reason):
    pytest.importorskip("jax")
    ok, why = strategies.get("jax_hessian").supports(net, loss_fn)
    assert not ok and reason in why
    batch = (torch.randn(3, 2), torch.randn(3, 1))
    with pytest.raises(ValueError):
        strategies.compute("jax_hessian", net, dict(net.named_parameters()), batch, loss_fn)


def test_jax_hessian_rejects_out_of_range_class():
    pytest.importorskip("jax")
    net = nn.Sequential(nn.Linear(2, 3))
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 2, 3]))
    # the probe forward of the contract meets it first, through torch's own cross-entropy
    with pytest.raises(ValueError, match="class indices|must lie"):
        strategies.compute("jax_hessian", net, dict(net.named_parameters()), batch, F.cross_entropy)


def test_jax_hessian_without_jax(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "jax", None)
    net, _, _ = _case("tanh-mse")
    assert strategies.get("jax_hessian").supports(net, None) == (False, "jax is not installed")


def test_jax_hessian_is_a_compiling_peer():
    s = strategies.get("jax_hessian")
    assert s.peer and s.compiles
