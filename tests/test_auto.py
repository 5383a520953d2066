"""``auto``, the planner: its estimate follows the committed measurements scaled by the net's
structure, it remembers what worked per structure, routes around refusals, errors and audit
findings, fits memory, and every Hessian it returns passed ``verify``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cases import PINN, RawWeights, ReadmeModel, assert_close_to
from torch import nn

import strategies
from bench.problems.models import custom_mse
from bench.reference import loop_hessian
from strategies import _pilot, _plan, auto
from strategies._contract import prepare, sharing_problems

ROOT = Path(__file__).resolve().parent.parent


def _regime(P_min: int, P_max: int, cost: dict[str, float], peak: dict[str, float]) -> dict:
    return {
        "machine": "m",
        "device": "cpu",
        "dtype": "float32",
        "P_min": P_min,
        "P_max": P_max,
        "ranking": sorted(cost, key=cost.get),
        "time_s": {},
        "cost_vs_grad": cost,
        "peak_ratio": peak,
    }


TABLE = {
    "command": "hand-made for tests",
    "sources": [],
    "regimes": [
        _regime(
            10,
            30,
            {"kron": 0.1, "block_symmetric": 0.2, "vmap_jvp": 0.3, "block_symmetric_chunked": 0.4},
            {"kron": 2.0, "block_symmetric": 4.0, "vmap_jvp": 5.0, "block_symmetric_chunked": 1.2},
        ),
        _regime(30, 100, {"vmap_jvp": 0.1, "kron": 0.2}, {"vmap_jvp": 2.0, "kron": 2.0}),
    ],
    # made up: as if the audit had found these wrong on LayerNorm nets
    "wrong_on": {"block_symmetric": ["layernorm"], "kron": ["layernorm", "conv"]},
}


@pytest.fixture(autouse=True)
def no_wisdom():
    """Each test starts, and leaves, with nothing learned."""
    auto.forget_wisdom()
    yield
    auto.forget_wisdom()


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(_plan, "load_table", lambda: TABLE)
    return TABLE


def _problem(net: nn.Module, n_in: int = 2, n_out: int = 1, dtype=torch.float32, n: int = 5):
    torch.manual_seed(0)
    net = net.to(dtype)
    batch = (torch.randn(n, n_in, dtype=dtype), torch.randn(n, n_out, dtype=dtype))
    return net, dict(net.named_parameters()), batch


def _small_mlp(width: int = 3):
    return _problem(nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)))


# --- the estimate ---


def test_choice_follows_the_cost_per_row_and_is_visible_through_the_registry(table) -> None:
    net, params, batch = _small_mlp()
    assert sum(p.numel() for p in params.values()) == 13
    assert strategies.get("auto").module.choose(net, params, batch) == "kron"
    plan = auto.plan(net, params, batch)
    times = {c.name: c.predicted_s for c in plan.candidates}
    # the same gradient time scales every strategy: the ratios are the table's
    assert times["block_symmetric"] / times["kron"] == pytest.approx(2.0)
    assert "kron" in str(plan) and "predicted" in str(plan)


def test_kron_workload_is_examined_only_where_kron_could_come_first(monkeypatch) -> None:
    """Every row of kron costs at least the cheaper of a Kronecker direction (0.2 gradients
    here) and a Hessian-vector row (vmap_jvp's 0.1): where vmap_vjp's 0.05 beats that, its
    workload (a forward under the site mode) is not examined, and the bound is its estimate."""
    kron = strategies.get("kron").module
    examined = []
    real = kron.workload
    monkeypatch.setattr(kron, "workload", lambda problem: examined.append(1) or real(problem))
    peaks = {"vmap_vjp": 2.0, "vmap_jvp": 2.0, "kron": 2.0}
    costs = {"vmap_vjp": 0.05, "vmap_jvp": 0.1, "kron": 0.2}
    table = {**TABLE, "regimes": [_regime(30, 100, costs, peaks)], "wrong_on": {}}
    monkeypatch.setattr(_plan, "load_table", lambda: table)
    net, params, batch = _small_mlp(8)  # P = 33
    plan = auto.plan(net, params, batch)
    times = {c.name: c for c in plan.candidates}
    assert plan.choice == "vmap_vjp" and not examined
    assert "not examined" in times["kron"].basis
    assert times["kron"].predicted_s == pytest.approx(times["vmap_jvp"].predicted_s)
    # where a Kronecker direction is the cheapest row, the workload sets the estimate
    costs.update(kron=0.01)
    table["regimes"] = [_regime(30, 100, costs, peaks)]
    plan = auto.plan(net, params, batch)
    assert plan.choice == "kron" and examined
    assert "Kronecker rows" in next(c.basis for c in plan.candidates if c.name == "kron")


def test_size_picks_the_regime(table) -> None:
    net, params, batch = _small_mlp(8)
    assert sum(p.numel() for p in params.values()) == 33
    assert auto.choose(net, params, batch) == "vmap_jvp"


def test_falls_back_where_the_specialised_strategy_refuses(table) -> None:
    net, params, batch = _problem(
        nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Tanh(), nn.Linear(2, 1))
    )
    # batch statistics mix samples: kron refuses, the next by predicted time is generic
    assert not strategies.get("kron").supports(net, None)[0]
    assert auto.choose(net, params, batch) == "block_symmetric"


def test_routes_away_from_strategies_the_audit_found_wrong(table) -> None:
    net, params, batch = _problem(
        nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 1))
    )
    assert auto.choose(net, params, batch) == "vmap_jvp"
    passed_over = auto.plan(net, params, batch).passed_over
    assert "kron: found wrong on layernorm" in passed_over


def test_memory_budget_picks_the_leaner(table) -> None:
    net, params, batch = _small_mlp()
    hessian_bytes = 13 * 13 * 4
    assert auto.choose(net, params, batch, memory_budget=int(1.5 * hessian_bytes)) == (
        "block_symmetric_chunked"
    )
    with pytest.raises(ValueError, match="over budget"):
        auto.choose(net, params, batch, memory_budget=hessian_bytes // 2)


def test_unmeasured_dtype_uses_the_same_device(table) -> None:
    net, params, batch = _problem(
        nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)), dtype=torch.float64
    )
    assert auto.choose(net, params, batch) == "kron"


def test_a_net_without_kronecker_structure_is_not_given_to_kron(monkeypatch) -> None:
    """Every row of RawWeights is a Hessian-vector product for kron: something else wins.
    Its workload is examined, as a Kronecker direction (0.05 gradients) would be the
    cheapest row."""
    costs = {"vmap_vjp": 0.08, "vmap_jvp": 0.1, "kron": 0.05}
    regime = _regime(100, 1000, costs, dict.fromkeys(costs, 2.0))
    monkeypatch.setattr(_plan, "load_table", lambda: {**TABLE, "regimes": [regime]})
    net, params, batch = _problem(RawWeights(), n_in=8, n=32)
    plan = auto.plan(net, params, batch)
    (kron,) = [c for c in plan.candidates if c.name == "kron"]  # kron takes any net
    assert kron.basis.startswith("0 Kronecker rows (0 of them shared")
    assert plan.choice != "kron"
    assert plan.candidates[0].predicted_s < kron.predicted_s


def test_a_pinn_with_autograd_grad_in_its_forward_gets_an_exact_reverse_mode_loop() -> None:
    net, params, batch = _problem(PINN(), n_in=2, n_out=3, dtype=torch.float64, n=16)
    plan = auto.plan(net, params, batch)
    # torch.func cannot differentiate through autograd.grad: the probes say so before anything runs
    assert plan.choice in auto.LAST_RESORT
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = strategies.compute("auto", net, params, batch)
    assert_close_to(H, loop_hessian(net, list(params), batch), 1e-10)


def test_the_forum_threads_model_gets_the_fastest_measured_below_1000_params() -> None:
    """P = 49: the table's regime nearest in P decides, not a preferred strategy."""
    net = ReadmeModel(input_dim=1, hidden_dim=16)
    net, params, batch = _problem(net, n_in=1, n=100)
    batch = (batch[0], batch[1].squeeze(-1))
    assert sum(p.numel() for p in params.values()) == 49
    table = _plan.load_table()
    nearest = _plan.regime(table, "cpu", "float32", 49)
    plan = auto.plan(net, params, batch, custom_mse)
    eligible = [name for name in nearest["ranking"] if name in {c.name for c in plan.candidates}]
    assert plan.choice == eligible[0]


# --- wisdom ---


def test_wisdom_sends_later_calls_straight_to_the_winner(monkeypatch, tmp_path) -> None:
    net, params, batch = _problem(ReadmeModel(input_dim=2, hidden_dim=5), n_in=2, n=6)
    batch = (batch[0], batch[1].squeeze(-1))
    H = strategies.compute("auto", net, params, batch)
    (entry,) = auto.wisdom().values()
    assert entry["how"] == "estimate"

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again despite wisdom")

    monkeypatch.setattr(_plan, "probe", no_planning)
    assert torch.equal(strategies.compute("auto", net, params, batch), H)

    path = tmp_path / "wisdom.json"
    assert auto.save_wisdom(path) == 1
    learned = auto.wisdom()
    auto.forget_wisdom()
    assert auto.load_wisdom(path) == 1
    assert auto.wisdom() == learned
    assert auto.plan.__name__  # the plan still works from loaded wisdom
    monkeypatch.undo()
    assert auto.plan(net, params, batch).how == "wisdom"


def _key(net, params, batch, loss_fn=None) -> str:
    return _plan.structure_key(net, params, batch, loss_fn)


def test_a_changed_structure_is_not_served_stale_wisdom() -> None:
    net, params, batch = _small_mlp()
    key = _key(net, params, batch)
    other_values = _problem(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)))
    assert _key(*other_values) == key  # values are not structure
    assert _key(net, params, (batch[0][:4], batch[1][:4])) != key  # batch size
    assert _key(net, params, batch, F.l1_loss) != key  # loss
    assert _key(net, params, batch, lambda o, t: ((o - t) ** 4).mean()) != key  # a lambda
    assert _key(net, {"0.weight": params["0.weight"]}, batch) != key  # chosen params
    assert _key(net, params, (batch[0].double(), batch[1].double())) != key  # dtype
    net.eval()
    assert _key(net, params, batch) != key  # mode


def test_load_wisdom_refuses_a_foreign_file(tmp_path) -> None:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"entries": {"k": "kron"}}))
    with pytest.raises(ValueError, match="not hessbench wisdom"):
        auto.load_wisdom(path)
    with pytest.raises(ValueError, match="cannot read wisdom"):
        auto.load_wisdom(tmp_path / "missing.json")


def test_stale_wisdom_costs_time_never_exactness(monkeypatch) -> None:
    def wrong(net, params, batch, loss_fn=None):
        return strategies.compute("vmap_vjp", net, params, batch, loss_fn) * 1.05

    _register(monkeypatch, "off_by_5_percent", wrong)
    net, params, batch = _exact_problem()
    auto._WISDOM[_key(net, params, batch)] = {"strategy": "off_by_5_percent", "how": "measure"}
    with pytest.warns(RuntimeWarning, match="'off_by_5_percent' returned a Hessian that fails"):
        H = strategies.compute("auto", net, params, batch)
    assert_close_to(H, loop_hessian(net, list(params), batch), 1e-10)


# --- measure ---


def test_measure_times_the_plausible_candidates_and_remembers_the_fastest() -> None:
    net, params, batch = _exact_problem()
    plan = auto.plan(net, params, batch, measure=True)
    assert plan.how == "measure"
    piloted = [r for r in plan.rows() if r["pilot_s"] is not None]
    assert 2 <= len(piloted) <= auto.MAX_PILOTS
    # the winner computed its whole Hessian, which passed the float64 check
    winner = plan.rows()[0]
    assert winner["strategy"] == plan.choice and winner["exact"] is True
    assert winner["measured_s"] is not None
    faster = [r for r in piloted if r["pilot_s"] < winner["pilot_s"]]
    assert all(r["exact"] is False or r["measured_s"] is not None for r in faster)
    assert auto.wisdom()[plan.key] == {"strategy": plan.choice, "how": "measure"}
    H = strategies.compute("auto", net, params, batch, measure=True)
    assert_close_to(H, loop_hessian(net, list(params), batch), 1e-10)


def _sliceable(dtype=torch.float64):
    """Passes of more than ``WHOLE_PASS`` rows: the pilots time slices, not whole passes."""
    return _problem(nn.Sequential(nn.Linear(3, 24), nn.Tanh(), nn.Linear(24, 4)), 3, 4, dtype, n=7)


@pytest.mark.parametrize("name", sorted(_pilot.SLICED))
def test_a_pilots_slices_are_rows_of_the_strategys_own_hessian(name) -> None:
    net, params, batch = _sliceable()
    H = strategies.compute(name, net, params, batch)
    with sharing_problems():
        problem = prepare(net, params, batch, nested_autograd=True)
        work = _pilot.work(name, problem)
        state = work.setup()
        assert sum(p.rows for p in work.passes) == problem.P
        for p in work.passes:
            for k in _pilot.slice_rows(p.rows):
                rows = p.run(state, k)
                assert_close_to(rows, H[p.row : p.row + k, p.column :].double(), 1e-12)
    assert any(len(_pilot.slice_rows(p.rows)) == 2 for p in work.passes)


@pytest.mark.parametrize(
    "make",
    [
        _sliceable,
        lambda: _exact_problem(),
        lambda: _problem(ReadmeModel(1, 16).double(), 1, 1, torch.float64, n=20),
    ],
    ids=["mlp-3-24-4", "mlp-3-5-2", "forum-model"],
)
def test_measure_mode_picks_an_exact_strategy_and_records_its_pilot(make) -> None:
    net, params, batch = make()
    if isinstance(net, ReadmeModel):  # the forum's squeezed output
        batch = (batch[0], batch[1].squeeze(-1))
    plan = auto.plan(net, params, batch, measure=True)
    assert_close_to(plan._hessian, loop_hessian(net, list(params), batch), 1e-10)
    P = sum(p.numel() for p in params.values())
    for row in plan.rows():
        if row["pilot_s"] is None:
            continue
        passes = row["pilot"]
        if passes[0]["pass"] == "whole":  # not sliced, or nothing to slice: the whole H
            assert passes[0]["rows"] == P and row["measured_s"] == row["pilot_s"]
            continue
        assert row["strategy"] in _pilot.SLICED
        assert passes[0]["pass"] == "setup"
        assert sum(p["rows"] for p in passes[1:]) == P
        assert all(0 < p["timed_rows"] <= p["rows"] for p in passes[1:])
        assert row["pilot_s"] == pytest.approx(sum(p["seconds"] for p in passes))
    if P <= _pilot.WHOLE_PASS:  # every pass fits in one slice: every pilot is whole
        assert all(r["pilot"] is None or r["pilot"][0]["pass"] == "whole" for r in plan.rows())
    winner = plan.rows()[0]
    # extrapolated against the whole run, within a generous factor (not a timing test)
    assert winner["measured_s"] / 5 <= winner["pilot_s"] <= 5 * winner["measured_s"]


# --- memory ---


def test_a_strategy_predicted_over_memory_refuses_before_allocating(tmp_path) -> None:
    """Under an address-space limit that the Hessian fits but vmap_vjp's measured peak does not."""
    script = textwrap.dedent(
        """
        import resource, torch, strategies
        from torch import nn
        from strategies import auto
        from strategies._memory import available_bytes
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 1))
        params = dict(net.named_parameters())
        batch = (torch.randn(64, 8), torch.randn(64, 1))
        P = sum(p.numel() for p in params.values())
        H = P * P * 4
        size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 12 * H, resource.RLIM_INFINITY))
        assert available_bytes("cpu") < 13 * H
        try:
            strategies.compute("vmap_vjp", net, params, batch)
        except MemoryError as error:
            print("refused:", error)
        print("auto:", auto.choose(net, params, batch))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: strategy 'vmap_vjp' is predicted to peak at" in run.stdout
    assert "auto: vmap_vjp" not in run.stdout


# --- one rule with the report ---


class _NormedNet(nn.Module):
    """A user's net of P = 1,291 in the 1,000-3,000 range: two hidden Linear layers, with or
    without an affine LayerNorm after each (not the grid's LayerNorm MLP: other widths, its
    own forward)."""

    def __init__(self, normed: bool, width: int = 30) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 1)
        self.na = nn.LayerNorm(width) if normed else nn.Identity()
        self.nb = nn.LayerNorm(width) if normed else nn.Identity()

    def forward(self, x):
        return self.head(torch.tanh(self.nb(self.b(torch.tanh(self.na(self.a(x)))))))


def test_a_net_with_layernorm_is_ranked_by_the_layernorm_nets_costs() -> None:
    """Where the committed runs rank the LayerNorm nets of a size range on their own, ``auto``
    ranks any net with a LayerNorm by that ranking (the decision box's choice for the arch);
    the same net without the LayerNorms by the range's."""
    table = _plan.load_table()
    P_range = next(r for r in table["regimes"] if r["device"] == "cpu" and r["P_min"] == 1000)
    normed = P_range["kinds"]["layernorm"]["ranking"]
    assert normed[0] != P_range["ranking"][0]  # else this test shows nothing
    for is_normed, first in ((True, normed[0]), (False, P_range["ranking"][0])):
        net, params, batch = _problem(_NormedNet(is_normed), n_in=6, n=64)
        assert 1000 <= sum(p.numel() for p in params.values()) < 3000
        plan = auto.plan(net, params, batch)
        assert plan.choice == first, (is_normed, str(plan))
        assert ("as measured on layernorm nets" in plan.candidates[0].basis) == is_normed


@pytest.mark.parametrize(
    "width, P, borrowed",
    [
        (16, 465, False),  # smaller than any LayerNorm net ranked: its range's plain nets
        (110, 13_531, True),  # larger than any: the LayerNorm nets of the nearest range below
    ],
)
def test_a_signature_its_range_did_not_rank_is_costed_as_in_the_nearest_range_below(
    width: int, P: int, borrowed: bool
) -> None:
    """Where P's own range ranked no net of the signature, its costs come from the nearest
    range below that did, never from one above (a row's cost against a gradient falls
    with P); the report's decision box takes the same ranking (``rule.decision``)."""
    table = _plan.load_table()
    cpu = [r for r in table["regimes"] if r["device"] == "cpu" and r["dtype"] == "float32"]
    own = next(r for r in cpu if r["P_min"] <= P < r["P_max"])
    assert "layernorm" not in own.get("kinds", {})  # else this case shows nothing
    below = [r for r in cpu if r["P_max"] <= own["P_min"] and "layernorm" in r.get("kinds", {})]
    above = [r for r in cpu if r["P_min"] >= own["P_max"] and "layernorm" in r.get("kinds", {})]
    assert bool(below) == borrowed and (borrowed or above)
    net, params, batch = _problem(_NormedNet(True, width), n_in=6, n=64)
    assert sum(p.numel() for p in params.values()) == P
    plan = auto.plan(net, params, batch)
    measured_on = [c.name for c in plan.candidates if "as measured on layernorm nets" in c.basis]
    if borrowed:
        nearest = max(below, key=lambda r: r["P_min"])
        assert plan.choice == nearest["kinds"]["layernorm"]["ranking"][0], str(plan)
        assert set(measured_on) == set(nearest["kinds"]["layernorm"]["cost_vs_grad"])
    else:
        assert measured_on == [], str(plan)


class _ConvHead(nn.Module):
    """A small CNN with a LayerNorm before its head: conv, ReLU, flatten, LayerNorm, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x)).flatten(1)))


#: (net, chosen params' prefixes, the kinds its Hessian's derivatives pass through)
_PATH_CASES = [
    (_ConvHead, ("head.",), set()),
    (_ConvHead, ("norm.", "head."), {"layernorm"}),
    (_ConvHead, ("conv.", "head."), {"conv", "layernorm"}),
    (
        lambda: nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 1)),
        ("0.",),
        {"layernorm"},
    ),
    (
        lambda: nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)),
        ("1.", "3."),
        set(),
    ),
]


@pytest.mark.parametrize("make, chosen, kinds", _PATH_CASES)
def test_the_kinds_a_net_is_costed_by_are_those_its_derivatives_pass_through(make, chosen, kinds):
    """``auto`` costs a net by the kinds of the modules whose outputs depend on the chosen
    params (``kinds_on_path``), not of every module: a CNN's head alone is a plain net."""
    torch.manual_seed(0)
    net = make()
    x = torch.randn(5, 1, 3, 6) if isinstance(net, _ConvHead) else torch.randn(5, 4)
    y = torch.randn(5, net(x).shape[-1])
    params = {n: p for n, p in net.named_parameters() if n.startswith(chosen)}
    assert strategies.kinds_on_path(prepare(net, params, (x, y))) == kinds
    # an input that already requires grad hides the path: every module's kinds count
    x.requires_grad_(True)
    everything = strategies.kinds_of(net) - {"mlp"}
    assert strategies.kinds_on_path(prepare(net, params, (x, y))) - {"mlp"} == everything


def test_auto_agrees_with_the_reports_recommendation_on_the_committed_runs() -> None:
    from bench.analysis import rule, tidy
    from bench.problems.grid import Case
    from bench.problems.models import make_problem

    committed = json.loads(_plan.TABLE_PATH.read_text())
    df, _ = tidy.load([str(ROOT / f) for f in committed["sources"]])
    table = rule.recommend(df)
    checked = 0
    for row in table.itertuples():
        if row.device != "cpu" or not isinstance(row.fastest, str):
            continue
        cases = df[
            (df["P"] >= row.P_min)
            & (df["P"] < row.P_max)
            & (df["arch"] == "mlp")
            & (df["device"] == row.device)
            & (df["dtype"] == row.dtype)
        ]
        if cases.empty:  # a range of the users' nets alone (the forum's P = 49)
            continue
        smallest = cases.sort_values("P").iloc[0]
        case = Case(
            **{
                f: getattr(smallest[f], "item", lambda v=smallest[f]: v)()
                for f in Case.__dataclass_fields__
            }
        )
        net, batch, loss_fn = make_problem(case)
        choice = auto.choose(net, dict(net.named_parameters()), batch, loss_fn)
        allowed = {row.fastest, row.runner_up} if row.tie else {row.fastest}
        assert choice in allowed, (row.P_min, row.P_max, choice, allowed)
        checked += 1
    assert checked >= 3


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


def _exact_problem():
    """A float64 problem small enough for the loop reference."""
    return _problem(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)), 3, 2, torch.float64)


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


def _only(monkeypatch, costs: dict[str, float]) -> None:
    """``auto`` ranks exactly by ``costs`` (gradients per row); the rest are unmeasured."""
    table = {"regimes": [_regime(1, 10**6, costs, {})], "wrong_on": {}}
    table["regimes"][0]["dtype"] = "float64"
    monkeypatch.setattr(_plan, "load_table", lambda: table)


def test_auto_passes_over_a_wrong_hessian_with_a_warning(monkeypatch) -> None:
    def wrong(net, params, batch, loss_fn=None):
        return strategies.compute("vmap_vjp", net, params, batch, loss_fn) * 1.05

    _register(monkeypatch, "off_by_5_percent", wrong)
    _only(monkeypatch, {"off_by_5_percent": 0.01, "block_symmetric": 0.1})
    net, params, batch = _exact_problem()
    with pytest.warns(
        RuntimeWarning, match="'off_by_5_percent' returned a Hessian that fails verification"
    ):
        H = strategies.compute("auto", net, params, batch)
    assert_close_to(H, loop_hessian(net, list(params), batch), 1e-10)
    assert auto.wisdom()[_key(net, params, batch)]["strategy"] == "block_symmetric"


def test_auto_moves_past_any_failure(monkeypatch) -> None:
    def out_of_memory(net, params, batch, loss_fn=None):
        raise MemoryError("no room")

    def torch_cannot(net, params, batch, loss_fn=None):
        raise RuntimeError("derivative for aten::something is not implemented")

    _register(monkeypatch, "no_room", out_of_memory)
    _register(monkeypatch, "torch_cannot", torch_cannot)
    _only(monkeypatch, {"no_room": 0.01, "torch_cannot": 0.02, "vmap_jvp": 0.03})
    net, params, batch = _exact_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = strategies.compute("auto", net, params, batch, F.huber_loss)  # vmap_jvp: no formula
    assert_close_to(H, loop_hessian(net, list(params), batch, F.huber_loss), 1e-10)


def test_auto_reports_every_failure_when_none_is_exact(monkeypatch) -> None:
    kept = {n: strategies.get(n) for n in ("vmap_jvp", "block_symmetric", "auto")}
    monkeypatch.setattr(strategies, "_REGISTRY", kept)
    _only(monkeypatch, {"vmap_jvp": 0.1, "block_symmetric": 0.2})
    net, params, batch = _exact_problem()
    with pytest.raises(
        ValueError, match="vmap_jvp: ValueError: .*huber.*; block_symmetric: ValueError"
    ):
        strategies.compute("auto", net, params, batch, F.huber_loss)


@pytest.mark.parametrize("loss_fn", [None, nn.MSELoss(), F.huber_loss])
def test_auto_exact_on_a_custom_module(loss_fn) -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    net, params, batch = _problem(Net(), 3, 2, torch.float64)
    H = strategies.compute("auto", net, params, batch, loss_fn)
    assert_close_to(H, loop_hessian(net, list(params), batch, loss_fn), 1e-10)


# --- fixed costs: each check once per call ---


def _counting(monkeypatch, module, name: str) -> list[int]:
    calls, original = [0], getattr(module, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_with_wisdom_auto_checks_its_inputs_and_reads_free_memory_once(monkeypatch) -> None:
    from strategies import _contract, _memory

    net, params, batch = _small_mlp()
    H = strategies.compute("auto", net, params, batch)  # learns
    checks = _counting(monkeypatch, _contract, "check_inputs")
    readings = _counting(monkeypatch, _memory, "available_bytes")
    assert torch.equal(strategies.compute("auto", net, params, batch), H)
    assert (checks[0], readings[0]) == (1, 1)
    checks[0] = readings[0] = 0
    strategies.compute(auto.wisdom().popitem()[1]["strategy"], net, params, batch)
    assert (checks[0], readings[0]) == (1, 1)  # a direct call checks for itself, once
    checks[0] = 0
    auto.plan(net, params, batch)
    assert checks[0] == 1


def test_a_direct_call_after_auto_still_checks_its_inputs() -> None:
    net, params, batch = _small_mlp()
    strategies.compute("auto", net, params, batch)
    name = auto.wisdom().popitem()[1]["strategy"]
    with torch.no_grad():
        batch[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        strategies.compute(name, net, params, batch)
    with pytest.raises(ValueError, match="NaN or infinite"):
        strategies.compute("auto", net, params, batch)


def test_the_memory_reading_auto_takes_serves_only_the_first_check_after_it(monkeypatch) -> None:
    from strategies import _memory

    readings = _counting(monkeypatch, _memory, "available_bytes")
    params = {"w": torch.zeros(3)}
    with _memory.reading_for_next_check(torch.device("cpu")) as free:
        assert free > 0 and readings[0] == 1
        _memory.check_fits(params)
        assert readings[0] == 1
        _memory.check_fits(params)
        assert readings[0] == 2
    _memory.check_fits(params)
    assert readings[0] == 3
