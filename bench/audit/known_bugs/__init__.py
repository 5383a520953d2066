"""Minimal reproductions of the upstream bugs the audit tracks (``bench.audit.KNOWN_BUGS``).

One module each: a self-contained script that sets ``bug_shows``, and runs as one
(``python -m bench.audit.known_bugs.NAME``). The audit runs its text in a fresh namespace under a
fixed seed and records that text in the audit JSON verbatim, which is why the formatter
leaves these modules as they are (``pyproject.toml``). Importing this package runs none.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["source"]


def source(name: str) -> str:
    """The text of the reproduction in module ``name`` of this package."""
    return (Path(__file__).parent / f"{name}.py").read_text(encoding="utf-8")
