"""The benchmark plugin's state for one pytest run, in one place: a ``State`` on
``config.stash[STATE]``, below the plugin and the partial file that both read it."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bench.run.session import Run

__all__ = ["State", "STATE"]


@dataclass
class State:
    """What the plugin keeps for one pytest run, in one place: ``config.stash[STATE]``."""

    run: Run | None = None  # the session's benchmark state; None where --grid is not ours
    locked: str | None = None  # the --benchmark-json this run holds the lock of
    machine_info: dict | None = None  # gathered once per run (cpuinfo, git)
    commit_info: dict | None = None
    notes: list[str] = field(default_factory=list)  # lines for the terminal summary
    partial_written: bool = False  # this run has written its own ``<json>.partial``


#: the plugin's state on ``config.stash``
STATE = pytest.StashKey[State]()
