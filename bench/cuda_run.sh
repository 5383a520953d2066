#!/usr/bin/env bash
# The GPU run in one command (README, "GPU run"): bench/cuda_run.sh --wheels wheels --out DIR.
# Options: python3 -m bench.cuda_run --help. PYTHON overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.cuda_run "$@"
