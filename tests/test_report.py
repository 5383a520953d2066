"""Tests of bench.results and bench.report: loading JSON, the recommendation rule, tables, files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import plots, report, results
from bench.vocabulary import (
    BASELINE,
    ERROR,
    OK,
    OLD_STATUSES,
    OOM,
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
    df, audits = results.load(inputs)
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
    df, _ = results.load(inputs)
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
    df, _ = results.load(inputs[:1])
    row = raw["benchmarks"][0]["extra_info"]
    cell = df[(df["strategy"] == row["strategy"]) & (df["case"] == row["case"])]
    assert cell["status"].tolist() == [WRONG]


def test_load_reads_the_old_status_words(inputs):
    """The fixtures, like the committed results/*.json, say "inaccurate" and "pass"."""
    benchmark_words = [b["extra_info"]["status"] for b in _raw(inputs[0])["benchmarks"]]
    audit_words = [r["status"] for r in _raw(inputs[2])["records"]]
    assert "inaccurate" in benchmark_words and "pass" in audit_words
    df, [audit] = results.load(inputs)
    assert set(df["status"]) <= set(STATUSES)
    cpu = df[df["source"] == str(inputs[0])]
    assert (cpu["status"] == WRONG).sum() == benchmark_words.count("inaccurate")
    assert [r["status"] for r in audit["records"]] == [OLD_STATUSES.get(w, w) for w in audit_words]


def test_load_names_the_file_with_an_unknown_status(inputs):
    raw = _raw(inputs[0])
    raw["benchmarks"][0]["extra_info"]["status"] = "fine"
    inputs[0].write_text(json.dumps(raw))
    with pytest.raises(results.InputFileError, match="bench_cpu.json.*'fine'"):
        results.load(inputs[:1])


@pytest.mark.parametrize("content", ['{"benchmarks": "nope"}', "not json", '["a list"]'])
def test_unknown_file_is_named_and_exits_2(tmp_path, inputs, capsys, content):
    bad = tmp_path / "strange.json"
    bad.write_text(content)
    with pytest.raises(results.InputFileError, match="strange.json"):
        results.load([inputs[0], bad])
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
    assert results.size_range(P) == expected


def test_size_range_rejects_nonpositive():
    with pytest.raises(ValueError, match="positive"):
        results.size_range(0)


def _cells(*cells: tuple) -> pd.DataFrame:
    """(strategy, case, min, stddev, status, peak_bytes, peer) rows of one machine and range."""
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
            "status": status,
            "peak_bytes": peak,
            "peer": peer,
        }
        for strategy, case, t, sd, status, peak, peer in cells
    ]
    return pd.DataFrame(rows)


def _only_row(df: pd.DataFrame) -> dict:
    table = results.recommend(df)
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


def test_recommend_leaves_out_ranges_where_nothing_was_timed():
    df = _cells(("a", "c1", np.nan, np.nan, SKIPPED, np.nan, False))
    assert results.recommend(df).empty


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
    table = results.growth_exponents(pd.DataFrame(rows)).iloc[0]
    assert table["exponent_in_P"] == pytest.approx(2.0)
    assert table["exponent_in_batch"] == pytest.approx(0.5)
    assert (table["fits_in_P"], table["fits_in_batch"]) == (2, 3)


def test_not_timed_lists_every_cell_without_a_trusted_time(inputs):
    df, _ = results.load(inputs)
    table = results.not_timed(df)
    assert len(table) == (df["status"] != OK).sum()
    assert table["reason"].astype(bool).all()
    wrong = table[table["status"] == WRONG]
    assert not wrong.empty and wrong["reason"].str.contains("tolerance").all()


def test_accuracy_matrix_and_audit_marks(inputs, tmp_path):
    _, audits = results.load(inputs)
    records = results.audit_frame(audits)
    matrix = results.accuracy_matrix(records)
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
    assert "vmap_jvp (audit: wrong or failing on layernorm)" in page
    assert "torch_func (audit: wrong or failing on batchnorm-train)" in page


def test_strategy_colours_are_fixed_by_name():
    names = [f"s{i:02d}" for i in range(15)]
    colours = plots.strategy_colours(names)
    assert colours == plots.strategy_colours(list(reversed(names)) + names[:3])
    assert len(set(colours.values())) == len(names)


def test_main_writes_every_output(tmp_path, inputs):
    plots_dir = tmp_path / "plots"
    assert report.main([*map(str, inputs), "--plots-dir", str(plots_dir), "--title", "T"]) == 0
    df, audits = results.load(inputs)
    for path in inputs[:2]:
        written = pd.read_csv(path.with_suffix(".csv"))
        assert len(written) == (df["source"] == str(path)).sum()
        assert set(written["machine"]) == {_raw(path)["machine_info"]["machine_label"]}
    matrix = pd.read_csv(inputs[2].with_name("audit_matrix.csv"), index_col=0)
    assert matrix.equals(results.accuracy_matrix(results.audit_frame(audits)))
    for name in ("headline", "time_vs_P", "memory_vs_P", "speedup", "cost_ratios"):
        assert (plots_dir / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    recommendations = json.loads((plots_dir / "recommendations.json").read_text())
    expected = results.recommend(df)
    assert [r["fastest"] for r in recommendations] == expected["fastest"].tolist()
    assert all(set(r) == set(results.RECOMMENDATION_FIELDS) for r in recommendations)
    never = set(df.loc[df["peer"] | (df["status"] != OK), "strategy"]) - set(
        df.loc[~df["peer"] & (df["status"] == OK), "strategy"]
    )
    assert never and not never & {r["fastest"] for r in recommendations}
    page = (plots_dir / "report.html").read_text()
    for raw in map(_raw, inputs[:2]):
        assert raw["machine_info"]["machine_label"] in page
        assert raw["hessbench"]["command"] in page
    assert "torch_version" in page and "2.13.0" in page
    assert "wrong or failing on layernorm" in page and "<pre>" in page


def test_main_with_an_audit_alone(tmp_path, inputs):
    html = tmp_path / "audit.html"
    assert (
        report.main([str(inputs[2]), "--plots-dir", str(tmp_path / "p"), "--html", str(html)]) == 0
    )
    page = html.read_text()
    assert "id='accuracy-matrix'" in page and "<img" not in page
    assert not (tmp_path / "p" / "recommendations.json").exists()


def test_a_dispatcher_is_never_recommended(inputs):
    """`auto` runs another strategy; even timed faster than everything, it is not a default."""
    df, _ = results.load(inputs)
    winners = set(results.recommend(df)["fastest"].dropna())
    faster = df[df["strategy"].isin(winners)].assign(strategy="auto")
    faster["min"] = faster["min"] / 10
    table = results.recommend(pd.concat([df, faster], ignore_index=True))
    assert "auto" not in set(table["fastest"]) | set(table["runner_up"]) | set(table["leanest"])
    assert set(table["fastest"].dropna()) == winners
