"""The torch.compile strategies: cache per structure, values as arguments, crash guards.

Tests that run inductor do so in a subprocess, so that a segfault in compiled code fails
one test (with its signal) instead of killing the test session; each compiles once.
The cache logic is tested in-process with ``torch.compile`` replaced by the identity.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.fx
from torch import nn

import strategies
from bench.problems import zoo as bench_zoo
from bench.reference import loop_hessian
from strategies import _compiled

COMPILED = ["torch_func_compiled", "vmap_jvp_compiled"]
ROOT = Path(__file__).resolve().parents[1]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3), torch.randn(n, 2)


def _cache(name: str) -> _compiled.CompiledHessian:
    """The compiled structures of strategy ``name``: its module's ``cache``."""
    return importlib.import_module(f"strategies.{name}").cache


def _rel_err(H: torch.Tensor, ref: torch.Tensor) -> float:
    return float((H.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", COMPILED)
def test_registered_as_compiling(name: str) -> None:
    strategy = strategies.get(name)
    assert strategy.compiles and not strategy.peer
    assert "torch.compile" in strategy.description


def test_torch_func_compiled_refuses_what_torch_func_refuses() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 1))
    ok, reason = strategies.get("torch_func_compiled").supports(net, None)
    assert (ok, reason) == strategies.get("torch_func").supports(net, None)
    assert not ok and "LayerNorm" in reason


@pytest.mark.parametrize("name", COMPILED)
def test_refuses_recurrent_layers_dynamo_does_not_trace(name: str) -> None:
    net = bench_zoo.build(bench_zoo.get("gru"))[0]
    ok, reason = strategies.get(name).supports(net, None)
    assert not ok and "GRU" in reason


def test_graph_break_raises_named_error_not_an_eager_fallback() -> None:
    """fullgraph: a loss dynamo must split fails on the call, naming the strategy."""

    def loss_with_break(outputs, targets):
        torch._dynamo.graph_break()  # a no-op when run eagerly
        return ((outputs - targets) ** 2).sum()

    net = _mlp()
    strategy = strategies.get("vmap_jvp_compiled")
    _cache("vmap_jvp_compiled").clear()
    with pytest.raises(ValueError, match="'vmap_jvp_compiled': torch.compile failed.*graph_break"):
        strategy.compute(net, dict(net.named_parameters()), _batch(), loss_with_break)
    assert len(_cache("vmap_jvp_compiled")) == 0  # the failed entry is not kept


# --- the cache, with torch.compile replaced by the identity (no inductor) ---------------


@pytest.fixture
def compile_calls(monkeypatch) -> list:
    """Every ``torch.compile`` call the strategies make; the function runs eagerly."""
    calls: list = []

    def identity(fn, **options):
        calls.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", identity)
    for name in COMPILED:
        _cache(name).clear()
    yield calls
    for name in COMPILED:
        _cache(name).clear()


@pytest.mark.parametrize("name", COMPILED)
def test_compiles_once_per_structure_with_static_shapes_and_fullgraph(name, compile_calls):
    strategy = strategies.get(name)
    net = _mlp()
    params = dict(net.named_parameters())
    strategy.compute(net, params, _batch())
    strategy.compute(net, params, _batch())  # new values, same structure
    assert len(compile_calls) == 1
    assert compile_calls[0]["fullgraph"] is True and compile_calls[0]["dynamic"] is False
    strategy.compute(net, params, _batch(6))  # another batch size: another structure
    net.eval()  # a module attribute the compiled code could read
    strategy.compute(net, params, _batch())
    subset = {"2.bias": params["2.bias"], "0.weight": params["0.weight"]}
    H = strategy.compute(net, subset, _batch())
    assert len(compile_calls) == 4
    P = sum(p.numel() for p in subset.values())
    assert H.shape == (P, P) and P < sum(p.numel() for p in params.values())


@pytest.mark.parametrize("name", COMPILED)
def test_cache_is_bounded_least_recently_used_first_out(name, compile_calls):
    strategy = strategies.get(name)
    net = _mlp()
    params = dict(net.named_parameters())
    sizes = range(2, 3 + _compiled.MAX_ENTRIES)  # one more structure than the cache holds
    for n in sizes:
        strategy.compute(net, params, _batch(n))
    assert len(_cache(name)) == _compiled.MAX_ENTRIES
    calls = len(compile_calls)
    strategy.compute(net, params, _batch(sizes[-1]))  # kept
    assert len(compile_calls) == calls
    strategy.compute(net, params, _batch(sizes[0]))  # evicted first: compiled again
    assert len(compile_calls) == calls + 1


@pytest.mark.parametrize("name", COMPILED)
def test_bad_loss_raises_before_compiling(name, compile_calls):
    net = _mlp()
    with pytest.raises(ValueError, match="scalar"):
        strategies.get(name).compute(
            net, dict(net.named_parameters()), _batch(), lambda o, t: (o - t) ** 2
        )
    assert compile_calls == []


def test_each_entry_has_its_own_code_object():
    """Dynamo counts recompiles per code object: entries must not share one."""

    def f(x):
        return x + 1

    g, h = _compiled._own_code(f), _compiled._own_code(f)
    assert g.__code__ is not f.__code__ and g.__code__ is not h.__code__
    assert g(torch.ones(2)).tolist() == [2.0, 2.0]


def test_zero_tensors_become_ordinary_zeros():
    """The post-grad pass keeps size, dtype and device of each ``_efficientzerotensor``."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    zero = graph.call_function(
        torch.ops.aten._efficientzerotensor.default,
        ([2, 3],),
        {"dtype": torch.float64, "device": torch.device("cpu")},
    )
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (x, zero)))
    _compiled.materialise_zero_tensors(graph)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._efficientzerotensor.default not in targets
    out = torch.fx.GraphModule(torch.nn.Module(), graph)(torch.ones(2, 3, dtype=torch.float64))
    assert out.dtype == torch.float64 and torch.equal(out, torch.ones(2, 3, dtype=torch.float64))


# --- inductor, one subprocess per strategy ----------------------------------------------

_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import torch, torch.nn as nn
    from torch._dynamo.utils import counters
    import strategies
    from bench.reference import loop_hessian

    name = sys.argv[1]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = dict(net.named_parameters())
    out = {}
    for step in ("first", "changed"):
        if step == "changed":
            with torch.no_grad():  # in place: the same tensors, new values
                net[0].weight.mul_(1.5)
                net[2].bias.add_(0.25)
        batch = (torch.randn(5, 3), torch.randn(5, 2))
        H = strategies.compute(name, net, params, batch)  # the default (MSE) loss
        ref = loop_hessian(net, list(params), batch)
        out[step] = {
            "rel_err": float((H.double() - ref).abs().max() / ref.abs().max()),
            "dtype": str(H.dtype),
            "graphs": counters["stats"]["unique_graphs"],
            "entries": len(importlib.import_module("strategies." + name).cache),
        }
    out["graph_breaks"] = sum(counters["graph_break"].values())
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_hessian_is_exact_and_reused_at_new_values(name: str) -> None:
    """Default loss (F.mse_loss: a segfault in inductor without the zero-tensor pass)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, name],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    if proc.returncode < 0:
        pytest.fail(f"compiled {name} died of {signal.Signals(-proc.returncode).name}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    first, changed = result["first"], result["changed"]
    assert first["dtype"] == changed["dtype"] == "torch.float32"
    assert first["rel_err"] <= 1e-5 and changed["rel_err"] <= 1e-5
    # new values, same structure: the same compiled graph, nothing traced again
    assert first["graphs"] == changed["graphs"] == 1
    assert first["entries"] == changed["entries"] == 1
    assert result["graph_breaks"] == 0


def test_values_are_arguments_not_constants_eagerly(compile_calls):
    """The function handed to torch.compile reads the values it is called with."""
    net = _mlp()
    params = dict(net.named_parameters())
    batch = _batch()
    strategies.compute("vmap_jvp_compiled", net, params, batch)
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    H = strategies.compute("vmap_jvp_compiled", net, params, batch)
    assert len(compile_calls) == 1
    assert _rel_err(H, loop_hessian(net, list(params), batch)) <= 1e-5
