#!/usr/bin/env bash
# Sets up .venv and runs the test suite: every test but the gpu ones (skipped without CUDA).
#   bash scripts/test.sh           everything (what CI runs)
#   bash scripts/test.sh --fast    the unit tier only (pytest -m unit: in-process, not slow)
# Other flags are passed to pytest (-x, -k NAME, -m "distributed and not slow", ...).
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--fast" ]; then
  shift
  select=(-m unit)
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q ${select[@]+"${select[@]}"} "$@"
