"""Tables of the audit JSON: its records in one frame, the strategy x model matrices of
statuses and outcomes, what counts against a strategy (a wrong Hessian, or an error that is
not a refusal), the findings the report gives and the model kinds ``auto`` passes a strategy
over on (``bench.auto_table``). Pandas only, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from bench.vocabulary import ERROR, REFUSALS, UNSUPPORTED, WRONG

__all__ = [
    "audit_frame",
    "NOT_RUN",
    "accuracy_statuses",
    "accuracy_matrix",
    "counts_against",
    "audit_findings",
    "wrong_kinds",
    "merged_wrong_kinds",
]


def audit_frame(audits: list[dict]) -> pd.DataFrame:
    """All audit records in one DataFrame, with the audit's machine, torch and source."""
    rows = [
        {
            "machine": audit.get("machine_label"),
            "torch_version": audit.get("torch_version"),
            "source": audit["source"],
            **record,
        }
        for audit in audits
        for record in audit.get("records") or []
    ]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(
            columns=["machine", "source", "strategy", "model", "model_kind", "status"]
        )
    frame["model_kind"] = frame["model_kind"].map(
        lambda k: ", ".join(k) if isinstance(k, list) else k
    )
    return frame


def _cell_text(record: pd.Series) -> str:
    status = record["status"]
    if status == WRONG and pd.notna(record.get("max_rel_err")):
        return f"{WRONG} (rel err {record['max_rel_err']:.2g})"
    if status == ERROR and record.get("exception"):
        return f"{ERROR} ({record['exception']})"
    return str(status)


#: an accuracy-matrix cell where the audit has no record of the pair
NOT_RUN = "not run"


def _audit_pivot(records: pd.DataFrame, values: pd.Series) -> pd.DataFrame:
    """Strategy x model of ``values`` (one per record), models in the audit's order."""
    table = records.assign(cell=values).pivot_table(
        index="strategy", columns="model", values="cell", aggfunc="first"
    )
    return table[list(dict.fromkeys(records["model"]))].fillna(NOT_RUN)


def accuracy_statuses(records: pd.DataFrame) -> pd.DataFrame:
    """Strategy x model matrix of audit statuses ("ok", "wrong", ..., "not run")."""
    if records.empty:
        return pd.DataFrame()
    return _audit_pivot(records, records["status"])


def accuracy_matrix(records: pd.DataFrame) -> pd.DataFrame:
    """Strategy x model matrix of audit outcomes as text ("ok", "wrong (rel err ..)", ...)."""
    if records.empty:
        return pd.DataFrame()
    return _audit_pivot(records, records.apply(_cell_text, axis=1))


def counts_against(status: str, exception: Any = None) -> bool:
    """Whether an audit cell counts against its strategy: a wrong Hessian (no error raised),
    or an exception that is not a refusal (:data:`REFUSALS`). A refusal is the strategy
    contract at work, a clear error in place of a wrong matrix: it counts against nothing.
    The one rule of ``audit_findings`` (the report) and ``wrong_kinds`` (``auto``'s routing)."""
    return status == WRONG or (status == ERROR and exception not in REFUSALS)


def audit_findings(audits: list[dict[str, Any]]) -> pd.DataFrame:
    """What the audits found against each strategy: silently wrong, or failing.

    One row per strategy and status, "wrong" (a wrong Hessian, no error raised) or "error"
    (an exception other than a refusal, :data:`REFUSALS`): ``kinds`` and ``models`` (sorted
    tuples), ``max_rel_err`` (wrong), ``exceptions`` (error), ``upstream`` (the known bugs'
    upstream references naming the strategy and one of those models) and ``refused``:
    whether an audit run that honours ``supports()`` found every one of those pairs
    "unsupported" (the strategy now refuses them).
    """
    records = audit_frame(audits)
    columns = ["strategy", "status", "kinds", "models", "max_rel_err", "exceptions"]
    columns += ["upstream", "refused"]
    if "exception" not in records:
        records = records.assign(exception=None)
    against = [counts_against(s, e) for s, e in zip(records["status"], records["exception"])]
    found = records[pd.Series(against, index=records.index, dtype=bool)]
    if found.empty:
        return pd.DataFrame(columns=columns)
    unsupported = set(
        zip(*records.loc[records["status"] == UNSUPPORTED, ["strategy", "model"]].T.values)
    )
    bugs = [bug for audit in audits for bug in audit.get("known_bugs") or []]
    rows = []
    for (strategy, status), part in found.groupby(["strategy", "status"], sort=True):
        models = tuple(sorted(set(part["model"])))
        upstream = {
            bug["upstream"]
            for bug in bugs
            if bug.get("upstream")
            and strategy in (bug.get("strategies") or [])
            and set(models) & set(bug.get("models") or [])
        }
        kinds = {k.strip() for tags in part["model_kind"] for k in str(tags).split(",")}
        rows.append(
            {
                "strategy": strategy,
                "status": status,
                "kinds": tuple(sorted(kinds)),
                "models": models,
                "max_rel_err": float(part["max_rel_err"].max()) if status == WRONG else None,
                "exceptions": tuple(sorted(set(part["exception"].dropna())))
                if status == ERROR
                else (),
                "upstream": tuple(sorted(upstream)),
                "refused": all((strategy, m) in unsupported for m in models),
            }
        )
    return pd.DataFrame(rows, columns=columns)


def wrong_kinds(audit: dict[str, Any]) -> dict[str, set[str]]:
    """For each audited strategy, the model_kind tags of models where it was wrong or failed
    (``counts_against``: a refusal is neither)."""
    out: dict[str, set[str]] = {}
    for r in audit["records"]:
        kinds = out.setdefault(r["strategy"], set())
        if counts_against(r["status"], r.get("exception")):
            kinds.update(r["model_kind"])
    return out


def merged_wrong_kinds(audits: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """``wrong_kinds`` over several audits, for the strategies wrong or failing somewhere."""
    merged: dict[str, set[str]] = {}
    for audit in audits:
        for name, kinds in wrong_kinds(audit).items():
            merged.setdefault(name, set()).update(kinds)
    return {name: sorted(kinds) for name, kinds in sorted(merged.items()) if kinds}
