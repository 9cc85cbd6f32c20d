#!/usr/bin/env bash
# A real SLURM job on this machine: starts a one-node SLURM cluster on loopback (munged,
# slurmctld, slurmd, all state in a temporary folder), submits examples/slurm/tiny_cpu.sbatch
# with 2 tasks and checks that it completed with exit code 0, that training ran (iteration lines
# in the job log) and that the checkpoint was written (latest_checkpointed_iteration.txt). A
# second job is then signalled before its time limit as SLURM would (USR1 to the batch script,
# what #SBATCH --signal=B:USR1@60 sends): the ranks write a checkpoint and exit with 75, the
# script requeues the job, and the requeued job resumes at the next iteration and completes.
# Then it stops the daemons by PID and removes the folder.
#
#   bash tests/slurm/run_slurm_test.sh            # as root (installs SLURM and munge if missing)
#
# Environment: PYTHON (the job's interpreter, default .venv/bin/python), JOB_TIMEOUT (seconds the
# job may take, default 300), KEEP=1 (keep the temporary folder for inspection).
# Recipe and reasons: ../shared/notes/slurm-on-one-machine.md and docs/cluster.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
JOB_TIMEOUT=${JOB_TIMEOUT:-300}
NODE=cinode
PARTITION=ci

say() { echo "[slurm-test] $*"; }
fail() { echo "[slurm-test] FAILED: $*" >&2; exit 1; }

[ -x "$PYTHON" ] || fail "no Python at $PYTHON (run scripts/setup.sh or set PYTHON)"

# --- packages -------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  [ "$(id -u)" = 0 ] || fail "SLURM and munge are missing and installing them needs root"
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -qq
  timeout 300 apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi
[ "$(id -u)" = 0 ] || fail "the daemons run as root (SlurmUser=root) and munged as munge: run as root"
id munge >/dev/null 2>&1 || fail "no munge user (the munge package creates it)"
[ -f /etc/munge/munge.key ] || fail "no /etc/munge/munge.key (the munge package creates it)"

# --- a private cluster in a temporary folder -------------------------------------------------
TMP=$(mktemp -d /tmp/nitp-slurm.XXXXXX)
chmod 755 "$TMP"
MUNGE_PID="" CTLD_PID="" SLURMD_PID="" JOB_ID=""

stop_pid() {  # PID NAME: TERM, wait up to 10 s, then KILL
  local pid=$1 name=$2
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || { say "stopped $name ($pid)"; return 0; }
    sleep 0.2
  done
  kill -KILL "$pid" 2>/dev/null || true
  say "killed $name ($pid)"
}

cleanup() {
  local rc=$?
  set +e
  if [ -n "$JOB_ID" ] && [ -n "$CTLD_PID" ]; then
    timeout 10 scancel "$JOB_ID" >/dev/null 2>&1
  fi
  stop_pid "$SLURMD_PID" slurmd
  stop_pid "$CTLD_PID" slurmctld
  stop_pid "$MUNGE_PID" munged
  if [ "$rc" != 0 ]; then
    for log in "$TMP"/job-*.out "$TMP/slurmctld.log" "$TMP/slurmd.log" "$TMP/munge/munged.log"; do
      [ -f "$log" ] || continue
      echo "----- $log (last 40 lines)" >&2
      tail -n 40 "$log" >&2
    done
  fi
  if [ "${KEEP:-0}" = 1 ]; then
    say "kept $TMP"
  else
    rm -rf "$TMP"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # SECONDS DESCRIPTION COMMAND...: poll every 0.2 s until COMMAND succeeds
  local seconds=$1 what=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}

# munged as the munge user, on a socket of its own (another munged may be running).
mkdir -p "$TMP/munge"
chown munge:munge "$TMP/munge"
chmod 755 "$TMP/munge"  # munged: socket folder searchable by all, writable by munge only
SOCKET=$TMP/munge/munge.socket
runuser -u munge -- /usr/sbin/munged --socket="$SOCKET" --pid-file="$TMP/munge/munged.pid" \
  --log-file="$TMP/munge/munged.log" --seed-file="$TMP/munge/munged.seed"
MUNGE_PID=$(cat "$TMP/munge/munged.pid")
wait_for 10 "munge credentials" bash -c "munge -n -S '$SOCKET' | unmunge -S '$SOCKET'"
say "munged up (pid $MUNGE_PID)"

CPUS=$(nproc)
MEMORY_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
CTLD_PORT=$(free_port)
SLURMD_PORT=$(free_port)
while [ "$SLURMD_PORT" = "$CTLD_PORT" ]; do SLURMD_PORT=$(free_port); done
mkdir -p "$TMP/state" "$TMP/spool"
export SLURM_CONF=$TMP/slurm.conf
cat >"$SLURM_CONF" <<EOF
ClusterName=nitpci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
MailProg=/bin/true
StateSaveLocation=$TMP/state
SlurmdSpoolDir=$TMP/spool
SlurmctldPidFile=$TMP/slurmctld.pid
SlurmdPidFile=$TMP/slurmd.pid
SlurmctldLogFile=$TMP/slurmctld.log
SlurmdLogFile=$TMP/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/builtin
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEMORY_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

setsid /usr/sbin/slurmctld -D -c -f "$SLURM_CONF" >"$TMP/slurmctld.stdout" 2>&1 &
CTLD_PID=$!
wait_for 30 "slurmctld (scontrol ping)" bash -c "timeout 5 scontrol ping | grep -q UP"
say "slurmctld up (pid $CTLD_PID, port $CTLD_PORT)"
setsid /usr/sbin/slurmd -D -N "$NODE" -f "$SLURM_CONF" >"$TMP/slurmd.stdout" 2>&1 &
SLURMD_PID=$!
wait_for 30 "node $NODE idle" bash -c "timeout 5 sinfo -h -N -o %T | grep -qx idle"
say "slurmd up (pid $SLURMD_PID), node $NODE idle with $CPUS CPUs"

# --- the job ----------------------------------------------------------------------------------
RUN_DIR=$TMP/run
cd "$ROOT"
for name in RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT; do unset "$name"; done
export PYTHON RUN_DIR NITP_ROOT=$ROOT
JOB_ID=$(timeout 30 sbatch --parsable --ntasks=2 --output="$TMP/job-%j.out" \
  examples/slurm/tiny_cpu.sbatch)
JOB_ID=${JOB_ID%%;*}
say "submitted job $JOB_ID (examples/slurm/tiny_cpu.sbatch, 2 tasks)"
start=$SECONDS
state="" exit_code=""
wait_job() {  # until the job $JOB_ID is done (a requeued job runs again: REQUEUED, PENDING)
  while :; do
    info=$(timeout 10 scontrol -o show job "$JOB_ID" 2>/dev/null || true)
    state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info")
    exit_code=$(sed -n 's/.* ExitCode=\([0-9:]*\).*/\1/p' <<<"$info")
    case "$state" in
      PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED | "") ;;
      *) break ;;
    esac
    [ $((SECONDS - start)) -lt "$JOB_TIMEOUT" ] || fail "job $JOB_ID still $state after ${JOB_TIMEOUT}s"
    sleep 1
  done
}
wait_job
LOG=$TMP/job-$JOB_ID.out
say "job $JOB_ID: $state, exit code $exit_code, $((SECONDS - start)) s"

# --- checks -----------------------------------------------------------------------------------
[ "$state" = COMPLETED ] || fail "job state $state (expected COMPLETED)"
[ "$exit_code" = 0:0 ] || fail "job exit code $exit_code (expected 0:0)"
[ -f "$LOG" ] || fail "no job log $LOG"
iterations=$(grep -c '^ *iteration  *[0-9]*/' "$LOG" || true)
[ "$iterations" -ge 1 ] || fail "no iteration lines in $LOG"
grep -q "world 2 " "$LOG" || fail "the job did not run with 2 ranks"
TRACKER=$RUN_DIR/checkpoints/latest_checkpointed_iteration.txt
[ -f "$TRACKER" ] || fail "no checkpoint tracker $TRACKER"
last=$(cat "$TRACKER")
[ -d "$RUN_DIR/checkpoints/iter_$(printf %07d "$last")" ] || fail "no checkpoint folder for $last"
grep '^ *iteration  *[0-9]*/' "$LOG" | tail -n 2
say "passed: $iterations iteration lines, checkpoint at iteration $last, 2 ranks over srun"

# --- signalled before the time limit, requeued, resumed ---------------------------------------
RUN_DIR=$TMP/requeue
export RUN_DIR TRAIN_ITERS=${REQUEUE_ITERS:-30}
JOB_ID=$(timeout 30 sbatch --parsable --ntasks=2 --output="$TMP/job-%j.out" \
  examples/slurm/tiny_cpu.sbatch)
JOB_ID=${JOB_ID%%;*}
LOG=$TMP/job-$JOB_ID.out
say "submitted job $JOB_ID ($TRAIN_ITERS iterations) to signal after its second iteration"
start=$SECONDS
until grep -q '^ *iteration  *2/' "$LOG" 2>/dev/null; do
  [ $((SECONDS - start)) -lt "$JOB_TIMEOUT" ] || fail "job $JOB_ID: no iteration 2 after ${JOB_TIMEOUT}s"
  sleep 0.5
done
timeout 10 scancel --batch --signal=USR1 "$JOB_ID"  # what --signal=B:USR1@60 does at the limit
say "sent USR1 to the batch script of job $JOB_ID"
# SLURM holds a requeued batch job for about two minutes before it is eligible again; the test
# lets it start at once (that hold is SLURM's policy, not what is tested here).
while :; do
  info=$(timeout 10 scontrol -o show job "$JOB_ID" 2>/dev/null || true)
  state=$(sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' <<<"$info")
  restarts=$(sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' <<<"$info")
  if [ "${restarts:-0}" -ge 1 ] && [ "$state" = PENDING ]; then
    # slurmd refuses a launch whose credential is not newer, in whole seconds, than the kill
    # of the requeued run ("Job N already killed, do not launch batch job"): wait past it
    sleep 3
    timeout 10 scontrol update JobId="$JOB_ID" StartTime=now || true
    say "job $JOB_ID requeued; released from SLURM's requeue hold"
    break
  fi
  case "$state" in
    PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED | "") ;;
    *) break ;;
  esac
  [ $((SECONDS - start)) -lt "$JOB_TIMEOUT" ] || fail "job $JOB_ID not requeued after ${JOB_TIMEOUT}s"
  sleep 0.5
done
wait_job
say "job $JOB_ID: $state, exit code $exit_code, $((SECONDS - start)) s"
[ "$state" = COMPLETED ] || fail "requeued job state $state (expected COMPLETED)"
restarts=$(sed -n 's/.* Restarts=\([0-9]*\).*/\1/p' <<<"$info")
[ "${restarts:-0}" -ge 1 ] || fail "job $JOB_ID was not requeued (Restarts=${restarts:-?})"
stopped=$(sed -n 's/^> exit after iteration \([0-9]*\): SIGUSR1.*exiting with code 75.*/\1/p' "$LOG")
[ -n "$stopped" ] || fail "no '> exit after iteration N: SIGUSR1 ... code 75' line in $LOG"
grep -q "requeueing job $JOB_ID" "$LOG" || fail "the batch script did not requeue"
grep -q "resumed from .* at iteration $stopped " "$LOG" || fail "no resume at iteration $stopped"
grep -q "^ *iteration  *$((stopped + 1))/" "$LOG" || fail "iteration $((stopped + 1)) missing"
last=$(cat "$RUN_DIR/checkpoints/latest_checkpointed_iteration.txt")
[ "$last" = "$TRAIN_ITERS" ] || fail "final checkpoint at $last (expected $TRAIN_ITERS)"
say "PASSED: 2 ranks over srun; signalled job stopped at iteration $stopped (code 75), was \
requeued ($restarts restart) and resumed to iteration $last"
