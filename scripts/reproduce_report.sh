#!/usr/bin/env bash
# Reproduction report on CPU: the tiny dense preset on the default corpus (KJV Bible), the NTP
# baseline (--no-nitp) and NITP, several seeds each, then docs/results.md and docs/results/*.png.
#
#   bash scripts/reproduce_report.sh                 # 600 iterations, seeds 1 2 3, 2 jobs at once
#   ITERS=300 SEEDS="1 2" JOBS=1 bash scripts/reproduce_report.sh
#   STAGE=train bash scripts/reproduce_report.sh     # only the runs; STAGE=report: only analysis
#
# Environment:
#   ITERS    training iterations per run (600)
#   SEEDS    seeds (1 2 3)
#   JOBS     runs trained at the same time, one CPU thread each (2)
#   RUNS     folder of the run folders (runs/report); a run whose summary.json exists is reused
#   DOCS     where the report goes (docs): DOCS/results.md and DOCS/results/
#   PYTHON   interpreter (default: .venv/bin/python, created by scripts/setup.sh)
#   STAGE    all | train | report (all)
#
# Measured on the development machine (2 CPU cores shared with other work): about 0.5 s per
# iteration per run with two runs at once: 17 minutes for 6 x 600 iterations, then about one
# minute for the comparison, the six frozen evaluations and the report.
set -euo pipefail
cd "$(dirname "$0")/.."

ITERS=${ITERS:-600}
SEEDS=${SEEDS:-"1 2 3"}
JOBS=${JOBS:-2}
RUNS=${RUNS:-runs/report}
DOCS=${DOCS:-docs}
STAGE=${STAGE:-all}
if [ -z "${PYTHON:-}" ]; then
    bash scripts/setup.sh
    PYTHON=.venv/bin/python
fi
# The runs share a few cores: one thread each is faster than oversubscribing them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A single-process run: never join a rendezvous left in the environment.
unset RANK WORLD_SIZE LOCAL_RANK MASTER_ADDR MASTER_PORT

mkdir -p "$RUNS" "$DOCS/results"
START=$(date +%s)

train_one() {  # train_one KIND SEED
    local kind=$1 seed=$2 dir="$RUNS/$1-seed$2"
    if [ -f "$dir/summary.json" ]; then
        echo "> $dir exists (summary.json): reused"
        return 0
    fi
    rm -rf "$dir"
    local flags=()
    [ "$kind" = ntp ] && flags+=(--no-nitp)
    local t0
    t0=$(date +%s)
    echo "> training $dir ($ITERS iterations)"
    "$PYTHON" pretrain_gpt_nitp.py --preset tiny-dense --train-iters "$ITERS" --seed "$seed" \
        --geometry-interval 10 --eval-interval 50 --log-interval 50 --run-dir "$dir" \
        "${flags[@]}" > "$RUNS/$kind-seed$seed.log" 2>&1 \
        || { echo "error: $dir failed, see $RUNS/$kind-seed$seed.log" >&2; return 1; }
    echo "> $dir done in $(( $(date +%s) - t0 )) s"
}

if [ "$STAGE" = all ] || [ "$STAGE" = train ]; then
    # Build the corpus and tokenizer once, before parallel runs race for the cache lock.
    "$PYTHON" -c "import sys; sys.path.insert(0, '.'); import megatron_nitp; \
from megatron_nitp.data.corpus import prepare_default_corpus; prepare_default_corpus()"
    pids=()
    for seed in $SEEDS; do
        for kind in ntp nitp; do
            while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
            train_one "$kind" "$seed" &
            pids+=($!)
        done
    done
    failed=0
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    [ "$failed" = 0 ] || { echo "error: some runs failed" >&2; exit 1; }
    echo "> training finished in $(( $(date +%s) - START )) s"
fi

if [ "$STAGE" = all ] || [ "$STAGE" = report ]; then
    ntp=() nitp=()
    for seed in $SEEDS; do ntp+=("$RUNS/ntp-seed$seed"); nitp+=("$RUNS/nitp-seed$seed"); done
    join() { local IFS=,; echo "$*"; }
    "$PYTHON" tools/compare_runs.py --label "NTP=$(join "${ntp[@]}")" \
        --label "NITP=$(join "${nitp[@]}")" --output "$DOCS/results/compare" \
        --json "$DOCS/results/compare.json" --title "tiny-dense, $ITERS iterations"
    pids=()
    for dir in "${ntp[@]}" "${nitp[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 1; done
        name=$(basename "$dir")
        "$PYTHON" tools/evaluate_representations.py --load "$dir/checkpoints" \
            --evaluations geometry,probe,cloze \
            --json "$DOCS/results/eval-$name.json" > "$RUNS/eval-$name.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid" || { echo "error: an evaluation failed, see $RUNS/eval-*.log" >&2; exit 1; }
    done
    "$PYTHON" tools/make_report.py --runs "$RUNS" --seeds $SEEDS --iters "$ITERS" \
        --jobs "$JOBS" --results "$DOCS/results" --output "$DOCS/results.md"
    echo "> report $DOCS/results.md written in $(( $(date +%s) - START )) s"
fi
