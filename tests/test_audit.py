"""The correctness audit catches planted wrong, asymmetric, net-changing and crashing strategies."""

from __future__ import annotations

import json

import pytest
import torch

import strategies
from bench import audit
from bench.analysis import audit_tables
from bench.problems import zoo
from bench.reference import fd_hessian, loop_hessian
from bench.vocabulary import ERROR, OK, UNSUPPORTED, WRONG
from strategies import Strategy

# the audits below are session fixtures, and the module's tests one xdist group: under the
# README's ``pytest -n logical --dist loadgroup`` one worker runs them all, and each audit
# once (tests/test_suite.py checks that a group holds; under pytest 9.2 it did not, and
# the audit of every registered strategy ran on both workers, 234 s each on a new machine)
pytestmark = pytest.mark.xdist_group("audit")


def _loop(net, params, batch, loss_fn=None):
    return loop_hessian(net, list(params), batch, loss_fn)


def _perturbed(net, params, batch, loss_fn=None):
    return _loop(net, params, batch, loss_fn) * (1 + 1e-5)


def _asymmetric(net, params, batch, loss_fn=None):
    H = _loop(net, params, batch, loss_fn)
    H[0, -1] += 1e-5 * H.abs().max()
    return H


def _changes_the_net(net, params, batch, loss_fn=None):
    H = _loop(net, params, batch, loss_fn)
    net.train(not net.training)
    return H


def _nan(net, params, batch, loss_fn=None):
    return _loop(net, params, batch, loss_fn) * float("nan")


def _crashes(net, params, batch, loss_fn=None):
    raise ZeroDivisionError("planted crash")


def _never_called(net, params, batch, loss_fn=None):
    raise AssertionError("compute called although supports() said no")


PLANTED = [
    strategies.get("full_autograd"),
    Strategy("planted_loop", "returns the loop reference", _loop),
    Strategy("planted_perturbed", "loop reference times 1 + 1e-5", _perturbed),
    Strategy("planted_asymmetric", "loop reference with one entry moved", _asymmetric),
    Strategy("planted_mutating", "right matrix, flips the net's mode", _changes_the_net),
    Strategy("planted_nan", "loop reference times NaN", _nan),
    Strategy("planted_crash", "raises ZeroDivisionError", _crashes),
    Strategy(
        "planted_unsupported", "supports nothing", _never_called, lambda net, loss: (False, "no")
    ),
]


@pytest.fixture(scope="session")
def result():
    """One audit of the planted strategies over the whole zoo, shared by the tests below."""
    return audit.run_audit(strategy_objects=PLANTED, known_bugs=False)


def _cells(result, strategy):
    cells = [r for r in result["records"] if r["strategy"] == strategy]
    assert len(cells) == len(zoo.ZOO)
    return cells


def test_references_agree_on_every_zoo_model(result):
    assert [r["model"] for r in result["references"]] == zoo.names()
    for ref in result["references"]:
        assert ref["error"] is None
        assert ref["loop_vs_fd_rel_err"] <= audit.REFERENCE_TOL, ref
        assert ref["agree"]
    assert audit.references_agree(result)


@pytest.mark.parametrize("name", ["full_autograd", "planted_loop"])
def test_correct_strategy_passes_every_cell(result, name):
    for cell in _cells(result, name):
        assert cell["status"] == OK, cell
        assert cell["max_rel_err"] <= audit.TOL and cell["sym_err"] <= audit.TOL


def test_perturbed_strategy_is_wrong_everywhere(result):
    for cell in _cells(result, "planted_perturbed"):
        assert cell["status"] == WRONG, cell
        assert cell["max_rel_err"] == pytest.approx(1e-5, rel=1e-3)


def test_asymmetric_strategy_is_wrong_everywhere(result):
    for cell in _cells(result, "planted_asymmetric"):
        assert cell["status"] == WRONG, cell
        assert cell["sym_err"] > audit.TOL


def test_strategy_that_changes_the_net_is_wrong(result):
    for cell in _cells(result, "planted_mutating"):
        assert cell["status"] == WRONG, cell
        assert cell["max_rel_err"] <= audit.TOL
        assert "changed the net" in cell["message"]


def test_non_finite_hessian_is_wrong_and_the_json_stays_valid(result):
    for cell in _cells(result, "planted_nan"):
        assert cell["status"] == WRONG, cell
        assert cell["max_rel_err"] is None and "non-finite" in cell["message"]
    json.dumps(result, allow_nan=False)


def test_crash_is_recorded_and_the_audit_goes_on(result):
    for cell in _cells(result, "planted_crash"):
        assert cell["status"] == ERROR
        assert cell["exception"] == "ZeroDivisionError"
        assert cell["message"] == "planted crash"
        assert cell["max_rel_err"] is None


def test_unsupported_is_recorded_without_calling_compute(result):
    for cell in _cells(result, "planted_unsupported"):
        assert cell["status"] == UNSUPPORTED, cell
        assert cell["message"] == "no"


def test_ignore_supports_computes_and_says_so():
    refuses = Strategy(
        "planted_refuses", "right, but says no", _loop, lambda net, loss: (False, "x")
    )
    out = audit.run_audit(
        strategy_objects=[refuses], models=["tied"], known_bugs=False, ignore_supports=True
    )
    [cell] = out["records"]
    assert cell["status"] == OK
    assert "supports() says no: x" in cell["message"]


def test_records_follow_the_contract(result):
    keys = {"strategy", "model", "model_kind", "status", "max_rel_err", "sym_err"}
    keys |= {"exception", "message"}
    assert result["kind"] == "hessbench-audit"
    assert result["torch_version"] == torch.__version__
    for cell in result["records"]:
        assert keys <= set(cell)
        assert cell["model_kind"] == list(zoo.get(cell["model"]).model_kind)
    json.dumps(result)


def test_wrong_kinds_collects_tags_of_wrong_and_crashing_cells(result):
    kinds = audit_tables.wrong_kinds(result)
    every_tag = {tag for m in zoo.ZOO for tag in m.model_kind}
    assert kinds["full_autograd"] == set()
    assert kinds["planted_unsupported"] == set()
    assert kinds["planted_perturbed"] == every_tag
    assert kinds["planted_crash"] == every_tag


def test_wrong_kinds_only_names_models_where_the_strategy_failed():
    records = [
        {"strategy": "s", "model": "a", "model_kind": ["layernorm", "mlp"], "status": WRONG},
        {"strategy": "s", "model": "b", "model_kind": ["gru"], "status": OK},
        {"strategy": "s", "model": "c", "model_kind": ["conv"], "status": ERROR},
        {"strategy": "s", "model": "d", "model_kind": ["tied"], "status": UNSUPPORTED},
    ]
    assert audit_tables.wrong_kinds({"records": records}) == {"s": {"layernorm", "mlp", "conv"}}


def test_fd_agrees_with_loop_on_a_smooth_model():
    net, params, batch, loss_fn = zoo.build(zoo.get("mlp_tanh"))
    loop = loop_hessian(net, list(params), batch, loss_fn)
    fd = fd_hessian(net, list(params), batch, loss_fn, step=audit.FD_STEP)
    err = (loop - fd).abs().max() / loop.abs().max()
    assert err <= audit.REFERENCE_TOL


def test_zoo_builds_are_seeded_float64_and_small():
    assert len(set(zoo.names())) == len(zoo.ZOO)
    for model in zoo.ZOO:
        net, params, batch, _ = zoo.build(model)
        _, again, batch_again, _ = zoo.build(model)
        assert all(p.dtype == torch.float64 for p in params.values())
        assert all(torch.equal(params[n], again[n]) for n in params)
        assert torch.equal(batch[0], batch_again[0]) and torch.equal(batch[1], batch_again[1])
        assert 0 < sum(p.numel() for p in params.values()) <= 300
        assert model.model_kind


def test_zoo_tags_are_what_kinds_of_finds():
    for model in zoo.ZOO:
        net, _, _, _ = zoo.build(model)
        found = zoo.kinds_of(net)
        # residual connections and tied weights live in forward(), not in the modules
        assert set(model.model_kind) - {"residual", "tied"} <= found, model.name
        assert ("mlp" in found) == (model.model_kind == ("mlp",)), model.name


def test_a_refusal_counts_against_nothing_in_the_findings_nor_in_auto_s_table():
    """A ValueError or TypeError is the contract's refusal: neither a finding nor a kind."""
    records = [
        {"strategy": "s", "model": "a", "model_kind": ["gru"], "status": ERROR,
         "exception": "ValueError", "max_rel_err": None},
        {"strategy": "s", "model": "b", "model_kind": ["conv"], "status": ERROR,
         "exception": "RuntimeError", "max_rel_err": None},
    ]  # fmt: skip
    audit_json = {"records": records}
    assert audit_tables.wrong_kinds(audit_json) == {"s": {"conv"}}
    assert audit_tables.merged_wrong_kinds([audit_json]) == {"s": ["conv"]}
    assert not audit_tables.counts_against(ERROR, "TypeError")
    assert audit_tables.counts_against(WRONG) and audit_tables.counts_against(ERROR, "RuntimeError")


def test_kinds_of_tags_batchnorm_by_the_statistics_it_normalises_with():
    """Eval mode without running statistics normalises with the batch's: batchnorm-train."""
    tracked, untracked = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3, track_running_stats=False)
    assert strategies.kinds_of(tracked) == {"batchnorm-train"}
    assert strategies.kinds_of(untracked) == {"batchnorm-train"}
    tracked.eval(), untracked.eval()
    assert strategies.kinds_of(tracked) == {"batchnorm-eval"}
    assert strategies.kinds_of(untracked) == {"batchnorm-train"}
    assert strategies.uses_batch_statistics(untracked)
    assert not strategies.uses_batch_statistics(tracked)


def test_unknown_names_raise_key_error():
    with pytest.raises(KeyError, match="valid names"):
        zoo.get("no_such_model")
    with pytest.raises(KeyError, match="valid names"):
        audit.run_audit(["no_such_strategy"], ["tied"])
    with pytest.raises(ValueError, match="not both"):
        audit.run_audit(["full_autograd"], strategy_objects=PLANTED)


def test_known_bug_reproductions_are_run_in_a_fresh_namespace():
    bugs = [
        {"title": "shows", "strategies": [], "models": [], "upstream": None,
         "reproduction": "leaked = 1\nbug_shows = True\n"},
        {"title": "fixed", "strategies": [], "models": [], "upstream": None,
         "reproduction": "bug_shows = 'leaked' in globals()\n"},
        {"title": "broken", "strategies": [], "models": [], "upstream": None,
         "reproduction": "raise RuntimeError('snippet broke')\n"},
    ]  # fmt: skip
    out = audit.run_known_bugs(bugs)
    assert [b["reproduces"] for b in out] == [True, False, False]
    assert "snippet broke" in out[2]["error"]


def test_every_known_bug_has_a_runnable_reproduction():
    for bug in audit.run_known_bugs():
        assert bug["title"] and bug["reproduction"]
        assert "error" not in bug, bug
        assert isinstance(bug["reproduces"], bool)


def test_cli_writes_the_json_and_exits_zero(tmp_path, capsys):
    path = tmp_path / "audit.json"
    code = audit.main(["--json", str(path), "--strategies", "full_autograd", "--models", "tied"])
    assert code == 0
    written = json.loads(path.read_text())
    assert [(r["strategy"], r["model"], r["status"]) for r in written["records"]] == [
        ("full_autograd", "tied", OK)
    ]
    assert written["command"].endswith("--strategies full_autograd --models tied")
    assert "full_autograd" in capsys.readouterr().out


def test_cli_exits_non_zero_when_the_references_disagree(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "REFERENCE_TOL", 0.0)
    path = tmp_path / "audit.json"
    code = audit.main(["--json", str(path), "--strategies", "full_autograd", "--models", "tied"])
    assert code == 1
    assert json.loads(path.read_text())["references"][0]["agree"] is False


@pytest.fixture(scope="session")
def registered_result():
    """One audit of every registered strategy over the whole zoo."""
    return audit.run_audit(known_bugs=False)


@pytest.mark.parametrize("name", strategies.names())
def test_no_registered_strategy_is_silently_wrong(registered_result, name):
    wrong = [
        (r["model"], r["max_rel_err"], r["message"])
        for r in registered_result["records"]
        if r["strategy"] == name and r["status"] == WRONG
    ]
    assert wrong == []
