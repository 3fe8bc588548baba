#!/usr/bin/env bash
# Run a command under another Triton version, e.g.
#   tools/with_triton.sh 3.6.0 .venv/bin/python -m pytest tests/test_kernels.py
# Installs triton==VERSION once (--no-deps) into .cache/triton-VERSION and puts it first on
# PYTHONPATH; everything else (torch, numpy, ...) comes from the venv. PIP overrides the installer.
set -euo pipefail
ver=${1:?usage: tools/with_triton.sh VERSION COMMAND...}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
dir=$root/.cache/triton-$ver
if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    "${PIP:-$root/.venv/bin/pip}" install --quiet --no-deps --target "$dir" "triton==$ver"
    touch "$dir/.complete"
fi
export PYTHONPATH=$dir${PYTHONPATH:+:$PYTHONPATH}
exec "$@"
