#!/usr/bin/env bash
# megatron-core version matrix: a smoke subset of the tests against megatron-core 0.19.2, the
# line NGC containers with Python 3.12 install (CI's main run tests 0.16.1, the newest release
# that installs on Python 3.11).
#
# Creates .venv019 (if missing) layered on the main .venv (scripts/layered_venv.sh: torch, this
# project and its dependencies come from there), then megatron-core 0.19.2 into it with --no-deps
# --ignore-requires-python (0.17+ declare Python >= 3.12, yet the wheel imports on 3.11; its own
# dependencies are torch, numpy and packaging), which shadows the main environment's 0.16.1.
# Flags are passed to pytest:   bash scripts/test_019.sh -x
# --setup-only: create the environment and stop (CI makes it while the main tests run).
set -euo pipefail
cd "$(dirname "$0")/.."
MCORE_VERSION=${MCORE_VERSION:-0.19.2}
VENV=${VENV019:-.venv019}
PY=$VENV/bin/python

# shellcheck source=scripts/layered_venv.sh
source scripts/layered_venv.sh
layered_venv "$VENV"
if [ "$("$PY" -c "from importlib.metadata import version; print(version('megatron-core'))")" \
    != "$MCORE_VERSION" ]; then
  "$PY" -m pip install -q --no-deps --ignore-requires-python "megatron-core==$MCORE_VERSION" \
    2>&1 | grep -v "outside environment\|No files were found to uninstall" || true
fi

installed=$("$PY" -c "from importlib.metadata import version; print(version('megatron-core'))")
if [ "$installed" != "$MCORE_VERSION" ]; then
  echo "error: $VENV has megatron-core $installed, expected $MCORE_VERSION" >&2
  exit 1
fi
echo "megatron-core $installed, torch $("$PY" -c 'import torch; print(torch.__version__)')"
if [ "${1:-}" = --setup-only ]; then
  exit 0
fi

# Loss, model, single-process training and MoE: the megatron-core APIs the code calls (model
# build, schedules, optimizer, datasets, dist-checkpointing); plus the context-parallel batch
# slicing (a 4-process gloo job: get_batch_on_this_cp_rank changed its signature in 0.19). The
# multi-process layouts ("parallel") stay with the main run. SDPA attention subclasses
# megatron-core's DotProductAttention (tests/test_attention.py). What 0.19 changed under us
# before: MTP's loss tracker (tests/test_objectives.py), the router-loss tracker (test_moe.py),
# the optimizer's parameter-group keys on a resume with another schedule
# (test_checkpoint_folders.py), the CP group asked through torch.distributed
# (test_document_boundaries.py).
exec "$PY" -m pytest -q tests/test_loss.py tests/test_model.py tests/test_training.py \
  tests/test_moe.py tests/test_cp_slice.py tests/test_attention.py tests/test_objectives.py \
  tests/test_checkpoint_folders.py tests/test_document_boundaries.py \
  -k "not parallel or context_parallel_shards" "$@"
