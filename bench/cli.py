"""What the command lines share: one-line errors with exit status 2, lists, output files.

``python -m bench.report`` and ``python -m bench.audit`` answer a bad argument or input
with one line on stderr and exit status 2, never a traceback (docs/DESIGN.md, "Command
lines"); the benchmark's pytest options read their lists the same way.
"""

from __future__ import annotations

import argparse
import json
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
    "partial_path",
    "kept_partial_path",
    "write_json",
    "lock_output",
    "unlock_output",
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
    # os.access answers yes to root everywhere, and knows nothing of read-only file systems
    # or /proc: open it (never truncating an existing file), and remove it if it is new
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise ValueError(f"{option} {path} cannot be written ({exc.strerror})") from None
    if not existed:
        path.unlink()


def partial_path(output: str | os.PathLike) -> str:
    """Where a run keeps what it has measured so far: ``<json>.partial``, removed at the end."""
    return f"{os.fspath(output)}.partial"


def kept_partial_path(output: str | os.PathLike) -> str:
    """Where an earlier run's unfinished ``<json>.partial`` is kept: ``<json>.<N>.partial``.

    N is the smallest positive integer whose file does not exist yet, so nothing is ever
    overwritten.
    """
    n = 1
    while os.path.exists(f"{os.fspath(output)}.{n}.partial"):
        n += 1
    return f"{os.fspath(output)}.{n}.partial"


def write_json(data: object, target: str | os.PathLike, indent: int | None = None) -> None:
    """Write ``data`` as JSON to ``target`` through a temporary file and a rename, so that a
    kill never leaves half a file."""
    with open(f"{os.fspath(target)}.tmp", "w") as f:
        json.dump(data, f, indent=indent)
        if indent is not None:
            f.write("\n")
    os.replace(f"{os.fspath(target)}.tmp", target)


def _lock_path(output: str | os.PathLike) -> str:
    return f"{os.fspath(output)}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_output(output: str | os.PathLike, option: str) -> None:
    """Claim ``output`` for this process: ``<json>.lock``, created exclusively, holds its pid.

    Two runs writing one JSON would each overwrite the other's cells. A lock whose process
    is gone (a run that was killed) is taken over.

    Raises:
        ValueError: a live process holds the lock (the message names it).
    """
    lock = _lock_path(output)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(lock) as f:
                    holder = int(f.read().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                raise ValueError(
                    f"{option} {output} is being written by another run (process {holder}, "
                    f"{lock}): wait for it to end, or choose another file"
                ) from None
            os.remove(lock)  # its run is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return
    raise ValueError(f"{option} {output}: cannot take its lock {lock}")


def unlock_output(output: str | os.PathLike) -> None:
    """Release the lock of ``lock_output``, if this process holds it."""
    lock = _lock_path(output)
    try:
        with open(lock) as f:
            mine = f.read().strip() == str(os.getpid())
    except OSError:
        return
    if mine:
        os.remove(lock)
