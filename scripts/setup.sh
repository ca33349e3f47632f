#!/usr/bin/env bash
# Creates .venv (Python 3.10+), installs xlard's dependencies and builds xlard._C in place.
# Idempotent: a second run only rebuilds what changed. Used by the README and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NEED='import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'
if ! "$PY" -c "$NEED" 2>/dev/null; then
  echo "scripts/setup.sh: xlard needs Python 3.10 or newer; $PY is $("$PY" -V 2>&1 || echo missing) (set PYTHON, e.g. PYTHON=python3.11 bash scripts/setup.sh)" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "$NEED" 2>/dev/null; then
  echo "scripts/setup.sh: .venv was made with $(.venv/bin/python -V 2>&1); xlard needs Python 3.10 or newer: remove it (rm -rf .venv) and run this again" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned to the CPU build this project tests with. PyPI's Linux wheel of the same version is a
# multi-GB CUDA build: a +cpu wheel the configured indexes hold is taken if there is one, else PyTorch's CPU index.
TORCH_VERSION=${XLARD_TORCH_VERSION:-2.13.0}
if ! python -m pip install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null; then
  python -m pip install -q "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -r requirements-dev.txt
# --no-build-isolation: build against the torch above instead of downloading another one.
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
python -m xlard.info
