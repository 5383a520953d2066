"""What the command lines share: one-line errors with exit status 2, comma-separated lists.

``python -m bench.report`` and ``python -m bench.audit`` answer a bad argument or input
with one line on stderr and exit status 2, never a traceback (docs/DESIGN.md, "Command
lines"); the benchmark's pytest options read their lists the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

__all__ = [
    "USAGE_ERROR",
    "Parser",
    "fail",
    "split_list",
    "check_names",
    "default_strategies",
    "output_file",
]

#: exit status of a command given a bad argument or input file (argparse's own)
USAGE_ERROR = 2


def fail(prog: str, message: str) -> int:
    """Print ``prog: error: message`` on stderr, as one line; returns ``USAGE_ERROR``."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return USAGE_ERROR


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")
        sys.exit(USAGE_ERROR)


def split_list(text: str, what: str) -> list[str]:
    """The names in a comma-separated list, spaces around them stripped.

    Raises:
        ValueError: the list names nothing (e.g. ``""`` or ``" , "``).
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"{what} names nothing: {text!r}")
    return names


def check_names(names: Iterable[str], valid: Sequence[str], what: str) -> None:
    """Raise ValueError naming every unknown name and listing the valid ones."""
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; valid {what}: {list(valid)}")


def default_strategies() -> list[str]:
    """What ``pytest bench`` runs unless told: every registered strategy but the compiled
    variants of others (a compile per cell would double a run)."""
    import strategies  # imports torch: only the commands that run strategies ask for this

    return [name for name in strategies.names() if strategies.get(name).eager is None]


def output_file(path: Path, option: str) -> None:
    """Make sure ``path`` can be written (its folder made), before any work is spent on it.

    Raises:
        ValueError: ``path`` is a folder, its folder cannot be made, or it is not writable.
    """
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder, not a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"{option} {path}: {path.parent} is not a folder") from None
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot make its folder ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path} is not writable")
