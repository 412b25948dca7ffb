#!/usr/bin/env bash
# Create .venv and install mediator-ray with its test extras.
# torch is installed first and pinned: 2.13.0 is the CPU wheel this machine keeps on disk; an
# unpinned torch would pull a multi-GB CUDA build. Everything else then resolves against it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
echo "mediator-ray installed in $VENV"
