"""Test-session settings shared by every test module."""

from __future__ import annotations

import os

import torch


def pytest_configure(config) -> None:
    """One torch thread per pytest-xdist worker: with N workers on N cores, each worker's
    default of N OpenMP threads oversubscribes the machine, and OpenMP's spinning threads then
    make small tensor ops many times slower (a kron test took 45 s under ``-n 2`` and 1.4 s
    alone). Benchmark runs started by the tests are subprocesses that set their own threads."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
