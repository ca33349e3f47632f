#!/usr/bin/env bash
# Creates .venv (Python 3.10+), installs xlard's dependencies and builds xlard._C in place.
# Idempotent: a second run only rebuilds what changed. Used by the README and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build this project tests with; a range would pull a multi-GB CUDA build.
python -m pip install -q "torch==${XLARD_TORCH_VERSION:-2.13.0}"
python -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build against the torch above instead of downloading another one.
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
python -m xlard.info
