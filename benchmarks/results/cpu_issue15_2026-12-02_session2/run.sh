#!/bin/bash
# Before (5d1e66c, exported to $BEFORE) and after (this checkout), back to back, twice; then the
# NaN-guard diagnostic on this checkout. Run from the repository root with the venv's python.
set -euo pipefail
BEFORE=${BEFORE:-/tmp/before}
HERE=$(pwd)
SCRIPT=$HERE/benchmarks/results/cpu_issue15_2026-12-02_session2/alternating.py
PY=$HERE/.venv/bin/python
export OMP_NUM_THREADS=1
cases=("fpn 64 fwd 25" "fpn 512 fwd 9" "fpn 64 bwd 9" "fpn 512 bwd 7" "roi_spp 1,2,4 9" "roi_spp 1,2,3,6 9")
for round in 1 2; do
  for c in "${cases[@]}"; do
    for side in before after; do
      if [ $side = before ]; then root=$BEFORE; else root=$HERE; fi
      (cd "$root" && PYTHONPATH=$root:$root/benchmarks $PY "$SCRIPT" $c 2>/dev/null | sed "s/^/round $round $side: /")
    done
  done
done
for c in "fpn 64 fwd 25" "fpn 512 fwd 9"; do
  PYTHONPATH=$HERE:$HERE/benchmarks SPP_BENCH_NO_NAN_GUARD=1 $PY "$SCRIPT" $c 2>/dev/null | sed "s/^/after, NaN guard off: /"
done
