#!/usr/bin/env bash
# megatron-core version matrix: a smoke subset of the tests against megatron-core 0.19.2, the
# line NGC containers with Python 3.12 install (CI's main run tests 0.16.1, the newest release
# that installs on Python 3.11).
#
# Creates .venv019 (if missing): torch 2.13.0 (the CPU wheel), this project's dependencies from
# pyproject.toml except torch and megatron-core, then megatron-core 0.19.2 with --no-deps
# --ignore-requires-python (0.17+ declare Python >= 3.12, yet the wheel imports on 3.11; its own
# dependencies are torch, numpy and packaging), then this project with --no-deps. Flags are
# passed to pytest:   bash scripts/test_019.sh -x
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE_VERSION=${MCORE_VERSION:-0.19.2}
VENV=${VENV019:-.venv019}
PY=$VENV/bin/python

if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
"$PY" -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
"$PY" -m pip install -q "torch==2.13.0"
mapfile -t deps < <("$PY" - <<'EOF'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
skip = ("torch", "megatron-core")
for dep in project["dependencies"] + project["optional-dependencies"]["test"]:
    if re.match(r"[\w.-]+", dep).group(0).lower() not in skip:
        print(dep)
EOF
)
"$PY" -m pip install -q "${deps[@]}"
"$PY" -m pip install -q --no-deps --ignore-requires-python "megatron-core==$MCORE_VERSION"
"$PY" -m pip install -q --no-deps -e .

installed=$("$PY" -c "from importlib.metadata import version; print(version('megatron-core'))")
if [ "$installed" != "$MCORE_VERSION" ]; then
  echo "error: $VENV has megatron-core $installed, expected $MCORE_VERSION" >&2
  exit 1
fi
echo "megatron-core $installed, torch $("$PY" -c 'import torch; print(torch.__version__)')"

# Loss, model, single-process training and MoE: the megatron-core APIs the code calls (model
# build, schedules, optimizer, datasets, dist-checkpointing); plus the context-parallel batch
# slicing (a 4-process gloo job: get_batch_on_this_cp_rank changed its signature in 0.19). The
# multi-process layouts ("parallel") stay with the main run. SDPA attention subclasses
# megatron-core's DotProductAttention (tests/test_attention.py).
exec "$PY" -m pytest -q tests/test_loss.py tests/test_model.py tests/test_training.py \
  tests/test_moe.py tests/test_cp_slice.py tests/test_attention.py -k "not parallel" "$@"
