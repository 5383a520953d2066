"""``auto``: its choice follows the table, routes around refusals, errors and audit findings, fits
memory, and every Hessian it returns passed ``verify``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases import assert_close_to
from torch import nn

import strategies
from bench.reference import loop_hessian
from strategies import auto

ROOT = Path(__file__).resolve().parent.parent

TABLE = {
    "command": "hand-made for tests",
    "sources": [],
    "regimes": [
        {
            "machine": "m",
            "device": "cpu",
            "dtype": "float32",
            "P_min": 10,
            "P_max": 30,
            "ranking": ["kron", "block_symmetric", "vmap_jvp", "block_symmetric_chunked"],
            "time_s": {},
            "peak_ratio": {
                "kron": 2.0,
                "block_symmetric": 4.0,
                "vmap_jvp": 5.0,
                "block_symmetric_chunked": 1.2,
            },
        },
        {
            "machine": "m",
            "device": "cpu",
            "dtype": "float32",
            "P_min": 30,
            "P_max": 100,
            "ranking": ["vmap_jvp", "kron"],
            "time_s": {},
            "peak_ratio": {"vmap_jvp": 2.0, "kron": 2.0},
        },
    ],
    # made up: as if the audit had found kron wrong on LayerNorm nets
    "wrong_on": {"block_symmetric": ["layernorm"], "kron": ["layernorm", "conv"]},
}


@pytest.fixture
def table(monkeypatch):
    """The hand-made table, and no preferred strategy: the table's ranking alone decides."""
    monkeypatch.setattr(auto, "load_table", lambda: TABLE)
    monkeypatch.setattr(auto, "PREFERRED", ())
    return TABLE


def _problem(net: nn.Module, n_in: int = 2, n_out: int = 1, dtype=torch.float32):
    torch.manual_seed(0)
    net = net.to(dtype)
    batch = (torch.randn(5, n_in, dtype=dtype), torch.randn(5, n_out, dtype=dtype))
    return net, dict(net.named_parameters()), batch


def test_choice_is_visible_through_the_registry(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    assert sum(p.numel() for p in params.values()) == 13
    assert strategies.get("auto").choose(net, params, batch) == "kron"


def test_size_picks_the_regime(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)))
    assert sum(p.numel() for p in params.values()) == 33
    assert auto.choose(net, params, batch) == "vmap_jvp"


def test_falls_back_where_the_specialised_strategy_refuses(table) -> None:
    net, params, batch = _problem(
        nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Tanh(), nn.Linear(2, 1))
    )
    # batch statistics mix samples: kron refuses, the next in the ranking is generic
    assert not strategies.get("kron").supports(net, None)[0]
    assert auto.choose(net, params, batch) == "block_symmetric"


def test_routes_away_from_strategies_the_audit_found_wrong(table) -> None:
    net, params, batch = _problem(
        nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 1))
    )
    # kron and block_symmetric were (in this table) found wrong on LayerNorm; vmap_jvp is next
    assert auto.choose(net, params, batch) == "vmap_jvp"


def test_memory_budget_picks_the_leaner(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    hessian_bytes = 13 * 13 * 4
    assert auto.choose(net, params, batch, memory_budget=int(1.5 * hessian_bytes)) == (
        "block_symmetric_chunked"
    )
    with pytest.raises(ValueError, match="over budget"):
        auto.choose(net, params, batch, memory_budget=hessian_bytes)


def test_unmeasured_dtype_uses_the_same_device(table) -> None:
    net, params, batch = _problem(
        nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), dtype=torch.float64
    )
    assert auto.choose(net, params, batch) == "kron"


def test_no_measurement_falls_back_to_generic(monkeypatch) -> None:
    monkeypatch.setattr(auto, "load_table", lambda: {**TABLE, "regimes": []})
    monkeypatch.setattr(auto, "PREFERRED", ())
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    assert auto.choose(net, params, batch) == auto.GENERIC_FALLBACK[0]


def test_compute_runs_the_choice(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    H = strategies.compute("auto", net, params, batch, F.mse_loss)
    assert torch.equal(H, strategies.compute("kron", net, params, batch, F.mse_loss))


def test_committed_table_is_what_the_committed_results_give(tmp_path) -> None:
    """The table `auto` ships must be remade, unchanged, by its own command."""
    committed = json.loads(auto.TABLE_PATH.read_text())
    files = committed["sources"]
    assert files, "the committed table names the files it was made from (relative to the root)"
    from bench.auto_table import main

    out = tmp_path / "table.json"
    assert main([*(str(ROOT / f) for f in files), "--out", str(out)]) == 0
    remade = json.loads(out.read_text())
    assert remade["regimes"] == committed["regimes"]
    assert remade["wrong_on"] == committed["wrong_on"]
    assert committed["regimes"], "the committed table holds measured regimes"


def _exact_problem():
    """A float64 problem small enough for the loop reference."""
    return _problem(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), 3, 2, torch.float64)


# --- compute: past refusals and errors, every result verified ---


class _Residual(nn.Module):
    """Not an MLP: a residual block, P = 1,105."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.mid = nn.Linear(32, 24)
        self.skip = nn.Linear(8, 24, bias=False)
        self.out = nn.Linear(24, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.mid(h) + self.skip(x)))


@pytest.mark.parametrize("loss_fn", [F.huber_loss, nn.MSELoss()], ids=["huber", "nn.MSELoss"])
def test_auto_exact_on_a_custom_module_at_1000_params(loss_fn) -> None:
    torch.manual_seed(0)
    net = _Residual().double()
    params = dict(net.named_parameters())
    assert sum(p.numel() for p in params.values()) >= 1000
    batch = (torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no strategy returned a Hessian that failed verification
        H = strategies.compute("auto", net, params, batch, loss_fn)
    assert_close_to(H, loop_hessian(net, list(params), batch, loss_fn), 1e-10)


def _register(monkeypatch, name: str, compute_fn, supports_fn=None) -> None:
    strategy = strategies.Strategy(
        name, "test-only", compute_fn, supports_fn or (lambda _net, _loss: (True, ""))
    )
    monkeypatch.setitem(strategies._REGISTRY, name, strategy)


def _only(monkeypatch, ranking: list[str]) -> None:
    """``auto`` tries exactly ``ranking`` (then its generic fallback), nothing preferred."""
    table = {"regimes": [], "wrong_on": {}}
    table["regimes"] = [
        {
            "device": "cpu",
            "dtype": "float64",
            "P_min": 1,
            "P_max": 10**6,
            "ranking": ranking,
            "peak_ratio": {},
        }
    ]
    monkeypatch.setattr(auto, "load_table", lambda: table)
    monkeypatch.setattr(auto, "PREFERRED", ())


def test_auto_passes_over_a_wrong_hessian_with_a_warning(monkeypatch) -> None:
    def wrong(net, params, batch, loss_fn=None):
        return strategies.compute("vmap_vjp", net, params, batch, loss_fn) * 1.05

    _register(monkeypatch, "off_by_5_percent", wrong)
    _only(monkeypatch, ["off_by_5_percent", "block_symmetric"])
    net, params, batch = _exact_problem()
    with pytest.warns(
        RuntimeWarning, match="'off_by_5_percent' returned a Hessian that fails verification"
    ):
        H = strategies.compute("auto", net, params, batch)
    assert_close_to(H, loop_hessian(net, list(params), batch), 1e-10)


def test_auto_moves_past_errors(monkeypatch) -> None:
    def out_of_memory(net, params, batch, loss_fn=None):
        raise MemoryError("no room")

    _register(monkeypatch, "no_room", out_of_memory)
    _only(monkeypatch, ["no_room", "vmap_jvp", "symmetric_half"])
    net, params, batch = _exact_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = strategies.compute("auto", net, params, batch, F.huber_loss)  # vmap_jvp: no formula
    assert_close_to(H, loop_hessian(net, list(params), batch, F.huber_loss), 1e-10)


def test_auto_reports_every_refusal_when_none_is_exact(monkeypatch) -> None:
    _only(monkeypatch, ["vmap_jvp"])
    monkeypatch.setattr(auto, "GENERIC_FALLBACK", ("block_symmetric",))
    net, params, batch = _exact_problem()
    with pytest.raises(
        ValueError, match="vmap_jvp: ValueError: .*huber.*; block_symmetric: ValueError"
    ):
        strategies.compute("auto", net, params, batch, F.huber_loss)


def test_auto_tries_kron_first_where_registered_and_supported(monkeypatch) -> None:
    assert auto.PREFERRED == ("kron",)
    net, params, batch = _exact_problem()
    calls = []

    def kron(net, params, batch, loss_fn=None):
        calls.append("kron")
        return strategies.compute("vmap_vjp", net, params, batch, loss_fn)

    monkeypatch.delitem(strategies._REGISTRY, "kron", raising=False)
    assert "kron" not in auto.candidates(net, params, batch)[0]  # a no-op while unregistered
    _register(monkeypatch, "kron", kron)
    assert auto.choose(net, params, batch) == "kron"
    H = strategies.compute("auto", net, params, batch)
    assert calls == ["kron"]
    assert_close_to(H, loop_hessian(net, list(params), batch), 1e-10)
    _register(monkeypatch, "kron", kron, lambda _net, _loss: (False, "not this net"))
    assert "kron" not in auto.candidates(net, params, batch)[0]
    assert "kron: not this net" in auto.candidates(net, params, batch)[1]


@pytest.mark.parametrize("loss_fn", [None, nn.MSELoss(), F.huber_loss])
def test_auto_takes_the_registered_kron_on_a_custom_module(loss_fn) -> None:
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    net, params, batch = _problem(Model(), 3, 2, torch.float64)
    assert auto.choose(net, params, batch, loss_fn) == "kron"
    H = strategies.compute("auto", net, params, batch, loss_fn)
    assert_close_to(H, loop_hessian(net, list(params), batch, loss_fn), 1e-10)
