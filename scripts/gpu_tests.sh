#!/usr/bin/env bash
# The GPU tests (tests/test_gpu.py, pytest -m gpu) the way scripts/gpu_check.sh runs them: the
# one-rank tests and the two-rank layouts in two pytest processes side by side (one GPU and its
# host's cores hold both; one after the other they would not fit a lent GPU's minutes).
#
#   OUT_DIR=<folder> [PYTHON=python3] [GPU_TESTS_K=<pytest -k>] [TWO_RANK=0] \
#     [TESTS_TIME_S=300] bash scripts/gpu_tests.sh
#
# Logs: $OUT_DIR/pytest.log (one rank), $OUT_DIR/pytest-two-rank.log (the two-rank layouts;
# left out with TWO_RANK=0, e.g. when two NCCL ranks cannot talk here). Each process is stopped
# after TESTS_TIME_S seconds: SIGINT first, so that pytest unwinds and stops its launches (SIGKILL
# 15 s later), and its log says so. Exit status: 0 when every selected test passed or was
# skipped (a process that GPU_TESTS_K leaves nothing is fine). Without CUDA every test is skipped.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
CAP=${TESTS_TIME_S:-300}
: "${OUT_DIR:?set OUT_DIR to the folder for the logs}"
mkdir -p "$OUT_DIR"
# Each pytest runs under its own `timeout`: a background job of a script ignores SIGINT (and
# Python keeps that), so a cap around this whole script could only kill pytest, leaving its
# launches running; timeout gives pytest SIGINT back and leads a process group of its own, which
# an interrupt of this script is passed on to.
pids=()
# shellcheck disable=SC2329  # called by the trap below
interrupt() {
  local pid
  for pid in "${pids[@]}"; do
    kill -INT -- "-$pid" 2>/dev/null
  done
}
trap interrupt INT TERM

# start LOG SELECT: the GPU tests that SELECT (-k) picks, in the background under the cap,
# logged to $OUT_DIR/LOG, each process with a temporary folder of its own.
start() {
  timeout -s INT -k 15 "$CAP" "$PY" -m pytest -q -m gpu -rs --durations=0 -k "$2" \
    --basetemp "${TMPDIR:-/tmp}/megatron-nitp-gpu-tests-${1%.log}" tests/test_gpu.py \
    > "$OUT_DIR/$1" 2>&1 &
  pids+=($!)
}

# finish PID LOG: the exit status of the process started for LOG (none selected, pytest's 5: 0).
finish() {
  local rc
  wait "$1"
  rc=$?
  while [ $rc -gt 128 ] && kill -0 "$1" 2>/dev/null; do  # a trapped signal ended the wait
    wait "$1"
    rc=$?
  done
  case $rc in
    5) rc=0 ;;
    124|137) echo "> stopped after its cap of $CAP s (raise TESTS_TIME_S)" >> "$OUT_DIR/$2" ;;
  esac
  return $rc
}

one="not two_rank" two="two_rank"
if [ -n "${GPU_TESTS_K:-}" ]; then
  one="($GPU_TESTS_K) and $one" two="($GPU_TESTS_K) and $two"
fi
status=0
echo "> pytest -m gpu -k \"$one\" (pytest.log)"
start pytest.log "$one"
if [ "${TWO_RANK:-1}" = 1 ]; then
  echo "> beside it: pytest -m gpu -k \"$two\" (pytest-two-rank.log)"
  start pytest-two-rank.log "$two"
  finish "${pids[1]}" pytest-two-rank.log || status=1
fi
finish "${pids[0]}" pytest.log || status=1
exit $status
