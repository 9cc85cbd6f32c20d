# shellcheck shell=bash
# Sourced by examples/pretrain.sh: the launcher, and the preset values a launch derives.
#
#   nitp_launch ENTRY.py FLAG...
#
# runs ENTRY.py from the repository root under torchrun, one launcher per node with a c10d
# rendezvous at $MASTER_ADDR:$MASTER_PORT ($NNODES nodes x $GPUS_PER_NODE processes; the
# rendezvous assigns node ranks, so every node runs the same command). With DRY_RUN=1 it runs
# `python ENTRY.py FLAG... --dry-run --world-size NNODES*GPUS_PER_NODE` instead: no GPU, no
# process group; the plan (layout, batch, memory per GPU) is printed and the exit code says
# whether the job can start (0), the layout is impossible (2) or it does not fit in memory (3).
#
# Paths the scripts pass (RUN_DIR, CHECKPOINT_PATH, DATA_CACHE_PATH: --data-cache-path, the
# dataset index cache that global rank 0 builds and every rank reads) must be on a file system
# all nodes see; a multi-node start without --data-cache-path is refused.
#
# Environment: NNODES, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT, RDZV_ID (default nitp; set it to
# the job id when several jobs share a rendezvous host), PYTHON (the dry run and nitp_preset;
# default python), TORCHRUN (default torchrun), DRY_RUN.

NITP_ROOT=${NITP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}

nitp_launch() {
  local entry=$1
  shift
  if [ "${DRY_RUN:-0}" = 1 ]; then
    exec "${PYTHON:-python}" "$NITP_ROOT/$entry" "$@" \
      --dry-run --world-size $((NNODES * GPUS_PER_NODE))
  fi
  local -a launcher=(
    --nnodes "$NNODES"
    --nproc-per-node "$GPUS_PER_NODE"
    --rdzv-backend c10d
    --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
    --rdzv-id "${RDZV_ID:-nitp}"
    --max-restarts 0
  )
  cd "$NITP_ROOT" || return
  # shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
  exec ${TORCHRUN:-torchrun} "${launcher[@]}" "$entry" "$@"
}

#   nitp_preset NAME KEY...
# prints the values of preset NAME's KEYs (flag names as megatron_nitp/config/presets.py spells
# them, e.g. global_batch_size seq_length) on one line, so that a launch derives them instead of
# repeating them. presets.py is loaded from its file: no torch import.
nitp_preset() {
  "${PYTHON:-python}" - "$NITP_ROOT" "$@" <<'EOF'
import importlib.util
import sys

root, name, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, root)
try:
    path = f"{root}/megatron_nitp/config/presets.py"
    spec = importlib.util.spec_from_file_location("nitp_presets", path)
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
except ImportError:  # presets.py imports from its package (relatively): load the package
    from megatron_nitp.config import presets
print(*(presets.PRESETS[name][key] for key in keys))
EOF
}

# A token count, optionally with a K, M, B or T suffix (240B), as a number.
nitp_tokens() {
  local n=${1%[KMBT]} scale=1
  case $1 in
    *K) scale=1000 ;;
    *M) scale=1000000 ;;
    *B) scale=1000000000 ;;
    *T) scale=1000000000000 ;;
  esac
  case $n in
    '' | *[!0-9]*)
      echo "error: '$1' is not a token count (e.g. 240B or 240000000000)" >&2
      return 2
      ;;
  esac
  echo $((10#$n * scale))
}

# Ceil(tokens / (global batch x sequence length)): the iterations of a token budget.
nitp_iterations() {
  local tokens=$1 gbs=$2 seq=$3
  echo $(((tokens + gbs * seq - 1) / (gbs * seq)))
}
