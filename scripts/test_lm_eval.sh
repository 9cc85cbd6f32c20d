#!/usr/bin/env bash
# The lm-eval bridge (tools/lm_eval_bridge.py) against a pinned lm-evaluation-harness, in a
# virtual environment of its own (.venv-lmeval): lm-eval brings datasets, evaluate, scikit-learn,
# pandas and more that the main test environment does not need.
#
# Creates .venv-lmeval (if missing): torch 2.13.0 (the CPU wheel) first, then this project with
# its test extras and lm-eval, all under a constraints file that holds torch at 2.13.0 (a
# dependency asking for another torch would otherwise pull a multi-GB CUDA build). A stamp in the
# environment skips the installs while the pins and pyproject.toml are unchanged. Then runs the
# lm-eval tests of tests/test_research_tools.py with NITP_REQUIRE_LM_EVAL=1: there a missing
# lm-eval fails them instead of skipping them. Flags are passed to pytest:
#   bash scripts/test_lm_eval.sh -x
# Time on 2 cores: 1-2 minutes with .venv-lmeval present (most of it trains the module's two tiny
# runs); 8 when .venv-lmeval is created (2 GB of packages; 5.5 minutes even from a warm pip
# cache), measured with other jobs sharing the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
LM_EVAL_VERSION=${LM_EVAL_VERSION:-0.4.13}
TORCH_VERSION=2.13.0
VENV=${VENV_LMEVAL:-.venv-lmeval}
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
stamp="lm-eval==$LM_EVAL_VERSION torch==$TORCH_VERSION $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$VENV/nitp-installed" 2>/dev/null)" != "$stamp" ]; then
  constraints=$VENV/constraints.txt
  echo "torch==$TORCH_VERSION" >"$constraints"
  "$PY" -m pip install -q --upgrade pip
  # torch first, pinned: the CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
  "$PY" -m pip install -q -c "$constraints" "torch==$TORCH_VERSION"
  "$PY" -m pip install -q -c "$constraints" -e ".[test]" "lm-eval==$LM_EVAL_VERSION"
  echo "$stamp" >"$VENV/nitp-installed"
fi

versions=$("$PY" -c "from importlib.metadata import version as v
print(v('lm-eval'), v('torch'))")
read -r lm_eval_now torch_now <<<"$versions"
if [ "$lm_eval_now" != "$LM_EVAL_VERSION" ] || [ "${torch_now%%+*}" != "$TORCH_VERSION" ]; then
  echo "error: $VENV has lm-eval $lm_eval_now and torch $torch_now," \
    "expected $LM_EVAL_VERSION and $TORCH_VERSION" >&2
  exit 1
fi
echo "lm-eval $lm_eval_now, torch $torch_now"

NITP_REQUIRE_LM_EVAL=1 exec "$PY" -m pytest -q tests/test_research_tools.py -k lm_eval "$@"
