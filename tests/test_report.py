"""Tests of bench.analysis and bench.report: loading JSON, the recommendation rule, tables, files."""

from __future__ import annotations

import contextlib
import dataclasses
import html
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import rgb_to_hsv, to_rgba

import strategies
from bench import report
from bench.analysis import audit_tables, numbers, rule, tidy
from bench.report import plots
from bench.vocabulary import (
    BASELINE,
    ERROR,
    MIN_ROUNDS,
    OK,
    OLD_STATUSES,
    OOM,
    OVER_BUDGET,
    SKIPPED,
    STATUSES,
    TIMED,
    UNSUPPORTED,
    WRONG,
)

DATA = Path(__file__).parent / "data"
FIXTURES = ("bench_cpu.json", "bench_cuda.json", "audit.json")


@pytest.fixture
def inputs(tmp_path: Path) -> list[Path]:
    """Copies of the hand-made fixtures, so that files written next to them land in tmp."""
    return [Path(shutil.copy(DATA / name, tmp_path / name)) for name in FIXTURES]


def _raw(path: Path) -> dict:
    return json.loads(path.read_text())


def test_load_keeps_machines_apart_and_records_every_cell(inputs):
    df, audits = tidy.load(inputs)
    expected = {}
    for path in inputs[:2]:
        raw = _raw(path)
        expected[raw["machine_info"]["machine_label"]] = len(raw["benchmarks"]) + len(
            raw["hessbench"]["outcomes"]
        )
    assert df.groupby("machine").size().to_dict() == expected
    assert [a["kind"] for a in audits] == ["hessbench-audit"]
    assert not df.duplicated(["machine", "strategy", "case"]).any()


def test_load_statuses_timings_and_peer_flag(inputs):
    df, _ = tidy.load(inputs)
    statuses = set(df["status"])
    assert {OK, WRONG, OOM, SKIPPED, UNSUPPORTED} <= statuses
    timed = df["status"].isin(TIMED)
    assert df.loc[timed, "min"].notna().all()
    assert df.loc[~timed, "min"].isna().all()
    assert not df.loc[df["status"] == WRONG, "accurate"].astype(bool).any()
    # Outcomes carry no peer flag; the strategy's timed rows on the other machine supply it.
    jax_unsupported = df[(df["strategy"] == "jax_hessian") & (df["status"] == "unsupported")]
    assert not jax_unsupported.empty and jax_unsupported["peer"].all()
    assert not df.loc[df["strategy"] == BASELINE, "peer"].any()


def test_load_marks_timed_but_inaccurate_row_as_wrong(inputs):
    raw = _raw(inputs[0])
    raw["benchmarks"][0]["extra_info"].update(status=OK, accurate=False)
    inputs[0].write_text(json.dumps(raw))
    df, _ = tidy.load(inputs[:1])
    row = raw["benchmarks"][0]["extra_info"]
    cell = df[(df["strategy"] == row["strategy"]) & (df["case"] == row["case"])]
    assert cell["status"].tolist() == [WRONG]


def test_load_reads_the_old_status_words(inputs):
    """The fixtures, like the committed results/*.json, say "inaccurate" and "pass"."""
    benchmark_words = [b["extra_info"]["status"] for b in _raw(inputs[0])["benchmarks"]]
    audit_words = [r["status"] for r in _raw(inputs[2])["records"]]
    assert "inaccurate" in benchmark_words and "pass" in audit_words
    df, [audit] = tidy.load(inputs)
    assert set(df["status"]) <= set(STATUSES)
    cpu = df[df["source"] == str(inputs[0])]
    assert (cpu["status"] == WRONG).sum() == benchmark_words.count("inaccurate")
    assert [r["status"] for r in audit["records"]] == [OLD_STATUSES.get(w, w) for w in audit_words]


def test_load_names_the_file_with_an_unknown_status(inputs):
    raw = _raw(inputs[0])
    raw["benchmarks"][0]["extra_info"]["status"] = "fine"
    inputs[0].write_text(json.dumps(raw))
    with pytest.raises(tidy.InputFileError, match="bench_cpu.json.*'fine'"):
        tidy.load(inputs[:1])


@pytest.mark.parametrize("content", ['{"benchmarks": "nope"}', "not json", '["a list"]'])
def test_unknown_file_is_named_and_exits_2(tmp_path, inputs, capsys, content):
    bad = tmp_path / "strange.json"
    bad.write_text(content)
    with pytest.raises(tidy.InputFileError, match="strange.json"):
        tidy.load([inputs[0], bad])
    assert report.main([str(inputs[0]), str(bad), "--plots-dir", str(tmp_path / "p")]) == 2
    assert "strange.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("P", "expected"),
    [
        (1, (1, 3)),
        (299, (100, 300)),
        (1000, (1000, 3000)),
        (2999, (1000, 3000)),
        (3000, (3000, 10000)),
    ],
)
def test_size_range_edges(P, expected):
    assert rule.size_range(P) == expected


def test_size_range_rejects_nonpositive():
    with pytest.raises(ValueError, match="positive"):
        rule.size_range(0)


def _cells(*cells: tuple) -> pd.DataFrame:
    """(strategy, case, min, stddev, status, peak_bytes, peer) rows of one machine and range,
    each timed cell with five rounds ``min + k x stddev``."""
    rows = [
        {
            "machine": "m",
            "device": "cpu",
            "dtype": "float32",
            "P": 1500,
            "case": case,
            "strategy": strategy,
            "min": t,
            "stddev": sd,
            "rounds_s": [t + k * sd for k in range(MIN_ROUNDS)],
            "status": status,
            "peak_bytes": peak,
            "peer": peer,
        }
        for strategy, case, t, sd, status, peak, peer in cells
    ]
    return pd.DataFrame(rows)


def _only_row(df: pd.DataFrame) -> dict:
    table = rule.recommend(df)
    assert len(table) == 1
    return table.iloc[0].to_dict()


def test_recommend_clear_winner():
    row = _only_row(
        _cells(
            (BASELINE, "c1", 2.0, 0.02, OK, 600, False),
            ("fast", "c1", 1.0, 0.01, OK, 500, False),
            ("slow", "c1", 1.5, 0.01, OK, 100, False),
        )
    )
    assert row["fastest"] == "fast" and row["runner_up"] == "slow" and not row["tie"]
    assert row["fastest_vs_torch_func"] == pytest.approx(2.0)
    assert row["leanest"] == "slow" and row["leanest_peak_bytes"] == 100
    assert row["leanest_vs_torch_func"] == pytest.approx(6.0)
    assert (row["P_min"], row["P_max"]) == (1000, 3000)


def test_recommend_tie_within_spread_of_rounds():
    row = _only_row(
        _cells(
            ("a", "c1", 1.00, 0.05, OK, 100, False),
            ("b", "c1", 1.03, 0.01, OK, 100, False),
        )
    )
    assert row["fastest"] == "a" and row["runner_up"] == "b" and row["tie"]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1.0, 1.01, 1.02, 1.03, 1.04], [1.2, 1.21, 1.22, 1.23, 1.24], 1),  # 1.2x, p < 0.01
        ([1.2, 1.21, 1.22, 1.23, 1.24], [1.0, 1.01, 1.02, 1.03, 1.04], -1),
        ([1.0, 1.01, 1.02, 1.03, 1.04], [1.05, 1.06, 1.07, 1.08, 1.09], 0),  # under 1.1x
        ([1.0, 1.5, 1.0, 1.5, 1.0], [1.1, 1.6, 1.1, 1.6, 1.2], 0),  # 1.1x, rounds overlap
        ([1.0], [1.9], 0),  # one round each: no test, under HUGE_RATIO
        ([1.0], [2.5], 1),  # one round each, at least HUGE_RATIO
        ([1.0, 1.0, 1.0], [1.5, 1.5, 1.5], 0),  # 3 against 3 cannot reach p < 0.05
    ],
)
def test_versus_needs_ratio_and_significance(a, b, expected):
    assert rule.versus(a, b) == expected


def test_testable_is_where_the_rank_test_can_reach_alpha():
    assert rule.testable(MIN_ROUNDS, MIN_ROUNDS) and rule.testable(4, 4)
    assert not rule.testable(3, 3) and not rule.testable(1, 20)


@pytest.mark.parametrize("bad", [[], [0.0], [float("nan")], [-1.0]])
def test_versus_refuses_rounds_that_are_no_times(bad):
    with pytest.raises(ValueError, match="positive finite"):
        rule.versus(bad, [1.0])


def test_a_win_must_hold_case_by_case():
    """1.25x faster on the range's geometric mean, but slower on one case: a tie."""
    cells = _cells(
        ("a", "c1", 1.0, 0.01, OK, 100, False),
        ("b", "c1", 2.0, 0.01, OK, 100, False),
        ("a", "c2", 1.0, 0.01, OK, 100, False),
        ("b", "c2", 0.8, 0.01, OK, 100, False),
    )
    row = _only_row(cells)
    assert (row["fastest"], row["runner_up"]) == ("a", "b") and row["tie"]
    clear = _cells(
        *[("a", case, 1.0, 0.01, OK, 100, False) for case in ("c1", "c2", "c3")],
        ("b", "c1", 2.0, 0.01, OK, 100, False),
        ("b", "c2", 2.0, 0.01, OK, 100, False),
        ("b", "c3", 1.0, 0.01, OK, 100, False),
    )
    assert not _only_row(clear)["tie"]  # faster on two cases of three, tied on the third
    assert _only_row(clear[clear["case"] != "c2"])["tie"]  # one of two is not more than half


def test_cells_too_slow_to_repeat_are_left_out_of_the_rankings():
    cells = _cells(
        ("slow_flagged", "c1", 0.5, 0.0, OK, 100, False),
        ("repeated", "c1", 1.0, 0.01, OK, 100, False),
        (rule.PLANNER, "c1", 1.1, 0.01, OK, 100, False),
    ).assign(too_slow=[True, False, False])
    row = _only_row(cells)
    assert row["fastest"] == "repeated" and row["runner_up"] is None
    frame = cells.assign(arch="mlp", first_call_s=np.nan)
    assert rule.regrets(frame)["fastest"].tolist() == ["repeated"]


def test_a_case_on_which_nothing_was_repeated_ranks_nothing_but_its_failures_count():
    """c2's cells are all too slow to repeat (or failed): it is left out of the ranking
    rather than ruling out every strategy; "wrong" there still rules its strategy out."""
    cells = _cells(
        ("a", "c1", 1.0, 0.01, OK, 100, False),
        ("b", "c1", 1.5, 0.01, OK, 100, False),
        ("c", "c1", 0.5, 0.01, OK, 100, False),
        ("a", "c2", 9.0, 0.0, OK, 100, False),
        ("b", "c2", 8.0, 0.0, OK, 100, False),
        ("c", "c2", 8.0, 0.0, WRONG, 100, False),
    ).assign(too_slow=[False, False, False, True, True, False])
    assert list(rule.ranking(cells).index) == ["a", "b"]
    assert _only_row(cells)["fastest"] == "a"
    # with c2 repeated by b alone, c2 ranks again and a, not complete there, is out
    repeated = cells.assign(too_slow=[False, False, False, True, False, False])
    assert list(rule.ranking(repeated).index) == ["b"]


def _run_json(path: Path, minimum: float, rounds: int, when: str) -> Path:
    """A one-cell benchmark JSON of machine "m" whose rounds start at ``minimum``."""
    data = [minimum * (1 + 0.01 * k) for k in range(rounds)]
    stats = {
        "min": min(data),
        "max": max(data),
        "mean": float(np.mean(data)),
        "stddev": float(np.std(data)),
        "median": float(np.median(data)),
        "iqr": float(np.subtract(*np.percentile(data, [75, 25]))),
        "rounds": rounds,
        "data": data,
    }
    extra = {"strategy": "kron", "case": "w8-d1", "P": 81, "input": 8, "width": 8, "depth": 1}
    extra.update({"output": 1, "activation": "tanh", "loss": "mse", "batch": 4})
    extra.update({"dtype": "float32", "device": "cpu", "status": OK, "accurate": True})
    path.write_text(
        json.dumps(
            {
                "machine_info": {"machine_label": "m"},
                "datetime": when,
                "benchmarks": [{"group": "w8-d1", "stats": stats, "extra_info": extra}],
                "hessbench": {"grid": "t", "command": "t", "outcomes": []},
            }
        )
    )
    return path


def test_runs_merge_by_a_rule_whatever_their_order(tmp_path):
    files = [
        _run_json(tmp_path / "a.json", 2.0, 1, "2026-01-01"),
        _run_json(tmp_path / "b.json", 1.0, MIN_ROUNDS, "2026-01-02"),
        _run_json(tmp_path / "c.json", 1.5, MIN_ROUNDS, "2026-01-03"),
    ]
    merged = [tidy.load(order)[0] for order in (files, files[::-1], files[1:] + files[:1])]
    for df in merged[1:]:
        pd.testing.assert_frame_equal(df, merged[0])
    [cell] = merged[0].to_dict("records")
    # more rounds first, then the smaller median; the spread across the three runs beside it
    assert cell["source"] == str(files[1]) and cell["rounds"] == MIN_ROUNDS
    assert (cell["runs"], cell["runs_lo_s"], cell["runs_hi_s"]) == (3, 1.0, 2.0)


def test_noisy_cells_are_flagged_by_iqr_over_median(tmp_path):
    quiet = _run_json(tmp_path / "q.json", 1.0, MIN_ROUNDS, "2026-01-01")
    data = json.loads(quiet.read_text())
    data["benchmarks"][0]["stats"]["iqr"] = 0.2
    noisy = tmp_path / "n.json"
    noisy.write_text(json.dumps({**data, "machine_info": {"machine_label": "other"}}))
    df = tidy.load([quiet, noisy])[0].set_index("machine")
    assert df.loc["other", "noisy"] and not df.loc["m", "noisy"]


@pytest.mark.parametrize(("status", "peer"), [(WRONG, False), (OK, True)])
def test_recommend_never_picks_wrong_or_peer(status, peer):
    row = _only_row(
        _cells(
            ("excluded", "c1", 0.1, 0.001, status, 10, peer),
            ("right", "c1", 1.0, 0.01, OK, 100, False),
        )
    )
    assert row["fastest"] == "right" and row["leanest"] == "right"
    assert row["runner_up"] is None and not row["tie"]
    # A peer that ran accurately is still shown for comparison: its time over the fastest's.
    assert row["peers"] == ({"excluded": pytest.approx(0.1)} if peer else {})


def test_recommend_excludes_strategy_out_of_memory_on_any_case_of_the_range():
    row = _only_row(
        _cells(
            ("fast_small", "c1", 0.1, 0.001, OK, 10, False),
            ("fast_small", "c2", np.nan, np.nan, OOM, np.nan, False),
            ("steady", "c1", 1.0, 0.01, OK, 100, False),
            ("steady", "c2", 2.0, 0.01, OK, 200, False),
        )
    )
    assert row["fastest"] == "steady" and row["leanest"] == "steady"
    assert row["fastest_s"] == pytest.approx(np.sqrt(2.0))
    assert row["leanest_peak_bytes"] == 200


def test_recommend_when_nothing_ran_every_case():
    row = _only_row(
        _cells(
            ("a", "c1", np.nan, np.nan, ERROR, np.nan, False),
            ("b", "c1", 0.1, 0.001, WRONG, 10, False),
        )
    )
    assert row["fastest"] is None and row["leanest"] is None


def test_a_refusal_keeps_a_strategy_ranked_on_the_cases_it_ran():
    """A strategy that refuses a net (a PINN's ``autograd.grad`` in the forward) is ranked on
    the nets it takes; one that fails where it does not refuse is not a candidate; a case
    that only strategies too slow to repeat ran leaves the others ranked."""
    df = _cells(
        ("narrow", "mlp", 1.0, 0.01, OK, 100, False),
        ("narrow", "pinn", np.nan, np.nan, UNSUPPORTED, np.nan, False),
        ("narrow", "ln", np.nan, np.nan, UNSUPPORTED, np.nan, False),
        ("broad", "mlp", 1.5, 0.01, OK, 100, False),
        ("broad", "pinn", np.nan, np.nan, UNSUPPORTED, np.nan, False),
        ("broad", "ln", 3.0, 0.01, OK, 100, False),
        ("crashy", "mlp", 0.5, 0.01, OK, 100, False),
        ("crashy", "pinn", np.nan, np.nan, UNSUPPORTED, np.nan, False),
        ("crashy", "ln", np.nan, np.nan, ERROR, np.nan, False),
        ("loop", "mlp", 40.0, 0.0, OK, 100, False),
        ("loop", "pinn", 60.0, 0.0, OK, 100, False),
        ("loop", "ln", 50.0, 0.0, OK, 100, False),
    )
    df["too_slow"] = df["strategy"] == "loop"
    grad_s = {"mlp": 1e-3, "pinn": 2e-3, "ln": 4e-3}
    df["cost_vs_grad"] = df["min"] / (df["P"] * df["case"].map(grad_s))
    row = _only_row(df)
    assert (row["fastest"], row["runner_up"], row["tie"]) == ("narrow", "broad", False)
    assert (row["cases"], row["fastest_cases"]) == (3, 1)
    summary = rule.ranking(df)
    assert list(summary.index) == ["narrow", "broad"]
    assert summary["cases"].tolist() == [1, 2]
    # the fastest on "mlp" (1.5x narrow) and on "ln" (no other candidate ran it)
    assert summary.loc["broad", "vs_fastest"] == pytest.approx(1.5**0.5)
    # the planner's cost keeps the ranking's order; on a strategy that ran every case it
    # can run, against cases where it was the fastest, it is its own geometric mean
    assert summary["cost_vs_grad"].is_monotonic_increasing
    assert rule.times_over(df, "broad", "narrow") == pytest.approx(1.5)
    assert np.isnan(rule.times_over(df, "narrow", "loop"))


def test_the_ranking_is_the_geometric_mean_where_every_candidate_ran_every_case():
    df = _cells(
        ("a", "c1", 1.0, 0.01, OK, 100, False),
        ("a", "c2", 4.0, 0.01, OK, 100, False),
        ("b", "c1", 1.5, 0.01, OK, 100, False),
        ("b", "c2", 2.0, 0.01, OK, 100, False),
        ("c", "c1", 0.9, 0.01, OK, 100, False),
        ("c", "c2", 9.0, 0.01, OK, 100, False),
    )
    df["cost_vs_grad"] = df["min"] / df["P"]
    summary = rule.ranking(df)
    assert list(summary.index) == list(summary["time_s"].sort_values().index) == ["b", "a", "c"]
    own = df.groupby("strategy")["cost_vs_grad"].agg(rule.geomean)
    assert summary["cost_vs_grad"].to_dict() == pytest.approx(own.to_dict())


def test_recommend_leaves_out_ranges_where_nothing_was_timed():
    df = _cells(("a", "c1", np.nan, np.nan, SKIPPED, np.nan, False))
    assert rule.recommend(df).empty


def test_growth_exponents_recover_known_powers():
    rows = []
    for width, P in ((8, 100), (16, 400), (32, 1600)):
        for batch in (32, 128):
            rows.append(
                {
                    "machine": "m",
                    "device": "cpu",
                    "dtype": "float32",
                    "strategy": "s",
                    "status": OK,
                    "input": 8,
                    "output": 1,
                    "activation": "tanh",
                    "loss": "mse",
                    "width": width,
                    "depth": 1,
                    "batch": batch,
                    "P": P,
                    "min": 1e-6 * P**2 * batch**0.5,
                }
            )
    table = numbers.growth_exponents(pd.DataFrame(rows)).iloc[0]
    assert table["exponent_in_P"] == pytest.approx(2.0)
    assert table["exponent_in_batch"] == pytest.approx(0.5)
    assert (table["fits_in_P"], table["fits_in_batch"]) == (2, 3)


def test_not_timed_lists_every_cell_without_a_trusted_time(inputs):
    df, _ = tidy.load(inputs)
    table = numbers.not_timed(df)
    assert len(table) == (df["status"] != OK).sum()
    assert table["reason"].astype(bool).all()
    wrong = table[table["status"] == WRONG]
    assert not wrong.empty and wrong["reason"].str.contains("tolerance").all()


def test_accuracy_matrix_and_audit_marks(inputs, tmp_path):
    _, audits = tidy.load(inputs)
    records = audit_tables.audit_frame(audits)
    matrix = audit_tables.accuracy_matrix(records)
    assert set(matrix.index) == set(records["strategy"])
    assert set(matrix.columns) == set(records["model"])
    for _, record in records.iterrows():
        cell = matrix.loc[record["strategy"], record["model"]]
        assert cell.startswith(record["status"])
        if record["status"] == ERROR:
            assert record["exception"] in cell
    html = tmp_path / "report.html"
    assert report.main([*map(str, inputs), "--plots-dir", str(tmp_path), "--html", str(html)]) == 0
    page = html.read_text()
    # the fixture's audit: vmap_jvp wrong on layernorm, torch_func failing on batchnorm-train
    assert "vmap_jvp (audit: wrong on layernorm)" in page
    assert "torch_func (audit: error on batchnorm-train)" in page


def test_strategy_styles_are_fixed_by_name():
    names = [f"s{i:02d}" for i in range(15)]
    styles = plots.strategy_styles(names)
    assert styles == plots.strategy_styles(list(reversed(names)) + names[:3])
    assert len({(s.colour, s.marker) for s in styles.values()}) == len(names)
    assert {s.family for s in styles.values()} == {tidy.OTHER_FAMILY}


def test_main_writes_every_output(tmp_path, inputs):
    plots_dir = tmp_path / "plots"
    assert report.main([*map(str, inputs), "--plots-dir", str(plots_dir), "--title", "T"]) == 0
    df, audits = tidy.load(inputs)
    for path in inputs[:2]:
        written = pd.read_csv(path.with_suffix(".csv"))
        assert len(written) == (df["source"] == str(path)).sum()
        assert set(written["machine"]) == {_raw(path)["machine_info"]["machine_label"]}
    matrix = pd.read_csv(inputs[2].with_name("audit_matrix.csv"), index_col=0)
    assert matrix.equals(audit_tables.accuracy_matrix(audit_tables.audit_frame(audits)))
    for name in ("headline", "time_vs_P", "memory_vs_P", "speedup", "cost_ratios", "accuracy"):
        assert (plots_dir / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    recommendations = json.loads((plots_dir / "recommendations.json").read_text())
    expected = rule.recommend(df)
    assert [r["fastest"] for r in recommendations] == expected["fastest"].tolist()
    assert all(set(r) == set(rule.RECOMMENDATION_FIELDS) for r in recommendations)
    never = set(df.loc[df["peer"] | (df["status"] != OK), "strategy"]) - set(
        df.loc[~df["peer"] & (df["status"] == OK), "strategy"]
    )
    assert never and not never & {r["fastest"] for r in recommendations}
    page = (plots_dir / "report.html").read_text()
    for raw in map(_raw, inputs[:2]):
        assert raw["machine_info"]["machine_label"] in page
        assert raw["hessbench"]["command"] in page
    assert "torch_version" in page and "2.13.0" in page
    assert "audit: wrong on layernorm" in page and "<pre>" in page


def test_main_with_an_audit_alone(tmp_path, inputs):
    html = tmp_path / "audit.html"
    assert (
        report.main([str(inputs[2]), "--plots-dir", str(tmp_path / "p"), "--html", str(html)]) == 0
    )
    page = html.read_text()
    # the audit's heat map is the one figure: no benchmark, no timing figures
    assert "id='accuracy-matrix'" in page and page.count("<img") == 1
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == ["accuracy.png"]
    assert not (tmp_path / "p" / "recommendations.json").exists()


def test_a_dispatcher_is_never_recommended(inputs):
    """`auto` runs another strategy; even timed faster than everything, it is not a default."""
    df, _ = tidy.load(inputs)
    winners = set(rule.recommend(df)["fastest"].dropna())
    faster = df[df["strategy"].isin(winners)].assign(strategy="auto")
    faster["min"] = faster["min"] / 10
    table = rule.recommend(pd.concat([df, faster], ignore_index=True))
    assert "auto" not in set(table["fastest"]) | set(table["runner_up"]) | set(table["leanest"])
    assert set(table["fastest"].dropna()) == winners


# --- families, compiled variants, the summary -----------------------------------------------

#: compiled variants in tests/data/bench_compiled.json, and the eager strategy each compiles
COMPILED = {"torch_func_compiled": "torch_func", "vmap_jvp_compiled": "vmap_jvp"}


@pytest.fixture
def compiled(tmp_path: Path, monkeypatch) -> list[Path]:
    """The compiled-variant run (three archs, a device with nothing run) and the audit.

    Its compiled variants are registered for the test, as strategies/ registers them: the
    eager strategy's functions, ``compiles=True``, ``eager`` naming it.
    """
    for name, eager in COMPILED.items():
        variant = dataclasses.replace(strategies.get(eager), name=name, compiles=True, eager=eager)
        monkeypatch.setitem(strategies._REGISTRY, name, variant)
    return [
        Path(shutil.copy(DATA / name, tmp_path / name))
        for name in ("bench_compiled.json", "audit.json")
    ]


def _cell(raw: dict, strategy: str, case: str) -> dict:
    (bench,) = [b for b in raw["benchmarks"] if b["params"] == {"strategy": strategy, "case": case}]
    return {**bench["extra_info"], **bench["stats"]}


def _summary(page: str) -> str:
    """The text of the report's opening summary, tags stripped."""
    found = re.search(r"<div id='summary'>(.*?)</div>", page, re.S)
    assert found, "the report has no summary"
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def test_strategy_facts_come_from_the_registry(compiled):
    facts = tidy.strategy_facts(["torch_func_compiled", "full_autograd", "foreign", "auto"])
    assert facts.loc["full_autograd", "family"] == strategies.get("full_autograd").family
    assert facts.loc["auto", "family"] == strategies.get("auto").family
    assert facts.loc["foreign", "family"] == tidy.OTHER_FAMILY
    assert facts.loc["torch_func_compiled", "eager"] == "torch_func"
    # the eager form joins, just before its compiled variant; unknown names come last
    order = list(facts.index)
    assert order.index("torch_func") + 1 == order.index("torch_func_compiled")
    assert order[-1] == "foreign"
    assert list(facts["family"].cat.categories) == [*strategies.FAMILIES, tidy.OTHER_FAMILY]


def test_styles_by_family_compiled_dashed_in_its_eager_colour(compiled):
    names = [*strategies.names(), *COMPILED, "foreign"]
    styles = plots.strategy_styles(names)
    for name, eager in COMPILED.items():
        assert styles[name].colour == styles[eager].colour
        assert styles[name].marker == styles[eager].marker
        assert styles[name].linestyle == "--" and styles[eager].linestyle != "--"
    eager_forms = [n for n in names if n not in COMPILED]
    assert len({(styles[n].colour, styles[n].marker) for n in eager_forms}) == len(eager_forms)
    # one hue per family: shades of one hue within a family (the dispatcher's greys have
    # none), different hues across families
    hues: dict[str, list[float]] = {}
    for name in eager_forms:
        hue, saturation, _ = rgb_to_hsv(styles[name].colour[:3])
        if saturation > 0.05:
            hues.setdefault(styles[name].family, []).append(float(hue))

    def apart(a: float, b: float) -> float:
        return min(abs(a - b), 1 - abs(a - b))

    centre = {
        f: float(np.angle(np.mean(np.exp(2j * np.pi * np.array(h)))) / (2 * np.pi)) % 1
        for f, h in hues.items()
    }
    assert len(hues) == len(set(strategies.FAMILIES) | {tidy.OTHER_FAMILY}) - 1
    for fam, values in hues.items():
        assert max(apart(h, centre[fam]) for h in values) < 0.06, fam
        for other in hues.keys() - {fam}:
            assert apart(centre[fam], centre[other]) > 0.03, (fam, other)


def test_compiled_vs_eager_and_break_even(compiled):
    df, _ = tidy.load(compiled)
    raw = _raw(compiled[0])
    table = numbers.compiled_vs_eager(df)
    assert set(table["strategy"]) == set(COMPILED)
    for _, row in table.iterrows():
        eager = _cell(raw, row["eager"], row["case"])
        variant = _cell(raw, row["strategy"], row["case"])
        assert row["eager_s"] == eager["min"] and row["compiled_s"] == variant["min"]
        assert row["first_call_s"] == variant["first_call_s"]
        assert row["compiled_over_eager"] == pytest.approx(variant["min"] / eager["min"])
        if variant["min"] < eager["min"]:
            expected = variant["first_call_s"] / (eager["min"] - variant["min"])
            assert row["break_even"] == pytest.approx(expected)
        else:
            assert math.isinf(row["break_even"])
    # the layernorm case: torch_func_compiled refused it, so it has no pair there
    assert not ((table["arch"] == "layernorm") & (table["strategy"] == "torch_func_compiled")).any()
    summary = numbers.compile_summary(df).set_index("strategy")
    assert summary.loc["vmap_jvp_compiled", "faster"] == 0
    assert (
        summary.loc["torch_func_compiled", "faster"] == summary.loc["torch_func_compiled", "cases"]
    )


def test_recommendation_for_one_hessian_and_for_many(compiled, tmp_path):
    df, _ = tidy.load(compiled)
    table = rule.recommend(df)
    for _, row in table.iterrows():
        rows = df[(df["P"] >= row["P_min"]) & (df["P"] < row["P_max"]) & (df["device"] == "cpu")]
        rows = rows[rows["arch"] != "layernorm"]  # the plain nets': their own ranking
        assert row["cases"] == rows["case"].nunique()
        candidates = rule.summaries(rows, set(rows["case"]))
        candidates = candidates[~candidates["peer"].astype(bool)]
        # one Hessian: the first call where recorded, else the min time
        assert row["fastest_single"] == candidates["single_vs_fastest"].idxmin()
        assert row["fastest"] == candidates["vs_fastest"].idxmin()
    # in the fixture, a compiled variant is fastest for many Hessians but its compile makes
    # an eager strategy the choice for one
    differs = table[table["fastest"] != table["fastest_single"]]
    assert set(differs["fastest"]) <= set(COMPILED) and not differs.empty
    assert report.main([*map(str, compiled), "--plots-dir", str(tmp_path / "p")]) == 0
    written = json.loads((tmp_path / "p" / "recommendations.json").read_text())
    assert [r["cases"] for r in written] == table["cases"].tolist()
    assert [r["fastest_single"] for r in written] == table["fastest_single"].tolist()
    page = (tmp_path / "p" / "report.html").read_text()
    assert 'id="compiled"' in page
    for name in table["fastest"]:
        assert f"<b>{name}</b>" in page


def test_a_device_with_nothing_run_collapses_into_one_line_per_reason(compiled):
    df, _ = tidy.load(compiled)
    raw = _raw(compiled[0])
    skipped = [o for o in raw["hessbench"]["outcomes"] if o["device"] == "cuda"]
    lines = numbers.untimed_devices(df)
    assert len(lines) == 1
    line = lines.iloc[0]
    assert (line["device"], line["cells"]) == ("cuda", len(skipped))
    assert line["reason"] == skipped[0]["reason"]
    page = report.render_html("T", df, [], {}, rule.recommend(df))
    assert f"cuda on {line['machine']}: {len(skipped)} cells not run" in html.unescape(page)
    table = page[page.index('id="not-timed"') :]
    assert "-cuda" not in table
    # the cpu cells not timed are still listed one by one
    assert table.count("unsupported") == ((df["device"] == "cpu") & (df["status"] != OK)).sum()


def test_figures_leave_out_panels_with_nothing_timed(compiled, tmp_path):
    df, audits = tidy.load(compiled)
    styles = plots.strategy_styles(df["strategy"])
    for draw in (plots.time_vs_p, plots.memory_vs_p):
        fig = draw(df, styles)
        visible = [ax for ax in fig.axes if ax.get_visible()]
        assert {ax.get_title().splitlines()[-1] for ax in visible} == {"cpu, float32"}
        timed_archs = set(df.loc[(df["device"] == "cpu") & (df["status"] == OK), "arch"])
        assert {ax.get_title().split(":")[0] for ax in visible} == timed_archs  # one per arch
    nothing = df[df["device"] == "cuda"]
    assert plots.time_vs_p(nothing, styles) is None
    assert plots.speedup(nothing, styles) is None
    written = plots.write_figures(nothing, tmp_path)
    assert not list(tmp_path.glob("time_vs_P.png")) and "time_vs_P" not in written


def test_recommended_strategy_is_drawn_thicker(compiled):
    df, _ = tidy.load(compiled)
    styles = plots.strategy_styles(df["strategy"])
    fig = plots.time_vs_p(df, styles)
    # each panel (an arch) thickens what the rule recommends on its own cases
    arch = fig.axes[0].get_title().split(":")[0]
    recommended = set(rule.recommend(df[df["arch"] == arch])["fastest"])
    widths: dict[str, set] = {}
    for line in fig.axes[0].get_lines():
        for name, style in styles.items():
            if line.get_color() == style.colour and line.get_linestyle() == style.linestyle:
                widths.setdefault(name, set()).add(line.get_linewidth())
    thick = {name for name, w in widths.items() if max(w) > 2}
    assert recommended and thick == recommended


def test_accuracy_heat_map_colours_follow_statuses(inputs, tmp_path):
    _, audits = tidy.load(inputs)
    fig = plots.accuracy_heatmap(audits)
    (ax,) = fig.axes[:1]
    statuses = audit_tables.accuracy_statuses(audit_tables.audit_frame(audits))
    rows = [t.get_text() for t in ax.get_yticklabels()]
    columns = [t.get_text() for t in ax.get_xticklabels()]
    codes = ax.images[0].get_array()
    colours = ax.images[0].cmap
    for i, strategy in enumerate(rows):
        for j, model in enumerate(columns):
            status = statuses.loc[strategy, model]
            rgba = colours(ax.images[0].norm(codes[i, j]))
            assert np.allclose(rgba, to_rgba(plots.STATUS_COLOURS[status]))
    assert {t.get_text() for t in fig.legends[0].get_texts()} == set(plots.STATUS_COLOURS)
    assert plots.accuracy_heatmap([]) is None


def test_summary_answers_with_numbers_from_the_run(compiled, tmp_path):
    df, audits = tidy.load(compiled)
    raw = _raw(compiled[0])
    ratios = [
        _cell(raw, "full_autograd", b["params"]["case"])["min"] / b["stats"]["min"]
        for b in raw["benchmarks"]
        if b["params"]["strategy"] == "symmetric_half"
    ]
    text = _summary(report.render_html("T", df, audits, {}, rule.recommend(df)))
    assert text.startswith("Timed on hostC / Intel Xeon / 4 cores (cpu).")
    assert f"on all {len(ratios)} cases both ran accurately" in text
    assert f"{min(ratios):.2g}× to {max(ratios):.2g}× faster" in text
    choices = rule.decision(df)
    for arch in ("mlp", "custom", "layernorm"):
        runs = choices.loc[choices["arch"] == arch].sort_values("P_min")["runs"]
        assert runs.notna().all() and f"auto runs {runs.iloc[0]} at " in text
    # mlp_kron, which refuses all but the plain MLPs and is the fastest there, is what the
    # planner runs on them; kron runs the other archs, and the page says why
    assert "auto runs mlp_kron at 1,000 ≤ P < 3,000 and torch_func_compiled" in text
    assert "auto runs kron at 1,000 ≤ P < 3,000; mlp_kron does not run it (unsupported" in text
    assert "torch_func_compiled does not run it (unsupported: wrong Hessian upstream" in text
    # what to avoid: the audit's wrong strategy, the much slower loop, the costly compile
    assert "Avoid vmap_jvp on nets with layernorm layers" in text
    slow = numbers.much_slower(df)
    assert set(slow["strategy"]) and all(f"{s} (" in text for s in slow["strategy"])
    assert "vmap_jvp_compiled is never faster than vmap_jvp" in text
    pairs = numbers.compiled_vs_eager(df)
    tfc = pairs[pairs["strategy"] == "torch_func_compiled"]["break_even"]
    assert f"pays after {math.ceil(tfc.min())} to {math.ceil(tfc.max())} Hessians" in text
    assert "for many" in text and "first call included" in text
    assert "CUDA is not available on this machine" in text


def test_summary_says_what_is_missing(inputs, tmp_path):
    """bench_cpu's symmetric_half is wrong everywhere; no custom or LayerNorm cases; no audit."""
    df, audits = tidy.load(inputs[:2])
    text = _summary(report.render_html("T", df, [], {}, rule.recommend(df)))
    cpu = df.loc[df["device"] == "cpu", "machine"].iloc[0]
    assert f"On {cpu} (cpu), no case ran both symmetric_half and full_autograd" in text
    assert "symmetric_half: wrong on 3 cases" in text
    # the other machine never ran symmetric_half: its own sentence says so
    assert "On gpuB / NVIDIA H100 (cuda), no case ran both" in text
    assert "symmetric_half did not run" in text
    assert "for a custom module" in text and "these runs hold no timed case" in text
    assert "no audit among these inputs" in text.lower()
    # two machines: each gets its own sentences
    assert all(f"On {m} (" in text for m in set(df["machine"]))
    _, audits = tidy.load(inputs[2:])
    only_audit = _summary(
        report.render_html("T", df.iloc[:0], audits, {}, rule.recommend(df.iloc[:0]))
    )
    assert only_audit.startswith("No benchmark run among these inputs")
    assert "Avoid vmap_jvp" in only_audit


def test_report_of_the_committed_runs(tmp_path):
    """The committed reference runs and audits make a full report whose summary answers
    from their numbers (older runs, without the arch axis and in the old status words,
    too)."""
    committed = sorted((Path(__file__).parent.parent / "results").glob("*.json"))
    inputs = [str(shutil.copy(path, tmp_path / path.name)) for path in committed]
    assert report.main([*inputs, "--plots-dir", str(tmp_path / "p")]) == 0
    df, _ = tidy.load(inputs)
    ratios = numbers.speedups(df, numbers.HALF_LOOP, numbers.FULL_LOOP)["speedup"]
    text = _summary((tmp_path / "p" / "report.html").read_text())
    assert f"{ratios.min():.2g}× to {ratios.max():.2g}×" in text
    choices = rule.decision(df)
    for arch, mine in choices[choices["device"] == "cpu"].groupby("arch"):
        first = mine.sort_values("P_min").iloc[0]
        if not isinstance(first["runs"], str):  # a PINN only the loops, too slow, ran
            where = f"{first['P_min']:,} ≤ P"
            assert f"auto runs what its estimates pick at {where}" in text, arch
            continue
        assert f"auto runs {first['runs']} at {first['P_min']:,} ≤ P" in text, arch
    assert (tmp_path / "p" / "accuracy.png").exists()


def test_regrets_are_auto_over_the_fastest_exact_strategy_that_is_no_peer(inputs, tmp_path):
    """auto planted as torch_func's ok rows at 1.5x its time, first call 4x; a peer planted
    fastest everywhere must not count; one case where auto is wrong has no regret."""
    df, _ = tidy.load(inputs[:1])
    base = df[(df["strategy"] == "torch_func") & (df["status"] == OK)]
    assert len(base) >= 2
    auto = base.assign(strategy="auto", min=base["min"] * 1.5, first_call_s=base["min"] * 4)
    auto.loc[auto.index[-1], "status"] = WRONG
    peer = base.assign(strategy="planted_peer", min=base["min"] / 100, peer=True)
    planted = pd.concat([df, auto, peer], ignore_index=True)
    table = rule.regrets(planted)
    assert len(table) == len(base)
    for case, row in table.set_index("case").iterrows():
        exact = df[(df["case"] == case) & (df["status"] == OK) & ~df["peer"].astype(bool)]
        exact = exact[~exact["strategy"].isin(rule.DISPATCHERS)]
        fastest = exact.loc[exact["min"].idxmin()]
        assert row["fastest"] == fastest["strategy"] != "planted_peer"
        assert row["fastest_s"] == fastest["min"]
        mine = base[base["case"] == case].iloc[0]
        if case == auto["case"].iloc[-1]:
            assert row["planner_status"] == WRONG and math.isnan(row["regret"])
        else:
            assert row["regret"] == pytest.approx(1.5 * mine["min"] / fastest["min"])
            assert row["first_call_regret"] == pytest.approx(4 * mine["min"] / fastest["min"])
    page = report.render_html("T", planted, [], {}, rule.recommend(planted))
    assert 'id="regrets"' in page and "Largest regret" in page
    assert rule.regrets(df).empty  # no auto in the fixture itself
    assert "was not timed in these runs" in report.render_html("T", df, [], {}, rule.recommend(df))


def test_compare_lists_cells_changed_by_10_percent_and_significantly(tmp_path, capsys):
    old = _run_json(tmp_path / "old.json", 1.0, MIN_ROUNDS, "2026-01-01")
    slower = _run_json(tmp_path / "slower.json", 1.5, MIN_ROUNDS, "2026-01-02")
    same = _run_json(tmp_path / "same.json", 1.05, MIN_ROUNDS, "2026-01-02")
    table = rule.changes(tidy.load([old])[0], tidy.load([slower])[0])
    assert table[["strategy", "change"]].values.tolist() == [["kron", "slower"]]
    assert table["new_over_old"].iloc[0] == pytest.approx(1.5)
    assert rule.changes(tidy.load([slower])[0], tidy.load([old])[0])["change"].tolist() == [
        "faster"
    ]
    assert rule.changes(tidy.load([old])[0], tidy.load([same])[0]).empty
    assert report.main(["--compare", str(old), str(slower)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 cells changed") and "slower" in out and "kron on w8-d1" in out


@pytest.mark.parametrize(
    "argv, message",
    [(["--compare", "a.json"], "expected 2"), (["x.json", "--compare", "a", "b"], "no other")],
)
def test_compare_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) if "expected" in message else contextlib.nullcontext():
        assert report.main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_committed_runs_give_one_table_whatever_their_order():
    from bench import auto_table

    committed = json.loads(auto_table.DEFAULT_OUT.read_text())
    root = auto_table.DEFAULT_OUT.parent.parent
    sources = [str(root / name) for name in committed["sources"]]
    built = []
    for order in (sources, sources[::-1], sources[1:] + sources[:1]):
        df, audits = tidy.load(order)
        table = auto_table.build(df, audits, committed["sources"], committed["command"])
        built.append((table, rule.recommendation_records(rule.recommend(df))))
    assert built[0][0] == committed  # the committed table is this merged dataset's
    assert all(b == built[0] for b in built[1:])


def test_the_decision_box_of_the_committed_runs_is_auto_table_and_the_planner(tmp_path):
    """The report of the committed runs names, per size range and arch, the first strategy of
    auto_table.json's ranking of that range that ran every case of the arch, and what the
    planner itself chooses on the arch's smallest case of the range; the "What to use"
    sentences name the same."""
    from bench import auto_table
    from bench.problems.grid import ARCH_KINDS, Case
    from bench.problems.models import chosen_params, make_problem
    from strategies import auto

    committed = json.loads(auto_table.DEFAULT_OUT.read_text())
    root = auto_table.DEFAULT_OUT.parent.parent
    inputs = [
        Path(shutil.copy(root / name, tmp_path / Path(name).name)) for name in committed["sources"]
    ]
    assert report.main([*map(str, inputs), "--plots-dir", str(tmp_path / "plots")]) == 0
    page = (tmp_path / "plots" / "report.html").read_text()
    assert page.index("id='decision'") < page.index("<h2>Summary</h2>")
    box = page[
        page.index("id='decision-table'") : page.index("</table>", page.index("id='decision'"))
    ]
    shown = re.findall(
        r"<td>cpu, float32</td><td>(\w+)</td><td>([\d,]+) ≤ P &lt; ([\d,]+)</td>"
        r"<td>(?:<code>(\w+)</code>|([^<]+))</td>",
        box,
    )
    rankings = {r["P_min"]: r["ranking"] for r in committed["regimes"] if r["device"] == "cpu"}
    kinds = {r["P_min"]: r["kinds"] for r in committed["regimes"] if r["device"] == "cpu"}
    df, _ = tidy.load(inputs)
    df = df[df["device"] == "cpu"].assign(arch=df["arch"].fillna("mlp"))
    assert len(shown) == len(df.groupby(["arch", df["P"].map(lambda p: rule.size_range(p))]))
    summary = _summary(page)
    named = 0
    for arch, lo, hi, name, none in shown:
        P_min, P_max = int(lo.replace(",", "")), int(hi.replace(",", ""))
        cells = df[(df["P"] >= P_min) & (df["P"] < P_max) & (df["arch"] == arch)]
        if P_min in rankings:
            ok = rule.ranked(cells)
            ok = ok[~ok["strategy"].isin(rule.DISPATCHERS)]
            refused = cells[cells["status"] == UNSUPPORTED]
            failed = set(cells.loc[cells["status"].isin(rule.FAILED), "strategy"])
            # the first of the planner's ranking for the arch (its kinds signature's, then the
            # range's) that ran every case of the arch it supports where any was repeated
            own = kinds[P_min].get(ARCH_KINDS.get(arch, ""), {}).get("ranking")
            everywhere = [
                s
                for s in rule.planner_order(rankings[P_min], own)
                if set(ok[ok["strategy"] == s]["case"])
                and s not in failed
                and set(ok[ok["strategy"] == s]["case"])
                | set(refused[refused["strategy"] == s]["case"])
                >= set(ok["case"])
            ]
            assert name == (everywhere[0] if everywhere else ""), (arch, P_min, name)
        if not name:
            assert none == "no ranked strategy ran every case it supports"
            continue
        named += 1
        smallest = cells.sort_values("P").iloc[0]
        fields = {f: smallest[f] for f in Case.__dataclass_fields__}
        case = Case(**{f: v.item() if isinstance(v, np.generic) else v for f, v in fields.items()})
        net, batch, loss_fn = make_problem(case)
        assert auto.choose(net, chosen_params(case, net), batch, loss_fn) == name, (arch, P_min)
        assert f"{name} at {P_min:,} ≤ P < {P_max:,}" in summary, (arch, P_min)
    assert named >= 3 and {"mlp", "custom", "layernorm"} <= {a for a, *_ in shown}
    # the LayerNorm MLP of 1,000 to 3,000 is ranked by the LayerNorm nets' own costs
    assert ("layernorm", "1,000", "3,000", "kron", "") in shown
    assert "<td>cuda</td><td>any</td><td>any P</td><td>not measured</td>" in box


def test_case_cells_give_each_ranked_cell_its_multiples(inputs):
    df, _ = tidy.load(inputs)
    cells = numbers.case_cells(df)
    ranked = rule.ranked(df)
    assert len(cells) == len(ranked)
    for _, case in cells.groupby(["machine", "device", "case"]):
        assert case["rank"].tolist() == list(range(1, len(case) + 1))
        assert case["median"].is_monotonic_increasing
        eligible = case[~case["strategy"].isin(rule.DISPATCHERS)]
        assert eligible["times_fastest"].min() == pytest.approx(1.0)
    row = cells.iloc[0]
    grad_s = ranked.set_index(["machine", "case", "strategy"]).loc[
        (row["machine"], row["case"], row["strategy"]), "grad_s"
    ]
    assert row["times_grad"] == pytest.approx(row["median"] / grad_s)
    table = numbers.multiples(df)
    assert set(table["strategy"]) == set(cells["strategy"])
    assert (table["times_fastest_lo"] <= table["times_fastest"] + 1e-12).all()


def test_accuracy_of_the_timed_cells_is_counted(inputs):
    df, _ = tidy.load(inputs)
    accuracy = numbers.accuracy_of_timed(df)
    timed = df[df["status"].isin(TIMED)]
    assert accuracy["cells"] == len(timed) and accuracy["wrong"] == (timed["status"] == WRONG).sum()
    assert accuracy["worst"] == pytest.approx(timed["max_rel_err"].max())


def test_not_timed_cells_fold_into_counts_by_reason():
    df = pd.DataFrame(
        {
            "machine": "m",
            "device": "cpu",
            "P": [100, 200, 300],
            "case": ["a", "b", "c"],
            "strategy": ["s", "s", "t"],
            "status": OVER_BUDGET,
            "reason": [f"predicted {t} s per call > --time-budget 30 s" for t in (31.5, 40, 2e3)],
            "max_rel_err": np.nan,
            "tolerance": np.nan,
        }
    )
    [row] = numbers.not_timed_counts(df).to_dict("records")
    assert row["reason"] == "predicted N s per call > --time-budget N s"
    assert (row["cells"], row["cases"], row["strategies"]) == (3, 3, 2)


def test_report_states_accuracy_shows_cases_and_prints_each_bug_once(inputs, tmp_path):
    html_path = tmp_path / "report.html"
    audit = json.loads(inputs[2].read_text())
    twin = tmp_path / "audit-twin.json"
    twin.write_text(json.dumps(audit))  # a second audit listing the same known bug
    argv = [*map(str, inputs), str(twin), "--plots-dir", str(tmp_path), "--html", str(html_path)]
    assert report.main(argv) == 0
    page = html_path.read_text()
    assert "id='timed-accuracy'" in page and "<table id='cases'>" in page
    assert page.count(html.escape(audit["known_bugs"][0]["title"])) == 1
    counts = page.index('id="not-timed-counts"')
    assert counts < page.index("<details><summary>Every cell") < page.index('id="not-timed"')


def test_figures_fit_the_page_with_contenders_in_colour_and_untimed_cells_as_markers(compiled):
    df, _ = tidy.load(compiled)
    styles = plots.strategy_styles(df["strategy"])
    drawn = [draw(df, styles) for draw in (plots.time_vs_p, plots.memory_vs_p, plots.cost_ratios)]
    bars = plots.speedup(df, styles)
    for fig in [*drawn, bars]:
        assert fig.get_figwidth() <= plots.PAGE_WIDTH  # shown at full size at 1400 px
    ax = drawn[0].axes[0]
    arch = ax.get_title().split(":")[0]
    cells = numbers.case_cells(df[(df["arch"] == arch) & (df["device"] == "cpu")])
    contenders = set(rule.recommend(df[df["arch"] == arch])["fastest"].dropna())
    contenders |= set(cells.loc[cells["rank"] <= plots.CONTENDER_RANK, "strategy"])
    coloured = {
        name
        for line in ax.get_lines()
        for name, style in styles.items()
        if line.get_color() == style.colour and line.get_linestyle() == style.linestyle
    }
    assert coloured and coloured <= contenders
    grey = [line for line in ax.get_lines() if line.get_color() == plots.OTHERS_COLOUR]
    assert len(grey) >= 1 or set(df["strategy"]) <= contenders
    # a cell not timed is never a bar: no hatched or empty-faced patch in the speedup figure
    for axis in bars.axes:
        assert all(not patch.get_hatch() or patch.get_hatch() == ".." for patch in axis.patches)


def test_two_cells_are_compared_by_their_interleaved_rounds_where_both_have_them(tmp_path):
    """A JSON whose cells, timed apart, say "faster", and whose interleaved rounds say "tie":
    the ranking follows the interleaved rounds; a cell without them falls back to its own."""
    path = _run_json(tmp_path / "run.json", 1.0, MIN_ROUNDS, "2026-01-01")
    raw = json.loads(path.read_text())
    [kron] = raw["benchmarks"]
    slow = json.loads(json.dumps(kron))
    slow["extra_info"]["strategy"] = "torch_func"
    slow["stats"]["data"] = [t * 1.5 for t in kron["stats"]["data"]]
    slow["stats"].update(min=1.5, median=float(np.median(slow["stats"]["data"])))
    raw["benchmarks"].append(slow)
    same = [1.0, 1.01, 0.99, 1.02, 1.0]
    rounds = {"kron": same, "torch_func": [t * 1.01 for t in same]}
    raw["hessbench"]["interleaved"] = {
        "w8-d1": {"strategies": ["kron", "torch_func"], "rounds_s": rounds}
    }
    path.write_text(json.dumps(raw))
    df, _ = tidy.load([path])
    cells = df.set_index("strategy")
    assert cells.loc["kron", "interleaved_s"] == same
    a, b = rule.compared_rounds(cells.loc["kron"], cells.loc["torch_func"])
    assert (a, b) == (same, rounds["torch_func"]) and rule.versus(a, b) == 0
    alone = cells.loc["torch_func"].copy()
    alone["interleaved_s"] = None
    a, b = rule.compared_rounds(cells.loc["kron"], alone)
    assert rule.versus(a, b) == 1  # each one's own rounds: 1.5x apart
    [row] = rule.decision(df).to_dict("records")
    assert row["runs"] == "kron" and row["runner_up"] == "torch_func"
    assert row["tie"] and row["wins"] == 0
    # another run's interleaved rounds are not compared with this one's
    other = cells.loc["torch_func"].copy()
    other["source"] = "another.json"
    assert rule.compared_rounds(cells.loc["kron"], other)[0] == kron["stats"]["data"]
