"""``auto``: its choice follows the table, routes around refusals and audit findings, fits memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strategies
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
            "ranking": ["mlp_kron", "block_symmetric", "vmap_jvp", "block_symmetric_chunked"],
            "time_s": {},
            "peak_ratio": {
                "mlp_kron": 2.0,
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
            "ranking": ["vmap_jvp", "mlp_kron"],
            "time_s": {},
            "peak_ratio": {"vmap_jvp": 2.0, "mlp_kron": 2.0},
        },
    ],
    "wrong_on": {"block_symmetric": ["layernorm"], "mlp_kron": ["conv"]},
}


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(auto, "load_table", lambda: TABLE)
    return TABLE


def _problem(net: nn.Module, n_in: int = 2, n_out: int = 1, dtype=torch.float32):
    torch.manual_seed(0)
    net = net.to(dtype)
    batch = (torch.randn(5, n_in, dtype=dtype), torch.randn(5, n_out, dtype=dtype))
    return net, dict(net.named_parameters()), batch


def test_choice_is_visible_through_the_registry(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    assert sum(p.numel() for p in params.values()) == 13
    assert strategies.get("auto").choose(net, params, batch) == "mlp_kron"


def test_size_picks_the_regime(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)))
    assert sum(p.numel() for p in params.values()) == 33
    assert auto.choose(net, params, batch) == "vmap_jvp"


def test_falls_back_where_the_specialised_strategy_refuses(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)))
    # a loss mlp_kron does not know: it refuses, the next in the ranking is generic
    loss = lambda out, y: (out - y).abs().pow(3).mean()  # noqa: E731
    assert not strategies.get("mlp_kron").supports(net, loss)[0]
    assert auto.choose(net, params, batch, loss) == "block_symmetric"


def test_routes_away_from_strategies_the_audit_found_wrong(table) -> None:
    net, params, batch = _problem(
        nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 1))
    )
    # mlp_kron refuses LayerNorm; block_symmetric was found wrong on it; vmap_jvp is next
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
    assert auto.choose(net, params, batch) == "mlp_kron"


def test_no_measurement_falls_back_to_generic(monkeypatch) -> None:
    monkeypatch.setattr(auto, "load_table", lambda: {**TABLE, "regimes": []})
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    assert auto.choose(net, params, batch) == auto.GENERIC_FALLBACK[0]


def test_compute_runs_the_choice(table) -> None:
    net, params, batch = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    H = strategies.compute("auto", net, params, batch, F.mse_loss)
    assert torch.equal(H, strategies.compute("mlp_kron", net, params, batch, F.mse_loss))


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
