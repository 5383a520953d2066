"""What every benchmark and audit process sets before it computes: exact float32, JAX's GPU share.

On a GPU since Ampere, torch (cuDNN by default) and JAX (both by default) may run float32
matrix products in TF32, whose 10-bit mantissa gives errors around 1e-3: no float32
Hessian would pass the benchmark's 1e-4 tolerance, and timings would compare a different
arithmetic with the CPU's. ``prepare_process`` turns TF32 off and keeps JAX to a share of
the GPU's memory; the pytest process (``bench.run.plugin``), the worker (``bench.run.worker``) and
the audit (``bench.audit``) each call it before their first computation, so it holds for
every strategy call and every reference. On a CPU it changes nothing that is computed.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

__all__ = ["JAX_ENV", "WORKER_JAX_ENV", "exact_float32", "precision", "prepare_process"]

#: JAX's environment in a process that times it. JAX reads these when it is imported: on a GPU
#: it would otherwise take 75% of the memory at its first call and keep it, leaving the torch
#: strategies timed after it in the same process a quarter. Without preallocation its pool
#: grows as it needs, up to this share; the rest stays torch's.
JAX_ENV = {
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.35",
}
#: the worker's: JAX is never timed there (its pass is a first call), so it allocates and frees
#: each buffer with the device itself and holds nothing once the call is over
WORKER_JAX_ENV = {**JAX_ENV, "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
#: JAX's float32 products in full precision, as for torch (an environment setting, so that a
#: child process and a JAX imported later both follow it)
_JAX_PRECISION = ("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def exact_float32() -> None:
    """TF32 off: float32 products in full float32 precision in torch (cuBLAS, cuDNN) and JAX.

    Applies to this process and, through the environment, to the processes it starts.
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    name, value = _JAX_PRECISION
    os.environ[name] = value
    if "jax" in sys.modules:  # imported already: its flag was read from the environment then
        sys.modules["jax"].config.update("jax_default_matmul_precision", value)


def precision() -> dict[str, Any]:
    """This process's float32 settings, as runs record them (``tf32`` False: exact)."""
    return {
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


def prepare_process(worker: bool = False) -> None:
    """``exact_float32`` and JAX's share of the GPU (``JAX_ENV``, or ``WORKER_JAX_ENV`` in the
    worker) where the environment does not set them already; JAX must not be imported yet for
    the share to apply."""
    exact_float32()
    for name, value in (WORKER_JAX_ENV if worker else JAX_ENV).items():
        os.environ.setdefault(name, value)
