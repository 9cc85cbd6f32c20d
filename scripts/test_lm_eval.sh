#!/usr/bin/env bash
# The lm-eval bridge (tools/lm_eval_bridge.py) against a pinned lm-evaluation-harness, in a
# virtual environment of its own (.venv-lmeval): lm-eval brings datasets, evaluate, scikit-learn,
# pandas and more that the main test environment does not need.
#
# Creates .venv-lmeval (if missing) layered on the main .venv (scripts/layered_venv.sh: torch,
# this project and its test tools come from there), then installs lm-eval into it under a
# constraints file that holds torch at 2.13.0 (a dependency asking for another torch would
# otherwise pull a multi-GB CUDA build). A stamp in the environment skips the install while the
# pins and pyproject.toml are unchanged. Then runs the lm-eval tests of
# tests/test_research_tools.py with NITP_REQUIRE_LM_EVAL=1: there a missing lm-eval fails them
# instead of skipping them. Flags are passed to pytest:
#   bash scripts/test_lm_eval.sh -x
# --setup-only: create the environment and stop (CI makes it while the main tests run).
# Time on 2 cores: 1-2 minutes with .venv-lmeval present (most of it trains the module's two tiny
# runs), a few more when it is created (lm-eval's datasets, evaluate, scikit-learn, pandas ...;
# torch is the main environment's).
set -euo pipefail
cd "$(dirname "$0")/.."
LM_EVAL_VERSION=${LM_EVAL_VERSION:-0.4.13}
TORCH_VERSION=2.13.0
VENV=${VENV_LMEVAL:-.venv-lmeval}
PY=$VENV/bin/python

# shellcheck source=scripts/layered_venv.sh
source scripts/layered_venv.sh
layered_venv "$VENV"
stamp="lm-eval==$LM_EVAL_VERSION torch==$TORCH_VERSION layered $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$VENV/nitp-installed" 2>/dev/null)" != "$stamp" ]; then
  constraints=$VENV/constraints.txt
  echo "torch==$TORCH_VERSION" >"$constraints"
  "$PY" -m pip install -q -c "$constraints" "lm-eval==$LM_EVAL_VERSION"
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
if [ "${1:-}" = --setup-only ]; then
  exit 0
fi

NITP_REQUIRE_LM_EVAL=1 exec "$PY" -m pytest -q tests/test_research_tools.py -k lm_eval "$@"
