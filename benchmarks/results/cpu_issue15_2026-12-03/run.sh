#!/bin/bash
# Before (f8d64e2, exported to $BEFORE with `git archive`) and after (this checkout, compiled CPU
# kernel), back to back, twice. Run from the repository root with the venv's python.
# The cases and the timing loop are the first session's (../cpu_issue15_2026-12-02/alternating.py,
# run through ../cpu_issue15_2026-12-02_session2/alternating.py with no switch set).
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
