"""The numbers of the report's summary, from the tidy frame (``bench.analysis.tidy``): half vs
full loop, growth exponents, much slower strategies, compiled vs eager, devices with nothing
run, cells not timed, each cell's multiples of the gradient and of the fastest. They rank and
compare by the recommendation rule (``bench.analysis.rule``); docs/DESIGN.md, "The report",
says how the page words them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from bench.analysis.rule import DISPATCHERS, geomean, ranked
from bench.analysis.tidy import (
    CASE_FIELDS,
    CELL_COLUMNS,
    family,
    strategy_facts,
    with_case_defaults,
)
from bench.vocabulary import OK, TIMED, WRONG

__all__ = [
    "FULL_LOOP",
    "HALF_LOOP",
    "SLOW_FACTOR",
    "growth_exponents",
    "speedups",
    "much_slower",
    "compiled_vs_eager",
    "compile_summary",
    "device_timed",
    "untimed_devices",
    "not_timed",
    "first_calls",
    "case_cells",
    "multiples",
    "accuracy_of_timed",
    "not_timed_counts",
]

#: the loop most users write first, and the same loop over half the Hessian: whether the
#: half pays is the question the report answers first
FULL_LOOP = "full_autograd"


HALF_LOOP = "symmetric_half"


#: "much slower": at least this many times the fastest's time (an order of magnitude)
SLOW_FACTOR = 10.0


def _slope(x: pd.Series, y: pd.Series) -> float:
    return float(np.polyfit(np.log(x.astype(float)), np.log(y.astype(float)), 1)[0])


def growth_exponents(df: pd.DataFrame) -> pd.DataFrame:
    """Exponent of min time in P and in batch size, from log-log least-squares fits.

    In P: over the cases of one family (``tidy.family``). In batch: over cases that differ
    only in batch. Each fit needs at least two distinct values; a strategy's exponent is the
    mean over its fits, with the fit count.
    """
    ok = with_case_defaults(df[df["status"] == OK])
    keys = ["machine", "device", "dtype", "strategy"]
    sweeps = {
        "P": [family(ok)],
        "batch": [f for f in CASE_FIELDS if f != "batch"],
    }
    parts = []
    for variable, fixed in sweeps.items():
        fits = [
            {**dict(zip(keys, key)), "exponent": _slope(g[variable], g["min"])}
            for key, g in ok.groupby(keys + fixed, sort=True)
            if g[variable].nunique() >= 2
        ]
        if fits:
            part = pd.DataFrame(fits).groupby(keys)["exponent"].agg(["mean", "count"])
            parts.append(part.set_axis([f"exponent_in_{variable}", f"fits_in_{variable}"], axis=1))
    if not parts:
        columns = ["exponent_in_P", "fits_in_P", "exponent_in_batch", "fits_in_batch"]
        return pd.DataFrame(columns=keys + columns)
    return pd.concat(parts, axis=1).reset_index()


def _beside(df: pd.DataFrame, partner: dict[str, str]) -> pd.DataFrame:
    """Each "ok" row of a strategy in ``partner`` beside its partner's "ok" row on its case.

    Adds ``partner`` (the name) and ``partner_s`` (its min time); cases where either did not
    run accurately are left out.
    """
    ok = with_case_defaults(df[df["status"] == OK])
    left = ok[ok["strategy"].isin(partner)]
    left = left.assign(partner=left["strategy"].map(partner))
    right = ok[[*CELL_COLUMNS, "strategy", "min"]].rename(
        columns={"strategy": "partner", "min": "partner_s"}
    )
    return left.merge(right, on=[*CELL_COLUMNS, "partner"]).sort_values(
        ["machine", "device", "P", "case"]
    )


def speedups(df: pd.DataFrame, strategy: str, other: str) -> pd.DataFrame:
    """Per case where both ran "ok": ``speedup``, the other's min time over the strategy's.

    Columns: machine, device, dtype, arch, case, P, speedup (above 1: ``strategy`` faster).
    """
    pairs = _beside(df, {strategy: other})
    return (
        pairs[CELL_COLUMNS].assign(speedup=pairs["partner_s"] / pairs["min"]).reset_index(drop=True)
    )


def much_slower(df: pd.DataFrame, factor: float = SLOW_FACTOR) -> pd.DataFrame:
    """Strategies at least ``factor`` times slower than the fastest on the cases they ran.

    Per machine and device: on each case, the fastest min time of the strategies that could
    be recommended (status "ok", no peer, no dispatcher); each such strategy's
    ``times_fastest`` is the geometric mean over its "ok" cases of its min over that, with
    the count of ``cases``. Sorted slowest first.
    """
    ok = df[(df["status"] == OK) & ~df["peer"].astype(bool) & ~df["strategy"].isin(DISPATCHERS)]
    keys = ["machine", "device"]
    ok = ok.assign(ratio=ok["min"] / ok.groupby([*keys, "case"])["min"].transform("min"))
    table = (
        ok.groupby([*keys, "strategy"])
        .agg(times_fastest=("ratio", geomean), cases=("case", "nunique"))
        .reset_index()
    )
    table = table[table["times_fastest"] >= factor]
    return table.sort_values([*keys, "times_fastest"], ascending=[True, True, False]).reset_index(
        drop=True
    )


def compiled_vs_eager(df: pd.DataFrame) -> pd.DataFrame:
    """Each compiled variant beside its eager form, per case where both ran "ok".

    Columns: machine, device, dtype, arch, case, P, ``strategy`` (the compiled variant),
    ``eager``, ``eager_s`` and ``compiled_s`` (min times), ``compiled_over_eager``,
    ``first_call_s`` (the compiled variant's first call, compile included) and
    ``break_even``: ``first_call_s / (eager_s - compiled_s)``, about the number of Hessians
    of one structure after which compiling pays; infinite where the compiled variant is not
    faster, null where its first call was not recorded.
    """
    facts = strategy_facts(df["strategy"].unique())
    pairs = _beside(df, facts["eager"].dropna().to_dict())
    saved = pairs["partner_s"] - pairs["min"]
    first = pd.to_numeric(pairs["first_call_s"])
    table = pairs[CELL_COLUMNS].assign(
        strategy=pairs["strategy"],
        eager=pairs["partner"],
        eager_s=pairs["partner_s"],
        compiled_s=pairs["min"],
        compiled_over_eager=pairs["min"] / pairs["partner_s"],
        first_call_s=first,
        break_even=(first / saved).where(saved > 0, np.where(first.notna(), np.inf, np.nan)),
    )
    return table.reset_index(drop=True)


def compile_summary(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`compiled_vs_eager` per machine, device and compiled variant, over its cases.

    Columns: machine, device, strategy, eager, cases, ``faster`` (cases where the compiled
    variant's min time beats the eager one's), ``first_call_lo``/``_hi``, ``eager_lo``/``_hi``
    (the eager min times) and ``break_even_lo``/``_hi``.
    """
    pairs = compiled_vs_eager(df)
    return (
        pairs.assign(faster=pairs["compiled_s"] < pairs["eager_s"])
        .groupby(["machine", "device", "strategy", "eager"], sort=True)
        .agg(
            cases=("case", "nunique"),
            faster=("faster", "sum"),
            first_call_lo=("first_call_s", "min"),
            first_call_hi=("first_call_s", "max"),
            eager_lo=("eager_s", "min"),
            eager_hi=("eager_s", "max"),
            break_even_lo=("break_even", "min"),
            break_even_hi=("break_even", "max"),
        )
        .reset_index()
    )


def device_timed(df: pd.DataFrame) -> pd.Series:
    """Whether anything was timed on each row's machine and device (a bool per row)."""
    timed = df["status"].isin(TIMED).groupby([df["machine"], df["device"]]).transform("any")
    return timed.astype(bool)


def untimed_devices(df: pd.DataFrame) -> pd.DataFrame:
    """Machines' devices where nothing was timed, one row per status and reason.

    Columns: machine, device, status, reason, ``cells``, ``cases`` and ``strategies``
    (counts); e.g. every CUDA cell of a machine without CUDA in one row.
    """
    rows = df[~device_timed(df)]
    columns = ["machine", "device", "status", "reason", "cells", "cases", "strategies"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    keys = ["machine", "device", "status", "reason"]
    table = rows.assign(reason=rows["reason"].fillna("no reason recorded")).groupby(keys)
    return table.agg(
        cells=("case", "size"), cases=("case", "nunique"), strategies=("strategy", "nunique")
    ).reset_index()[columns]


def not_timed(df: pd.DataFrame) -> pd.DataFrame:
    """Cells without a trusted time: every status but "ok", with the reason."""
    rows = df[df["status"] != OK].copy()
    wrong = rows["status"] == WRONG
    rows.loc[wrong, "reason"] = [
        f"max_rel_err {err:.2g} > tolerance {tol:.2g}"
        for err, tol in zip(rows.loc[wrong, "max_rel_err"], rows.loc[wrong, "tolerance"])
    ]
    columns = ["machine", "device", "case", "P", "strategy", "status", "reason"]
    return rows[columns].sort_values(["machine", "device", "P", "case", "strategy"])


def first_calls(df: pd.DataFrame) -> pd.DataFrame:
    """First call (compile) against steady state, for strategies that compile and ran "ok"."""
    first = df[df["first_call_s"].notna() & (df["status"] == OK)]
    first = first.assign(first_call_over_steady=first["first_call_s"] / first["min"])
    columns = ["machine", "device", "case", "strategy", "first_call_s", "min"]
    return first[[*columns, "first_call_over_steady"]]


def case_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Every ranked cell (``rule.ranked``; peers and dispatchers included) with its multiples:
    ``times_grad``, its median over one gradient of the same loss (``grad_s``, curvlinops'
    convention), and ``times_fastest``, its median over the least median of the case among
    the strategies that could be recommended; ``rank`` within its case by median.

    Columns: machine, device, dtype, case, P, strategy, rank, median, min, max, rounds,
    noisy, max_rel_err, times_grad, times_fastest.
    """
    columns = ["machine", "device", "dtype", "case", "P", "strategy", "rank", "median", "min"]
    columns += ["max", "rounds", "noisy", "max_rel_err", "times_grad", "times_fastest"]
    cells = ranked(df)
    if cells.empty:
        return pd.DataFrame(columns=columns)
    keys = ["machine", "device", "case"]
    median = pd.to_numeric(cells["median"]).fillna(pd.to_numeric(cells["min"]))
    eligible = ~cells["peer"].astype(bool) & ~cells["strategy"].isin(DISPATCHERS)
    fastest = median.where(eligible).groupby([cells[k] for k in keys]).transform("min")
    cells = cells.assign(
        median=median,
        times_grad=median / pd.to_numeric(cells["grad_s"]),
        times_fastest=median / fastest,
        rank=median.groupby([cells[k] for k in keys]).rank(method="first").astype(int),
        noisy=cells["noisy"] if "noisy" in cells else False,
    )
    return cells.sort_values([*keys[:2], "P", "case", "rank"])[columns].reset_index(drop=True)


def multiples(df: pd.DataFrame) -> pd.DataFrame:
    """Per machine, device and strategy, over its ranked cells (:func:`case_cells`): ``cases``,
    ``times_grad`` (median over cases) and ``times_fastest`` (geometric mean, with its range),
    fastest first."""
    cells = case_cells(df)
    columns = ["machine", "device", "strategy", "cases", "times_grad", "times_fastest"]
    columns += ["times_fastest_lo", "times_fastest_hi"]
    if cells.empty:
        return pd.DataFrame(columns=columns)
    table = (
        cells.groupby(["machine", "device", "strategy"])
        .agg(
            cases=("case", "nunique"),
            times_grad=("times_grad", "median"),
            times_fastest=("times_fastest", geomean),
            times_fastest_lo=("times_fastest", "min"),
            times_fastest_hi=("times_fastest", "max"),
        )
        .reset_index()
    )
    return table.sort_values(["machine", "device", "times_fastest"])[columns].reset_index(drop=True)


def accuracy_of_timed(df: pd.DataFrame) -> dict[str, Any]:
    """How accurate the timed cells were: ``cells``, ``wrong`` (beyond tolerance), and the
    worst ``max_rel_err`` with its ``strategy`` and ``case`` (None where nothing was timed)."""
    timed = df[df["status"].isin(TIMED)]
    record: dict[str, Any] = {"cells": len(timed), "wrong": int((timed["status"] == WRONG).sum())}
    errors = pd.to_numeric(timed["max_rel_err"]).dropna()
    record.update(worst=None, strategy=None, case=None)
    if len(errors):
        worst = timed.loc[errors.idxmax()]
        record.update(worst=float(errors.max()), strategy=worst["strategy"], case=worst["case"])
    return record


def not_timed_counts(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`not_timed` folded: per status and reason with its numbers written ``N``, the
    count of ``cells``, ``cases`` and ``strategies``, most cells first."""
    rows = not_timed(df)
    columns = ["status", "reason", "cells", "cases", "strategies"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    reason = rows["reason"].fillna("no reason recorded").astype(str)
    rows = rows.assign(reason=reason.str.replace(r"\d[\d.,]*(?:e[+-]?\d+)?", "N", regex=True))
    table = rows.groupby(["status", "reason"]).agg(
        cells=("case", "size"), cases=("case", "nunique"), strategies=("strategy", "nunique")
    )
    return table.reset_index().sort_values("cells", ascending=False, kind="stable")[columns]
