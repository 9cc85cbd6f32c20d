#!/usr/bin/env bash
# Sets up .venv and runs the default job: a tiny GPT with NITP on CPU (flags pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python pretrain_gpt_nitp.py "$@"
