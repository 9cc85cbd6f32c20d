#!/usr/bin/env bash
# The GPU tests (tests/test_gpu.py, pytest -m gpu) the way scripts/gpu_check.sh runs them: the
# one-rank tests and the two-rank layouts in two pytest processes side by side (one GPU and its
# host's cores hold both; one after the other they would not fit a lent GPU's minutes).
#
#   OUT_DIR=<folder> [PYTHON=python3] [GPU_TESTS_K=<pytest -k>] [TWO_RANK=0] bash scripts/gpu_tests.sh
#
# Logs: $OUT_DIR/pytest.log (one rank), $OUT_DIR/pytest-two-rank.log (the two-rank layouts;
# left out with TWO_RANK=0, e.g. when two NCCL ranks cannot talk here). Exit status: 0 when
# every selected test passed or was skipped (a process that GPU_TESTS_K leaves nothing is fine).
# No time cap of its own: gpu_check.sh caps the whole phase. Without CUDA every test is skipped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
: "${OUT_DIR:?set OUT_DIR to the folder for the logs}"
mkdir -p "$OUT_DIR"

# pytest_gpu LOG SELECT: the GPU tests that SELECT (-k) picks, logged to $OUT_DIR/LOG, each
# process with a temporary folder of its own; none selected (pytest's 5) is not a failure.
pytest_gpu() {
  local rc
  "$PY" -m pytest -q -m gpu -rs --durations=0 -k "$2" \
    --basetemp "${TMPDIR:-/tmp}/megatron-nitp-gpu-tests-${1%.log}" tests/test_gpu.py \
    > "$OUT_DIR/$1" 2>&1
  rc=$?
  [ $rc = 5 ] && rc=0
  return $rc
}

one="not two_rank" two="two_rank"
if [ -n "${GPU_TESTS_K:-}" ]; then
  one="($GPU_TESTS_K) and $one" two="($GPU_TESTS_K) and $two"
fi
status=0
echo "> pytest -m gpu -k \"$one\" (pytest.log)"
pytest_gpu pytest.log "$one" &
one_pid=$!
if [ "${TWO_RANK:-1}" = 1 ]; then
  echo "> beside it: pytest -m gpu -k \"$two\" (pytest-two-rank.log)"
  pytest_gpu pytest-two-rank.log "$two" &
  wait $! || status=1
fi
wait $one_pid || status=1
exit $status
